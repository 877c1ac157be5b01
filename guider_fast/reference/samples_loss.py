"""Reference of GeomLoss ``SamplesLoss("sinkhorn")`` (tensorized backend, geomloss 0.3.1).

Same cost routines (expanded |x|^2 - 2x.y + |y|^2, sqrt clamped at 1e-8 for
p=1), same epsilon schedule, the same symmetric averaged updates with debiasing
and the same "last extrapolation" step that carries the gradients.  The loop
runs under ``torch.no_grad()`` (a context, so the caller's grad mode is never
flipped) in one reused work buffer with the fused log-softmax soft-min.
"""

from __future__ import annotations

import numpy as np
import torch

from .._constants import EXP_FLOOR, GEOMLOSS_LOG_ZERO, GEOMLOSS_SQRT_FLOOR
from .sinkhorn import softmin_


def geomloss_cost(x: torch.Tensor, y: torch.Tensor, p: int) -> torch.Tensor:
    """GeomLoss's batched cost: (|x|^2 - 2 x.y + |y|^2) / 2 for p=2, its sqrt(max(., 1e-8)) for p=1.

    Without autograd it is built in place (one (B, n, m) buffer); IEEE addition
    and scaling by -2 commute exactly, so both versions give the same bits.
    """
    d_xx = (x * x).sum(-1).unsqueeze(2)
    d_yy = (y * y).sum(-1).unsqueeze(1)
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        sq = d_xx - 2 * torch.matmul(x, y.transpose(1, 2)) + d_yy
        return sq / 2 if p == 2 else torch.sqrt(torch.clamp_min(sq, GEOMLOSS_SQRT_FLOOR))
    sq = torch.matmul(x, y.transpose(1, 2)).mul_(-2.0).add_(d_xx).add_(d_yy)
    return sq.div_(2) if p == 2 else sq.clamp_min_(GEOMLOSS_SQRT_FLOOR).sqrt_()


def geomloss_log_weights(w: torch.Tensor) -> torch.Tensor:
    return torch.where(w > 0, w.clamp_min(torch.finfo(w.dtype).tiny).log(),
                       torch.full_like(w, GEOMLOSS_LOG_ZERO))


def bounding_box_diameter(x: torch.Tensor, y: torch.Tensor) -> float:
    """Diagonal of the bounding box of every point of every problem (GeomLoss's ``max_diameter``)."""
    d = x.shape[-1]
    pts_x, pts_y = x.reshape(-1, d), y.reshape(-1, d)
    mins = torch.minimum(pts_x.amin(0), pts_y.amin(0))
    maxs = torch.maximum(pts_x.amax(0), pts_y.amax(0))
    return float((maxs - mins).norm())


def epsilon_schedule(p: int, diameter: float, blur: float, scaling: float):
    """``[diam^p] + [exp(e) for e in arange(p ln diam, p ln blur, p ln scaling)] + [blur^p]``."""
    return ([diameter ** p]
            + [float(np.exp(e)) for e in np.arange(p * np.log(diameter), p * np.log(blur),
                                                   p * np.log(scaling))]
            + [blur ** p])


def one_point_divergence(a, x, b, y, p: int, debias: bool):
    """Closed form of GeomLoss's output when every problem has one point per side.

    With n = m = 1, every symmetric update keeps f + g = (C_xy + C_yx) / 2 and the
    last extrapolation returns the same sum, whatever the schedule, so
    ``S = (C_xy + C_yx)/2 - (C_xx + C_yy)/2`` (debiased).  Gradients follow
    GeomLoss: dS/dx = grad C(x, y), dS/da = (C_xy + C_yx)/4 - C_xx/2 (= f - f_aa).
    Works on (B, 1, d) points and (B, 1) weights; returns (B,).
    """
    c_xy = geomloss_cost(x, y, p).view(-1)
    c_yx = geomloss_cost(y, x, p).view(-1)
    f_ab = (c_xy + c_yx) / 4  # f_ba = g_ab at the fixed point
    f = f_ab.unsqueeze(1)
    g = f_ab.unsqueeze(1)
    if debias:
        f = f - geomloss_cost(x, x.detach(), p).view(-1, 1) / 2
        g = g - geomloss_cost(y, y.detach(), p).view(-1, 1) / 2
    return (a * f).sum(-1) + (b * g).sum(-1)


