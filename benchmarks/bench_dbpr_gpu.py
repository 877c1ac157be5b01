"""GPU side-by-side of DBPR (fwd+bwd, fused step) and AMSC calibration.

    python benchmarks/bench_dbpr_gpu.py --results OUT.jsonl --md OUT.md [--summary OUT.md]
                                        [--json OUT.json] [--budget SECONDS] [--smoke] [--plan]

Runs under the one runner (``runner.py``): each section in its own worker process (a
kernel that breaks the CUDA context costs the rest of its section only), a time budget
shared by the sections (unused time carries forward), the rows measured so far kept when
the script is killed (SIGTERM).  Sections:

* ``copy``: device copy bandwidth of a 1 GiB float32 tensor (bytes read + written),
  the ceiling the fractions below are measured against.
* ``dbpr``: fwd+bwd (loss + table gradients) and step (fwd+bwd+update) of the
  contenders in ``FWD_BWD`` and ``STEP`` over B = 2,048 / 65,536 / 1,048,576 triplets,
  D = 64 / 256, Amazon Baby (19,445 x 7,050) and 100k x 1M tables, K = 1 (and one K = 5
  row), in priority order: the two target configurations come first.
* ``calib``: calibrate(backend="triton") vs "cuda" vs "torch" and calibrate_items (cached
  codes), d = 64, bits = 64; GB/s of input bytes.
* ``huge``: dbpr_step with a 10^7-row item table at B = 2^20, D = 64 and 256.

Every Triton kernel of guider_fast has a CUDA C++ twin (``backend="cuda"``, the extension
``guider_fast._C``): dbpr fwd+bwd (atomic backward), dbpr_step sorted SGD, sorted row-wise
Adagrad, sorted SGD on bfloat16 and atomic SGD, calibrate and calibrate_items.  Each twin
runs right after its Triton contender (so a budget cut keeps pairs), and the "CUDA C++ vs
Triton" section lists cuda ms / triton ms per pair against the target (the CUDA kernel at
least matches its Triton twin: ratio <= 1 + MATCH_TOL).  A twin the dispatcher cannot run
here (extension not built, a size limit) is reported as skipped with the dispatcher's reason.

Floors (bytes that must move per triplet): the step reads and
writes K+2 rows (+ K+2 float32 accumulators read and written for row-wise Adagrad);
fwd+bwd reads K+2 rows and writes K+2 gradient rows; both read K+2 int64 indices and
one float32 weight.  Duplicate rows are counted every time (an upper bound on what a
kernel must move; small tables can run above 100 % through L2).  Dense-gradient
contenders also zero-fill whole gradient tables (``dense_zero_bytes`` in the JSON, not
in the floor).  GB/s = floor bytes / median time; "% copy" = GB/s / the measured copy
bandwidth.  ratio = contender ms / base ms (the triton contender named in ``BASES``): above 1,
the base (guider_fast triton) is faster.  The naive and hand-derived contenders are
``baselines.naive_dbpr_loss`` and ``baselines.hand_derived_*``.

Times: ``triton.testing.do_bench`` medians (CUDA events, L2 flushed between runs) with
the 20th/80th percentiles; the first call (compilation included) is timed apart.  Every
first call is checked against a reference (``check``: max error relative to the
reference's largest value, see ``_fwd_bwd_error`` / ``_step_error``).  A contender that
fails, runs out of memory, or would not fit is reported with its reason.

``--smoke`` runs tiny sizes on CPU (TRITON_INTERPRET=1, torch.compile with the
aot_eager backend, the CUDA C++ contenders through their emulation build,
GUIDER_FAST_CUDA_SIM=1) to check the script itself.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys

import torch

import guider_fast as gf
import runner
from baselines import (compile_hand_derived, hand_derived_fwd_bwd, hand_derived_step, naive_dbpr_loss,
                       relative_error)
from guider_fast import _dispatch, bench
from runner import Env, cleanup, describe, first_call, free_bytes, timed

# ----------------------------------------------------------------------------- sizes

BABY = ("Baby 19445x7050", 19_445, 7_050)
BIG = ("100kx1M", 100_000, 1_000_000)
HUGE = ("100kx10M", 100_000, 10_000_000)
MI = 1 << 20

# (B, D, tables, K) in priority order: the two target configurations first.
DBPR_CONFIGS = [
    (65_536, 64, BABY, 1), (MI, 64, BIG, 1), (MI, 256, BIG, 1), (65_536, 64, BIG, 1),
    (MI, 64, BABY, 1), (65_536, 256, BABY, 1), (65_536, 256, BIG, 1), (MI, 256, BABY, 1),
    (2_048, 64, BABY, 1), (2_048, 64, BIG, 1), (2_048, 256, BABY, 1), (2_048, 256, BIG, 1),
    (65_536, 64, BABY, 5),
]
HUGE_CONFIGS = [(MI, 64, HUGE, 1), (MI, 256, HUGE, 1)]
CALIB_BATCHES = [2_048, 65_536, MI]
CALIB_ITEMS = [BABY, BIG]
CALIB_D, CALIB_BITS = 64, 64
COPY_ELEMS = 1 << 28  # 1 GiB of float32

SMOKE_TABLES = ("smoke 30x20", 30, 20)
SMOKE_DBPR = [(24, 8, SMOKE_TABLES, 1), (16, 16, SMOKE_TABLES, 3)]
SMOKE_HUGE = [(24, 8, ("smoke 30x1000", 30, 1_000), 1)]
SMOKE_CALIB = [16, 40]
SMOKE_CALIB_ITEMS = [SMOKE_TABLES]
SMOKE_COPY = 1 << 20

# Share of --budget per section (unused time carries to the next one).
SECTIONS = (("copy", 0.10), ("dbpr", 0.54), ("calib", 0.12), ("huge", 0.24))

LR_TIME = 1e-3    # timing runs: tables barely move over hundreds of steps
LR_CHECK = 0.05  # x B: the checked first step (mean reduction) moves rows far above float32 rounding
CHECK_CLONE_LIMIT = 3 << 30  # clone tables for the step check only below this size
MEM_HEADROOM = 0.85  # use at most this share of the free device memory
# The CUDA C++ target is "at least matches its Triton twin".  Two back-to-back do_bench
# medians of one kernel differ by a few percent on a shared card, so a ratio up to
# 1 + MATCH_TOL counts as a match (reported as such, apart from "faster").
MATCH_TOL = 0.03


# ----------------------------------------------------------------------------- problems

class Problem:
    def __init__(self, batch, dim, tables, k, device, dtype=torch.float32, seed=0):
        label, n_users, n_items = tables
        self.batch, self.dim, self.k, self.n_users, self.n_items = batch, dim, k, n_users, n_items
        self.label = f"B={batch:,} D={dim} K={k} {label}"
        gen = torch.Generator(device=device).manual_seed(seed)
        self.U = torch.randn(n_users, dim, device=device, generator=gen).mul_(0.1).to(dtype)
        self.I = torch.randn(n_items, dim, device=device, generator=gen).mul_(0.1).to(dtype)
        self.users = torch.randint(0, n_users, (batch,), device=device, generator=gen)
        self.pos = torch.randint(0, n_items, (batch,), device=device, generator=gen)
        self.neg = torch.randint(0, n_items, (batch, k), device=device, generator=gen)
        self.w = torch.rand(batch, device=device, generator=gen).add_(0.1)

    def table_bytes(self):
        return (self.U.numel() + self.I.numel()) * self.U.element_size()

    def gathered_bytes(self):
        return self.batch * (self.k + 2) * self.dim * 4

    def clone_tables(self):
        return self.U.clone(), self.I.clone()


def floor_bytes(p: Problem, mode: str, elem: int, accumulators: bool = False) -> int:
    """The per-batch floor: K+2 rows read and K+2 rows (or grad rows) written."""
    rows = p.k + 2
    per = 2 * rows * p.dim * elem + rows * 8 + 4
    if accumulators:
        per += rows * 8
    return p.batch * per


# ----------------------------------------------------------------------------- contenders

_COMPILED = {}


def compiled(fn):
    if fn not in _COMPILED:
        # dynamic=True: one graph for every B, D and table size (no recompiles across configs).
        _COMPILED[fn] = compile_hand_derived(fn, dynamic=True,
                                             backend="aot_eager" if Env.smoke else "inductor")
    return _COMPILED[fn]


def _leaves(p):
    return p.U.detach().requires_grad_(), p.I.detach().requires_grad_()


def fb_guider(backend, **kw):
    def run(p):
        U, I = _leaves(p)
        loss = gf.dbpr_loss(U, I, p.users, p.pos, p.neg, p.w, backend=backend, **kw)
        return (loss,) + torch.autograd.grad(loss, (U, I))
    return run


def fb_naive(sparse):
    def run(p):
        U, I = _leaves(p)
        loss = naive_dbpr_loss(U, I, p.users, p.pos, p.neg, p.w, sparse=sparse)
        return (loss,) + torch.autograd.grad(loss, (U, I))
    return run


def fb_compiled(p):
    with torch.no_grad():
        return compiled(hand_derived_fwd_bwd)(p.U, p.I, p.users, p.pos, p.neg, p.w)


# name -> (run(problem) -> (loss, grad_U, grad_I), gradient layout: dense tables or sparse)
FWD_BWD = {
    "guider_fast triton": (fb_guider("triton", deterministic=False), "dense"),
    # The CUDA C++ backward is the atomic scatter (dense gradients): the twin of the above.
    "guider_fast cuda": (fb_guider("cuda", deterministic=False), "dense"),
    "guider_fast triton deterministic": (fb_guider("triton", deterministic=True), "dense"),
    "guider_fast triton sparse_grad": (fb_guider("triton", sparse_grad=True), "sparse"),
    "guider_fast torch": (fb_guider("torch"), "dense"),
    "naive torch autograd": (fb_naive(False), "dense"),
    "torch.compile hand-derived": (fb_compiled, "dense"),
    "nn.Embedding(sparse=True) autograd": (fb_naive(True), "sparse"),
}


def st_guider(backend, optimizer="sgd", dtype=None, duplicates="sorted"):
    def build(p, U, I, lr):
        if dtype is not None:
            U, I = U.to(dtype), I.to(dtype)
        state = gf.RowwiseAdagradState(U, I) if optimizer == "rowwise_adagrad" else None

        def fn():
            return gf.dbpr_step(U, I, p.users, p.pos, p.neg, p.w, lr=lr, optimizer=optimizer,
                                state=state, duplicates=duplicates, backend=backend)
        return fn, (U, I)
    return build


def st_naive(sparse, optimizer):
    def build(p, U, I, lr):
        Ul, Il = U.detach().requires_grad_(), I.detach().requires_grad_()
        opt = optimizer([Ul, Il], lr=lr)

        def fn():
            opt.zero_grad(set_to_none=True)
            loss = naive_dbpr_loss(Ul, Il, p.users, p.pos, p.neg, p.w, sparse=sparse)
            loss.backward()
            opt.step()
            return loss
        return fn, (U, I)
    return build


def st_compiled(p, U, I, lr):
    lr_t = torch.tensor(lr, device=U.device)  # a tensor: no recompile for another lr
    step = compiled(hand_derived_step)

    def fn():
        with torch.no_grad():
            return step(U, I, p.users, p.pos, p.neg, p.w, lr_t)
    return fn, (U, I)


# name -> (build(problem, U, I, lr) -> (fn, tables), optimizer of the check reference,
#          table dtype, rows of float32 accumulators per triplet row, dense grads, dense
#          optimizer states (tables' worth))
STEP = {
    "dbpr_step triton sgd": (st_guider("triton"), "sgd", torch.float32, False, 0, 0),
    "dbpr_step cuda sgd": (st_guider("cuda"), "sgd", torch.float32, False, 0, 0),
    "dbpr_step triton rowwise_adagrad": (st_guider("triton", "rowwise_adagrad"), "rowwise_adagrad",
                                         torch.float32, True, 0, 0),
    "dbpr_step cuda rowwise_adagrad": (st_guider("cuda", "rowwise_adagrad"), "rowwise_adagrad",
                                       torch.float32, True, 0, 0),
    "dbpr_step triton sgd bf16": (st_guider("triton", dtype=torch.bfloat16), "sgd", torch.bfloat16,
                                  False, 0, 0),
    "dbpr_step cuda sgd bf16": (st_guider("cuda", dtype=torch.bfloat16), "sgd", torch.bfloat16,
                                False, 0, 0),
    # Hogwild: its check against the exact step shows the cross-block staleness.
    "dbpr_step triton sgd atomic": (st_guider("triton", duplicates="atomic"), "sgd", torch.float32,
                                    False, 0, 0),
    "dbpr_step cuda sgd atomic": (st_guider("cuda", duplicates="atomic"), "sgd", torch.float32,
                                  False, 0, 0),
    "dbpr_step torch sgd": (st_guider("torch"), "sgd", torch.float32, False, 0, 0),
    "naive torch autograd + SGD": (st_naive(False, torch.optim.SGD), "sgd", torch.float32, False, 1, 0),
    "torch.compile hand-derived step": (st_compiled, "sgd", torch.float32, False, 0, 0),
    "nn.Embedding(sparse) + SparseAdam": (st_naive(True, torch.optim.SparseAdam), None, torch.float32,
                                          False, 0, 2),
    "nn.Embedding(sparse) + SGD": (st_naive(True, torch.optim.SGD), "sgd", torch.float32, False, 0, 0),
}
HUGE_STEP = ("dbpr_step triton sgd", "dbpr_step cuda sgd", "dbpr_step triton sgd atomic",
             "dbpr_step cuda sgd atomic", "dbpr_step triton rowwise_adagrad", "dbpr_step cuda rowwise_adagrad",
             "dbpr_step triton sgd bf16", "dbpr_step cuda sgd bf16",
             "dbpr_step torch sgd", "torch.compile hand-derived step", "nn.Embedding(sparse) + SGD",
             "naive torch autograd + SGD")

# cuda contender -> its Triton twin (the pairs of the "CUDA C++ vs Triton" section).
CUDA_TWINS = {
    "guider_fast cuda": "guider_fast triton",
    **{name: name.replace(" cuda ", " triton ") for name in STEP if " cuda " in name},
    "calibrate cuda": "calibrate triton",
    "calibrate_items cuda": "calibrate_items triton",
}


def cuda_reason(op, dtype, problem=None):
    """None if backend="cuda" can run ``op`` here, else the dispatcher's reason (not built, a limit)."""
    return _dispatch.unavailable_reason(op, "cuda", Env.device, dtype, problem)


