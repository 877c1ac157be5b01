"""Public optimal-transport ops: ``sinkhorn`` (batched entropic OT) and ``SamplesLoss``."""

from __future__ import annotations

from typing import Optional

import torch

from . import _cpu_build, _dispatch, _library, _library_cuda
from . import _validate as V
from .kernels import ENVELOPE_MAX_FEATURES, SINKHORN_ONCHIP_MAX_POINTS
from .reference import samples_loss as ref_samples
from .reference import sinkhorn as ref_sinkhorn

GRAD_MODES = ("envelope", "autodiff", "detach")
_MIN_EPS = 1e-30


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half inputs are solved in float32: log-domain potentials need the mantissa.
    return torch.float64 if dtype == torch.float64 else torch.float32


class SinkhornResult:
    """Result of ``guider_fast.sinkhorn`` (batched; unbatched inputs give squeezed fields).

    Attributes
    ----------
    value : entropic OT value ``<a, f> + <b, g>`` (GeomLoss's convention), (B,) or scalar.
    value_linear : ``<P, C>`` (POT ``sinkhorn2``'s convention); computed on first access
        (one pass over the cost), carries no gradient.
    f, g : dual potentials, (B, n) and (B, m); ``P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps)``.
    n_iters : iterations run (the longest run of the batch; the torch path stops all
        problems together, the Triton kernel each on its own; checks every 10 iterations).
        Read on first access (one device sync on the GPU).
    marginal_error : (B,) L1 row-marginal violation of the returned plan.
    plan() : the (B, n, m) transport plan, built on request.
    """

    def __init__(self, value, f, g, n_iters, marginal_error, solved):
        self.value = value
        self.f = f
        self.g = g
        self._n_iters = n_iters
        self.marginal_error = marginal_error
        # (_Batched inputs, f, g in the compute dtype, eps, p)
        self._solved = solved
        self._value_linear = None

    @property
    def n_iters(self) -> int:
        if isinstance(self._n_iters, torch.Tensor):
            self._n_iters = int(self._n_iters.max())
        return self._n_iters

    def __repr__(self) -> str:
        return (f"SinkhornResult(value={self.value!r}, n_iters={self.n_iters}, "
                f"max marginal_error={float(self.marginal_error.max()):.3g})")

    def _rebuild(self, fn):
        batch, f, g, eps, p = self._solved
        with torch.no_grad():
            cost = ref_sinkhorn.cost_matrix(batch.x.detach(), batch.y.detach(), p)
            return batch.restore(fn(cost, batch.a.detach(), batch.b.detach(), f, g, eps))

    @property
    def value_linear(self) -> torch.Tensor:
        if self._value_linear is None:
            self._value_linear = self._rebuild(ref_sinkhorn.linear_value)
        return self._value_linear

    def plan(self) -> torch.Tensor:
        """The transport plan (B, n, m) (or (n, m)), rebuilt from the potentials."""
        return self._rebuild(ref_sinkhorn.plan)


