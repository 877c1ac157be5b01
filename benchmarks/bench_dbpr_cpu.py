"""One DBPR training step (forward + backward + update) on CPU, one thread: guider_fast.dbpr_step
(the C++ CPU extension, backend "cpu", and the torch step) against dense autograd,
torch.compile, sparse embeddings and ``implicit``'s BPR, next to the step's memory floor
(``dbpr_floor.cpp``: every row of every triplet read and written back, nothing else).

Run (from the repository root; ~2-3 min):

    python -m pytest benchmarks/bench_dbpr_cpu.py --benchmark-only --benchmark-json dbpr.json
    python benchmarks/report.py add dbpr.json --run dbpr_cpu_YYYY-MM-DD   # rows + tables/<run>.md

One pytest-benchmark group per shape (``dbpr_contenders.SHAPES``), so each group
compares the contenders side by side; each contender first takes one untimed
step (torch.compile compiles there, implicit initialises its factors), then
``rounds`` timed steps (each on the next of a few pre-drawn batches).  Before timing a shape, one step of
every torch contender is checked against ``guider_fast.dbpr_step`` (same loss;
same updated tables for the SGD contenders).  extra_info carries triplets/s,
the effective GB/s and its fraction of the 23 GB/s floor
(``dbpr_contenders.bytes_per_triplet``).  pytest-benchmark times one contender after the
other; ``python benchmarks/dbpr_contenders.py interleaved`` times the step contenders
round-robin in one process, which is what to quote on a shared machine.
"""

from __future__ import annotations

import gc

import pytest
import torch

import dbpr_contenders as C

CASES = [(shape, contender) for shape in C.SHAPES for contender in shape.contenders]
_CHECKED = set()


@pytest.fixture
def measure_step(benchmark):
    def run(step, triplets, *, shape, contender, rounds):
        benchmark.group = f"dbpr training step | {shape.label}"
        per_triplet = C.bytes_per_triplet(shape.dim, shape.k)
        info = benchmark.extra_info
        info.update(family="dbpr_step", workload=shape.name, contender=contender,
                    baseline=contender == C.BASELINE, n_users=shape.n_users, n_items=shape.n_items,
                    dim=shape.dim, batch=shape.batch, k=shape.k, graph=shape.graph or "uniform",
                    triplets=triplets, bytes_per_triplet=per_triplet,
                    floor_triplets_per_s=C.FLOOR_GBPS * 1e9 / per_triplet,
                    torch_threads=torch.get_num_threads(), huge_pages=shape.huge_pages)
        benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # absent with --benchmark-disable
            median = stats.stats.median
            info["triplets_per_s"] = triplets / median
            info["effective_GBps"] = triplets * per_triplet / median / 1e9
            info["floor_fraction"] = info["effective_GBps"] / C.FLOOR_GBPS

    return run


@pytest.mark.parametrize("shape,contender", CASES,
                         ids=[f"{s.name}-{c.replace(' ', '_')}" for s, c in CASES])
def test_dbpr_step(measure_step, shape, contender):
    if shape.n_users == 0:
        pytest.skip(f"{shape.graph} interactions not found (set GUIDER_DATA; now {C.DATA_DIR})")
    if contender == C.IMPLICIT:
        try:
            import implicit.cpu.bpr  # noqa: F401
        except ImportError as error:
            pytest.skip(f"implicit is not installed ({error})")
    if contender in (C.GF_CPU_SGD, C.GF_CPU_ADAGRAD):
        missing = C.cpu_extension_missing()
        if missing is not None:
            pytest.skip(f"the CPU extension is not available: {missing}")
    if contender == C.FLOOR:
        try:
            C.floor_module()
        except Exception as error:  # no compiler: the floor is a measurement, not a requirement
            pytest.skip(f"dbpr_floor.cpp does not build here: {error}")
    problem = C.make_problem(shape)
    if shape not in _CHECKED:
        C.check_same_work(problem, shape.contenders)
        _CHECKED.add(shape)
        gc.collect()
    step, triplets = C.build(contender, problem)
    measure_step(step, triplets, shape=shape, contender=contender, rounds=shape.rounds_for(contender))
    del step
    gc.collect()