def _step_cuda_reason(name, p, dtype):
    if " cuda " not in name:
        return None
    return cuda_reason("dbpr_step", dtype, ("atomic" if name.endswith(" atomic") else "sorted", p.dim, 0.0))


# ----------------------------------------------------------------------------- checks

def _fwd_bwd_error(out, ref):
    """max over loss and both gradients of max|got - ref| / max|ref|."""
    errs = []
    for got, want in zip(out, ref):
        if got.is_sparse:
            got = got.to_dense()
        errs.append(relative_error(got, want))
    return max(errs)


def _touched(p):
    return p.users.unique(), torch.cat([p.pos, p.neg.reshape(-1)]).unique()


def _step_error(tables, ref_tables, start_tables, rows):
    """max|got - ref| / max|ref - start| over the touched rows: error relative to the update."""
    errs = []
    for got, want, start, idx in zip(tables, ref_tables, start_tables, rows):
        got, want, start = (t.index_select(0, idx).double() for t in (got, want, start))
        if not bool(torch.isfinite(got).all()):
            return float("inf")
        errs.append((got - want).abs().max().item() / ((want - start).abs().max().item() or 1.0))
    return max(errs)


# ----------------------------------------------------------------------------- worker

class Worker(runner.Worker):
    # ---- copy bandwidth
    def run_copy(self):
        base = dict(config=f"{COPY_ELEMS if not Env.smoke else SMOKE_COPY} float32", mode="copy",
                    contender="torch copy_")
        if self.todo(base, base["contender"]):
            return

        def body(row):
            n = SMOKE_COPY if Env.smoke else COPY_ELEMS
            src = torch.randn(n, device=Env.device)
            dst = torch.empty_like(src)
            row["bytes"] = 2 * n * 4
            first_call(lambda: dst.copy_(src))
            row.update(timed(lambda: dst.copy_(src)))
            row.pop("peak_mb", None)
            row["copy_gbps"] = row["bytes"] / row["ms"] / 1e6
        self.attempt(dict(base), body)

    # ---- DBPR matrix
    def run_dbpr(self, configs, step_names=None, fwd_bwd=True):
        for batch, dim, tables, k in configs:
            cfg = f"B={batch:,} D={dim} K={k} {tables[0]}"
            need = (tables[1] + tables[2]) * dim * 4 + batch * (k + 3) * 8
            names = ([("fwd+bwd", n) for n in FWD_BWD] if fwd_bwd else []) + \
                [("step", n) for n in (step_names or STEP)]
            pending = [(m, n) for m, n in names
                       if self.todo(dict(config=cfg, mode=m), n) != "done"]
            if not pending:
                continue
            if self.left() < 2 or need > MEM_HEADROOM * free_bytes():
                why = ("section time budget exhausted" if self.left() < 2 else
                       f"tables need {need / 2**30:.1f} GiB, more than is free")
                for mode, name in pending:
                    self.emit(dict(config=cfg, mode=mode, contender=name, skipped=why))
                continue
            try:
                p = Problem(batch, dim, tables, k, Env.device)
            except Exception as exc:
                for mode, name in pending:
                    self.emit(dict(config=cfg, mode=mode, contender=name,
                                   skipped=f"setup failed: {describe(exc)}"))
                cleanup()
                continue
            common = dict(config=cfg, batch=batch, dim=dim, k=k, n_users=tables[1], n_items=tables[2])
            if fwd_bwd:
                self._fwd_bwd(p, common)
            self._step(p, common, step_names or tuple(STEP))
            del p
            cleanup()

    def _fwd_bwd(self, p, common):
        ref = None
        base = dict(common, mode="fwd+bwd")
        for name, (run, kind) in FWD_BWD.items():
            why = self.todo(base, name)
            if why == "done":
                continue
            row = dict(base, contender=name, floor_bytes=floor_bytes(p, "fwd+bwd", 4),
                       dense_zero_bytes=p.table_bytes() if kind == "dense" else 0)
            if not why and name in CUDA_TWINS:
                why = cuda_reason("dbpr", p.U.dtype, ("dense",))
            if why:
                self.emit(dict(row, skipped=why))
                continue
            need = 4 * p.gathered_bytes() + (p.table_bytes() if kind == "dense" else 0)
            if ref is None:
                need += p.table_bytes()
            if need > MEM_HEADROOM * free_bytes():
                self.emit(dict(row, skipped=f"needs ~{need / 2**30:.1f} GiB, more than is free"))
                continue
            if ref is None:
                try:
                    ref = tuple(t.detach() for t in fb_guider("torch")(p))
                except Exception as exc:
                    ref = describe(exc)
                    cleanup()

            def body(row, run=run):
                out, row["first_s"] = first_call(lambda: run(p))
                row["check"] = _fwd_bwd_error(out, ref) if isinstance(ref, tuple) else None
                del out
                row.update(timed(lambda: run(p)))
            self.attempt(row, body)
        del ref
        cleanup()

    def _step(self, p, common, names):
        base = dict(common, mode="step")
        check = p.table_bytes() <= CHECK_CLONE_LIMIT
        refs = {}
        start = p.clone_tables() if check else None
        rows = _touched(p) if check else None
        for name in names:
            build, ref_opt, dtype, accs, dense_grads, dense_states = STEP[name]
            why = self.todo(base, name)
            if why == "done":
                continue
            elem = torch.tensor([], dtype=dtype).element_size()
            row = dict(base, contender=name, floor_bytes=floor_bytes(p, "step", elem, accs),
                       dense_zero_bytes=p.table_bytes() if dense_grads else 0)
            why = why or _step_cuda_reason(name, p, dtype)
            if why:
                self.emit(dict(row, skipped=why))
                continue
            need = (4 * p.gathered_bytes() + p.table_bytes() * (dense_grads + dense_states)
                    + (3 * p.table_bytes() if check else 0))
            if need > MEM_HEADROOM * free_bytes():
                self.emit(dict(row, skipped=f"needs ~{need / 2**30:.1f} GiB, more than is free"))
                continue
            # The check compares one step from the tables as they were before any timing
            # (timing runs move p.U / p.I) with dbpr_step(backend="torch") of that optimizer
            # and dtype from the same start.
            ref_key = (ref_opt, dtype)
            if check and ref_opt is not None and ref_key not in refs:
                try:
                    ref_fn, ref_tables = st_guider("torch", ref_opt, dtype)(
                        p, start[0].clone(), start[1].clone(), LR_CHECK * p.batch)
                    ref_fn()
                    refs[ref_key] = ref_tables
                except Exception as exc:
                    refs[ref_key] = describe(exc)
                    cleanup()

            def body(row, build=build, ref_key=ref_key):
                if check:
                    fn, tables = build(p, start[0].clone(), start[1].clone(), LR_CHECK * p.batch)
                    _, row["first_s"] = first_call(fn)
                    ref = refs.get(ref_key)
                    row["check"] = (_step_error(tables, ref, start, rows) if isinstance(ref, tuple)
                                    else None)
                    del fn, tables
                    cleanup()
                    fn, _ = build(p, p.U, p.I, LR_TIME)
                else:
                    fn, _ = build(p, p.U, p.I, LR_TIME)
                    _, row["first_s"] = first_call(fn)
                row.update(timed(fn))
            self.attempt(row, body)
            cleanup()
        del refs, start
        cleanup()

    # ---- calibration
    def run_calib(self):
        batches = SMOKE_CALIB if Env.smoke else CALIB_BATCHES
        d, bits = CALIB_D, CALIB_BITS
        if Env.smoke:
            d = 8
        for batch in batches:
            gen = torch.Generator(device=Env.device).manual_seed(batch)
            t = torch.randn(batch, d, device=Env.device, generator=gen)
            v = t + 0.5 * torch.randn(batch, d, device=Env.device, generator=gen)
            codes = [torch.randn(batch, bits, device=Env.device, generator=gen) for _ in range(3)]
            in_bytes = (2 * d + 3 * bits) * 4 * batch
            cfg = f"B={batch:,} d={d} bits={bits}"
            for distance in ("geomloss", "euclidean"):
                ref = None
                for backend in ("triton", "cuda", "torch"):
                    row = dict(config=cfg, mode=f"calibrate {distance}", contender=f"calibrate {backend}",
                               batch=batch, in_bytes=in_bytes)
                    why = self.todo(row, row["contender"])
                    if why == "done":
                        continue
                    if not why and backend == "cuda":
                        why = cuda_reason("calibrate", t.dtype, (t.dim(), codes[0].dtype))
                    if why:
                        self.emit(dict(row, skipped=why))
                        continue
                    fn = (lambda backend=backend, distance=distance:
                          gf.calibrate(t, v, *codes, distance=distance, backend=backend))
                    if ref is None:
                        try:
                            ref = gf.calibrate(t, v, *codes, distance=distance, backend="torch")
                        except Exception as exc:
                            ref = describe(exc)

                    self.attempt(row, _calibration_body(fn, ref))
            del t, v, codes
            cleanup()
        self._calib_items(batches, d, bits)

    def _calib_items(self, batches, d, bits):
        for tables in (SMOKE_CALIB_ITEMS if Env.smoke else CALIB_ITEMS):
            label, _, n_items = tables
            gen = torch.Generator(device=Env.device).manual_seed(n_items)
            t_all = torch.randn(n_items, d, device=Env.device, generator=gen)
            v_all = t_all + 0.5 * torch.randn(n_items, d, device=Env.device, generator=gen)
            t_code, v_code = (torch.randn(n_items, bits, device=Env.device, generator=gen)
                              for _ in range(2))
            try:
                cache = gf.precompute_item_calibration(t_all, v_all, t_code, v_code)
                row_bytes = _cache_row_bytes(cache, n_items)
            except Exception as exc:
                cache, row_bytes = describe(exc), 0
            for batch in batches:
                cfg = f"B={batch:,} bits={bits} items={label}"
                items = torch.randint(0, n_items, (batch,), device=Env.device, generator=gen)
                u_code = torch.randn(batch, bits, device=Env.device, generator=gen)
                ref = None
                for backend in ("triton", "cuda", "torch"):
                    row = dict(config=cfg, mode="calibrate_items", contender=f"calibrate_items {backend}",
                               batch=batch, in_bytes=batch * (bits * 4 + 8 + row_bytes))
                    why = self.todo(row, row["contender"])
                    if why == "done":
                        continue
                    if not why and backend == "cuda":
                        why = cuda_reason("calibrate_items", u_code.dtype)
                    if isinstance(cache, str):
                        why = why or f"precompute_item_calibration failed: {cache}"
                    if why:
                        self.emit(dict(row, skipped=why))
                        continue
                    fn = lambda backend=backend: gf.calibrate_items(cache, u_code, items, backend=backend)
                    if ref is None:
                        try:
                            # Independent reference: calibrate on the gathered rows (torch).
                            ref = gf.calibrate(t_all[items], v_all[items], u_code, t_code[items],
                                               v_code[items], backend="torch")
                        except Exception as exc:
                            ref = describe(exc)

                    self.attempt(row, _calibration_body(fn, ref))
                del items, u_code
            del cache, t_all, v_all, t_code, v_code
            cleanup()


