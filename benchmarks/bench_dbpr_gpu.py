"""GPU side-by-side of DBPR (fwd+bwd, fused step) and AMSC calibration: issue #4's matrix.

    python benchmarks/bench_dbpr_gpu.py --json OUT.json --md OUT.md [--summary OUT.md]
                                        [--budget SECONDS] [--smoke]

Sections, each run in its own worker process (a kernel that breaks the CUDA context
costs the rest of its section only: the parent restarts the section without the
contender that broke it), each with a time budget (unused time carries forward):

* ``copy``: device copy bandwidth of a 1 GiB float32 tensor (bytes read + written),
  the ceiling the fractions below are measured against.
* ``dbpr``: fwd+bwd (loss + table gradients) and step (fwd+bwd+update) of the
  contenders in ``FWD_BWD`` and ``STEP`` over B = 2,048 / 65,536 / 1,048,576 triplets,
  D = 64 / 256, Amazon Baby (19,445 x 7,050) and 100k x 1M tables, K = 1 (and one K = 5
  row), in priority order: the two target configurations come first.
* ``calib``: calibrate(backend="triton") vs "torch" and calibrate_items (cached codes),
  d = 64, bits = 64; GB/s of input bytes.
* ``huge``: dbpr_step with a 10^7-row item table at B = 2^20, D = 64 and 256.

Floors (bytes that must move per triplet, as issue #4 defines them): the step reads and
writes K+2 rows (+ K+2 float32 accumulators read and written for row-wise Adagrad);
fwd+bwd reads K+2 rows and writes K+2 gradient rows; both read K+2 int64 indices and
one float32 weight.  Duplicate rows are counted every time (an upper bound on what a
kernel must move; small tables can run above 100 % through L2).  Dense-gradient
contenders also zero-fill whole gradient tables (``dense_zero_bytes`` in the JSON, not
in the floor).  GB/s = floor bytes / median time; "% copy" = GB/s / the measured copy
bandwidth.  ratio = contender ms / base ms (the triton contender named in ``BASES``): above 1,
the base (guider_fast triton) is faster.

Times: ``triton.testing.do_bench`` medians (CUDA events, L2 flushed between runs) with
the 20th/80th percentiles; the first call (compilation included) is timed apart.  Every
first call is checked against a reference (``check``: max error relative to the
reference's largest value, see ``_fwd_bwd_error`` / ``_step_error``).  A contender that
fails, runs out of memory, or would not fit is reported with its reason.

``--smoke`` runs tiny sizes on CPU (TRITON_INTERPRET=1, torch.compile with the
aot_eager backend) to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import guider_fast as gf

# ----------------------------------------------------------------------------- sizes

BABY = ("Baby 19445x7050", 19_445, 7_050)
BIG = ("100kx1M", 100_000, 1_000_000)
HUGE = ("100kx10M", 100_000, 10_000_000)
MI = 1 << 20

# (B, D, tables, K) in priority order: the issue's two targets first.
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


class Env:
    smoke = False
    device = torch.device("cpu")


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
    """Issue #4's per-batch floor: K+2 rows read and K+2 rows (or grad rows) written."""
    rows = p.k + 2
    per = 2 * rows * p.dim * elem + rows * 8 + 4
    if accumulators:
        per += rows * 8
    return p.batch * per


# ----------------------------------------------------------------------------- contenders

def naive_loss(U, I, users, pos, neg, w, sparse=False):
    """Plain torch: gather, mul, sum, logsigmoid, weights, mean (autograd does the rest)."""
    if sparse:
        u, p, n = (F.embedding(users, U, sparse=True), F.embedding(pos, I, sparse=True),
                   F.embedding(neg, I, sparse=True))
    else:
        u, p, n = U[users], I[pos], I[neg]
    x = (u * p).sum(-1, keepdim=True) - (u.unsqueeze(1) * n).sum(-1)
    return -(w * F.logsigmoid(x).mean(1)).mean()


