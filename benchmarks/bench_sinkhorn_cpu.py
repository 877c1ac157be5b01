"""Batched Sinkhorn on CPU: guider_fast side by side with POT, GeomLoss and naive torch.

Run:  pytest benchmarks/bench_sinkhorn_cpu.py --benchmark-only

One pytest-benchmark group per (family, workload, mode), so the contenders of
one comparison appear in one table.  Before the first timing of a workload,
``check_same_work`` asserts that every contender returns the same values and
gradients as guider_fast (POT: after its factor 2), i.e. that the timings
compare the same work.
"""

from __future__ import annotations

import pytest

from sinkhorn_contenders import (BASELINE, FAMILIES, MODES, N_ITERS, SAMPLES_LOSS_BLUR,
                                 WORKLOADS, check_same_work, make_problem, make_runner)

# Few rounds keep the whole file under ~3 minutes on 2 vCPUs; the bigger
# workload's solves take ~0.2-1 s each, so fewer rounds suffice there.
ROUNDS = {"B512_n32_m32_d64": 25, "B128_n128_m128_d64": 11}

GROUP_TITLES = {
    "fixed_eps": f"sinkhorn fixed eps, {N_ITERS} iters",
    "samples_loss": f"SamplesLoss p=2 blur={SAMPLES_LOSS_BLUR}",
}


@pytest.fixture(scope="module")
def checked_problem():
    """(family, workload) -> (problem, facts), built and cross-checked once per module."""
    cache = {}

    def get(family, workload):
        key = (family, workload.name)
        if key not in cache:
            problem = make_problem(family, workload)
            cache[key] = (problem, check_same_work(family, problem))
        return cache[key]

    return get


CASES = [
    pytest.param(family, workload, mode, contender,
                 id=f"{family}-{workload.name}-{mode}-{contender.replace(' ', '_')}")
    for family, contenders in FAMILIES.items()
    for workload in WORKLOADS
    for mode in MODES
    for contender in contenders
]


@pytest.mark.parametrize("family, workload, mode, contender", CASES)
def test_sinkhorn(measure, checked_problem, family, workload, mode, contender):
    problem, facts = checked_problem(family, workload)
    run = make_runner(family, contender, problem, mode)
    measure(run, group=f"{GROUP_TITLES[family]} | {workload.label} | {mode}",
            rounds=ROUNDS[workload.name], family=family, workload=workload.name,
            mode=mode, contender=contender, baseline=contender == BASELINE, **facts)