def _calibration_body(fn, ref):
    """A measurement body: first call (checked against ``ref``, a Calibration or an error text), then timing."""
    def body(row):
        out, row["first_s"] = first_call(fn)
        if not isinstance(ref, str):
            row["check"] = max(relative_error(out.weights, ref.weights),
                               relative_error(out.distance, ref.distance))
            row["clean_mismatches"] = int((out.clean != ref.clean).sum())
        row.update(timed(fn))
    return body


def _cache_row_bytes(cache, n_items):
    """Bytes per item held by an ItemCalibration (every tensor field with n_items rows)."""
    fields = vars(cache).values() if hasattr(cache, "__dict__") else [
        getattr(cache, f) for f in getattr(cache, "__slots__", ())]
    total = 0
    stack = list(fields)
    while stack:
        value = stack.pop()
        if isinstance(value, (tuple, list)):
            stack.extend(value)
        elif isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n_items:
            total += value[0].numel() * value.element_size()
    return total


def worker_main(args):
    gf.set_checks(False)  # production setting: no value-check syncs
    worker = Worker(args.worker, args.rows, args.deadline, args.exclude)
    if args.worker == "copy":
        worker.run_copy()
    elif args.worker == "dbpr":
        worker.run_dbpr(SMOKE_DBPR if Env.smoke else DBPR_CONFIGS)
    elif args.worker == "calib":
        worker.run_calib()
    elif args.worker == "huge":
        worker.run_dbpr(SMOKE_HUGE if Env.smoke else HUGE_CONFIGS, step_names=HUGE_STEP, fwd_bwd=False)


