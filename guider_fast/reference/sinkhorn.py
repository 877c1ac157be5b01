"""Reference batched log-domain Sinkhorn (torch): the CPU path and the test oracle.

Conventions (see ``guider_fast.sinkhorn`` for the public contract):

* cost ``p=2``: ``C(x, y) = |x - y|^2 / 2``; ``p=1``: ``C(x, y) = |x - y|``;
* potentials ``f`` (B, n), ``g`` (B, m) with the plan
  ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``;
* updates in POT's order (``f`` from ``g``, then ``g`` from ``f``), so a fixed
  number of iterations gives the same iterates as ``ot.batch.solve_batch``;
* zero weights are ``log 0 = -inf`` entries: padded points carry finite
  potentials but no mass, so ragged batches need no special case.

Everything here works on batched (B, n, d) tensors in float32 or float64;
dtype promotion and argument checking happen in ``guider_fast.ot``.
"""

from __future__ import annotations

import torch

from .._constants import DISTANCE_FLOOR, EXP_FLOOR, SINKHORN_CHECK_EVERY


def centered(x: torch.Tensor, y: torch.Tensor):
    """x and y shifted by the mean of all their points, per problem.

    Costs and their gradients only depend on differences x_i - y_j, but the
    expanded form |x|^2 - 2 x.y + |y|^2 loses digits to cancellation when the
    clouds sit far from the origin or close to each other (a student converging
    to its teacher): centring first cuts the float32 error by 10-40x there.
    """
    center = (x.sum(1, keepdim=True) + y.sum(1, keepdim=True)) / (x.shape[1] + y.shape[1])
    return x - center, y - center


