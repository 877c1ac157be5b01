"""Fused batched Sinkhorn, on-chip regime: one program per problem, every iteration in one launch.

Each program builds its (n, m) cost tile once (centred points, ``tl.dot`` over
chunks of the feature dimension, IEEE fp32 products), keeps it on chip and runs
the alternating log-domain updates of ``guider_fast.reference.sinkhorn`` (f from
g, then g from f, POT's order) with the convergence test inside the kernel: a
problem stops on its own at the first check (every ``CHECK_EVERY`` iterations)
where its L1 row-marginal error is <= tol.  Zero weights are padding.

Inputs: x (B, n, d), y (B, m, d), a (B, n), b (B, m) of any float dtype and
strides (loaded, then computed in fp32).  Outputs: f (B, n), g (B, m) fp32, the
marginal error (B,) and the iterations run (B,) int32.

This module imports triton; ``guider_fast`` imports it only when the "triton"
backend is used.
"""

import torch
import triton
import triton.language as tl

from guider_fast.reference.sinkhorn import CHECK_EVERY


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
    count = (n + m).to(tl.float32)
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
        cost = tl.sqrt(sq)

    a = tl.load(a_ptr + problem * stride_ab + rows * stride_an, mask=row_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + problem * stride_bb + cols * stride_bm, mask=col_ok, other=0.0).to(tl.float32)
    log_a = tl.where(a > 0, tl.log(tl.maximum(a, 1e-38)), float("-inf"))
    log_b = tl.where(b > 0, tl.log(tl.maximum(b, 1e-38)), float("-inf"))
    inv_eps = 1.0 / eps
    scaled_cost = cost * inv_eps

    f = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g = tl.zeros((BLOCK_M,), dtype=tl.float32)
    error = tl.zeros((), dtype=tl.float32)
    it = 0
    done = 0
    while (it < n_iters) & (done == 0):
        z = (log_b + g * inv_eps)[None, :] - scaled_cost
        z_max = tl.max(z, axis=1)
        f_new = -eps * (z_max + tl.log(tl.sum(tl.exp(z - z_max[:, None]), axis=1)))
        if USE_TOL:
            if (it > 0) & (it % CHECK == 0):
                ratio = tl.exp(tl.minimum((f - f_new) * inv_eps, 80.0))
                error = tl.sum(tl.where(row_ok, tl.abs(a * (ratio - 1.0)), 0.0), axis=0)
                if error <= tol:
                    done = 1
        if done == 0:
            f = f_new
            z = (log_a + f * inv_eps)[:, None] - scaled_cost
            z_max = tl.max(z, axis=0)
            g = -eps * (z_max + tl.log(tl.sum(tl.exp(z - z_max[None, :]), axis=0)))
            it += 1
    if done == 0:
        # Error of the returned plan, from one more f-update (not applied).
        z = (log_b + g * inv_eps)[None, :] - scaled_cost
        z_max = tl.max(z, axis=1)
        f_next = -eps * (z_max + tl.log(tl.sum(tl.exp(z - z_max[:, None]), axis=1)))
        ratio = tl.exp(tl.minimum((f - f_next) * inv_eps, 80.0))
        error = tl.sum(tl.where(row_ok, tl.abs(a * (ratio - 1.0)), 0.0), axis=0)

    tl.store(f_ptr + problem * n + rows, f, mask=row_ok)
    tl.store(g_ptr + problem * m + cols, g, mask=col_ok)
    tl.store(err_ptr + problem, error)
    tl.store(iters_ptr + problem, it)


def _block(size: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(size))


def solve_onchip(x, y, a, b, eps: float, p: int, n_iters: int, tol):
    """Launch one program per problem; returns (f, g, marginal_error, iterations)."""
    batch, n, d = x.shape
    m = y.shape[1]
    f = torch.empty(batch, n, dtype=torch.float32, device=x.device)
    g = torch.empty(batch, m, dtype=torch.float32, device=x.device)
    error = torch.empty(batch, dtype=torch.float32, device=x.device)
    iterations = torch.empty(batch, dtype=torch.int32, device=x.device)
    _sinkhorn_onchip_kernel[(batch,)](
        x, y, a, b, f, g, error, iterations,
        n, m, d,
        x.stride(0), x.stride(1), x.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        float(eps), int(n_iters), float(tol if tol is not None else 0.0),
        P=p, USE_TOL=tol is not None, CHECK=CHECK_EVERY,
        BLOCK_N=_block(n), BLOCK_M=_block(m), BLOCK_D=min(64, _block(d)),
    )
    return f, g, error, iterations