# ----------------------------------------------------------------------------- parent

def derive(rows):
    """Add triplets/s, GB/s and % of copy bandwidth; returns the copy bandwidth (GB/s) or None."""
    copy = [r["copy_gbps"] for r in rows if "copy_gbps" in r]
    copy_gbps = copy[0] if copy else None
    for r in rows:
        if "ms" not in r or r.get("mode") == "copy":
            continue
        moved = r.get("floor_bytes") or r.get("in_bytes")
        if "batch" in r:
            r["triplets_per_s"] = r["batch"] / r["ms"] * 1e3
        if moved:
            r["gbps"] = moved / r["ms"] / 1e6
            if copy_gbps:
                r["copy_fraction"] = r["gbps"] / copy_gbps
    return copy_gbps


# The base of each group (ratio = ms / its ms); no ratio where it did not run.
BASES = ("guider_fast triton", "dbpr_step triton sgd", "calibrate triton", "calibrate_items triton")
OPS = {"fwd+bwd": "dbpr_loss fwd+bwd", "step": "dbpr_step"}
LONG_KEYS = ("config", "mode", "contender", "ms", "min_ms", "skipped", "error", "section")


def long_row(r, device):
    """A worker row -> the results layout (times in seconds; the rest under extra)."""
    row = dict(op=OPS.get(r.get("mode"), r.get("mode")), contender=r.get("contender"), shape=r.get("config"),
               dtype="bfloat16" if "bf16" in str(r.get("contender")) else "float32", device=device,
               median=r["ms"] / 1e3 if "ms" in r else None,
               min=r["min_ms"] / 1e3 if "min_ms" in r else None,
               group=f"{r.get('config')} | {r.get('mode')}", mode=r.get("mode"), timer="device" if Env.device.type == "cuda" else "host",
               baseline=r.get("contender") in BASES, section=r.get("section"))
    for key in ("skipped", "error"):
        if r.get(key):
            row[key] = r[key]
    row["extra"] = {k: v for k, v in r.items() if k not in LONG_KEYS}
    return row


