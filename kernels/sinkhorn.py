"""Triton kernels of the Sinkhorn family: batched OT, GeomLoss's SamplesLoss and their backward.

* ``solve_onchip``: one program per problem for clouds of up to
  ``SINKHORN_ONCHIP_MAX_POINTS`` points.  Each program builds its (n, m) cost tile
  once (centred points, ``tl.dot`` over chunks of the feature dimension, IEEE fp32
  products), keeps it on chip and runs the alternating log-domain updates of
  ``guider_fast.reference.sinkhorn`` (f from g, then g from f, POT's order) with the
  convergence test inside the kernel: a problem stops on its own at the first check
  (every ``SINKHORN_CHECK_EVERY`` iterations) where its L1 row-marginal error is <= tol.
* ``solve_streamed``: larger clouds, one launch per half-iteration; cost tiles are
  recomputed from the points with an online log-sum-exp (O((n + m) d) memory).
* ``samples_loss_potentials``: GeomLoss's annealed, debiased loop and its last
  extrapolation in one launch (clouds of up to ``SINKHORN_ONCHIP_MAX_POINTS`` points).
* ``weighted_cost_gradient``: the envelope backward, rebuilding the plan tile by tile
  from the final potentials (never stored).

Zero weights are padding.  Inputs of any float dtype and strides are loaded and
computed in fp32; potentials and gradients come back in fp32.

This module imports triton; ``guider_fast`` imports it only when the "triton"
backend is used.
"""

import torch
import triton
import triton.language as tl

from guider_fast import _constants

from ._launch import block_size as _block
from ._launch import on_device as _on_device

# The reference's floors, as constexpr globals the kernels can name.
SQRT_FLOOR = tl.constexpr(_constants.GEOMLOSS_SQRT_FLOOR)
LOG_ZERO = tl.constexpr(_constants.GEOMLOSS_LOG_ZERO)
DISTANCE_FLOOR = tl.constexpr(_constants.DISTANCE_FLOOR)
# Guards log() of the masked-out lanes of a weight vector (the tl.where picks another
# value there); float32's smallest normal, as the reference's torch.finfo(...).tiny.
FLOAT32_TINY = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _softmin_rows(scaled_cost, h, eps):
    """-eps * logsumexp_j(h_j - C_ij/eps) for every row i of a (rows, cols) tile."""
    z = h[None, :] - scaled_cost
    z_max = tl.max(z, axis=1)
    return -eps * (z_max + tl.log(tl.sum(tl.exp(z - z_max[:, None]), axis=1)))


@triton.jit
def _softmin_cols(scaled_cost, h, eps):
    """-eps * logsumexp_i(h_i - C_ij/eps) for every column j of a (rows, cols) tile."""
    z = h[:, None] - scaled_cost
    z_max = tl.max(z, axis=0)
    return -eps * (z_max + tl.log(tl.sum(tl.exp(z - z_max[None, :]), axis=0)))


@triton.jit
def _row_marginal_error(f_before, f_after, a, row_ok, inv_eps):
    """L1 row-marginal error of the plan on (f_before, g), given f_after = the next f-update."""
    ratio = tl.exp(tl.minimum((f_before - f_after) * inv_eps, 80.0))
    return tl.sum(tl.where(row_ok, tl.abs(a * (ratio - 1.0)), 0.0), axis=0)


