"""DBPR training-step workloads and the contenders that run them, for ``bench_dbpr_cpu.py``.

Every torch contender does one whole training step per call: forward (gather,
margins, weighted logsigmoid), backward, and the optimizer update of the
embedding tables, in place.  All contenders get the same batches, in the same
order, cycling through ``n_batches`` distinct ones (fresh data each call, as in
training: one batch repeated lets the branch predictor learn its sort).  The contenders:

* ``guider_fast sgd`` / ``guider_fast rowwise_adagrad``: ``guider_fast.dbpr_step``
  (backend "torch", value checks on, as by default);
* ``guider_fast cpu sgd`` / ``guider_fast cpu rowwise_adagrad``: the same with
  backend "cpu", the C++ CPU extension (``csrc/cpu/dbpr_step_cpu.cpp``; what
  ``backend="auto"`` takes on CPU when the extension is there; built just in time here if
  it is not installed, skipped if it cannot be);
* ``floor: read+write each row (C++)``: not a step but its memory floor: for each triplet,
  read its K + 2 rows and write them back (``dbpr_floor.cpp``), with the fastest of a
  few prefetch distances (chosen untimed); every exact step moves at least these bytes;
* ``guider_fast dbpr_loss + dense SGD``: ``guider_fast.dbpr_loss`` forward and
  backward into dense gradient tables, then ``torch.optim.SGD``;
* ``naive torch + dense SGD``: ``baselines.naive_dbpr_loss`` (gather, multiply,
  sum, logsigmoid, weights, mean, autograd), ``torch.optim.SGD``;
* ``torch.compile hand-derived step``: ``baselines.hand_derived_step`` (the
  reference's margins and sigmoid coefficients, three ``index_add_`` updates
  straight into the tables, no autograd, duplicates added one occurrence at a
  time), compiled once per shape, warmed up outside timing;
* ``nn.Embedding(sparse) + SparseAdam``: the usual sparse-gradient recipe
  (``naive_dbpr_loss(sparse=True)`` on the embeddings' weights; Adam, so a
  different update; same forward and backward work);
* ``implicit BPR (1 epoch)``: ``implicit``'s CPU BPR, one epoch (``fit`` with
  ``iterations=1`` on already-initialised factors) over a user x item matrix with
  exactly ``batch`` distinct interactions, i.e. ``batch`` sampled triplets.
  ``factors=64`` gives 65 columns (implicit appends an item-bias column); it draws
  negatives from the interaction list (popularity-weighted), and
  ``verify_negative_samples=False`` skips its liked-item check, as the torch
  contenders do.  One thread (``num_threads=1``).

Workloads: uniform random indices on synthetic tables (Amazon Baby size,
20k x 7k, and 100k users x 1M items; the latter also with its tables on transparent
huge pages, ``huge_pages=True``: ``huge_page_copy``), and the real Amazon Baby / Sports
training interactions (``x_label == 0`` rows of the ``.inter`` files under
``$GUIDER_DATA``; skipped where it is not set): a batch draws ``batch``
(user, positive) pairs uniformly from them (repeats included, as a training
loop's batch has) and uniform negatives.

Effective bandwidth counts the bytes a step must move: read and write the
``K + 2`` rows of each triplet (``D`` float32 each) and read its ``K + 2`` int64
indices, ``2 (K + 2) 4 D + 8 (K + 2)`` bytes; the floor is that at 23 GB/s.

Command line (from the repository root):

    python benchmarks/dbpr_contenders.py report RUN.json
        # markdown tables of a pytest-benchmark JSON file (or results rows)
    python benchmarks/dbpr_contenders.py interleaved [--rounds N] [--all]
        # the step contenders (and the floor) timed round-robin in one process, each
        # round calling each once: 100k x 1M, D = 64, B = 65,536 on 4 KiB and huge
        # pages (--all: every shape); medians, best rounds, floor share, vs implicit
    python benchmarks/dbpr_contenders.py floor [--rounds N]
        # the row-traffic floor at 100k x 1M, D = 64, B = 65,536: read-only and
        # read+write sweeps at several prefetch distances, 4 KiB and huge pages, memcpy
    python benchmarks/dbpr_contenders.py cpu-before-after OLD_DBPR_STEP_CPU.cpp [--rounds N]
        # the C++ CPU step: an older csrc/cpu/dbpr_step_cpu.cpp (e.g. from `git show
        # REV:csrc/cpu/dbpr_step_cpu.cpp`), built beside the installed extension, against
        # the installed one and the floor at 100k x 1M, D = 64, B = 65,536 (SGD and
        # row-wise Adagrad, 4 KiB and huge pages), interleaved round by round in one process
    python benchmarks/dbpr_contenders.py before-after OLD_DBPR_STEP.py [--rounds N]
        # dbpr_step before/after: an older guider_fast/reference/dbpr_step.py
        # (e.g. from `git show REV:guider_fast/reference/dbpr_step.py`) against
        # the current one, interleaved round by round in one process
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

import guider_fast
from guider_fast import bench
from baselines import compile_hand_derived, hand_derived_step, naive_dbpr_loss

SEED = 0
LR = 0.05
SPARSE_ADAM_LR = 1e-3
FLOOR_GBPS = 23.0
MACHINE = "2-vCPU CPU guest, 1 thread"
# The real graphs: $GUIDER_DATA/amazon_baby/baby.inter and .../amazon_sports/sports.inter
# (no default: without the variable those shapes are skipped).
DATA_DIR = Path(os.environ["GUIDER_DATA"]) if os.environ.get("GUIDER_DATA") else None
GRAPH_FILES = {"baby": "amazon_baby/baby.inter", "sports": "amazon_sports/sports.inter"}

BASELINE = "guider_fast sgd"
GF_SGD, GF_ADAGRAD = BASELINE, "guider_fast rowwise_adagrad"
GF_CPU_SGD, GF_CPU_ADAGRAD = "guider_fast cpu sgd", "guider_fast cpu rowwise_adagrad"
GF_DENSE = "guider_fast dbpr_loss + dense SGD"
NAIVE = "naive torch + dense SGD"
COMPILED = "torch.compile hand-derived step"
SPARSE = "nn.Embedding(sparse) + SparseAdam"
IMPLICIT = "implicit BPR (1 epoch)"
FLOOR = "floor: read+write each row (C++)"
ALL = (GF_CPU_SGD, GF_CPU_ADAGRAD, GF_SGD, GF_ADAGRAD, GF_DENSE, NAIVE, COMPILED, SPARSE, IMPLICIT, FLOOR)
STEPS = (GF_CPU_SGD, GF_CPU_ADAGRAD, GF_SGD, GF_ADAGRAD, COMPILED, IMPLICIT, FLOOR)  # no dense gradients
SGD_STEPS = (GF_SGD, GF_CPU_SGD, GF_DENSE, NAIVE, COMPILED)  # same update: checked for the same tables
DENSE = (GF_DENSE, NAIVE)


@dataclass(frozen=True)
class Shape:
    n_users: int
    n_items: int
    dim: int
    batch: int
    k: int = 1
    graph: Optional[str] = None  # None: uniform indices; else a key of GRAPH_FILES
    rounds: int = 10
    contenders: Tuple[str, ...] = ALL
    huge_pages: bool = False  # the tables on transparent huge pages (huge_page_copy)

    @property
    def name(self) -> str:
        thp = "_thp" if self.huge_pages else ""
        return f"{self.graph or 'uniform'}_{self.n_users}x{self.n_items}_D{self.dim}_B{self.batch}_K{self.k}{thp}"

    @property
    def label(self) -> str:
        source = f"Amazon {self.graph.capitalize()} interactions" if self.graph else "uniform indices"
        pages = ", tables on huge pages" if self.huge_pages else ""
        return (f"{self.n_users:,} users x {self.n_items:,} items, D={self.dim}, B={self.batch:,}, "
                f"K={self.k}, {source}{pages}")

    def rounds_for(self, contender: str) -> int:
        # Dense-gradient contenders touch every row of the 1M-item table each step.
        if contender in DENSE + (SPARSE,) and self.n_items >= 1_000_000:
            return min(self.rounds, 4)
        return self.rounds


def bytes_per_triplet(dim: int, k: int, elem: int = 4, index: int = 8) -> int:
    """Read + write of the K + 2 rows, plus their indices."""
    return 2 * (k + 2) * dim * elem + (k + 2) * index


@functools.lru_cache(maxsize=None)
def graph_sizes(graph: str) -> Tuple[int, int]:
    users, items, _ = _read_graph(graph)
    return int(users.max()) + 1, int(items.max()) + 1


@functools.lru_cache(maxsize=None)
def _read_graph(graph: str):
    table = np.loadtxt(DATA_DIR / GRAPH_FILES[graph], dtype=np.int64, delimiter="\t", skiprows=1)
    return table[:, 0], table[:, 1], table[:, 2]


def graph_pairs(graph: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The training (user, item) pairs (x_label == 0)."""
    users, items, split = _read_graph(graph)
    train = split == 0
    return torch.from_numpy(users[train].copy()), torch.from_numpy(items[train].copy())


