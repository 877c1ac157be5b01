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

import geomloss
import ot
import torch
from geomloss._legacy.sinkhorn_divergence import log_weights as geomloss_log_weights
from geomloss._legacy.sinkhorn_divergence import sinkhorn_loop
from geomloss._legacy.sinkhorn_samples import cost_routines as geomloss_cost_routines
from geomloss._legacy.sinkhorn_samples import softmin_tensorized

import guider_fast

SEED = 0
DIM = 64
N_ITERS = 100
# eps = 5% of the median entry of the cost matrix: small enough that the plan
# is far from the independent coupling, large enough that 100 iterations get
# guider_fast's marginals to ~1e-6, so all contenders agree on the value (to
# 1e-4, asserted in check_same_work) and the comparison is of speed alone.
EPS_FRACTION_OF_MEDIAN_COST = 0.05
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


def half_squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain-torch ``|x_i - y_j|^2 / 2`` for batched clouds (the naive contender's cost)."""
    x_sq = x.pow(2).sum(-1).unsqueeze(2)
    y_sq = y.pow(2).sum(-1).unsqueeze(1)
    return (x_sq + y_sq - 2 * torch.bmm(x, y.transpose(1, 2))) / 2


def fixed_eps(x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return EPS_FRACTION_OF_MEDIAN_COST * float(half_squared_distances(x, y).median())


def uniform_weights(batch: int, size: int) -> torch.Tensor:
    return torch.full((batch, size), 1.0 / size, dtype=torch.float32)


# --------------------------------------------------------------------------
# fixed_eps contenders: forward(x, y, eps, with_grad) -> (B,) value
# --------------------------------------------------------------------------

def guider_fast_sinkhorn(x, y, eps, with_grad):
    grad = "envelope" if with_grad else "detach"
    return guider_fast.sinkhorn(x, y, eps=eps, n_iters=N_ITERS, grad=grad).value


def pot_solve(x, y, eps, with_grad):
    # tol=0.0 never stops early (POT tests `err < tol`), so POT runs all N_ITERS.
    return ot.batch.solve_sample_batch(
        x, y, reg=2 * eps, metric="sqeuclidean", max_iter=N_ITERS, tol=0.0,
        method="log_sinkhorn", grad="envelope" if with_grad else "detach")


def pot_sinkhorn(x, y, eps, with_grad):
    # POT's `value` adds reg * sum(T log T) to <T, M>; with T detached
    # (grad="envelope") its gradient is that of <T, M> = 2 x ours.
    return pot_solve(x, y, eps, with_grad).value


def geomloss_fixed_eps_potentials(x, y, eps):
    """GeomLoss's tensorized Sinkhorn loop at one eps for N_ITERS iterations, cost included.

    As ``geomloss.sinkhorn_tensorized`` does, each cost matrix carries gradient
    to its first argument only, and the loop's last extrapolation step (run with
    grad enabled) is what carries the gradients.
    """
    batch, n, m = x.shape[0], x.shape[1], y.shape[1]
    a, b = uniform_weights(batch, n), uniform_weights(batch, m)
    cost = geomloss_cost_routines[2]
    c_xy = cost(x, y.detach())
    c_yx = cost(y, x.detach())
    _, _, g_ab, f_ba = sinkhorn_loop(
        softmin_tensorized, geomloss_log_weights(a), geomloss_log_weights(b), None, None,
        c_xy, c_yx, [eps] * N_ITERS, None, debias=False)
    return a, b, f_ba, g_ab


def geomloss_sinkhorn(x, y, eps, with_grad):
    # sinkhorn_loop switches grad mode on globally before its last step; inputs
    # without requires_grad keep the forward-only mode graph-free anyway.
    a, b, f, g = geomloss_fixed_eps_potentials(x, y, eps)
    return (a * f).sum(-1) + (b * g).sum(-1)


def naive_torch_sinkhorn(x, y, eps, with_grad):
    """What one writes by hand: alternating logsumexp updates on a dense cost matrix."""
    batch, n, m = x.shape[0], x.shape[1], y.shape[1]
    a, b = uniform_weights(batch, n), uniform_weights(batch, m)
    log_a, log_b = a.log(), b.log()
    with torch.no_grad():
        cost = half_squared_distances(x, y)
        f = torch.zeros_like(a)
        g = torch.zeros_like(b)
        for _ in range(N_ITERS):
            f = -eps * torch.logsumexp(log_b.unsqueeze(1) + (g.unsqueeze(1) - cost) / eps, dim=2)
            g = -eps * torch.logsumexp(log_a.unsqueeze(2) + (f.unsqueeze(2) - cost) / eps, dim=1)
    if with_grad:
        # Envelope-theorem gradient in plain torch (GeomLoss's trick): one more
        # differentiable update of each potential from the converged other one,
        # the cost seeing x in the f-update and y in the g-update only, so that
        # the gradient is sum_j P_ij (x_i - y_j) and not twice that.
        cost_x = half_squared_distances(x, y.detach())
        cost_y = half_squared_distances(x.detach(), y)
        f_last = -eps * torch.logsumexp(log_b.unsqueeze(1) + (g.unsqueeze(1) - cost_x) / eps, dim=2)
        g_last = -eps * torch.logsumexp(log_a.unsqueeze(2) + (f.unsqueeze(2) - cost_y) / eps, dim=1)
        f, g = f_last, g_last
    return (a * f).sum(-1) + (b * g).sum(-1)


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
    "GeomLoss": lambda: geomloss.SamplesLoss("sinkhorn", p=2, blur=SAMPLES_LOSS_BLUR,
                                             backend="tensorized"),
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

def _assert_close(name, actual, expected, rtol):
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rtol * scale, f"{name}: max abs difference {error:.3g} > {rtol} * {scale:.3g}"


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
        _assert_close("POT value_linear / 2", pot.value_linear / 2, ours.value_linear, rtol)
        for name in ("GeomLoss", "naive torch"):
            value = FIXED_EPS_CONTENDERS[name](x, y, eps, False)
            _assert_close(f"{name} value", value, ours.value, rtol)
        gradient_factor = {"POT": 0.5}
        facts = {"eps": eps, "max_marginal_error": ours.marginal_error.max().item()}
    else:
        ours_value = SAMPLES_LOSS_CONTENDERS["guider_fast"]()(x, y)
        theirs = SAMPLES_LOSS_CONTENDERS["GeomLoss"]()(x, y)
        _assert_close("GeomLoss SamplesLoss value", theirs, ours_value, rtol)
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
        _assert_close(f"{name} grad x", grad_x, ours_grad_x, 100 * rtol)
        _assert_close(f"{name} grad y", grad_y, ours_grad_y, 100 * rtol)
    return facts