@triton.jit
def _sinkhorn_onchip_kernel(
    x_ptr, y_ptr, a_ptr, b_ptr, f_ptr, g_ptr, err_ptr, iters_ptr,
    n, m, d,
    stride_xb, stride_xn, stride_xd,
    stride_yb, stride_ym, stride_yd,
    stride_ab, stride_an, stride_bb, stride_bm,
    eps, n_iters, tol,
    P: tl.constexpr, USE_TOL: tl.constexpr, CHECK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    problem = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    feats = tl.arange(0, BLOCK_D)
    row_ok = rows < n
    col_ok = cols < m

    # Cost tile: |x_i - y_j|^2 = |x_i|^2 + |y_j|^2 - 2 x_i.y_j on points centred
    # per feature (the cost only sees differences; centring limits cancellation).
    dots = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    x_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    y_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    count = (n + m) * 1.0  # n, m may be specialised to Python ints (== 1) at launch
    for start in range(0, d, BLOCK_D):
        feat_ok = (start + feats) < d
        x_mask = row_ok[:, None] & feat_ok[None, :]
        y_mask = col_ok[:, None] & feat_ok[None, :]
        xt = tl.load(x_ptr + problem * stride_xb + rows[:, None] * stride_xn
                     + (start + feats)[None, :] * stride_xd, mask=x_mask, other=0.0).to(tl.float32)
        yt = tl.load(y_ptr + problem * stride_yb + cols[:, None] * stride_ym
                     + (start + feats)[None, :] * stride_yd, mask=y_mask, other=0.0).to(tl.float32)
        center = (tl.sum(xt, axis=0) + tl.sum(yt, axis=0)) / count
        xt = tl.where(x_mask, xt - center[None, :], 0.0)
        yt = tl.where(y_mask, yt - center[None, :], 0.0)
        dots += tl.dot(xt, tl.trans(yt), input_precision="ieee")
        x_sq += tl.sum(xt * xt, axis=1)
        y_sq += tl.sum(yt * yt, axis=1)
    sq = tl.maximum(x_sq[:, None] + y_sq[None, :] - 2.0 * dots, 0.0)
    if P == 2:
        cost = 0.5 * sq
    else:
        cost = tl.sqrt_rn(sq)

    a = tl.load(a_ptr + problem * stride_ab + rows * stride_an, mask=row_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + problem * stride_bb + cols * stride_bm, mask=col_ok, other=0.0).to(tl.float32)
    log_a = tl.where(a > 0, tl.log(tl.maximum(a, FLOAT32_TINY)), float("-inf"))
    log_b = tl.where(b > 0, tl.log(tl.maximum(b, FLOAT32_TINY)), float("-inf"))
    inv_eps = tl.div_rn(1.0, eps)
    scaled_cost = cost * inv_eps

    f = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g = tl.zeros((BLOCK_M,), dtype=tl.float32)
    error = tl.sum(tl.zeros((BLOCK_N,), dtype=tl.float32), axis=0)  # a float32 scalar
    it = 0
    done = 0
    while (it < n_iters) & (done == 0):
        f_new = _softmin_rows(scaled_cost, log_b + g * inv_eps, eps)
        if USE_TOL:
            if (it > 0) & (it % CHECK == 0):
                error = _row_marginal_error(f, f_new, a, row_ok, inv_eps)
                if error <= tol:
                    done = 1
        if done == 0:
            f = f_new
            g = _softmin_cols(scaled_cost, log_a + f * inv_eps, eps)
            it += 1
    if done == 0:
        # Error of the returned plan, from one more f-update (not applied).
        f_next = _softmin_rows(scaled_cost, log_b + g * inv_eps, eps)
        error = _row_marginal_error(f, f_next, a, row_ok, inv_eps)

    tl.store(f_ptr + problem * n + rows, f, mask=row_ok)
    tl.store(g_ptr + problem * m + cols, g, mask=col_ok)
    tl.store(err_ptr + problem, error)
    tl.store(iters_ptr + problem, it)


def _check_block(name: str, value: int) -> None:
    # tl.dot needs every dimension >= 16, tl.arange a power of two.
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def feature_block(d: int, tile_rows: int) -> int:
    """Feature chunk of the on-chip cost tile: its tl.dot operands are staged in shared
    memory, (tile_rows x chunk) each; keep 256-point debiased tiles under 227 KiB."""
    return max(16, min(64, _block(d), 8192 // tile_rows))


def _warps_for_tile(rows: int, cols: int) -> int:
    # The on-chip kernels hold whole (rows, cols) tiles: spread large ones over more warps.
    elements = rows * cols
    return 4 if elements <= 64 * 64 else (8 if elements <= 128 * 128 else 16)


def solve_onchip(x, y, a, b, eps: float, p: int, n_iters: int, tol):
    """Launch one program per problem; returns (f, g, marginal_error, iterations)."""
    batch, n, d = x.shape
    m = y.shape[1]
    f = torch.empty(batch, n, dtype=torch.float32, device=x.device)
    g = torch.empty(batch, m, dtype=torch.float32, device=x.device)
    error = torch.empty(batch, dtype=torch.float32, device=x.device)
    iterations = torch.empty(batch, dtype=torch.int32, device=x.device)
    with _on_device(x):
        _sinkhorn_onchip_kernel[(batch,)](
            x, y, a, b, f, g, error, iterations,
            n, m, d,
            x.stride(0), x.stride(1), x.stride(2),
            y.stride(0), y.stride(1), y.stride(2),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            float(eps), int(n_iters), float(tol if tol is not None else 0.0),
            P=p, USE_TOL=tol is not None, CHECK=_constants.SINKHORN_CHECK_EVERY,
            BLOCK_N=_block(n), BLOCK_M=_block(m), BLOCK_D=feature_block(d, max(_block(n), _block(m))),
            num_warps=_warps_for_tile(_block(n), _block(m)),
        )
    return f, g, error, iterations


@triton.jit
def _geomloss_cost_tile(u_ptr, v_ptr, u_rows, v_rows, d, stride_un, stride_ud, stride_vn, stride_vd,
                        P: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """GeomLoss's cost between two point sets: (|u|^2 - 2 u.v + |v|^2)/2, or its sqrt(max(., 1e-8))."""
    ru = tl.arange(0, BLOCK_U)
    rv = tl.arange(0, BLOCK_V)
    feats = tl.arange(0, BLOCK_D)
    dots = tl.zeros((BLOCK_U, BLOCK_V), dtype=tl.float32)
    u_sq = tl.zeros((BLOCK_U,), dtype=tl.float32)
    v_sq = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        feat_ok = (start + feats) < d
        ut = tl.load(u_ptr + ru[:, None] * stride_un + (start + feats)[None, :] * stride_ud,
                     mask=(ru < u_rows)[:, None] & feat_ok[None, :], other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + rv[:, None] * stride_vn + (start + feats)[None, :] * stride_vd,
                     mask=(rv < v_rows)[:, None] & feat_ok[None, :], other=0.0).to(tl.float32)
        dots += tl.dot(ut, tl.trans(vt), input_precision="ieee")
        u_sq += tl.sum(ut * ut, axis=1)
        v_sq += tl.sum(vt * vt, axis=1)
    sq = (u_sq[:, None] - 2.0 * dots) + v_sq[None, :]
    if P == 2:
        return sq / 2.0
    else:
        return tl.sqrt_rn(tl.maximum(sq, SQRT_FLOOR))


@triton.jit
def _geomloss_log_weights(w_ptr, stride, count, BLOCK: tl.constexpr):
    # GeomLoss: log w, with LOG_ZERO for zero weights; lanes past the cloud are -inf.
    rows = tl.arange(0, BLOCK)
    w = tl.load(w_ptr + rows * stride, mask=rows < count, other=0.0).to(tl.float32)
    logs = tl.where(w > 0, tl.log(tl.maximum(w, FLOAT32_TINY)), LOG_ZERO)
    return tl.where(rows < count, logs, float("-inf"))


@triton.jit
def _samples_loss_onchip_kernel(
    x_ptr, y_ptr, a_ptr, b_ptr, eps_ptr, out_ptr,
    n, m, d, n_eps, stride_out,
    stride_xb, stride_xn, stride_xd,
    stride_yb, stride_ym, stride_yd,
    stride_ab, stride_an, stride_bb, stride_bm,
    P: tl.constexpr, DEBIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    problem = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    x_base = x_ptr + problem * stride_xb
    y_base = y_ptr + problem * stride_yb
    c_xy = _geomloss_cost_tile(x_base, y_base, n, m, d, stride_xn, stride_xd, stride_ym, stride_yd,
                               P, BLOCK_N, BLOCK_M, BLOCK_D)
    a_log = _geomloss_log_weights(a_ptr + problem * stride_ab, stride_an, n, BLOCK_N)
    b_log = _geomloss_log_weights(b_ptr + problem * stride_bb, stride_bm, m, BLOCK_M)

    # GeomLoss's sinkhorn_loop: initial soft-mins at eps_0, then symmetric averaged
    # updates at every eps of the schedule (the last extrapolation happens outside).
    eps = tl.load(eps_ptr)
    inv_eps = tl.div_rn(1.0, eps)
    f_ba = _softmin_rows(c_xy * inv_eps, b_log, eps)
    g_ab = _softmin_cols(c_xy * inv_eps, a_log, eps)
    if DEBIAS:
        c_xx = _geomloss_cost_tile(x_base, x_base, n, n, d, stride_xn, stride_xd, stride_xn, stride_xd,
                                   P, BLOCK_N, BLOCK_N, BLOCK_D)
        c_yy = _geomloss_cost_tile(y_base, y_base, m, m, d, stride_ym, stride_yd, stride_ym, stride_yd,
                                   P, BLOCK_M, BLOCK_M, BLOCK_D)
        f_aa = _softmin_rows(c_xx * inv_eps, a_log, eps)
        g_bb = _softmin_rows(c_yy * inv_eps, b_log, eps)
    for k in range(0, n_eps):
        eps = tl.load(eps_ptr + k)
        inv_eps = tl.div_rn(1.0, eps)
        ft_ba = _softmin_rows(c_xy * inv_eps, b_log + g_ab * inv_eps, eps)
        gt_ab = _softmin_cols(c_xy * inv_eps, a_log + f_ba * inv_eps, eps)
        f_ba = 0.5 * (f_ba + ft_ba)
        g_ab = 0.5 * (g_ab + gt_ab)
        if DEBIAS:
            ft_aa = _softmin_rows(c_xx * inv_eps, a_log + f_aa * inv_eps, eps)
            gt_bb = _softmin_rows(c_yy * inv_eps, b_log + g_bb * inv_eps, eps)
            f_aa = 0.5 * (f_aa + ft_aa)
            g_bb = 0.5 * (g_bb + gt_bb)

    # GeomLoss's last extrapolation at the final eps, from the potentials above.
    inv_eps = tl.div_rn(1.0, eps)
    f_new = _softmin_rows(c_xy * inv_eps, b_log + g_ab * inv_eps, eps)
    g_new = _softmin_cols(c_xy * inv_eps, a_log + f_ba * inv_eps, eps)
    out = out_ptr + problem * stride_out
    tl.store(out + rows, f_ba, mask=rows < n)
    tl.store(out + n + cols, g_ab, mask=cols < m)
    tl.store(out + n + m + rows, f_new, mask=rows < n)
    tl.store(out + 2 * n + m + cols, g_new, mask=cols < m)
    if DEBIAS:
        f_aa_new = _softmin_rows(c_xx * inv_eps, a_log + f_aa * inv_eps, eps)
        g_bb_new = _softmin_rows(c_yy * inv_eps, b_log + g_bb * inv_eps, eps)
        tl.store(out + 2 * n + 2 * m + rows, f_aa, mask=rows < n)
        tl.store(out + 3 * n + 2 * m + cols, g_bb, mask=cols < m)
        tl.store(out + 3 * n + 3 * m + rows, f_aa_new, mask=rows < n)
        tl.store(out + 4 * n + 3 * m + cols, g_bb_new, mask=cols < m)


def samples_loss_potentials(x, y, a, b, eps_list, p: int, debias: bool):
    """GeomLoss's annealed loop and its last extrapolation in one launch.

    Returns (B, k) float32 packing, per problem, [f_ba, g_ab, f_new, g_new] and with
    debiasing also [f_aa, g_bb, f_aa_new, g_bb_new]: the potentials before the last
    extrapolation (whose soft-max weights the backward rebuilds) and after it (the
    value's potentials).
    """
    batch, n, d = x.shape
    m = y.shape[1]
    schedule = torch.tensor(eps_list, dtype=torch.float32, device=x.device)
    out = torch.empty(batch, 2 * (n + m) * (2 if debias else 1), dtype=torch.float32, device=x.device)
    with _on_device(x):
        _samples_loss_onchip_kernel[(batch,)](
            x, y, a, b, schedule, out,
            n, m, d, len(eps_list), out.stride(0),
            x.stride(0), x.stride(1), x.stride(2),
            y.stride(0), y.stride(1), y.stride(2),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            P=p, DEBIAS=bool(debias),
            BLOCK_N=_block(n), BLOCK_M=_block(m), BLOCK_D=feature_block(d, max(_block(n), _block(m))),
            num_warps=_warps_for_tile(max(_block(n), _block(m)), max(_block(n), _block(m))),
        )
    return out


@triton.jit
def _softmin_streamed_kernel(
    u_ptr, v_ptr, u_norm_ptr, v_norm_ptr, h_ptr, out_ptr,
    n_u, n_v, d,
    stride_ub, stride_un, stride_ud, stride_vb, stride_vn, stride_vd,
    stride_unb, stride_vnb, stride_hb, stride_ob,
    eps,
    P: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out_i = -eps * logsumexp_j(h_j - C(u_i, v_j)/eps) with an online logsumexp over v blocks.

    Cost tiles are recomputed from the points (``tl.dot`` over feature chunks)
    in every call, so memory stays O((n_u + n_v) d): no n_u x n_v buffer.
    """
    # Row blocks on grid axis 0 (up to 2^31 - 1 blocks), problems on axis 1 (65,535).
    problem = tl.program_id(1).to(tl.int64)
    ru = tl.program_id(0).to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = ru < n_u
    feats = tl.arange(0, BLOCK_D)
    u_norm = tl.load(u_norm_ptr + problem * stride_unb + ru, mask=u_ok, other=0.0)
    inv_eps = tl.div_rn(1.0, eps)
    running_max = tl.full((BLOCK_U,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_U,), dtype=tl.float32)
    for v_start in range(0, n_v, BLOCK_V):
        rv = (v_start + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_ok = rv < n_v
        dots = tl.zeros((BLOCK_U, BLOCK_V), dtype=tl.float32)
        for d_start in range(0, d, BLOCK_D):
            feat_ok = (d_start + feats) < d
            ut = tl.load(u_ptr + problem * stride_ub + ru[:, None] * stride_un
                         + (d_start + feats)[None, :] * stride_ud,
                         mask=u_ok[:, None] & feat_ok[None, :], other=0.0).to(tl.float32)
            vt = tl.load(v_ptr + problem * stride_vb + rv[:, None] * stride_vn
                         + (d_start + feats)[None, :] * stride_vd,
                         mask=v_ok[:, None] & feat_ok[None, :], other=0.0).to(tl.float32)
            dots += tl.dot(ut, tl.trans(vt), input_precision="ieee")
        v_norm = tl.load(v_norm_ptr + problem * stride_vnb + rv, mask=v_ok, other=0.0)
        sq = tl.maximum(u_norm[:, None] + v_norm[None, :] - 2.0 * dots, 0.0)
        if P == 2:
            cost = 0.5 * sq
        else:
            cost = tl.sqrt_rn(sq)
        h = tl.load(h_ptr + problem * stride_hb + rv, mask=v_ok, other=float("-inf"))
        z = h[None, :] - cost * inv_eps
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        # A block of padding only (all -inf) must not turn the sums into nan.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) \
            + tl.sum(tl.exp(z - safe_max[:, None]), axis=1)
        running_max = new_max
    out = -eps * (running_max + tl.log(running_sum))
    tl.store(out_ptr + problem * stride_ob + ru, out, mask=u_ok)


class StreamedCost:
    """Centred points and their squared norms, prepared once per solve (O((n + m) d) memory)."""

    def __init__(self, x, y, p: int, block_points: int = 64, block_features: int = 64):
        from guider_fast.reference.sinkhorn import centered

        _check_block("block_points", block_points)
        _check_block("block_features", block_features)
        self.x, self.y = (t.float().contiguous() for t in centered(x, y))
        self.x_norm = (self.x * self.x).sum(-1)
        self.y_norm = (self.y * self.y).sum(-1)
        self.p = p
        self.block_points = block_points
        self.block_features = block_features

    def softmin(self, h, eps: float, rows: str):
        """-eps * logsumexp over the other side: rows="x" gives (B, n) from h (B, m); "y" the converse."""
        u, v, u_norm, v_norm = ((self.x, self.y, self.x_norm, self.y_norm) if rows == "x"
                                else (self.y, self.x, self.y_norm, self.x_norm))
        h = h.float().contiguous()
        batch, n_u, d = u.shape
        n_v = v.shape[1]
        out = torch.empty(batch, n_u, dtype=torch.float32, device=u.device)
        block_u = min(self.block_points, _block(n_u))
        block_v = min(self.block_points, _block(n_v))
        grid = (triton.cdiv(n_u, block_u), batch)
        with _on_device(u):
            _softmin_streamed_kernel[grid](
                u, v, u_norm, v_norm, h, out,
                n_u, n_v, d,
                u.stride(0), u.stride(1), u.stride(2), v.stride(0), v.stride(1), v.stride(2),
                u_norm.stride(0), v_norm.stride(0), h.stride(0), out.stride(0),
                float(eps),
                P=self.p, BLOCK_U=block_u, BLOCK_V=block_v,
                BLOCK_D=min(self.block_features, _block(d)),
            )
        return out


def solve_streamed(x, y, a, b, eps: float, p: int, n_iters: int, tol,
                   block_points: int = 64, block_features: int = 64):
    """Streamed regime: one launch per half-iteration, O((n + m) d) memory.

    Runs the reference's alternating loop (``iterate``: all problems stop together,
    the tol test every ``SINKHORN_CHECK_EVERY`` iterations) with the soft-min half-steps
    computed by ``_softmin_streamed_kernel``.  Returns (f, g, marginal_error, n_iters).
    """
    from guider_fast.reference.sinkhorn import iterate, log_weights

    cost = StreamedCost(x, y, p, block_points, block_features)
    a, b = a.float(), b.float()
    log_a, log_b = log_weights(a), log_weights(b)
    state = iterate(lambda g: cost.softmin(log_b + g / eps, eps, rows="x"),
                    lambda f: cost.softmin(log_a + f / eps, eps, rows="y"),
                    a, b, eps, n_iters, tol)
    return state.f, state.g, state.marginal_error, state.n_iters


@triton.jit
def _envelope_rows_kernel(
    u_ptr, v_ptr, u_norm_ptr, v_norm_ptr, row_term_ptr, col_term_ptr, scale_ptr, out_ptr,
    n_u, n_v, d,
    stride_ub, stride_un, stride_vb, stride_vn,
    stride_nu, stride_nv, stride_rb, stride_cb, stride_sb, stride_ob, stride_on,
    eps,
    P: tl.constexpr, GEOMLOSS_COST: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_u_i = scale_i * sum_j w_ij grad_u C(u_i, v_j), streamed over v blocks.

    w_ij = exp(row_i + col_j - C_ij / eps) is rebuilt tile by tile and never stored:
    with row = log a + f/eps, col = log b + g/eps it is the Sinkhorn plan (envelope
    gradient); with row = f/eps, col = h it is GeomLoss's soft-max of an extrapolation
    step.  For p=2 the sum is rowsum(w)_i u_i - (w v)_i; for p=1 the same with
    w_ij / C_ij, 0 where C_ij = 0 (or, for GeomLoss's sqrt(max(sq, 1e-8)) cost, where
    that clamp is active).  Points are contiguous in the feature dimension, d <= BLOCK_D.

    NORMALIZE (soft-max rows, which sum to 1 exactly): divide by the computed row sum
    of exp(...), so that the cost's rounding here (not bit-identical to the forward
    kernel's, and amplified by 1/eps) cancels instead of entering rowsum * u - w v.
    """
    # Row blocks on grid axis 0 (up to 2^31 - 1 blocks), problems on axis 1 (65,535).
    problem = tl.program_id(1).to(tl.int64)
    ru = tl.program_id(0).to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = ru < n_u
    feats = tl.arange(0, BLOCK_D)
    feat_ok = feats < d
    u = tl.load(u_ptr + problem * stride_ub + ru[:, None] * stride_un + feats[None, :],
                mask=u_ok[:, None] & feat_ok[None, :], other=0.0)
    u_norm = tl.load(u_norm_ptr + problem * stride_nu + ru, mask=u_ok, other=0.0)
    row_term = tl.load(row_term_ptr + problem * stride_rb + ru, mask=u_ok, other=float("-inf"))
    inv_eps = tl.div_rn(1.0, eps)
    rowsum = tl.zeros((BLOCK_U,), dtype=tl.float32)
    mass = tl.zeros((BLOCK_U,), dtype=tl.float32)
    weighted = tl.zeros((BLOCK_U, BLOCK_D), dtype=tl.float32)
    for v_start in range(0, n_v, BLOCK_V):
        rv = (v_start + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_ok = rv < n_v
        v = tl.load(v_ptr + problem * stride_vb + rv[:, None] * stride_vn + feats[None, :],
                    mask=v_ok[:, None] & feat_ok[None, :], other=0.0)
        v_norm = tl.load(v_norm_ptr + problem * stride_nv + rv, mask=v_ok, other=0.0)
        col_term = tl.load(col_term_ptr + problem * stride_cb + rv, mask=v_ok, other=float("-inf"))
        sq = u_norm[:, None] + v_norm[None, :] - 2.0 * tl.dot(u, tl.trans(v), input_precision="ieee")
        if GEOMLOSS_COST:
            if P == 2:
                cost = 0.5 * sq
            else:
                cost = tl.sqrt_rn(tl.maximum(sq, SQRT_FLOOR))
        else:
            sq = tl.maximum(sq, 0.0)
            if P == 2:
                cost = 0.5 * sq
            else:
                cost = tl.sqrt_rn(sq)
        weights = tl.exp(row_term[:, None] + col_term[None, :] - cost * inv_eps)
        if NORMALIZE:
            mass += tl.sum(weights, axis=1)
        if P == 1:
            if GEOMLOSS_COST:
                weights = tl.where(sq > SQRT_FLOOR, weights / cost, 0.0)
            else:
                weights = tl.where(cost > 0, weights / tl.maximum(cost, DISTANCE_FLOOR), 0.0)
        rowsum += tl.sum(weights, axis=1)
        weighted += tl.dot(weights, v, input_precision="ieee")
    scale = tl.load(scale_ptr + problem * stride_sb + ru, mask=u_ok, other=0.0)
    if NORMALIZE:
        scale = scale / tl.where(mass > 0, mass, 1.0)
    grad = scale[:, None] * (rowsum[:, None] * u - weighted)
    tl.store(out_ptr + problem * stride_ob + ru[:, None] * stride_on + feats[None, :], grad,
             mask=u_ok[:, None] & feat_ok[None, :])


def weighted_cost_gradient(u, v, row_term, col_term, scale, eps: float, p: int,
                           geomloss_cost: bool = False, normalize: bool = False, block_points: int = 32):
    """(B, n_u, d) gradient of ``_envelope_rows_kernel`` for float32 points u, v."""
    _check_block("block_points", block_points)
    u, v = u.float().contiguous(), v.float().contiguous()
    u_norm, v_norm = (u * u).sum(-1), (v * v).sum(-1)
    row_term, col_term = row_term.float().contiguous(), col_term.float().contiguous()
    scale = scale.float().contiguous()
    batch, n_u, d = u.shape
    n_v = v.shape[1]
    out = torch.empty_like(u)
    block_u = min(block_points, _block(n_u))
    with _on_device(u):
        _envelope_rows_kernel[(triton.cdiv(n_u, block_u), batch)](
            u, v, u_norm, v_norm, row_term, col_term, scale, out,
            n_u, n_v, d,
            u.stride(0), u.stride(1), v.stride(0), v.stride(1),
            u_norm.stride(0), v_norm.stride(0), row_term.stride(0), col_term.stride(0), scale.stride(0),
            out.stride(0), out.stride(1),
            float(eps),
            P=p, GEOMLOSS_COST=geomloss_cost, NORMALIZE=normalize,
            BLOCK_U=block_u, BLOCK_V=min(block_points, _block(n_v)), BLOCK_D=_block(d),
        )
    return out


def envelope_gradients(x, y, a, b, f, g, eps: float, p: int, scale, block_points: int = 32):
    """(grad_x, grad_y) of ``scale * (<a,f> + <b,g>)`` with the plan held at its optimum.

    Two launches (rows of x, then rows of y), each streaming over the other side;
    requires d <= guider_fast.kernels.ENVELOPE_MAX_FEATURES.  Float32 outputs.
    """
    from guider_fast.reference.sinkhorn import centered, log_weights

    xc, yc = centered(x.float(), y.float())
    inv_eps = 1.0 / eps
    x_term = log_weights(a.float()) + f.float() * inv_eps
    y_term = log_weights(b.float()) + g.float() * inv_eps
    grad_x = weighted_cost_gradient(xc, yc, x_term, y_term, scale.float()[:, None].expand_as(x_term),
                                    eps, p, block_points=block_points)
    grad_y = weighted_cost_gradient(yc, xc, y_term, x_term, scale.float()[:, None].expand_as(y_term),
                                    eps, p, block_points=block_points)
    return grad_x, grad_y