def _shapes():
    shapes = []
    for dim, rounds in ((64, (40, 12)), (256, (30, 6))):
        for batch, r in zip((2_048, 65_536), rounds):
            shapes.append(Shape(20_000, 7_000, dim, batch, rounds=r))
    for graph in ("baby", "sports"):
        found = DATA_DIR is not None and (DATA_DIR / GRAPH_FILES[graph]).exists()
        n_users, n_items = graph_sizes(graph) if found else (0, 0)
        for batch, r in ((2_048, 40), (65_536, 12)):
            shapes.append(Shape(n_users, n_items, 64, batch, graph=graph, rounds=r))
    shapes += [
        Shape(100_000, 1_000_000, 64, 2_048, rounds=20),
        Shape(100_000, 1_000_000, 64, 65_536, rounds=8),
        Shape(100_000, 1_000_000, 64, 65_536, rounds=8, contenders=STEPS, huge_pages=True),
        Shape(100_000, 1_000_000, 64, 1_048_576, rounds=3, contenders=STEPS),
        Shape(100_000, 1_000_000, 256, 65_536, rounds=4, contenders=STEPS),
    ]
    return tuple(shapes)


SHAPES = _shapes()


_MADV_HUGEPAGE = 14  # linux/mman.h
_HUGE_PAGE = 2 << 20