def _check_clouds(x, y, a, b, names=("x", "y", "a", "b")):
    nx, ny, na, nb = names
    V.require_float(nx, x)
    V.require_float(ny, y)
    V.require_rank(nx, x, (2, 3), "point cloud (n, d) or batch (B, n, d)")
    V.require_rank(ny, y, (2, 3), "point cloud (m, d) or batch (B, m, d)")
    if x.dtype != y.dtype:
        raise TypeError(f"{ny} must have the dtype of {nx} ({x.dtype}), got {y.dtype}")
    if x.dim() != y.dim():
        raise ValueError(f"{nx} and {ny} must both be batched or both unbatched, got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"{nx} and {ny} must have the same feature size d, got {x.shape[-1]} and {y.shape[-1]}")
    if x.dim() == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(f"{nx} and {ny} must have the same batch size, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[-2] == 0 or y.shape[-2] == 0 or (x.dim() == 3 and x.shape[0] == 0):
        raise ValueError(f"empty input: {nx} has shape {tuple(x.shape)}, {ny} has shape {tuple(y.shape)}")
    batch_shape = x.shape[:-2]
    for name, w, pts in ((na, a, x), (nb, b, y)):
        if w is None:
            continue
        V.require_float(name, w)
        V.require_shape(name, w, tuple(batch_shape) + (pts.shape[-2],),
                        f"one weight per point of {nx if pts is x else ny}")
    V.require_same_device([(nx, x), (ny, y), (na, a), (nb, b)])


def _value_checks(named_points, named_weights):
    if not V.checks_enabled():
        return
    checks = V.ValueChecks()
    for name, t in named_points:
        checks.finite(name, t)
    for name, w in named_weights:
        checks.weights(name, w)
    checks.raise_if_any()


def _uniform(pts: torch.Tensor, dtype) -> torch.Tensor:
    n = pts.shape[1]
    return torch.full((pts.shape[0], n), 1.0 / n, dtype=dtype, device=pts.device)


class _Batched:
    """Inputs as (B, n, d) / (B, n) tensors in the compute dtype, and how to undo that."""

    def __init__(self, x, y, a, b):
        self.squeeze = x.dim() == 2
        self.out_dtype = x.dtype
        dtype = _compute_dtype(x.dtype)
        lift = (lambda t: t.unsqueeze(0)) if self.squeeze else (lambda t: t)
        self.x, self.y = lift(x).to(dtype), lift(y).to(dtype)
        self.a = _uniform(self.x, dtype) if a is None else lift(a).to(dtype)
        self.b = _uniform(self.y, dtype) if b is None else lift(b).to(dtype)

    def restore(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.out_dtype)
        return t.squeeze(0) if self.squeeze else t


def _sinkhorn_torch(x, y, a, b, eps, p, n_iters, tol, grad):
    """Batched torch path: x (B, n, d), y (B, m, d), a (B, n), b (B, m) in the compute dtype.

    Returns ``(value, state)``; ``state.f``/``state.g`` carry autograd history only
    for ``grad="autodiff"``.
    """
    if grad == "autodiff":
        cost = ref_sinkhorn.cost_matrix(x, y, p)
        state = ref_sinkhorn.solve_autodiff(cost, a, b, eps, n_iters, tol)
        return (a * state.f).sum(-1) + (b * state.g).sum(-1), state
    with torch.no_grad():
        cost = ref_sinkhorn.cost_matrix(x.detach(), y.detach(), p)
        state = ref_sinkhorn.solve_detached(cost, a.detach(), b.detach(), eps, n_iters, tol)
    del cost
    if grad == "envelope":
        value = ref_sinkhorn.EnvelopeValue.apply(x, y, a, b, state.f, state.g, eps, p)
    else:
        value = (a * state.f).sum(-1) + (b * state.g).sum(-1)
    return value, state


_dispatch.register("sinkhorn", "torch", _sinkhorn_torch)


# Beyond this feature size, recomputing cost tiles in every half-iteration costs more
# than reading a cost matrix built once by one matrix product ...
STREAMED_MAX_FEATURES = 512
# ... as long as that (B, n, m) float32 matrix stays under 1 GiB.
PRECOMPUTED_COST_MAX_ELEMENTS = 1 << 28


def sinkhorn_regime(batch: int, n: int, m: int, d: int) -> str:
    """How the Triton backend solves a (B, n, m, d) batch (the rule ``auto`` follows on GPU).

    * ``"onchip"``: n, m <= 256: one program per problem keeps its cost tile on chip
      and runs every iteration in one launch.
    * ``"precomputed"``: larger clouds with d > 512 whose B*n*m cost fits in 1 GiB:
      the cost is one matrix product (cuBLAS), then log-domain updates read it.
    * ``"streamed"``: otherwise: cost tiles recomputed from the points in every
      half-iteration with an online log-sum-exp; memory O((n + m) d).
    """
    if max(n, m) <= SINKHORN_ONCHIP_MAX_POINTS:
        return "onchip"
    if d > STREAMED_MAX_FEATURES and batch * n * m <= PRECOMPUTED_COST_MAX_ELEMENTS:
        return "precomputed"
    return "streamed"


def _kernel_result(x, y, a, b, solved, eps, p, grad, point_gradients):
    """``(value, state)`` from a kernel's ``(f, g, marginal_error, iterations)``: the value
    carries envelope gradients from ``point_gradients`` (None: the reference's row blocks)."""
    f, g, error, iterations = solved
    f, g, error = f.to(x.dtype), g.to(x.dtype), error.to(x.dtype)
    # Kernels stop problems one by one: n_iters is the longest run, read on first access.
    state = ref_sinkhorn.SinkhornState(f, g, iterations, error)
    if grad == "envelope":
        value = ref_sinkhorn.EnvelopeValue.apply(x, y, a, b, f, g, eps, p, point_gradients)
    else:
        value = (a * f).sum(-1) + (b * g).sum(-1)
    return value, state


def _sinkhorn_triton(x, y, a, b, eps, p, n_iters, tol, grad):
    """Triton backend: regime by ``sinkhorn_regime``; envelope gradients from the
    tile-wise Triton kernel (d <= 256) or the reference's row-blocked backward, so
    the whole plan is never stored for large clouds."""
    regime = sinkhorn_regime(x.shape[0], x.shape[1], y.shape[1], x.shape[2])
    if regime == "precomputed":
        return _sinkhorn_torch(x, y, a, b, eps, p, n_iters, tol, grad)
    solve = _library.sinkhorn_onchip if regime == "onchip" else _library.sinkhorn_streamed
    with torch.no_grad():
        solved = solve(x.detach(), y.detach(), a.detach(), b.detach(), eps, p, n_iters, tol)
    point_gradients = (_library.sinkhorn_envelope_grad if x.shape[2] <= ENVELOPE_MAX_FEATURES
                       else None)  # wider points: the reference's row-blocked backward
    return _kernel_result(x, y, a, b, solved, eps, p, grad, point_gradients)


def _max_points(limit: int, kernel: str, why: str):
    """A dispatch ``limits`` rule: None for clouds of at most ``limit`` points, else the reason."""
    def limits(problem):
        n, m, _ = problem
        if max(n, m) > limit:
            return f"clouds of {max(n, m)} points exceed the {kernel}'s {limit} {why}"
        return None
    return limits


def _cuda_envelope_gradients(x, y, a, b, f, g, eps, p, scale):
    """EnvelopeValue's point gradients from the CUDA tiny-cloud kernel (float32 in and out)."""
    dense = [t.detach().float().contiguous() for t in (x, y, a, b, f, g, scale)]
    return _library_cuda.ops().sinkhorn_tiny_envelope(*dense[:6], eps, p, dense[6])


def _sinkhorn_cuda(x, y, a, b, eps, p, n_iters, tol, grad):
    """CUDA C++ backend: the tiny-cloud kernel (n, m <= 32: one warp per problem, every
    iteration in one launch, each problem stopping on its own) and its envelope backward."""
    dense = [t.detach().float().contiguous() for t in (x, y, a, b)]
    with torch.no_grad():
        solved = _library_cuda.ops().sinkhorn_tiny(*dense, eps, p, n_iters, tol)
    return _kernel_result(x, y, a, b, solved, eps, p, grad, _cuda_envelope_gradients)


# The CUDA kernel keeps one row and one column of a problem's cost in each lane of a warp.
SINKHORN_CUDA_MAX_POINTS = 32


_dispatch.register("sinkhorn", "cuda", _sinkhorn_cuda,
                   dtypes=(torch.float16, torch.bfloat16, torch.float32),
                   limits=_max_points(SINKHORN_CUDA_MAX_POINTS, "CUDA tiny-cloud kernel",
                                      "(one warp per problem); use backend='triton' or 'torch'"))


_dispatch.register("sinkhorn", "triton", _sinkhorn_triton,
                   dtypes=(torch.float16, torch.bfloat16, torch.float32))


def _cpu_envelope_point_gradients(x, y, a, b, f, g, eps, p, scale):
    """EnvelopeValue's point gradients on the CPU extension: the reference's row blocks
    (at most ENVELOPE_BLOCK_ELEMENTS plan entries), each cost block turned into plan
    weights in place by one fused pass, then two BLAS products."""
    ops = _cpu_build.ops()
    with torch.no_grad():
        x, y = x.detach().float(), y.detach().float()
        batch, n, _ = x.shape
        m = y.shape[1]
        scale = scale.detach().float().reshape(batch).contiguous()
        rows = max(1, min(n, ref_sinkhorn.ENVELOPE_BLOCK_ELEMENTS // max(1, batch * m)))
        x_blocks, grad_y = [], torch.zeros_like(y)
        for start in range(0, n, rows):
            block = slice(start, start + rows)
            xb = x[:, block]
            weights = ref_sinkhorn.cost_matrix(xb, y, p)
            rowsum, colsum = ops.plan_weights_(weights, a[:, block].float(), b.float(), f[:, block].float(),
                                               g.float(), eps, p, scale)
            x_blocks.append(torch.bmm(weights, y).neg_().addcmul_(rowsum.unsqueeze(2), xb))
            grad_y.addcmul_(colsum.unsqueeze(2), y).sub_(torch.bmm(weights.transpose(1, 2), xb))
            del weights
        grad_x = x_blocks[0] if len(x_blocks) == 1 else torch.cat(x_blocks, dim=1)
        return grad_x, grad_y


def _sinkhorn_cpu(x, y, a, b, eps, p, n_iters, tol, grad):
    """CPU C++ backend (float32): the reference's cost matrix, then every iteration of every
    problem in one call (csrc/cpu/sinkhorn_cpu.cpp: each problem's cost stays in cache, the
    exponentials are never stored, each problem stops on its own), and the fused envelope
    backward."""
    with torch.no_grad():
        cost = ref_sinkhorn.cost_matrix(x.detach(), y.detach(), p)
        solved = _cpu_build.ops().sinkhorn(cost, a.detach(), b.detach(), eps, n_iters, tol)
    del cost
    return _kernel_result(x, y, a, b, solved, eps, p, grad, _cpu_envelope_point_gradients)


_dispatch.register("sinkhorn", "cpu", _sinkhorn_cpu, dtypes=(torch.float16, torch.bfloat16, torch.float32))


def sinkhorn(x: torch.Tensor, y: torch.Tensor, a: Optional[torch.Tensor] = None,
             b: Optional[torch.Tensor] = None, *, eps: float, p: int = 2, n_iters: int = 100,
             tol: Optional[float] = None, grad: str = "envelope",
             backend: str = "auto") -> SinkhornResult:
    """Batched entropic optimal transport between point clouds (log-domain Sinkhorn).

    Parameters
    ----------
    x : (B, n, d) or (n, d) float tensor.  y : (B, m, d) or (m, d), same d.
    a, b : (B, n) / (B, m) non-negative weights, each problem summing to 1
        (default uniform).  Zero weights mark padding, so ragged batches are
        padded clouds with zero weights on the padding.
    eps : entropic regularisation (> 0), in cost units.  Log-domain updates stay
        stable down to ~1e-3 of the cost scale.
    p : 2 for C = |x - y|^2 / 2, 1 for C = |x - y|.
    n_iters : maximum number of iterations (one f and one g update each).
    tol : stop when every problem's L1 marginal error is <= tol; checked every
        10 iterations (one host sync per check, never one per iteration).
    grad : "envelope" (default): gradients of ``value`` w.r.t. x, y, a, b from the
        final potentials (no backprop through the loop, O(B n m) transient memory);
        "autodiff": backprop through every iteration (memory grows with n_iters);
        "detach": no gradients.
    backend : "auto" | "torch" | "triton" | "cuda" | "cpu" (see ``guider_fast._dispatch``).
        On CPU tensors ``auto`` takes the CPU C++ extension (``"cpu"``, float32 and half
        inputs; every size: measured faster than the torch path from one point and one
        iteration up, benchmarks/results/sinkhorn_cpu.md) where it is built, else the
        torch path; float64 always runs the torch path.
        On CUDA tensors ``auto`` takes Triton (float16/bfloat16/float32) and solves
        by the size rule of ``sinkhorn_regime``: on chip for n, m <= 256; a cost
        matrix built once when d > 512 and B*n*m fits in 1 GiB; otherwise cost
        tiles streamed from the points (memory O((n + m) d)).  ``backend="cuda"``
        runs the CUDA C++ tiny-cloud kernel (n, m <= 32, one warp per problem, costs
        from direct differences); ``auto`` keeps Triton ahead of it until a GPU has
        measured it faster (``guider-fast bench``).

    Returns a ``SinkhornResult``; half-precision inputs are solved in float32 and
    the result is returned in the input dtype.
    """
    _check_clouds(x, y, a, b)
    V.require_positive("eps", eps)
    V.require_choice("p", p, (1, 2))
    V.require_int("n_iters", n_iters, 1)
    if float(eps) < _MIN_EPS:
        raise ValueError(f"eps must be >= {_MIN_EPS:g} (1/eps must stay finite in float32), got {eps}")
    V.require_positive("tol", tol, allow_none=True)
    V.require_choice("grad", grad, GRAD_MODES)
    _value_checks([("x", x), ("y", y)], [("a", a), ("b", b)])
    if grad == "autodiff":
        if _dispatch.requested_backend(backend) not in ("auto", "torch"):
            raise RuntimeError(f"backend={_dispatch.requested_backend(backend)!r} cannot run sinkhorn with "
                               "grad='autodiff': backprop through the iterations runs on the torch "
                               "backend only (use grad='envelope')")
        backend = "torch"
    _, impl = _dispatch.resolve("sinkhorn", backend, x.device, x.dtype,
                                problem=(x.shape[-2], y.shape[-2], x.shape[-1]))

    batch = _Batched(x, y, a, b)
    value, state = impl(batch.x, batch.y, batch.a, batch.b, float(eps), p, int(n_iters), tol, grad)
    return SinkhornResult(value=batch.restore(value), f=batch.restore(state.f),
                          g=batch.restore(state.g), n_iters=state.n_iters,
                          marginal_error=batch.restore(state.marginal_error),
                          solved=(batch, state.f.detach(), state.g.detach(), float(eps), p))


def _samples_loss_torch(a, x, b, y, p, blur, scaling, debias, diameter):
    return ref_samples.sinkhorn_divergence(a, x, b, y, p=p, blur=blur, scaling=scaling,
                                           debias=debias, diameter=diameter)


_dispatch.register("samples_loss", "torch", _samples_loss_torch)


class _TritonSamplesLossValue(torch.autograd.Function):
    """GeomLoss's value from the kernel's extrapolated potentials; its gradients
    (the last extrapolation's, as GeomLoss) rebuilt tile by tile, never a (B, n, m) plan.
    ``pull(u, v, f, h, weights, eps, p)``: the backward's soft-max-weighted cost gradient
    (default: the Triton kernel; the CPU backend passes its own)."""

    @staticmethod
    def forward(ctx, a, x, b, y, packed, eps, p, debias, pull=None):
        n, m = x.shape[1], y.shape[1]
        parts = torch.split(packed, [n, m, n, m] * (2 if debias else 1), dim=1)
        f_ba, g_ab, f_new, g_new = (t.to(x.dtype) for t in parts[:4])
        if debias:
            f_aa, g_bb, f_aa_new, g_bb_new = (t.to(x.dtype) for t in parts[4:])
            f_value, g_value = f_new - f_aa_new, g_new - g_bb_new
        else:
            f_aa = g_bb = f_aa_new = g_bb_new = None
            f_value, g_value = f_new, g_new
        ctx.save_for_backward(a, x, b, y, f_value, g_value)
        ctx.potentials = (f_ba, g_ab, f_new, g_new, f_aa, g_bb, f_aa_new, g_bb_new)
        ctx.eps, ctx.p, ctx.debias = eps, p, debias
        ctx.pull = pull or _triton_pull
        return (a * f_value).sum(-1) + (b * g_value).sum(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value):
        a, x, b, y, f_value, g_value = ctx.saved_tensors
        f_ba, g_ab, f_new, g_new, f_aa, g_bb, f_aa_new, g_bb_new = ctx.potentials
        eps, p = ctx.eps, ctx.p
        a_log, b_log = ref_samples.geomloss_log_weights(a), ref_samples.geomloss_log_weights(b)
        scale = grad_value.unsqueeze(1)
        grad_x = grad_y = None

        def pull(u, v, f, h, weights):
            return ctx.pull(u.detach(), v.detach(), f, h, scale * weights, eps, p)

        if ctx.needs_input_grad[1]:
            grad_x = pull(x, y, f_new, b_log + g_ab / eps, a)
            if ctx.debias:
                grad_x = grad_x - pull(x, x, f_aa_new, a_log + f_aa / eps, a)
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[3]:
            grad_y = pull(y, x, g_new, a_log + f_ba / eps, b)
            if ctx.debias:
                grad_y = grad_y - pull(y, y, g_bb_new, b_log + g_bb / eps, b)
            grad_y = grad_y.to(y.dtype)
        grad_a = f_value * scale if ctx.needs_input_grad[0] else None
        grad_b = g_value * scale if ctx.needs_input_grad[2] else None
        return grad_a, grad_x, grad_b, grad_y, None, None, None, None, None


def _triton_pull(u, v, f, h, weights, eps, p):
    return _library.weighted_cost_gradient(u, v, f / eps, h, weights, eps, p, True, True)


def _cpu_pull(u, v, f, h, weights, eps, p):
    """scale_i sum_j softmax_j(h_j - C_ij/eps) grad_u C(u_i, v_j) on GeomLoss's cost: one fused
    pass turns the cost into the weights in place, then one BLAS product (f is not needed:
    the rows are normalised by their own log-sum-exp)."""
    with torch.no_grad():
        u, v = u.float(), v.float()
        weights_matrix = ref_samples.geomloss_cost(u, v, p)
        rowsum = _cpu_build.ops().softmax_weights_(weights_matrix, h.float(), weights.float(), eps, p)
        # bmm then subtract: torch's CPU baddbmm of small batched matrices is ~20x slower than bmm.
        return torch.bmm(weights_matrix, v).neg_().addcmul_(rowsum.unsqueeze(2), u)


def _samples_loss_cpu(a, x, b, y, p, blur, scaling, debias, diameter):
    """CPU C++ backend (float32): GeomLoss's costs built once (BLAS), then the annealed loop and
    the last extrapolation of every problem in one call, each problem's costs kept in cache
    (csrc/cpu/sinkhorn_cpu.cpp); the backward's weights from one fused pass per cost."""
    if x.shape[1] == 1 and y.shape[1] == 1:
        return ref_samples.one_point_divergence(a, x, b, y, p, debias)
    eps_list = ref_samples.schedule(x, y, p, blur, scaling, diameter)
    with torch.no_grad():
        xd, yd, ad, bd = x.detach(), y.detach(), a.detach(), b.detach()
        c_xy = ref_samples.geomloss_cost(xd, yd, p)
        c_xx = ref_samples.geomloss_cost(xd, xd, p) if debias else None
        c_yy = ref_samples.geomloss_cost(yd, yd, p) if debias else None
        packed = _cpu_build.ops().samples_loss(c_xy, c_xx, c_yy, ad, bd, ref_samples.geomloss_log_weights(ad),
                                               ref_samples.geomloss_log_weights(bd), eps_list)
        del c_xy, c_xx, c_yy
    return _TritonSamplesLossValue.apply(a, x, b, y, packed, eps_list[-1], p, debias, _cpu_pull)


_dispatch.register("samples_loss", "cpu", _samples_loss_cpu,
                   dtypes=(torch.float16, torch.bfloat16, torch.float32))


def _extrapolate_packed(a, x, b, y, packed, p, eps, debias):
    """The reference's last extrapolation (value and autograd) from a kernel's packed potentials."""
    n, m = x.shape[1], y.shape[1]
    parts = torch.split(packed.to(x.dtype), [n, m, n, m] * (2 if debias else 1), dim=1)
    potentials = (parts[0], parts[1], parts[4], parts[5]) if debias else (parts[0], parts[1], None, None)
    return ref_samples.extrapolated_divergence(a, x, b, y, p, eps, potentials)


def _samples_loss_triton(a, x, b, y, p, blur, scaling, debias, diameter):
    """GeomLoss's annealed loop and last extrapolation in one Triton launch; tile-wise
    backward (wider points than ENVELOPE_MAX_FEATURES: the reference's extrapolation)."""
    if x.shape[1] == 1 and y.shape[1] == 1:
        return ref_samples.one_point_divergence(a, x, b, y, p, debias)
    eps_list = ref_samples.schedule(x, y, p, blur, scaling, diameter)
    with torch.no_grad():
        packed = _library.samples_loss_onchip(x.detach(), y.detach(), a.detach(), b.detach(),
                                              eps_list, p, debias)
    if x.shape[2] <= ENVELOPE_MAX_FEATURES:
        return _TritonSamplesLossValue.apply(a, x, b, y, packed, eps_list[-1], p, debias)
    return _extrapolate_packed(a, x, b, y, packed, p, eps_list[-1], debias)


_dispatch.register("samples_loss", "triton", _samples_loss_triton,
                   dtypes=(torch.float16, torch.bfloat16, torch.float32),
                   limits=_max_points(SINKHORN_ONCHIP_MAX_POINTS, "on-chip Triton kernel",
                                      "(no streamed SamplesLoss kernel in this version)"))


def _samples_loss_cuda(a, x, b, y, p, blur, scaling, debias, diameter):
    """CUDA C++ backend: the annealed, debiased loop in one launch (one block per problem,
    n, m <= 256); the value and its gradients from GeomLoss's last extrapolation, rebuilt
    by the reference from the kernel's potentials."""
    if x.shape[1] == 1 and y.shape[1] == 1:
        return ref_samples.one_point_divergence(a, x, b, y, p, debias)
    eps_list = ref_samples.schedule(x, y, p, blur, scaling, diameter)
    dense = [t.detach().float().contiguous() for t in (x, y, a, b)]
    with torch.no_grad():
        packed = _library_cuda.ops().samples_loss_onchip(*dense, eps_list, p, debias)
    return _extrapolate_packed(a, x, b, y, packed, p, eps_list[-1], debias)


# One thread per point of a block: the on-chip CUDA kernel's bound.
SAMPLES_LOSS_CUDA_MAX_POINTS = 256


_dispatch.register("samples_loss", "cuda", _samples_loss_cuda,
                   dtypes=(torch.float16, torch.bfloat16, torch.float32),
                   limits=_max_points(SAMPLES_LOSS_CUDA_MAX_POINTS, "on-chip CUDA kernel",
                                      "(one block per problem, one thread per point)"))


class SamplesLoss(torch.nn.Module):
    """Drop-in for GeomLoss ``SamplesLoss("sinkhorn", ...)`` (tensorized semantics of geomloss 0.3.1).

    Same cost (p=1: |x-y|, p=2: |x-y|^2/2), epsilon schedule from the bounding-box
    diameter of all points down to ``blur^p`` by factors ``scaling^p``, symmetric
    averaged updates, debiasing and the final extrapolation step that carries the
    gradients.  Call as ``L(x, y)`` or ``L(a, x, b, y)`` with (n, d) clouds
    (returns a scalar) or (B, n, d) batches (returns (B,)).  One-point clouds
    (n = m = 1, GUIDER's calibration) take a closed form equal to GeomLoss's output.

    ``diameter`` may be given to skip the bounding-box pass (and its host sync).

    ``backend="cuda"`` runs the CUDA C++ on-chip kernel (n, m <= 256: one block per
    problem, the whole annealed, debiased loop in one launch, costs from direct
    differences, cost rows cached in shared memory as far as they fit); its value and
    gradients come from the reference's last extrapolation on the kernel's potentials.
    ``auto`` keeps Triton ahead of it on GPUs until a GPU has measured it faster.

    ``backend="cpu"`` runs the CPU C++ extension (float32, half inputs in float32): GeomLoss's
    costs built once, then the annealed loop and last extrapolation of each problem in one
    call with its costs in cache, and a fused backward.  On CPU tensors ``auto`` takes it at
    every size where it is built (measured faster than the torch path throughout), else the
    torch path; float64 always runs the torch path.

    GeomLoss compatibility: ``backend="tensorized"`` means ``"torch"``, and
    ``"online"`` / ``"multiscale"`` mean ``"auto"`` (same values, our kernels).
    GeomLoss options outside balanced Sinkhorn between weighted clouds
    (``reach``, ``cost``, ``kernel``, ``potentials=True``, ``cluster_scale``)
    raise ``NotImplementedError``; ``truncate`` and ``verbose`` only tune
    GeomLoss's multiscale backend and are accepted and ignored.
    """

    _GEOMLOSS_BACKENDS = {"tensorized": "torch", "online": "auto", "multiscale": "auto"}

    def __init__(self, loss: str = "sinkhorn", p: int = 2, blur: float = 0.05,
                 scaling: float = 0.5, debias: bool = True, backend: str = "auto",
                 diameter: Optional[float] = None, *, reach=None, cost=None, kernel=None,
                 potentials: bool = False, cluster_scale=None, truncate=5, verbose: bool = False):
        super().__init__()
        V.require_choice("loss", loss, ("sinkhorn",))
        V.require_choice("p", p, (1, 2))
        V.require_positive("blur", blur)
        V.require_positive("scaling", scaling)
        if not scaling < 1:
            raise ValueError(f"scaling must be in (0, 1), got {scaling}")
        V.require_positive("diameter", diameter, allow_none=True)
        for name, value, default in (("reach", reach, None), ("cost", cost, None),
                                     ("kernel", kernel, None), ("potentials", potentials, False),
                                     ("cluster_scale", cluster_scale, None)):
            if value is not default and value != default:
                raise NotImplementedError(
                    f"SamplesLoss: {name}={value!r} is not supported (balanced Sinkhorn with the "
                    f"|x-y|^p/p cost only); leave {name} at {default!r}")
        backend = self._GEOMLOSS_BACKENDS.get(backend, backend)
        _dispatch.requested_backend(backend)
        self.loss, self.p, self.blur, self.scaling = loss, p, float(blur), float(scaling)
        self.debias, self.backend, self.diameter = bool(debias), backend, diameter

    def extra_repr(self) -> str:
        return (f"loss={self.loss!r}, p={self.p}, blur={self.blur}, scaling={self.scaling}, "
                f"debias={self.debias}, backend={self.backend!r}")

    def forward(self, *args):
        if len(args) == 2:
            x, y = args
            a = b = None
        elif len(args) == 4:
            a, x, b, y = args
            V.require_tensor("a", a)
            V.require_tensor("b", b)
        else:
            raise TypeError(f"SamplesLoss expects (x, y) or (a, x, b, y), got {len(args)} arguments")
        _check_clouds(x, y, a, b)
        _value_checks([("x", x), ("y", y)], [("a", a), ("b", b)])
        _, impl = _dispatch.resolve("samples_loss", self.backend, x.device, x.dtype,
                                    problem=(x.shape[-2], y.shape[-2], x.shape[-1]))

        batch = _Batched(x, y, a, b)
        values = impl(batch.a, batch.x, batch.b, batch.y, self.p, self.blur, self.scaling,
                      self.debias, self.diameter)
        return batch.restore(values)