def _hand_grads(U, I, users, pos, neg, w):
    """Hand-derived DBPR forward and per-occurrence gradients (mean reduction)."""
    batch, k = neg.shape
    u, p, n = U[users], I[pos], I[neg]
    x = (u * p).sum(-1, keepdim=True) - (u.unsqueeze(1) * n).sum(-1)
    loss = -(w * F.logsigmoid(x).mean(1)).mean()
    s = torch.sigmoid(-x) * (w / (batch * k)).unsqueeze(1)      # -dL/dx
    s_total = s.sum(1, keepdim=True)
    d_u = (s.unsqueeze(2) * n).sum(1) - s_total * p
    d_p = -s_total * u
    d_n = s.unsqueeze(2) * u.unsqueeze(1)
    return loss, d_u, d_p, d_n


def hand_fwd_bwd(U, I, users, pos, neg, w):
    loss, d_u, d_p, d_n = _hand_grads(U, I, users, pos, neg, w)
    g_u = torch.zeros_like(U).index_add_(0, users, d_u)
    g_i = torch.zeros_like(I).index_add_(0, pos, d_p).index_add_(0, neg.reshape(-1),
                                                                   d_n.reshape(-1, U.shape[1]))
    return loss, g_u, g_i


def hand_step(U, I, users, pos, neg, w, lr):
    """SGD in place: index_add_ sums duplicates exactly like dense grad + SGD."""
    loss, d_u, d_p, d_n = _hand_grads(U, I, users, pos, neg, w)
    U.index_add_(0, users, d_u * -lr)
    I.index_add_(0, pos, d_p * -lr)
    I.index_add_(0, neg.reshape(-1), (d_n * -lr).reshape(-1, U.shape[1]))
    return loss


_COMPILED = {}


def compiled(fn):
    if fn not in _COMPILED:
        # dynamic=True: one graph for every B, D and table size (no recompiles across configs).
        backend = "aot_eager" if Env.smoke else "inductor"
        _COMPILED[fn] = torch.compile(fn, dynamic=True, backend=backend)
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
        loss = naive_loss(U, I, p.users, p.pos, p.neg, p.w, sparse=sparse)
        return (loss,) + torch.autograd.grad(loss, (U, I))
    return run


def fb_compiled(p):
    with torch.no_grad():
        return compiled(hand_fwd_bwd)(p.U, p.I, p.users, p.pos, p.neg, p.w)