class ExtrapolatedSoftmin(torch.autograd.Function):
    """``f_i = -eps * logsumexp_j(h_j - C(x_i, y_j) / eps)`` with gradients w.r.t. ``x`` only.

    This is GeomLoss's last extrapolation step, where ``y`` and ``h`` are detached:
    ``df_i/dx_i = sum_j pi_ij grad_x C(x_i, y_j)`` with ``pi`` the row soft-max.
    Backward rebuilds the cost and ``pi`` once instead of keeping autograd's
    (B, n, m) intermediates alive between forward and backward.
    """

    @staticmethod
    def forward(ctx, x, y, h, eps, p):
        with torch.no_grad():
            cost = geomloss_cost(x, y, p)
            f = softmin_(cost, h, eps, torch.empty_like(cost))
        ctx.save_for_backward(x, y, h, f)
        ctx.eps, ctx.p = eps, p
        return f

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_f):
        x, y, h, f = ctx.saved_tensors
        eps, p = ctx.eps, ctx.p
        sq = geomloss_cost(x, y, 2).mul_(2.0)
        cost = sq.div(2.0) if p == 2 else torch.sqrt(torch.clamp_min(sq, GEOMLOSS_SQRT_FLOOR))
        if p == 2:
            del sq
        # pi_ij = exp(h_j - C_ij/eps + f_i/eps): the soft-max weights of row i.
        weights = torch.add(h.unsqueeze(1), cost, alpha=-1.0 / eps).add_((f / eps).unsqueeze(2))
        weights.clamp_(min=EXP_FLOOR).exp_()
        if p == 1:
            # d sqrt(max(sq, 1e-8)) / dx = (x - y) / C where unclamped, else 0.
            weights = torch.where(sq > GEOMLOSS_SQRT_FLOOR, weights / cost, torch.zeros_like(weights))
        weights.mul_(grad_f.unsqueeze(2))
        grad_x = weights.sum(2, keepdim=True) * x - torch.bmm(weights, y)
        return grad_x, None, None, None, None


def schedule(x, y, p: int, blur: float, scaling: float, diameter=None):
    """GeomLoss's epsilon list for these clouds (one host read of the diameter if not given)."""
    if diameter is None:
        diameter = bounding_box_diameter(x.detach(), y.detach())
    return epsilon_schedule(p, diameter, blur, scaling)


def annealed_potentials(a, x, b, y, p: int, eps_list, debias: bool):
    """GeomLoss's symmetric loop over ``eps_list``, no autograd: (f_ba, g_ab, f_aa, g_bb).

    Memory: C(x, y), C(x, x), C(y, y) and one shared work buffer (C(y, x) is
    never formed: the g-update reduces C(x, y) along its rows).
    """
    a_log, b_log = geomloss_log_weights(a.detach()), geomloss_log_weights(b.detach())
    xd, yd = x.detach(), y.detach()
    batch, n, m = x.shape[0], x.shape[1], y.shape[1]
    f_aa = g_bb = None
    with torch.no_grad():
        c_xy = geomloss_cost(xd, yd, p)
        sizes = [n * m] + ([n * n, m * m] if debias else [])
        storage = torch.empty(batch * max(sizes), dtype=c_xy.dtype, device=c_xy.device)

        def work(rows, cols):
            return storage[: batch * rows * cols].view(batch, rows, cols)

        eps = eps_list[0]
        g_ab = softmin_(c_xy, a_log, eps, work(n, m), dim=1)
        f_ba = softmin_(c_xy, b_log, eps, work(n, m), dim=2)
        if debias:
            c_xx, c_yy = geomloss_cost(xd, xd, p), geomloss_cost(yd, yd, p)
            f_aa = softmin_(c_xx, a_log, eps, work(n, n))
            g_bb = softmin_(c_yy, b_log, eps, work(m, m))
        for eps in eps_list:
            ft_ba = softmin_(c_xy, b_log + g_ab / eps, eps, work(n, m), dim=2)
            gt_ab = softmin_(c_xy, a_log + f_ba / eps, eps, work(n, m), dim=1)
            f_ba = (f_ba + ft_ba).mul_(0.5)
            g_ab = (g_ab + gt_ab).mul_(0.5)
            if debias:
                ft_aa = softmin_(c_xx, a_log + f_aa / eps, eps, work(n, n))
                gt_bb = softmin_(c_yy, b_log + g_bb / eps, eps, work(m, m))
                f_aa = (f_aa + ft_aa).mul_(0.5)
                g_bb = (g_bb + gt_bb).mul_(0.5)
    return f_ba, g_ab, f_aa, g_bb


def extrapolated_divergence(a, x, b, y, p: int, eps: float, potentials):
    """GeomLoss's last extrapolation at ``eps`` (the step that carries the gradients) and the value."""
    f_ba, g_ab, f_aa, g_bb = potentials
    a_log, b_log = geomloss_log_weights(a.detach()), geomloss_log_weights(b.detach())
    xd, yd = x.detach(), y.detach()
    f_new = ExtrapolatedSoftmin.apply(x, yd, b_log + g_ab / eps, eps, p)
    g_new = ExtrapolatedSoftmin.apply(y, xd, a_log + f_ba / eps, eps, p)
    if f_aa is not None:
        f_new = f_new - ExtrapolatedSoftmin.apply(x, xd, a_log + f_aa / eps, eps, p)
        g_new = g_new - ExtrapolatedSoftmin.apply(y, yd, b_log + g_bb / eps, eps, p)
    return (a * f_new).sum(-1) + (b * g_new).sum(-1)


def sinkhorn_divergence(a, x, b, y, p: int = 2, blur: float = 0.05, scaling: float = 0.5,
                        debias: bool = True, diameter=None):
    """GeomLoss's ``sinkhorn_tensorized`` on (B, n, d) / (B, m, d) clouds; returns (B,)."""
    if x.shape[1] == 1 and y.shape[1] == 1:
        return one_point_divergence(a, x, b, y, p, debias)
    eps_list = schedule(x, y, p, blur, scaling, diameter)
    potentials = annealed_potentials(a, x, b, y, p, eps_list, debias)
    return extrapolated_divergence(a, x, b, y, p, eps_list[-1], potentials)