def _centred_squared_distances(x, y, out=None):
    """Centred |x_i - y_j|^2 clamped at 0; written into ``out`` (no autograd) when given."""
    x, y = centered(x, y)
    norms = torch.add((x * x).sum(-1).unsqueeze(2), (y * y).sum(-1).unsqueeze(1), out=out)
    if out is None:
        return torch.baddbmm(norms, x, y.transpose(1, 2), alpha=-2.0).clamp_min(0.0)
    return norms.baddbmm_(x, y.transpose(1, 2), alpha=-2.0).clamp_min_(0.0)


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|x_i - y_j|^2 for batched clouds, via batched matrix products, clamped at 0.

    Without autograd, problems are processed in chunks whose centred copies
    take at most a quarter of the output, so building the cost never costs
    more memory than the cost itself plus a quarter.
    """
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return _centred_squared_distances(x, y)
    batch, n, d = x.shape
    m = y.shape[1]
    out = torch.empty(batch, n, m, dtype=x.dtype, device=x.device)
    chunk = max(1, (n * m) * batch // (4 * (n + m) * d))
    for start in range(0, batch, chunk):
        stop = start + chunk
        _centred_squared_distances(x[start:stop], y[start:stop], out=out[start:stop])
    return out


def cost_matrix(x: torch.Tensor, y: torch.Tensor, p: int) -> torch.Tensor:
    """(B, n, m) ground cost: |x-y|^2/2 for p=2, |x-y| for p=1."""
    sq = squared_distances(x, y)
    if p == 2:
        return sq.mul_(0.5) if not sq.requires_grad else sq * 0.5
    # The clamp keeps autodiff finite at coincident points (d sqrt(0) = inf).
    return sq.clamp_min(DISTANCE_FLOOR).sqrt() if sq.requires_grad else sq.sqrt_()


def log_weights(w: torch.Tensor) -> torch.Tensor:
    """log(w) with log(0) = -inf, safe to differentiate (no 0 * inf = nan)."""
    positive = w > 0
    return torch.where(positive, torch.where(positive, w, torch.ones_like(w)).log(),
                       torch.full_like(w, float("-inf")))


def softmin_(cost: torch.Tensor, h: torch.Tensor, eps: float, work: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """In-place-buffered soft-min of a (B, n, m) ``cost`` along ``dim``.

    ``dim=2``: ``-eps * logsumexp_j(h_j - C_ij / eps)`` with ``h`` (B, m), giving (B, n);
    ``dim=1``: ``-eps * logsumexp_i(h_i - C_ij / eps)`` with ``h`` (B, n), giving (B, m).

    The log-sum-exp comes from torch's fused log_softmax kernel (one pass that
    does max, exp-sum and write, 2-4x faster on CPU than ``torch.logsumexp``):
    for any pivot ``k``, ``LSE = z_k - log_softmax(z)_k``.  The pivot is the
    entry with the largest ``h`` (never a zero-weight one), which keeps the
    cancellation error at one ulp of the cost range, the same size as the
    rounding already present in the cost matrix.  ``work`` (B, n, m) is
    overwritten; no autograd.
    """
    other = 3 - dim
    torch.add(h.unsqueeze(other), cost, alpha=-1.0 / eps, out=work)
    pivot = h.argmax(dim=1)
    index_shape = [work.shape[0], 1, 1]
    index_shape[other] = work.shape[other]
    index = pivot.view(-1, 1, 1).expand(index_shape)
    z_pivot = work.gather(dim, index)
    # In place on CPU (checked bit-identical there); elsewhere into a fresh
    # buffer, since aliasing input and output of a private op is not a contract.
    log_p = work if work.device.type == "cpu" else torch.empty_like(work)
    torch.ops.aten._log_softmax.out(work, dim, False, out=log_p)
    lse = z_pivot.sub_(log_p.gather(dim, index)).squeeze(dim)
    return lse.mul_(-eps)


def softmin(cost: torch.Tensor, h: torch.Tensor, eps: float) -> torch.Tensor:
    """Differentiable ``-eps * logsumexp_j(h_j - cost_ij / eps)`` (autodiff paths)."""
    return -eps * torch.logsumexp(h.unsqueeze(1) - cost / eps, dim=2)


class SinkhornState:
    """Final potentials and diagnostics of one batched solve."""

    __slots__ = ("f", "g", "n_iters", "marginal_error")

    def __init__(self, f, g, n_iters, marginal_error):
        self.f = f
        self.g = g
        self.n_iters = n_iters
        self.marginal_error = marginal_error


def _row_marginal_error(f_before, f_after, a, eps):
    """L1 row-marginal violation of the plan built on (f_before, g).

    With ``f_after = softmin(C, log b + g/eps)`` the rows of that plan sum to
    ``a_i * exp((f_before_i - f_after_i) / eps)``: the next update yields the
    error for free.
    """
    ratio = torch.exp(((f_before - f_after) / eps).clamp(max=80.0))
    return (a * (ratio - 1.0)).abs().sum(-1)


def iterate(update_f, update_g, a, b, eps, n_iters, tol):
    """The alternating loop shared by every solver: f from g, then g from f (POT's order).

    ``update_f(g)`` and ``update_g(f)`` are the soft-min half-steps; the tol test
    reads the row-marginal error every ``SINKHORN_CHECK_EVERY`` iterations (one host sync).
    """
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    for it in range(n_iters):
        f_new = update_f(g)
        if tol is not None and it > 0 and it % SINKHORN_CHECK_EVERY == 0:
            error = _row_marginal_error(f.detach(), f_new.detach(), a.detach(), eps)
            if bool((error <= tol).all()):
                return SinkhornState(f, g, it, error)
        f = f_new
        g = update_g(f)
    with torch.no_grad():
        error = _row_marginal_error(f, update_f(g.detach()), a, eps)
    return SinkhornState(f, g, n_iters, error)


def solve_detached(cost, a, b, eps, n_iters, tol=None):
    """Alternating log-domain Sinkhorn without autograd; returns a ``SinkhornState``.

    ``cost`` (B, n, m), ``a`` (B, n), ``b`` (B, m).  Runs ``n_iters`` iterations
    or stops at the first check (every ``SINKHORN_CHECK_EVERY`` iterations) where every
    problem's row-marginal L1 error is <= ``tol``.  One (B, n, m) work buffer.
    """
    with torch.no_grad():
        log_a, log_b = log_weights(a), log_weights(b)
        work = torch.empty_like(cost)
        return iterate(lambda g: softmin_(cost, log_b + g / eps, eps, work, dim=2),
                        lambda f: softmin_(cost, log_a + f / eps, eps, work, dim=1),
                        a, b, eps, n_iters, tol)


def solve_autodiff(cost, a, b, eps, n_iters, tol=None):
    """Same iterations as ``solve_detached``, recorded by autograd (memory ~ n_iters * B*n*m)."""
    log_a, log_b = log_weights(a), log_weights(b)
    cost_t = cost.transpose(1, 2)
    return iterate(lambda g: softmin(cost, log_b + g / eps, eps),
                    lambda f: softmin(cost_t, log_a + f / eps, eps),
                    a, b, eps, n_iters, tol)


def log_plan(cost, a, b, f, g, eps):
    """log P_ij = log a_i + log b_j + (f_i + g_j - C_ij) / eps  (-inf on padding)."""
    return (log_weights(a).unsqueeze(2) + log_weights(b).unsqueeze(1)
            + (f.unsqueeze(2) + g.unsqueeze(1) - cost) / eps)


def log_plan_(cost, a, b, f, g, eps):
    """``log_plan`` written over ``cost`` (no autograd, no (B, n, m) temporaries)."""
    out = cost.neg_().add_(f.unsqueeze(2)).add_(g.unsqueeze(1)).div_(eps)
    return out.add_(log_weights(a).unsqueeze(2)).add_(log_weights(b).unsqueeze(1))


def plan(cost, a, b, f, g, eps):
    return log_plan(cost, a, b, f, g, eps).exp()


def linear_value(cost, a, b, f, g, eps):
    """<P, C> per problem (POT ``sinkhorn2`` convention), without autograd."""
    with torch.no_grad():
        lp = log_plan(cost, a, b, f, g, eps).clamp_(min=EXP_FLOOR).exp_()
        return (lp * cost).sum(dim=(1, 2))


# Largest (B, rows, m) plan block the envelope backward materialises at once.
ENVELOPE_BLOCK_ELEMENTS = 1 << 26


def _envelope_block(x, y, a, b, f, g, eps, p):
    """Plan weights of one block of rows: P (p=2) or P / C (p=1), zero on padding."""
    cost = cost_matrix(x, y, p)
    if p == 1:
        inverse_cost = torch.where(cost > 0, cost.clamp_min(DISTANCE_FLOOR).reciprocal(), torch.zeros_like(cost))
    weights = log_plan_(cost, a, b, f, g, eps).clamp_(min=EXP_FLOOR).exp_()
    if p == 1:
        weights.mul_(inverse_cost)
    # Padding rows/columns have exactly zero mass; the exp floor must not leak into them.
    return weights.mul_((a > 0).unsqueeze(2)).mul_((b > 0).unsqueeze(1))


def envelope_point_gradients(x, y, a, b, f, g, eps, p):
    """Gradients of ``<a,f> + <b,g>`` w.r.t. x and y with the plan held at its optimum.

    d/dx_i = sum_j P_ij grad_x C(x_i, y_j): for p=2 that is ``rowsum(P)_i x_i - (P y)_i``,
    for p=1 the same with ``P_ij / |x_i - y_j|`` (0 where the points coincide).
    Rows are processed in blocks of at most ``ENVELOPE_BLOCK_ELEMENTS`` plan
    entries, so large clouds never hold the whole (B, n, m) plan.
    """
    with torch.no_grad():
        batch, n, _ = x.shape
        m = y.shape[1]
        rows = max(1, min(n, ENVELOPE_BLOCK_ELEMENTS // max(1, batch * m)))
        x_blocks, grad_y = [], torch.zeros_like(y)
        for start in range(0, n, rows):
            block = slice(start, start + rows)
            xb = x[:, block]
            weights = _envelope_block(xb, y, a[:, block], b, f[:, block], g, eps, p)
            # rowsum * x - P y, accumulated into the bmm outputs (no (B, n, d) temporaries).
            x_blocks.append(torch.bmm(weights, y).neg_().addcmul_(weights.sum(2, keepdim=True), xb))
            grad_y.addcmul_(weights.sum(1).unsqueeze(2), y).sub_(torch.bmm(weights.transpose(1, 2), xb))
            del weights
        grad_x = x_blocks[0] if len(x_blocks) == 1 else torch.cat(x_blocks, dim=1)
        return grad_x, grad_y


def scaled_envelope_point_gradients(x, y, a, b, f, g, eps, p, scale):
    """``envelope_point_gradients`` times a per-problem ``scale`` (B,): the backward's form."""
    grad_x, grad_y = envelope_point_gradients(x, y, a, b, f, g, eps, p)
    factor = scale.view(-1, 1, 1).to(grad_x.dtype)
    return grad_x.mul_(factor), grad_y.mul_(factor)


class EnvelopeValue(torch.autograd.Function):
    """``value = <a, f> + <b, g>`` whose backward is the envelope-theorem gradient.

    Forward takes solved (detached) potentials; backward never re-runs the loop:
    d/da = f, d/db = g, d/dx and d/dy from the plan rebuilt from f and g by
    ``point_gradients(x, y, a, b, f, g, eps, p, scale)`` (the reference's
    row-blocked torch version by default; the Triton backend passes its kernel).
    """

    @staticmethod
    def forward(ctx, x, y, a, b, f, g, eps, p, point_gradients=None):
        ctx.save_for_backward(x, y, a, b, f, g)
        ctx.eps, ctx.p = eps, p
        ctx.point_gradients = point_gradients or scaled_envelope_point_gradients
        return (a * f).sum(-1) + (b * g).sum(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value):
        x, y, a, b, f, g = ctx.saved_tensors
        grad_x = grad_y = grad_a = grad_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            gx, gy = ctx.point_gradients(x, y, a, b, f, g, ctx.eps, ctx.p, grad_value)
            grad_x = gx.to(x.dtype) if ctx.needs_input_grad[0] else None
            grad_y = gy.to(y.dtype) if ctx.needs_input_grad[1] else None
        scale = grad_value.unsqueeze(1)
        if ctx.needs_input_grad[2]:
            grad_a = f * scale
        if ctx.needs_input_grad[3]:
            grad_b = g * scale
        return grad_x, grad_y, grad_a, grad_b, None, None, None, None, None