def huge_page_copy(table: torch.Tensor) -> torch.Tensor:
    """A copy of ``table`` whose 2 MiB-aligned memory is advised for transparent huge pages
    before it is first touched (Linux ``madvise(MADV_HUGEPAGE)``; the THP mode here is
    "madvise", and torch's allocator advises nothing unless THP_MEM_ALLOC_ENABLE=1).
    Random rows of a 256 MB table on 4 KiB pages miss the TLB on nearly every access;
    on 2 MiB pages they do not.  Elsewhere: a plain copy."""
    elem = table.element_size()
    raw = torch.empty(table.numel() + _HUGE_PAGE // elem, dtype=table.dtype)  # untouched pages
    offset = (-raw.data_ptr()) % _HUGE_PAGE // elem
    out = raw[offset:offset + table.numel()].view(table.shape)
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        length = table.numel() * elem // _HUGE_PAGE * _HUGE_PAGE
        if length:
            libc.madvise(out.data_ptr(), length, _MADV_HUGEPAGE)  # advice: failure leaves 4 KiB pages
    return out.copy_(table)


def huge_pages_mib() -> float:
    """This process's anonymous memory on transparent huge pages (Linux), in MiB."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@functools.lru_cache(maxsize=None)
def floor_module():
    """benchmarks/dbpr_floor.cpp, built for this machine (cached by torch's extension builder)."""
    from torch.utils.cpp_extension import load

    return load("guider_fast_dbpr_floor", [str(Path(__file__).with_name("dbpr_floor.cpp"))],
                extra_cflags=["-O3", "-march=native"], verbose=False)


def cpu_extension_missing() -> Optional[str]:
    """None once the CPU extension is loaded (installed, or built just in time now), else why not."""
    from guider_fast import _cpu_build

    try:
        _cpu_build.load(build=True)
    except RuntimeError as error:
        return str(error)
    return None


@dataclass
class Batch:
    users: torch.Tensor
    pos_items: torch.Tensor
    neg_items: torch.Tensor  # (B,) for K = 1, else (B, K)
    weights: torch.Tensor

    @property
    def negatives_2d(self) -> torch.Tensor:
        return self.neg_items if self.neg_items.dim() == 2 else self.neg_items.unsqueeze(1)


@dataclass
class Problem:
    shape: Shape
    user_table: torch.Tensor
    item_table: torch.Tensor
    batches: List[Batch]  # steps cycle through them (see n_batches)
    implicit_pairs: Tuple[np.ndarray, np.ndarray]  # `batch` distinct (user, item) pairs


def n_batches(shape: Shape) -> int:
    """Distinct batches a contender cycles through.  Repeating one batch flatters
    data-dependent code: the branch predictor learns a comparison sort's input, which
    then runs ~4x faster than on fresh data (torch.sort on 4,096 keys: 40 vs 160 us)."""
    return 8 if shape.batch <= 65_536 else 3


def rotating(fn, batches):
    """``step()`` calling ``fn(batch)`` on the batches in turn (the first call gets batch 0)."""
    calls = [0]

    def step():
        batch = batches[calls[0] % len(batches)]
        calls[0] += 1
        return fn(batch)
    return step


def round_robin(runs, rounds):
    """Seconds of each ``runs[key]()`` call, ``rounds`` calls each, one call per contender per
    round (so the machine's drift hits every contender alike)."""
    times = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    return times


_PROBLEM_CACHE: dict = {}


def make_problem(shape: Shape) -> Problem:
    """Inputs of ``shape`` (the last one is cached: tests of one shape run back to back)."""
    if shape in _PROBLEM_CACHE:
        return _PROBLEM_CACHE[shape]
    _PROBLEM_CACHE.clear()
    gc.collect()
    g = torch.Generator().manual_seed(SEED)
    user_table = torch.randn(shape.n_users, shape.dim, generator=g).mul_(0.1)
    item_table = torch.randn(shape.n_items, shape.dim, generator=g).mul_(0.1)
    b = shape.batch
    batches = []
    for _ in range(n_batches(shape)):
        if shape.graph is None:
            users = torch.randint(0, shape.n_users, (b,), generator=g)
            pos = torch.randint(0, shape.n_items, (b,), generator=g)
        else:
            all_users, all_items = graph_pairs(shape.graph)
            pick = torch.randint(0, all_users.shape[0], (b,), generator=g)
            users, pos = all_users[pick], all_items[pick]
        neg_shape = (b,) if shape.k == 1 else (b, shape.k)
        neg = torch.randint(0, shape.n_items, neg_shape, generator=g)
        batches.append(Batch(users, pos, neg, torch.rand(b, generator=g)))
    if shape.graph is None:
        pair_users, pair_items = batches[0].users, batches[0].pos_items
    else:
        pair_users, pair_items = graph_pairs(shape.graph)
    # implicit samples its triplets from a user x item matrix: give it `batch`
    # distinct pairs, so that one epoch is `batch` triplets.
    codes = np.unique(pair_users.numpy() * shape.n_items + pair_items.numpy())
    rng = np.random.default_rng(SEED)
    while shape.graph is None and codes.shape[0] < b:  # uniform: replace the few repeats
        extra = rng.integers(0, shape.n_users, b) * shape.n_items + rng.integers(0, shape.n_items, b)
        codes = np.unique(np.concatenate([codes, extra]))
    if codes.shape[0] > b:
        codes = rng.choice(codes, b, replace=False)
    implicit_pairs = (codes // shape.n_items, codes % shape.n_items)
    if shape.huge_pages:
        user_table, item_table = huge_page_copy(user_table), huge_page_copy(item_table)
    problem = Problem(shape, user_table, item_table, batches, implicit_pairs)
    _PROBLEM_CACHE[shape] = problem
    return problem


# --------------------------------------------------------------------------
# Contenders: build(problem) -> step() doing one training step in place
# --------------------------------------------------------------------------

COMPILED_STEP = None
FLOOR_AHEAD = (0, 4, 8, 16, 32)  # prefetch distances the floor contender chooses from


def copy_tables(problem: Problem) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fresh copies of the problem's tables, on huge pages where the shape asks for them."""
    copy = huge_page_copy if problem.shape.huge_pages else torch.Tensor.clone
    return copy(problem.user_table), copy(problem.item_table)


def build(contender: str, problem: Problem) -> Tuple[Callable[[], object], int]:
    """(step, triplets per call); each contender owns fresh copies of the tables."""
    global COMPILED_STEP
    p = problem
    if contender in (GF_SGD, GF_ADAGRAD, GF_CPU_SGD, GF_CPU_ADAGRAD):
        user_table, item_table = copy_tables(p)
        backend = "cpu" if contender in (GF_CPU_SGD, GF_CPU_ADAGRAD) else "torch"
        if contender in (GF_SGD, GF_CPU_SGD):
            def one(b):
                return guider_fast.dbpr_step(user_table, item_table, b.users, b.pos_items, b.neg_items,
                                             b.weights, lr=LR, backend=backend)
        else:
            state = guider_fast.RowwiseAdagradState(user_table, item_table)

            def one(b):
                return guider_fast.dbpr_step(user_table, item_table, b.users, b.pos_items, b.neg_items,
                                             b.weights, lr=LR, optimizer="rowwise_adagrad", state=state,
                                             backend=backend)
        step = rotating(one, p.batches)
        step.tables = (user_table, item_table)
        return step, p.shape.batch
    if contender in DENSE:
        user_emb, item_emb = (torch.nn.Parameter(t) for t in copy_tables(p))
        optimizer = torch.optim.SGD([user_emb, item_emb], lr=LR)
        loss_fn = guider_fast.dbpr_loss if contender == GF_DENSE else naive_dbpr_loss

        def one(b):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(user_emb, item_emb, b.users, b.pos_items, b.neg_items, b.weights)
            loss.backward()
            optimizer.step()
            return loss
        step = rotating(one, p.batches)
        step.tables = (user_emb.data, item_emb.data)
        return step, p.shape.batch
    if contender == COMPILED:
        if COMPILED_STEP is None:
            COMPILED_STEP = compile_hand_derived(hand_derived_step, dynamic=False)
        user_table, item_table = copy_tables(p)

        def one(b):
            return COMPILED_STEP(user_table, item_table, b.users, b.pos_items, b.negatives_2d,
                                 b.weights, LR)
        step = rotating(one, p.batches)
        step.tables = (user_table, item_table)
        return step, p.shape.batch
    if contender == SPARSE:
        user_copy, item_copy = copy_tables(p)
        user_emb = torch.nn.Embedding.from_pretrained(user_copy, freeze=False, sparse=True)
        item_emb = torch.nn.Embedding.from_pretrained(item_copy, freeze=False, sparse=True)
        optimizer = torch.optim.SparseAdam(list(user_emb.parameters()) + list(item_emb.parameters()),
                                           lr=SPARSE_ADAM_LR)

        def one(b):
            optimizer.zero_grad(set_to_none=True)
            loss = naive_dbpr_loss(user_emb.weight, item_emb.weight, b.users, b.pos_items, b.neg_items,
                                   b.weights, sparse=True)
            loss.backward()
            optimizer.step()
            return loss
        step = rotating(one, p.batches)
        step.tables = (user_emb.weight.data, item_emb.weight.data)
        return step, p.shape.batch
    if contender == IMPLICIT:
        import scipy.sparse
        from implicit.cpu.bpr import BayesianPersonalizedRanking  # ImportError -> skipped

        rows, cols = p.implicit_pairs
        matrix = scipy.sparse.csr_matrix((np.ones(rows.shape[0], dtype=np.float32), (rows, cols)),
                                         shape=(p.shape.n_users, p.shape.n_items))
        model = BayesianPersonalizedRanking(factors=p.shape.dim, learning_rate=LR, regularization=0.0,
                                            iterations=1, num_threads=1,
                                            verify_negative_samples=False, random_state=SEED)
        model.fit(matrix, show_progress=False)  # initialises the factors, outside timing

        def step():
            model.fit(matrix, show_progress=False)  # one epoch = matrix.nnz triplets
        return step, int(matrix.nnz)
    if contender == FLOOR:
        floor = floor_module()
        user_table, item_table = copy_tables(p)
        batches = [(b.users, b.pos_items, b.negatives_2d.contiguous()) for b in p.batches]

        def sweep(ahead):
            return rotating(lambda b: floor.rmw(user_table, item_table, *b, ahead), batches)

        timings = {}
        for ahead in FLOOR_AHEAD:  # untimed choice of the prefetch distance
            run = sweep(ahead)
            run()
            start = time.perf_counter()
            for _ in range(2):
                run()
            timings[ahead] = time.perf_counter() - start
        step = sweep(min(timings, key=timings.get))
        step.tables = (user_table, item_table)
        return step, p.shape.batch
    raise ValueError(f"unknown contender {contender!r}")


def check_same_work(problem: Problem, contenders) -> None:
    """One step of each torch SGD contender from the same tables: same loss, same tables."""
    ref_step, _ = build(GF_SGD, problem)
    want_loss = float(ref_step().detach())
    want_user, want_item = ref_step.tables
    for contender in contenders:
        if contender in (GF_SGD, IMPLICIT, FLOOR):
            continue
        if contender in (GF_CPU_SGD, GF_CPU_ADAGRAD) and cpu_extension_missing() is not None:
            continue
        step, _ = build(contender, problem)
        loss = float(step().detach())
        assert abs(loss - want_loss) <= 1e-5 * abs(want_loss), (contender, loss, want_loss)
        if contender not in SGD_STEPS:
            continue  # other optimizers: same loss is the check
        for name, got, want in zip(("user", "item"), step.tables, (want_user, want_item)):
            err = (got - want).abs().max().item()
            moved = (want - problem.user_table if name == "user" else want - problem.item_table)
            scale = moved.abs().max().item()
            # float32 rounding of the updated values (~1 ulp of the table entries) + 0.1% of the step
            tol = 1e-6 * want.abs().max().item() + 1e-3 * scale
            assert err <= tol, f"{contender}: {name} table differs by {err:.3g} (step {scale:.3g})"
        del step
    del ref_step


# --------------------------------------------------------------------------
# Command line: markdown report, before/after of dbpr_step
# --------------------------------------------------------------------------

def _info_cell(key, scale=1.0, spec=".2f"):
    def cell(entry):
        value = (entry.row.get("extra") or {}).get(key)
        return "" if value is None else format(value * scale, spec)
    return cell


REPORT_COLUMNS = [("M trip/s", _info_cell("triplets_per_s", 1e-6)),
                  ("GB/s", _info_cell("effective_GBps")),
                  ("floor %", _info_cell("floor_fraction", 100.0, ".1f"))]


def report(path: str) -> str:
    """Markdown of a pytest-benchmark JSON (or results rows) of bench_dbpr_cpu.py: the one
    ratio-table writer (``guider_fast.bench``) with the step's throughput columns."""
    rows, _ = bench.load_results(path)
    intro = ("M trip/s = million triplets per second (median); GB/s = effective bandwidth over the "
             "bytes a step must move (read + write K+2 rows of D float32, plus indices); floor % = "
             f"that bandwidth as a share of {FLOOR_GBPS:g} GB/s. Machine: {MACHINE}.")
    text = bench.markdown(bench.collect_rows(rows), rows=rows, source=str(path), columns=REPORT_COLUMNS,
                          title="dbpr_step on CPU: guider_fast against the usual training-step recipes")
    head, _, tail = text.partition("\n## Summary")
    return head + intro + "\n\n## Summary" + tail


def _load_step_module(path: str):
    """An older guider_fast/reference/dbpr_step.py, imported inside guider_fast.reference."""
    spec = importlib.util.spec_from_file_location("guider_fast.reference._dbpr_step_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _direct_step(module, user, item, optimizer, acc_user, acc_item):
    """``batch -> module.dbpr_step(...)`` on the reference signature (no argument checks)."""
    def one(b):
        return module.dbpr_step(user, item, b.users, b.pos_items, b.negatives_2d, b.weights, LR,
                                optimizer, acc_user, acc_item, 0.0, "mean")
    return one


def before_after(path: str, rounds: int = 10) -> str:
    from guider_fast.reference import dbpr_step as current

    before = _load_step_module(path)
    torch.set_num_threads(1)
    lines = ["| shape | optimizer | before ms | after ms | before M trip/s | after M trip/s | speedup |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for shape in SHAPES:
        if shape.n_users == 0:
            continue
        problem = make_problem(shape)
        for optimizer in ("sgd", "rowwise_adagrad"):
            runs = {}
            for name, module in (("before", before), ("after", current)):
                user, item = problem.user_table.clone(), problem.item_table.clone()
                acc_u = torch.zeros(shape.n_users) if optimizer != "sgd" else None
                acc_i = torch.zeros(shape.n_items) if optimizer != "sgd" else None
                runs[name] = rotating(_direct_step(module, user, item, optimizer, acc_u, acc_i),
                                      problem.batches)
                runs[name]()  # warm-up
            times = {name: [] for name in runs}
            n_rounds = max(2, rounds if shape.batch < 1_000_000 else 3)
            for _ in range(n_rounds):
                for name, fn in runs.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
            b = shape.batch
            lines.append(f"| {shape.label} | {optimizer} | {med['before'] * 1e3:.2f} "
                         f"| {med['after'] * 1e3:.2f} | {b / med['before'] / 1e6:.2f} | {b / med['after'] / 1e6:.2f} "
                         f"| {med['before'] / med['after']:.2f} |")
            print(lines[-1], file=sys.stderr, flush=True)
            del runs
        _PROBLEM_CACHE.clear()
    return "\n".join(lines)


def old_cpu_step(path: str, tag: str = "before"):
    """An older csrc/cpu/dbpr_step_cpu.cpp (e.g. from `git show REV:csrc/cpu/dbpr_step_cpu.cpp`),
    built with the extension's flags under its own op namespace (``guider_fast_cpu_<tag>``), so
    that it loads beside the installed extension: returns its ``dbpr_step`` op."""
    from torch.utils.cpp_extension import load
    from guider_fast import _cpu_build

    namespace = f"guider_fast_cpu_{tag}"
    source = Path(path).read_text().replace("guider_fast_cpu", namespace)
    source = source.replace('"../constants.h"', f'"{_cpu_build.REPO / "csrc" / "constants.h"}"')
    directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"guider_fast_dbpr_{tag}_{os.getpid()}"
    directory.mkdir(parents=True, exist_ok=True)
    copy = directory / f"dbpr_step_cpu_{tag}.cpp"
    copy.write_text(source)
    load(namespace, [str(copy)], extra_cflags=_cpu_build.compile_flags(_cpu_build.build_isa()),
         build_directory=str(directory), is_python_module=False, verbose=False)
    return getattr(torch.ops, namespace).dbpr_step


def cpu_before_after(path: str, rounds: int = 20) -> str:
    """Markdown: an older C++ CPU step (source file) against the installed one and the floor,
    100k x 1M, D = 64, B = 65,536, K = 1, SGD and row-wise Adagrad, on 4 KiB and huge pages:
    one process, the contenders interleaved round by round, each with its own table copy."""
    torch.set_num_threads(1)
    missing = cpu_extension_missing()
    if missing is not None:
        raise RuntimeError(missing)
    from guider_fast import _cpu_build

    ops = {"before": old_cpu_step(path), "after": _cpu_build.ops().dbpr_step}
    lines = ["| pages | optimizer | contender | median ms | best ms | M trip/s (median) | M trip/s (best) "
             "| vs floor | vs before |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    floor = floor_module()
    for huge in (False, True):
        shape = Shape(100_000, 1_000_000, 64, 65_536, huge_pages=huge)
        problem = make_problem(shape)
        for optimizer in ("sgd", "rowwise_adagrad"):
            runs = {}
            for name, op in ops.items():
                user, item = copy_tables(problem)
                adagrad = optimizer != "sgd"
                acc_u = torch.zeros(shape.n_users) if adagrad else None
                acc_i = torch.zeros(shape.n_items) if adagrad else None

                def one(b, op=op, user=user, item=item, acc_u=acc_u, acc_i=acc_i, optimizer=optimizer):
                    return op(user, item, b.users, b.pos_items, b.negatives_2d, b.weights, acc_u, acc_i,
                              LR, 0.0, 1.0, optimizer)
                runs[name] = rotating(one, problem.batches)
            user, item = copy_tables(problem)
            batches = [(b.users, b.pos_items, b.negatives_2d.contiguous()) for b in problem.batches]
            runs["floor"] = rotating(lambda b, u=user, i=item: floor.rmw(u, i, *b, 16), batches)
            for fn in runs.values():
                fn()
                fn()  # warm-up: workspace growth, first-touch page faults
            times = round_robin(runs, rounds)
            med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
            pages = f"huge ({huge_pages_mib():,.0f} MiB in use)" if huge else "4 KiB"
            for name, values in times.items():
                lines.append(f"| {pages} | {optimizer} | {name} | {med[name] * 1e3:.2f} | {min(values) * 1e3:.2f} "
                             f"| {shape.batch / med[name] / 1e6:.2f} | {shape.batch / min(values) / 1e6:.2f} "
                             f"| {med['floor'] / med[name]:.2f} | {med['before'] / med[name]:.2f} |")
                print(lines[-1], file=sys.stderr, flush=True)
            del runs
        _PROBLEM_CACHE.clear()
        gc.collect()
    return "\n".join(lines)


INTERLEAVED = (GF_CPU_SGD, GF_CPU_ADAGRAD, GF_SGD, COMPILED, IMPLICIT, FLOOR)


def interleaved(rounds: int = 12, every_shape: bool = False) -> str:
    """Markdown: each shape's step contenders timed round-robin (one call each per round)."""
    torch.set_num_threads(1)
    shapes = [s for s in SHAPES if s.n_users and (every_shape or (s.n_items == 1_000_000 and s.dim == 64
                                                                  and s.batch == 65_536))]
    lines = ["| shape | contender | median ms | best ms | M trip/s (median) | M trip/s (best) "
             "| floor % (median) | vs floor | vs implicit |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for shape in shapes:
        problem = make_problem(shape)
        runners = {}
        for contender in INTERLEAVED:
            if contender == IMPLICIT and importlib.util.find_spec("implicit") is None:
                print(f"skipped {contender}: implicit is not installed", file=sys.stderr)
                continue
            if contender in (GF_CPU_SGD, GF_CPU_ADAGRAD) and cpu_extension_missing() is not None:
                print(f"skipped {contender}: {cpu_extension_missing()}", file=sys.stderr)
                continue
            if contender == COMPILED and shape.batch > 65_536:
                continue
            runners[contender] = build(contender, problem)
        for step, _ in runners.values():
            step()  # warm-up (torch.compile compiles, implicit initialises)
        times = round_robin({name: step for name, (step, _) in runners.items()},
                            rounds if shape.batch <= 65_536 else max(3, rounds // 4))
        rate = {name: runners[name][1] / sorted(t)[len(t) // 2] for name, t in times.items()}
        per_triplet = bytes_per_triplet(shape.dim, shape.k)
        pages = f"huge pages: {huge_pages_mib():,.0f} MiB in use" if shape.huge_pages else "4 KiB pages"
        for name, values in times.items():
            median, best = sorted(values)[len(values) // 2], min(values)
            triplets = runners[name][1]
            vs_floor = f"{rate[name] / rate[FLOOR]:.2f}" if FLOOR in rate else ""
            vs_implicit = f"{rate[name] / rate[IMPLICIT]:.2f}" if IMPLICIT in rate else ""
            lines.append(f"| {shape.label} ({pages}) | {name} | {median * 1e3:.2f} | {best * 1e3:.2f} "
                         f"| {triplets / median / 1e6:.2f} | {triplets / best / 1e6:.2f} "
                         f"| {100 * triplets * per_triplet / median / 1e9 / FLOOR_GBPS:.1f} "
                         f"| {vs_floor} | {vs_implicit} |")
            print(lines[-1], file=sys.stderr, flush=True)
        del runners
        _PROBLEM_CACHE.clear()
        gc.collect()
    return "\n".join(lines)


def floor_table(rounds: int = 8) -> str:
    """Markdown: the row-traffic floor at 100k x 1M, D = 64, B = 65,536 (K = 1), in detail."""
    torch.set_num_threads(1)
    floor = floor_module()
    shape = Shape(100_000, 1_000_000, 64, 65_536)
    problem = make_problem(shape)
    batches = [(b.users, b.pos_items, b.negatives_2d.contiguous()) for b in problem.batches]
    tables = {"4 KiB pages": (problem.user_table.clone(), problem.item_table.clone()),
              "huge pages": (huge_page_copy(problem.user_table), huge_page_copy(problem.item_table))}
    runs = {}
    for pages, (user, item) in tables.items():
        for kind in ("gather", "rmw"):
            for ahead in FLOOR_AHEAD:
                runs[(pages, kind, ahead)] = rotating(
                    lambda b, f=getattr(floor, kind), u=user, i=item, a=ahead: f(u, i, *b, a), batches)
        runs[(pages, "index_select", None)] = rotating(
            lambda b, u=user, i=item: (u.index_select(0, b[0]), i.index_select(0, b[1]),
                                       i.index_select(0, b[2].reshape(-1))), batches)
    for run in runs.values():
        run()
    times = round_robin(runs, rounds * len(batches))
    source, target = torch.randn(64 << 18), torch.empty(64 << 18)  # 64 MiB each
    copies = []
    for _ in range(rounds):
        start = time.perf_counter()
        target.copy_(source)
        copies.append(time.perf_counter() - start)
    per_triplet = bytes_per_triplet(shape.dim, shape.k)
    lines = [f"Row traffic of B = {shape.batch:,} triplets (K = 1) on {shape.label}, 1 thread; "
             f"huge pages in use: {huge_pages_mib():,.0f} MiB; memcpy of 64 MiB (torch copy_): "
             f"{2 * source.nbytes / sorted(copies)[len(copies) // 2] / 1e9:.1f} GB/s read + write.", "",
             "| pages | sweep | prefetch (triplets ahead) | median ms | M trip/s (median) | M trip/s (best) "
             "| GB/s at 1,560 B/triplet |", "|---|---|---:|---:|---:|---:|---:|"]
    names = {"gather": "read rows", "rmw": "read + write rows", "index_select": "torch index_select x3"}
    for (pages, kind, ahead), values in times.items():
        median, best = sorted(values)[len(values) // 2], min(values)
        lines.append(f"| {pages} | {names[kind]} | {'' if ahead is None else ahead} | {median * 1e3:.2f} "
                     f"| {shape.batch / median / 1e6:.2f} | {shape.batch / best / 1e6:.2f} "
                     f"| {shape.batch * per_triplet / median / 1e9:.1f} |")
    return "\n".join(lines)


def main(argv):
    if len(argv) >= 2 and argv[0] == "report":
        print(report(argv[1]))
    elif argv and argv[0] in ("interleaved", "floor"):
        rounds = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else None
        if argv[0] == "floor":
            print(floor_table(rounds or 8))
        else:
            print(interleaved(rounds or 12, "--all" in argv))
    elif len(argv) >= 2 and argv[0] == "cpu-before-after":
        rounds = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else 20
        print(cpu_before_after(argv[1], rounds))
    elif len(argv) >= 2 and argv[0] == "before-after":
        rounds = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else 10
        print(before_after(argv[1], rounds))
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