def _find(rows, mode, contender, pred):
    return [r for r in rows if r.get("mode") == mode and r.get("contender") == contender and pred(r)]


def targets(rows):
    lines = []
    for r in _find(rows, "fwd+bwd", "naive torch autograd",
                   lambda r: r.get("batch") == 65_536 and r.get("dim") == 64 and r.get("k") == 1):
        tri = _find(rows, "fwd+bwd", "guider_fast triton", lambda x: x["config"] == r["config"])
        if "ms" in r and tri and "ms" in tri[0]:
            speedup = r["ms"] / tri[0]["ms"]
            lines.append(f"- fwd+bwd >= 5x naive torch, {r['config']}: **{speedup:.2f}x** "
                         f"({'PASS' if speedup >= 5 else 'FAIL'}; triton {tri[0]['ms']:.3f} ms, "
                         f"naive {r['ms']:.3f} ms)")
        else:
            lines.append(f"- fwd+bwd >= 5x naive torch, {r['config']}: not measured "
                         f"({(tri[0] if tri else {}).get('error') or r.get('error') or r.get('skipped')})")
    step_rows = [r for name in ("dbpr_step triton sgd", "dbpr_step triton sgd atomic", "dbpr_step cuda sgd",
                                "dbpr_step cuda sgd atomic")
                 for r in _find(rows, "step", name, lambda r: r.get("batch", 0) >= 1_000_000)]
    for r in step_rows:
        if "copy_fraction" in r:
            frac = r["copy_fraction"]
            lines.append(f"- {r['contender']} >= 60% of copy bandwidth, {r['config']}: "
                         f"**{100 * frac:.0f}%** "
                         f"({'PASS' if frac >= 0.6 else 'FAIL'}; {r['gbps']:.0f} GB/s, {r['ms']:.3f} ms)")
        else:
            lines.append(f"- {r['contender']} >= 60% of copy bandwidth, {r['config']}: not measured "
                         f"({r.get('error') or r.get('skipped')})")
    return lines


