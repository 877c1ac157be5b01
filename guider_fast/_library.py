"""torch.library registrations of the kernels, with fake (meta) implementations.

Registered ops are opaque to torch.compile's tracer but their fake kernels give
it output shapes and dtypes, so a compiled model that calls them traces without
a graph break inside the op.  The real kernels are imported on first call only
(importing guider_fast must not import triton).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor


@torch.library.custom_op("guider_fast::sinkhorn_onchip", mutates_args=())
def sinkhorn_onchip(x: Tensor, y: Tensor, a: Tensor, b: Tensor, eps: float, p: int,
                    n_iters: int, tol: Optional[float]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused Triton Sinkhorn solve: (f, g, marginal_error, iterations) of each problem."""
    from .kernels import sinkhorn as kernels

    return kernels.solve_onchip(x, y, a, b, eps, p, n_iters, tol)


@sinkhorn_onchip.register_fake
def _sinkhorn_onchip_fake(x, y, a, b, eps, p, n_iters, tol):
    batch, n, _ = x.shape
    m = y.shape[1]
    return (x.new_empty(batch, n, dtype=torch.float32), x.new_empty(batch, m, dtype=torch.float32),
            x.new_empty(batch, dtype=torch.float32), x.new_empty(batch, dtype=torch.int32))


@torch.library.custom_op("guider_fast::sinkhorn_streamed", mutates_args=())
def sinkhorn_streamed(x: Tensor, y: Tensor, a: Tensor, b: Tensor, eps: float, p: int, n_iters: int,
                      tol: Optional[float], block_points: int = 64,
                      block_features: int = 64) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Streamed Triton Sinkhorn for large clouds: (f, g, marginal_error, iterations)."""
    from .kernels import sinkhorn as kernels

    f, g, error, iterations = kernels.solve_streamed(x, y, a, b, eps, p, n_iters, tol,
                                                     block_points, block_features)
    return f, g, error, torch.full((x.shape[0],), iterations, dtype=torch.int32, device=x.device)


@sinkhorn_streamed.register_fake
def _sinkhorn_streamed_fake(x, y, a, b, eps, p, n_iters, tol, block_points=64, block_features=64):
    return _sinkhorn_onchip_fake(x, y, a, b, eps, p, n_iters, tol)


@torch.library.custom_op("guider_fast::sinkhorn_envelope_grad", mutates_args=())
def sinkhorn_envelope_grad(x: Tensor, y: Tensor, a: Tensor, b: Tensor, f: Tensor, g: Tensor,
                           eps: float, p: int, scale: Tensor) -> Tuple[Tensor, Tensor]:
    """Tile-wise envelope gradients (grad_x, grad_y) in Triton; the plan is never stored."""
    from .kernels import sinkhorn as kernels

    return kernels.envelope_gradients(x, y, a, b, f, g, eps, p, scale)


@sinkhorn_envelope_grad.register_fake
def _sinkhorn_envelope_grad_fake(x, y, a, b, f, g, eps, p, scale):
    # The kernels return fresh contiguous tensors, whatever the inputs' layout.
    return x.new_empty(x.shape, dtype=torch.float32), y.new_empty(y.shape, dtype=torch.float32)


@torch.library.custom_op("guider_fast::samples_loss_onchip", mutates_args=())
def samples_loss_onchip(x: Tensor, y: Tensor, a: Tensor, b: Tensor, eps_list: List[float], p: int,
                        debias: bool) -> Tensor:
    """GeomLoss's annealed loop and last extrapolation in one Triton launch (packed potentials)."""
    from .kernels import sinkhorn as kernels

    return kernels.samples_loss_potentials(x, y, a, b, eps_list, p, debias)


@samples_loss_onchip.register_fake
def _samples_loss_onchip_fake(x, y, a, b, eps_list, p, debias):
    return x.new_empty(x.shape[0], 2 * (x.shape[1] + y.shape[1]) * (2 if debias else 1),
                       dtype=torch.float32)


@torch.library.custom_op("guider_fast::weighted_cost_gradient", mutates_args=())
def weighted_cost_gradient(u: Tensor, v: Tensor, row_term: Tensor, col_term: Tensor, scale: Tensor,
                           eps: float, p: int, geomloss_cost: bool, normalize: bool) -> Tensor:
    """scale_i * sum_j exp(row_i + col_j - C_ij/eps) grad_u C(u_i, v_j), tile by tile in Triton
    (``normalize``: rows are soft-max weights, divided by their computed sum)."""
    from .kernels import sinkhorn as kernels

    return kernels.weighted_cost_gradient(u, v, row_term, col_term, scale, eps, p, geomloss_cost,
                                          normalize)


@weighted_cost_gradient.register_fake
def _weighted_cost_gradient_fake(u, v, row_term, col_term, scale, eps, p, geomloss_cost, normalize):
    return u.new_empty(u.shape, dtype=torch.float32)


# ------------------------------------------------------------------------------- DBPR

