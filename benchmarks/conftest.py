"""Shared setup for the CPU benchmarks: one thread, fixed seeds, one measuring helper.

Timings on a shared 2-vCPU machine are noisy: compare contenders within one
run (they share a pytest-benchmark group) and read the ratios, not the
absolute milliseconds.
"""

from __future__ import annotations

import pytest
import torch

from sinkhorn_contenders import SEED, pin_single_thread

# Pinned at import time, before any benchmark (or torch parallel region) runs:
# every contender gets the same single core, so the ratios compare algorithms
# and not how well each library happens to use the second vCPU.
pin_single_thread()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)


@pytest.fixture
def measure(benchmark):
    """``measure(fn, group=..., rounds=..., **extra_info)``: time ``fn()`` with pytest-benchmark.

    One untimed warm-up call (first-call allocations, lazy library init), then
    ``rounds`` timed calls of one iteration each: every call is a whole solve
    of hundreds of milliseconds, so per-call timer overhead is irrelevant.
    """

    def run(fn, *, group: str, rounds: int, **extra_info):
        benchmark.group = group
        benchmark.extra_info.update(extra_info)
        benchmark.extra_info["torch_threads"] = torch.get_num_threads()
        return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)

    return run
