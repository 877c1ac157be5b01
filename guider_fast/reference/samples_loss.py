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

from .sinkhorn import softmin, softmin_

# GeomLoss replaces log(0) by this value (not -inf) for zero weights.
_LOG_ZERO = -100000.0


def geomloss_cost(x: torch.Tensor, y: torch.Tensor, p: int) -> torch.Tensor:
    """GeomLoss's batched cost: (|x|^2 - 2 x.y + |y|^2) / 2 for p=2, its sqrt(max(., 1e-8)) for p=1."""
    d_xx = (x * x).sum(-1).unsqueeze(2)
    d_xy = torch.matmul(x, y.transpose(1, 2))
    d_yy = (y * y).sum(-1).unsqueeze(1)
    sq = d_xx - 2 * d_xy + d_yy
    if p == 2:
        return sq / 2
    return torch.sqrt(torch.clamp_min(sq, 1e-8))


def geomloss_log_weights(w: torch.Tensor) -> torch.Tensor:
    return torch.where(w > 0, w.clamp_min(torch.finfo(w.dtype).tiny).log(),
                       torch.full_like(w, _LOG_ZERO))


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


def sinkhorn_divergence(a, x, b, y, p: int = 2, blur: float = 0.05, scaling: float = 0.5,
                        debias: bool = True, diameter=None):
    """GeomLoss's ``sinkhorn_tensorized`` on (B, n, d) / (B, m, d) clouds; returns (B,)."""
    if x.shape[1] == 1 and y.shape[1] == 1:
        return one_point_divergence(a, x, b, y, p, debias)

    if diameter is None:
        diameter = bounding_box_diameter(x.detach(), y.detach())
    eps_list = epsilon_schedule(p, diameter, blur, scaling)
    a_log, b_log = geomloss_log_weights(a.detach()), geomloss_log_weights(b.detach())

    # Cost matrices with gradients only through their first argument, as GeomLoss.
    c_xy = geomloss_cost(x, y.detach(), p)
    c_yx = geomloss_cost(y, x.detach(), p)
    c_xx = geomloss_cost(x, x.detach(), p) if debias else None
    c_yy = geomloss_cost(y, y.detach(), p) if debias else None

    with torch.no_grad():
        cxy, cyx = c_xy.detach(), c_yx.detach()
        work_xy = torch.empty_like(cxy)
        work_yx = torch.empty_like(cyx)
        eps = eps_list[0]
        g_ab = softmin_(cyx, a_log, eps, work_yx)
        f_ba = softmin_(cxy, b_log, eps, work_xy)
        if debias:
            cxx, cyy = c_xx.detach(), c_yy.detach()
            work_xx = torch.empty_like(cxx)
            work_yy = torch.empty_like(cyy)
            f_aa = softmin_(cxx, a_log, eps, work_xx)
            g_bb = softmin_(cyy, b_log, eps, work_yy)
        for eps in eps_list:
            ft_ba = softmin_(cxy, b_log + g_ab / eps, eps, work_xy)
            gt_ab = softmin_(cyx, a_log + f_ba / eps, eps, work_yx)
            f_ba = (f_ba + ft_ba).mul_(0.5)
            g_ab = (g_ab + gt_ab).mul_(0.5)
            if debias:
                ft_aa = softmin_(cxx, a_log + f_aa / eps, eps, work_xx)
                gt_bb = softmin_(cyy, b_log + g_bb / eps, eps, work_yy)
                f_aa = (f_aa + ft_aa).mul_(0.5)
                g_bb = (g_bb + gt_bb).mul_(0.5)

    # Last extrapolation at eps = blur^p: the only step that carries gradients.
    f_new = softmin(c_xy, b_log + g_ab / eps, eps)
    g_new = softmin(c_yx, a_log + f_ba / eps, eps)
    if debias:
        f_new = f_new - softmin(c_xx, a_log + f_aa / eps, eps)
        g_new = g_new - softmin(c_yy, b_log + g_bb / eps, eps)
    return (a * f_new).sum(-1) + (b * g_new).sum(-1)