@torch.library.custom_op("guider_fast::dbpr_forward", mutates_args=())
def dbpr_forward(user_table: Tensor, item_table: Tensor, users: Tensor, pos_items: Tensor,
                 neg_items: Tensor, weights: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Triton gather-and-score: per-triplet terms (B,), score coefficients G (B, K+1) and
    mean logsigmoids (B,)."""
    from .kernels import dbpr as kernels

    rows, coef, log_sig, _ = kernels.forward(user_table, item_table, users.contiguous(),
                                             pos_items.contiguous(), neg_items, weights)
    return rows, coef, log_sig


@dbpr_forward.register_fake
def _dbpr_forward_fake(user_table, item_table, users, pos_items, neg_items, weights):
    batch, k_neg = neg_items.shape
    return (users.new_empty(batch, dtype=torch.float32),
            users.new_empty(batch, k_neg + 1, dtype=torch.float32),
            users.new_empty(batch, dtype=torch.float32))


@torch.library.custom_op("guider_fast::dbpr_backward", mutates_args=())
def dbpr_backward(user_table: Tensor, item_table: Tensor, users: Tensor, pos_items: Tensor,
                  neg_items: Tensor, coef: Tensor, grad_rows: Tensor,
                  mode: str) -> Tuple[Tensor, Tensor]:
    """Triton DBPR backward: float32 table gradients (mode "atomic" or "deterministic"), or
    per-occurrence gradient rows (mode "sparse")."""
    from .kernels import dbpr as kernels

    return kernels.backward(user_table, item_table, users.contiguous(), pos_items.contiguous(),
                            neg_items, coef, grad_rows, mode)


@dbpr_backward.register_fake
def _dbpr_backward_fake(user_table, item_table, users, pos_items, neg_items, coef, grad_rows, mode):
    dim = user_table.shape[1]
    if mode == "sparse":
        return (user_table.new_empty(users.shape[0], dim, dtype=torch.float32),
                user_table.new_empty(neg_items.numel() + pos_items.shape[0], dim,
                                     dtype=torch.float32))
    return (user_table.new_empty(user_table.shape, dtype=torch.float32),
            item_table.new_empty(item_table.shape, dtype=torch.float32))


@torch.library.custom_op("guider_fast::dbpr_fused_step",
                         mutates_args=("user_table", "item_table", "user_accumulator",
                                       "item_accumulator"))
def dbpr_fused_step(user_table: Tensor, item_table: Tensor, users: Tensor, pos_items: Tensor,
                    neg_items: Tensor, weights: Optional[Tensor], user_accumulator: Optional[Tensor],
                    item_accumulator: Optional[Tensor], lr: float, l2: float,
                    scale: float) -> Tuple[Tensor, Tensor]:
    """Triton fused DBPR step, in place on the tables (and Adagrad accumulators when given):
    per-triplet terms (B,) and margins (B, K)."""
    from .kernels import dbpr as kernels

    return kernels.fused_step(user_table, item_table, users.contiguous(), pos_items.contiguous(),
                              neg_items, weights, user_accumulator, item_accumulator, lr, l2, scale)


@dbpr_fused_step.register_fake
def _dbpr_fused_step_fake(user_table, item_table, users, pos_items, neg_items, weights,
                          user_accumulator, item_accumulator, lr, l2, scale):
    batch, k_neg = neg_items.shape
    return (users.new_empty(batch, dtype=torch.float32),
            users.new_empty(batch, k_neg, dtype=torch.float32))


# ------------------------------------------------------------------------ calibration

@torch.library.custom_op("guider_fast::calibrate_rows", mutates_args=())
def calibrate_rows(t: Tensor, v: Tensor, u_code: Tensor, t_code: Tensor, v_code: Tensor,
                   threshold: float, euclidean: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton AMSC calibration of (B, d) rows: (weights, clean, distance, normalized)."""
    from .kernels import calibration as kernels

    return kernels.calibrate_rows(t, v, u_code, t_code, v_code, threshold, euclidean)


def _calibration_fake(batch, like):
    return (like.new_empty(batch, dtype=torch.float32), like.new_empty(batch, dtype=torch.bool),
            like.new_empty(batch, dtype=torch.float32), like.new_empty(batch, dtype=torch.float32))


@calibrate_rows.register_fake
def _calibrate_rows_fake(t, v, u_code, t_code, v_code, threshold, euclidean):
    return _calibration_fake(t.shape[0], t)


@torch.library.custom_op("guider_fast::calibrate_cached", mutates_args=())
def calibrate_cached(items: Tensor, item_distance: Tensor, u_code: Tensor, text_sign: Tensor,
                     text_nonzero: Tensor, image_sign: Tensor, image_nonzero: Tensor,
                     threshold: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton AMSC calibration from cached per-item distances and packed codes."""
    from .kernels import calibration as kernels

    return kernels.calibrate_cached(items, item_distance, u_code, text_sign, text_nonzero,
                                    image_sign, image_nonzero, threshold)


@calibrate_cached.register_fake
def _calibrate_cached_fake(items, item_distance, u_code, text_sign, text_nonzero, image_sign,
                           image_nonzero, threshold):
    return _calibration_fake(items.shape[0], u_code)


@torch.library.custom_op("guider_fast::dbpr_atomic_sgd_step", mutates_args=("user_table", "item_table"))
def dbpr_atomic_sgd_step(user_table: Tensor, item_table: Tensor, users: Tensor, pos_items: Tensor,
                         neg_items: Tensor, weights: Optional[Tensor], lr: float, l2: float,
                         scale: float) -> Tuple[Tensor, Tensor]:
    """Triton one-pass Hogwild SGD step on float32 tables: per-triplet terms (B,), margins (B, K)."""
    from .kernels import dbpr as kernels

    return kernels.atomic_sgd_step(user_table, item_table, users.contiguous(), pos_items.contiguous(),
                                   neg_items, weights, lr, l2, scale)


@dbpr_atomic_sgd_step.register_fake
def _dbpr_atomic_sgd_step_fake(user_table, item_table, users, pos_items, neg_items, weights, lr, l2,
                               scale):
    return _dbpr_fused_step_fake(user_table, item_table, users, pos_items, neg_items, weights, None,
                                 None, lr, l2, scale)