def cuda_vs_triton(rows):
    """The CUDA C++ twins against their Triton contenders: a table of cuda ms / triton ms per
    measured pair, a verdict line per pair kind, and why the pairs that did not run did not."""
    pairs, missing = [], {}
    for r in rows:
        twin_name = CUDA_TWINS.get(r.get("contender"))
        if twin_name is None:
            continue
        twin = [x for x in rows if x.get("contender") == twin_name and x.get("config") == r.get("config")
                and x.get("mode") == r.get("mode")]
        if "ms" in r and twin and "ms" in twin[0]:
            pairs.append((r, twin[0], r["ms"] / twin[0]["ms"]))
            continue
        if "ms" not in r:
            why = r.get("skipped") or r.get("error") or "not timed"
        else:
            other = twin[0] if twin else {}
            why = "its twin: " + (other.get("skipped") or other.get("error") or f"{twin_name} did not run")
        missing.setdefault((r["contender"], why[:200]), []).append(r["config"])
    lines = [f"Target: each CUDA C++ kernel at least matches its Triton twin (cuda/triton <= "
             f"{1 + MATCH_TOL:g}: below 1 faster, up to {1 + MATCH_TOL:g} a match within timing noise).", ""]
    if pairs:
        lines += ["| cuda contender | config | mode | cuda ms | triton ms | cuda/triton | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for r, t, ratio in pairs:
            lines.append(f"| {r['contender']} | {r['config']} | {r['mode']} | {r['ms']:.4f} | {t['ms']:.4f} | "
                         f"{ratio:.3f} | {_verdict(ratio)} |")
        lines.append("")
        by_name = {}
        for r, _, ratio in pairs:
            by_name.setdefault(r["contender"], []).append(ratio)
        for name, ratios in by_name.items():
            passed = ("no verdict (smoke)" if Env.smoke else
                      f"{sum(x <= 1 + MATCH_TOL for x in ratios)}/{len(ratios)} pairs PASS")
            lines.append(f"- {name} vs {CUDA_TWINS[name]}: {passed}, geometric-mean "
                         f"ratio **{math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}** "
                         f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    else:
        lines.append("- no CUDA C++ / Triton pair was measured")
    for (name, why), configs in missing.items():
        lines.append(f"- {name}: not measured in {len(configs)} configuration(s) ({why})")
    return lines


def _verdict(ratio):
    if Env.smoke:  # emulated CUDA C++ vs interpreted Triton on a CPU: no verdict to draw
        return "n/a (smoke)"
    return "PASS (faster)" if ratio < 1 else "PASS (match)" if ratio <= 1 + MATCH_TOL else "FAIL (slower)"


def header(copy_gbps, env):
    copy = f"{copy_gbps:.0f} GB/s" if copy_gbps else "not measured"
    return [f"{env}", "",
            f"Measured copy bandwidth (1 GiB float32 copy_, read + written): **{copy}**. "
            "GB/s = floor bytes / median; ratio = ms / the guider_fast triton (sgd) ms of the same config and "
            "mode; check = max error relative to the reference (fwd+bwd: guider_fast torch, step: "
            "dbpr_step torch of the same optimizer and table dtype, one step at lr 0.05 B on cloned tables, "
            "error / largest update (bf16: includes one bf16 rounding of the rows); "
            "calibration: torch on the same or gathered rows)."]


def environment():
    if Env.smoke:
        env = (f"SMOKE (CPU, TRITON_INTERPRET=1, CUDA C++ through its emulation build, tiny sizes): numbers are "
               f"meaningless; torch {torch.__version__}")
    else:
        props = torch.cuda.get_device_properties(0)
        env = (f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
               f"torch {torch.__version__}, python {platform.python_version()}, float32 unless noted")
    try:
        import triton
        env += f", triton {triton.__version__}"
    except ImportError:
        pass
    return env


def plan():
    lines = [f"sections (share of --budget): {', '.join(f'{n} {s:.0%}' for n, s in SECTIONS)}",
             f"dbpr configs (B, D, tables, K), priority order: "
             f"{[(b, d, t[0], k) for b, d, t, k in DBPR_CONFIGS]}",
             f"fwd+bwd contenders: {list(FWD_BWD)}", f"step contenders: {list(STEP)}",
             f"CUDA C++ twins (cuda -> triton): {CUDA_TWINS}",
             f"huge: {[(b, d, t[0], k) for b, d, t, k in HUGE_CONFIGS]} x {list(HUGE_STEP)}",
             f"calib batches: {CALIB_BATCHES}, items: {[t[0] for t in CALIB_ITEMS]}"]
    return "\n".join(lines)


def finish(args):
    def done(rows, log):
        import report

        copy_gbps = derive(rows)
        env = environment()
        device = runner.device_name()
        long = runner.stamp([long_row(r, device) for r in rows if r.get("mode") != "copy" or "ms" in r])
        goal = targets(rows)
        twins = cuda_vs_triton(rows)
        tables = report.render(long, title="DBPR and calibration on the GPU", summary=False)
        md = "\n".join(["# DBPR and calibration on the GPU", ""] + header(copy_gbps, env) + [
            "", "## Targets", ""] + (goal or ["- not measured"]) + ["", "## CUDA C++ vs Triton", ""] + twins
            + ["", "## All rows", "", tables, "", f"Sections: {log}."])
        key = [r for r in long if str(r.get("shape", "")).startswith("B=65,536 D=64 K=1 Baby")
               or (r.get("mode") == "step" and r.get("contender") == "dbpr_step triton sgd")]
        summary = "\n".join(["# DBPR summary"] + header(copy_gbps, env) + [""] + (goal or ["- not measured"])
                             + ["", "## CUDA C++ vs Triton", ""] + twins
                             + ["", report.render(key, title="Key rows", summary=False) if key else ""])
        runner.write_outputs(args, __file__, long, env, log, md, extra=dict(copy_gbps=copy_gbps))
        if args.summary:
            with open(args.summary, "w") as sink:
                sink.write(summary + "\n")
        print(summary)
    return done


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_arguments(parser, default_budget=135.0)
    parser.add_argument("--summary", help="write the targets and the key configuration here too")
    args = parser.parse_args()
    runner.setup(args)
    if args.plan:
        print(plan())
        return 0
    if Env.smoke and not args.worker:
        runner.smoke_cuda_emulation()
    if not args.worker and not Env.smoke and not torch.cuda.is_available():
        print("bench_dbpr_gpu.py: no CUDA device here; nothing measured (--smoke runs tiny sizes on CPU, "
              "--plan prints the matrix)", file=sys.stderr)
        return 2
    if Env.smoke and args.budget == 135.0:
        args.budget = 600.0
    runner.main(args, __file__, SECTIONS, worker_main, finish(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