# name -> (run(problem) -> (loss, grad_U, grad_I), gradient layout: dense tables or sparse)
FWD_BWD = {
    "guider_fast triton": (fb_guider("triton", deterministic=False), "dense"),
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
            loss = naive_loss(Ul, Il, p.users, p.pos, p.neg, p.w, sparse=sparse)
            loss.backward()
            opt.step()
            return loss
        return fn, (U, I)
    return build


def st_compiled(p, U, I, lr):
    lr_t = torch.tensor(lr, device=U.device)  # a tensor: no recompile for another lr
    step = compiled(hand_step)

    def fn():
        with torch.no_grad():
            return step(U, I, p.users, p.pos, p.neg, p.w, lr_t)
    return fn, (U, I)


# name -> (build(problem, U, I, lr) -> (fn, tables), optimizer of the check reference,
#          table dtype, rows of float32 accumulators per triplet row, dense grads, dense
#          optimizer states (tables' worth))
STEP = {
    "dbpr_step triton sgd": (st_guider("triton"), "sgd", torch.float32, False, 0, 0),
    "dbpr_step triton rowwise_adagrad": (st_guider("triton", "rowwise_adagrad"), "rowwise_adagrad",
                                         torch.float32, True, 0, 0),
    "dbpr_step triton sgd bf16": (st_guider("triton", dtype=torch.bfloat16), "sgd", torch.bfloat16,
                                  False, 0, 0),
    # Hogwild: its check against the exact step shows the cross-block staleness.
    "dbpr_step triton sgd atomic": (st_guider("triton", duplicates="atomic"), "sgd", torch.float32,
                                    False, 0, 0),
    "dbpr_step torch sgd": (st_guider("torch"), "sgd", torch.float32, False, 0, 0),
    "naive torch autograd + SGD": (st_naive(False, torch.optim.SGD), "sgd", torch.float32, False, 1, 0),
    "torch.compile hand-derived step": (st_compiled, "sgd", torch.float32, False, 0, 0),
    "nn.Embedding(sparse) + SparseAdam": (st_naive(True, torch.optim.SparseAdam), None, torch.float32,
                                          False, 0, 2),
    "nn.Embedding(sparse) + SGD": (st_naive(True, torch.optim.SGD), "sgd", torch.float32, False, 0, 0),
}
HUGE_STEP = ("dbpr_step triton sgd", "dbpr_step triton sgd atomic", "dbpr_step triton rowwise_adagrad",
             "dbpr_step triton sgd bf16",
             "dbpr_step torch sgd", "torch.compile hand-derived step", "nn.Embedding(sparse) + SGD",
             "naive torch autograd + SGD")


# ----------------------------------------------------------------------------- timing

def sync():
    if Env.device.type == "cuda":
        torch.cuda.synchronize()


def first_call(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def timed(fn):
    """(p20, p50, p80) ms and peak MB above the memory in use before."""
    if Env.device.type != "cuda":
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        return times[0], times[1], times[2], float("nan")
    import triton.testing

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    q = triton.testing.do_bench(fn, warmup=5, rep=30, quantiles=[0.2, 0.5, 0.8])
    return q[0], q[1], q[2], (torch.cuda.max_memory_allocated() - base) / 2**20


def free_bytes():
    if Env.device.type != "cuda":
        return float("inf")
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def cleanup():
    gc.collect()
    if Env.device.type == "cuda":
        torch.cuda.empty_cache()


def context_broken(exc) -> bool:
    """A sticky CUDA error (illegal address, launch failure) poisons every later launch."""
    if Env.device.type != "cuda":
        return False
    text = str(exc)
    if "illegal" in text or "unspecified launch failure" in text or "misaligned" in text:
        return True
    try:
        torch.cuda.synchronize()
        torch.empty(1, device="cuda").add_(1)
        torch.cuda.synchronize()
        return False
    except Exception:
        return True


def describe(exc) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


# ----------------------------------------------------------------------------- checks

def _rel(got, want):
    got, want = got.double(), want.double()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    scale = want.abs().max().item() or 1.0
    return (got - want).abs().max().item() / scale


def _fwd_bwd_error(out, ref):
    """max over loss and both gradients of max|got - ref| / max|ref|."""
    errs = []
    for got, want in zip(out, ref):
        if got.is_sparse:
            got = got.to_dense()
        errs.append(_rel(got, want))
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

class Worker:
    def __init__(self, section, rows_path, deadline, exclude):
        self.section, self.rows_path, self.deadline = section, rows_path, deadline
        self.exclude = set(exclude)
        self.done = set()
        if os.path.exists(rows_path):
            with open(rows_path) as src:
                for line in src:
                    row = json.loads(line)
                    self.done.add((row["config"], row["mode"], row["contender"]))

    def left(self):
        return self.deadline - time.time()

    def emit(self, row):
        row["section"] = self.section
        with open(self.rows_path, "a") as sink:
            sink.write(json.dumps(row, default=str) + "\n")
        brief = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                 if k in ("config", "mode", "contender", "ms", "check", "first_s", "skipped", "error")}
        print(f"[{self.section} {time.strftime('%H:%M:%S')}] {brief}", flush=True)

    def todo(self, base, name):
        """None to run, else a reason to skip (already emitted rows are silently skipped)."""
        key = (base["config"], base["mode"], name)
        if key in self.done:
            return "done"
        if name in self.exclude:
            return "excluded: broke the CUDA context in an earlier run of this section"
        if self.left() < (0.3 if Env.smoke else 1.5):
            return "section time budget exhausted"
        return None

    def attempt(self, row, body):
        """Run body(row) (fills row); errors go into the row; exit 3 on a broken context."""
        try:
            body(row)
        except Exception as exc:  # a contender that fails is reported, never fatal
            row["error"] = describe(exc)
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
            broken = context_broken(exc)
            row.pop("_keep", None)
            cleanup()
            if broken:
                row["broke_context"] = True
                self.emit(row)
                sys.exit(3)
        self.emit(row)

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
            row["p20"], row["ms"], row["p80"], _ = timed(lambda: dst.copy_(src))
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
                row["p20"], row["ms"], row["p80"], row["peak_mb"] = timed(lambda: run(p))
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
                row["p20"], row["ms"], row["p80"], row["peak_mb"] = timed(fn)
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
                for backend in ("triton", "torch"):
                    row = dict(config=cfg, mode=f"calibrate {distance}", contender=f"calibrate {backend}",
                               batch=batch, in_bytes=in_bytes)
                    why = self.todo(row, row["contender"])
                    if why == "done":
                        continue
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
                for backend in ("triton", "torch"):
                    row = dict(config=cfg, mode="calibrate_items", contender=f"calibrate_items {backend}",
                               batch=batch, in_bytes=batch * (bits * 4 + 8 + row_bytes))
                    why = self.todo(row, row["contender"])
                    if why == "done":
                        continue
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
            row["check"] = max(_rel(out.weights, ref.weights), _rel(out.distance, ref.distance))
            row["clean_mismatches"] = int((out.clean != ref.clean).sum())
        row["p20"], row["ms"], row["p80"], row["peak_mb"] = timed(fn)
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
    Env.device = torch.device("cpu" if Env.smoke else "cuda")
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

class Stop(Exception):
    pass


def _on_sigterm(signum, frame):
    raise Stop()


def run_sections(args, rows_path):
    start = time.time()
    carry = 0.0
    log = []
    for section, share in SECTIONS:
        if args.sections and section not in args.sections:
            continue
        section_start = time.time()
        deadline = section_start + share * args.budget + carry
        deadline = min(deadline, start + args.budget)
        exclude = []
        for attempt in range(3):
            left = deadline - time.time()
            if left < 1:
                break
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", section, "--rows", rows_path,
                   "--deadline", str(deadline)] + (["--smoke"] if Env.smoke else [])
            for name in exclude:
                cmd += ["--exclude", name]
            proc = subprocess.Popen(cmd)
            try:
                rc = proc.wait(timeout=left + 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = "killed at the section budget"
            except Stop:  # SIGTERM (device_check's timeout): keep what was measured
                proc.kill()
                proc.wait()
                log.append(dict(section=section, attempt=attempt, rc="stopped by SIGTERM"))
                return log
            log.append(dict(section=section, attempt=attempt, rc=rc))
            if rc != 3:
                break
            broke = [r["contender"] for r in _read_rows(rows_path)
                     if r.get("section") == section and r.get("broke_context")]
            exclude = sorted(set(broke))
        carry = max(0.0, deadline - time.time())
    return log


def _read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as src:
        return [json.loads(line) for line in src if line.strip()]


def derive(rows):
    """Add triplets/s, GB/s, % of copy bandwidth and ratios to the base contender."""
    copy = [r["copy_gbps"] for r in rows if "copy_gbps" in r]
    copy_gbps = copy[0] if copy else None
    base = {}
    for r in rows:
        if "ms" in r and r.get("contender") in BASES:
            base[(r["section"], r["config"], r["mode"])] = r["ms"]
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
        b = base.get((r["section"], r["config"], r["mode"]))
        if b:
            r["ratio"] = r["ms"] / b
    return copy_gbps


# ratio = ms / the ms of this contender of the same section, config and mode (no ratio
# where it did not run).
BASES = ("guider_fast triton", "dbpr_step triton sgd", "calibrate triton", "calibrate_items triton")


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
    step_rows = [r for name in ("dbpr_step triton sgd", "dbpr_step triton sgd atomic")
                 for r in _find(rows, "step", name, lambda r: r.get("batch", 0) >= 1_000_000)]
    for r in step_rows:
        if "copy_fraction" in r:
            frac = r["copy_fraction"]
            lines.append(f"- {r['contender']} >= 60% of copy bandwidth, {r['config']}: "
                         f"**{100 * frac:.0f}%** "
                         f"({'PASS' if frac >= 0.6 else 'FAIL'}; {r['gbps']:.0f} GB/s, {r['ms']:.3f} ms)")
        else:
            lines.append(f"- dbpr_step >= 60% of copy bandwidth, {r['config']}: not measured "
                         f"({r.get('error') or r.get('skipped')})")
    return lines


def _fmt(x, spec):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(rows):
    lines = ["| config | mode | contender | ms p50 [p20, p80] | M trip/s | GB/s | % copy | ratio | "
             "check | first s | peak MB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("mode") == "copy":
            continue
        head = f"| {r['config']} | {r['mode']} | {r['contender']} |"
        if "ms" not in r:
            why = r.get("error") or r.get("skipped") or "?"
            lines.append(f"{head} {'FAILED' if 'error' in r else 'skipped'}: {why[:160]} | | | | | | | |")
            continue
        trip = r.get("triplets_per_s")
        check = r.get("check")
        check_s = "" if check is None else f"{check:.1e}"
        if r.get("clean_mismatches"):
            check_s += f" ({r['clean_mismatches']} clean flips)"
        lines.append(
            f"{head} {r['ms']:.4f} [{r['p20']:.4f}, {r['p80']:.4f}] | "
            f"{_fmt(trip / 1e6 if trip else None, '.1f')} | {_fmt(r.get('gbps'), '.0f')} | "
            f"{_fmt(100 * r['copy_fraction'] if 'copy_fraction' in r else None, '.0f')} | "
            f"{_fmt(r.get('ratio'), '.2f')} | {check_s} | {_fmt(r.get('first_s'), '.2f')} | "
            f"{_fmt(r.get('peak_mb'), '.0f')} |")
    return lines


def header(copy_gbps, env):
    copy = f"{copy_gbps:.0f} GB/s" if copy_gbps else "not measured"
    return [f"{env}", "",
            f"Measured copy bandwidth (1 GiB float32 copy_, read + written): **{copy}**. "
            "GB/s = floor bytes / median; ratio = ms / the guider_fast triton (sgd) ms of the same config and "
            "mode; check = max error relative to the reference (fwd+bwd: guider_fast torch, step: "
            "dbpr_step torch of the same optimizer and table dtype, one step at lr 0.05 B on cloned tables, error / largest update (bf16: includes one bf16 rounding of the rows); "
            "calibration: torch on the same or gathered rows)."]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--md")
    parser.add_argument("--summary", help="write the targets and the key configuration here too")
    parser.add_argument("--budget", type=float, default=135.0,
                        help="seconds for all sections together (default 135)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, TRITON_INTERPRET=1")
    parser.add_argument("--sections", nargs="*", help="only these of copy dbpr calib huge")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--exclude", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    Env.smoke = args.smoke
    # Before triton is first imported (it reads the switch once).
    if Env.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 ignored: this benchmark times the compiled kernels", flush=True)
        os.environ["TRITON_INTERPRET"] = "0"
    if args.worker:
        worker_main(args)
        return
    if not Env.smoke and not torch.cuda.is_available():
        raise SystemExit("bench_dbpr_gpu.py needs a CUDA device (or --smoke)")
    if Env.smoke and args.budget == 135.0:
        args.budget = 600.0
    rows_path = (args.json or "/tmp/bench_dbpr_gpu.json") + ".rows.jsonl"
    if os.path.exists(rows_path):
        os.remove(rows_path)
    started = time.time()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        log = run_sections(args, rows_path)
    except Stop:
        log = ["stopped by SIGTERM"]
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    rows = _read_rows(rows_path)
    copy_gbps = derive(rows)
    if Env.smoke:
        env = f"SMOKE (CPU, TRITON_INTERPRET=1, tiny sizes): numbers are meaningless; torch {torch.__version__}"
    else:
        props = torch.cuda.get_device_properties(0)
        env = (f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
               f"torch {torch.__version__}, python {platform.python_version()}, float32 unless noted")
    try:
        import triton
        env += f", triton {triton.__version__}"
    except ImportError:
        pass
    goal = targets(rows)
    md = ["# DBPR and calibration on the GPU (issue #4)", ""] + header(copy_gbps, env) + [
        "", "## Targets", ""] + (goal or ["- not measured"]) + [
        "", "## All rows (priority order)", ""] + table(rows) + [
        "", f"Sections: {log}; total {time.time() - started:.0f} s."]
    text = "\n".join(md)
    key = [r for r in rows if r.get("config", "").startswith("B=65,536 D=64 K=1 Baby")
           or (r.get("mode") == "step" and r.get("contender") == "dbpr_step triton sgd")]
    summary = "\n".join(["# DBPR summary"] + header(copy_gbps, env) + [""] + (goal or ["- not measured"]) +
                        [""] + table(key))
    if args.json:
        with open(args.json, "w") as sink:
            json.dump(dict(env=env, copy_gbps=copy_gbps, sections=log, rows=rows), sink, indent=1,
                      default=str)
    if args.md:
        with open(args.md, "w") as sink:
            sink.write(text + "\n")
    if args.summary:
        with open(args.summary, "w") as sink:
            sink.write(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
