"""Sinkhorn workloads and the contenders that solve them, shared by
``bench_sinkhorn_cpu.py`` (timings) and ``peak_memory.py`` (peak RSS).

Every contender does the *same* work, end to end: build the cost matrix from
the point clouds, run the solver, return a (B,) value and, in the
forward+backward mode, backpropagate ``value.sum()`` into the points.

Two families of workloads:

* ``fixed_eps``: one eps for every iteration, exactly ``N_ITERS`` iterations
  (no early stopping), cost ``|x - y|^2 / 2``.  POT's "sqeuclidean" cost is
  ``|x - y|^2``, i.e. twice ours, so POT solves the same problem with
  ``reg = 2 * eps`` and reports twice our ``value_linear`` (checked by
  ``check_same_work``).
* ``samples_loss``: the GeomLoss ``SamplesLoss("sinkhorn", p=2, blur=0.05)``
  default (debiased, eps-scaling schedule) against guider_fast's drop-in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

import guider_fast
from baselines import (EPS_FRACTION_OF_MEDIAN_COST, N_ITERS, assert_close, fixed_eps,
                       geomloss_samples_loss, geomloss_sinkhorn, naive_torch_sinkhorn, pot_sinkhorn,
                       pot_solve)

SEED = 0
DIM = 64
# SamplesLoss workloads scale the points by 1/sqrt(d) so that the clouds have
# unit-size spread and a bounding-box diameter of about 8.3: GeomLoss's schedule
# (diameter^2 down to blur^2 by factors of 4) then has 10 eps values, the
# regime of a typical embedding-space loss, rather than extra coarse steps
# spent on the raw N(0, I_64) scale.
SAMPLES_LOSS_POINT_SCALE = 1.0 / math.sqrt(DIM)
SAMPLES_LOSS_BLUR = 0.05

MODES = ("forward", "forward+backward")


@dataclass(frozen=True)
class Workload:
    batch: int
    n: int
    m: int
    dim: int = DIM

    @property
    def name(self) -> str:
        return f"B{self.batch}_n{self.n}_m{self.m}_d{self.dim}"

    @property
    def label(self) -> str:
        return f"(B, n, m) = ({self.batch}, {self.n}, {self.m}), d = {self.dim}"


WORKLOADS = (Workload(512, 32, 32), Workload(128, 128, 128))
WORKLOADS_BY_NAME = {w.name: w for w in WORKLOADS}


def pin_single_thread() -> None:
    """One intra-op thread (and one inter-op thread where still settable) for comparable timings."""
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel region; harmless if late
        pass


def make_clouds(workload: Workload, scale: float = 1.0):
    """Seeded float32 N(0, scale^2 I) point clouds x (B, n, d), y (B, m, d)."""
    generator = torch.Generator().manual_seed(SEED)
    shape_x = (workload.batch, workload.n, workload.dim)
    shape_y = (workload.batch, workload.m, workload.dim)
    x = torch.randn(shape_x, generator=generator, dtype=torch.float32) * scale
    y = torch.randn(shape_y, generator=generator, dtype=torch.float32) * scale
    return x, y


# --------------------------------------------------------------------------
# fixed_eps contenders: forward(x, y, eps, with_grad) -> (B,) value
# --------------------------------------------------------------------------

def guider_fast_sinkhorn(x, y, eps, with_grad):
    grad = "envelope" if with_grad else "detach"
    return guider_fast.sinkhorn(x, y, eps=eps, n_iters=N_ITERS, grad=grad).value


FIXED_EPS_CONTENDERS: Dict[str, Callable] = {
    "guider_fast": guider_fast_sinkhorn,
    "POT": pot_sinkhorn,
    "GeomLoss": geomloss_sinkhorn,
    "naive torch": naive_torch_sinkhorn,
}

# --------------------------------------------------------------------------
# samples_loss contenders: forward(x, y) -> (B,) debiased Sinkhorn divergence
# --------------------------------------------------------------------------

SAMPLES_LOSS_CONTENDERS: Dict[str, Callable] = {
    "guider_fast": lambda: guider_fast.SamplesLoss("sinkhorn", p=2, blur=SAMPLES_LOSS_BLUR),
    "GeomLoss": lambda: geomloss_samples_loss(p=2, blur=SAMPLES_LOSS_BLUR),
}

FAMILIES = {
    "fixed_eps": FIXED_EPS_CONTENDERS,
    "samples_loss": SAMPLES_LOSS_CONTENDERS,
}
BASELINE = "guider_fast"


@dataclass
class Problem:
    """One benchmark input: the clouds and (fixed_eps only) the eps they are solved at."""

    x: torch.Tensor
    y: torch.Tensor
    eps: Optional[float] = None


def make_problem(family: str, workload: Workload, eps: Optional[float] = None) -> Problem:
    """The seeded clouds of ``workload``; for fixed_eps, ``eps`` defaults to ``fixed_eps(x, y)``.

    Passing ``eps`` skips the (B, n, m) cost matrix that computing it needs,
    which peak_memory.py relies on to keep its baseline free of that temporary.
    """
    if family == "fixed_eps":
        x, y = make_clouds(workload)
        return Problem(x, y, fixed_eps(x, y) if eps is None else eps)
    x, y = make_clouds(workload, scale=SAMPLES_LOSS_POINT_SCALE)
    return Problem(x, y)


def make_runner(family: str, contender: str, problem: Problem, mode: str) -> Callable[[], None]:
    """A no-argument callable doing the contender's whole work once, on its own copy of the inputs.

    In "forward+backward" mode the points require grad and each call clears
    the previous call's gradients first (cheap next to the solve).
    """
    with_grad = mode == "forward+backward"
    x = problem.x.detach().clone().requires_grad_(with_grad)
    y = problem.y.detach().clone().requires_grad_(with_grad)
    if family == "fixed_eps":
        solve = FIXED_EPS_CONTENDERS[contender]
        eps = problem.eps

        def forward():
            return solve(x, y, eps, with_grad)
    else:
        loss = SAMPLES_LOSS_CONTENDERS[contender]()

        def forward():
            return loss(x, y)

    if not with_grad:
        return forward

    def forward_backward():
        x.grad = None
        y.grad = None
        forward().sum().backward()

    forward_backward.inputs = (x, y)
    return forward_backward


# --------------------------------------------------------------------------
# Proof that the contenders do the same work
# --------------------------------------------------------------------------

def _gradients(family, contender, problem, factor=1.0):
    run = make_runner(family, contender, problem, "forward+backward")
    run()
    x, y = run.inputs
    return x.grad * factor, y.grad * factor


def check_same_work(family: str, problem: Problem, rtol: float = 1e-4) -> Dict[str, float]:
    """Assert that every contender returns the same values and gradients as guider_fast.

    Returns a few facts about the problem (eps, marginal error) for extra_info.
    """
    x, y = problem.x, problem.y
    if family == "fixed_eps":
        eps = problem.eps
        ours = guider_fast.sinkhorn(x, y, eps=eps, n_iters=N_ITERS, grad="detach")
        pot = pot_solve(x, y, eps, with_grad=False)
        # Same problem: POT's cost and reg are both 2x ours, so its <P, C> is 2x ours.
        assert_close("POT value_linear / 2", pot.value_linear / 2, ours.value_linear, rtol)
        for name in ("GeomLoss", "naive torch"):
            value = FIXED_EPS_CONTENDERS[name](x, y, eps, False)
            assert_close(f"{name} value", value, ours.value, rtol)
        gradient_factor = {"POT": 0.5}
        facts = {"eps": eps, "max_marginal_error": ours.marginal_error.max().item()}
    else:
        ours_value = SAMPLES_LOSS_CONTENDERS["guider_fast"]()(x, y)
        theirs = SAMPLES_LOSS_CONTENDERS["GeomLoss"]()(x, y)
        assert_close("GeomLoss SamplesLoss value", theirs, ours_value, rtol)
        gradient_factor = {}
        facts = {}

    ours_grad_x, ours_grad_y = _gradients(family, BASELINE, problem)
    for name in FAMILIES[family]:
        if name == BASELINE:
            continue
        grad_x, grad_y = _gradients(family, name, problem, gradient_factor.get(name, 1.0))
        # Gradients get a looser tolerance: GeomLoss's averaged (damped) updates
        # leave its potentials slightly less converged after N_ITERS, which moves
        # its extrapolated gradients by ~1e-3 relative (POT and naive: ~3e-6).
        assert_close(f"{name} grad x", grad_x, ours_grad_x, 100 * rtol)
        assert_close(f"{name} grad y", grad_y, ours_grad_y, 100 * rtol)
    return facts
