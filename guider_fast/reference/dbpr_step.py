"""Reference fused DBPR training step: forward, backward and optimizer update, in place.

Only the rows that appear in the batch are read and written: gradients are
computed per occurrence, summed per distinct row (``torch.unique`` + one
``index_add_`` into a compact (rows, D) buffer, so duplicate indices accumulate
exactly as in dense autograd), then applied to those rows.  On CPU the sum runs
in index order and the step is deterministic.  Math in float32 (float64 for
float64 tables); low-precision tables are rounded once on write-back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dbpr import _compute, gather_and_score, scaled_sigmoid, user_row_gradients

ADAGRAD_EPS = 1e-10


def _sum_per_row(index: torch.Tensor, rows: torch.Tensor):
    """Distinct indices and the per-index sums of ``rows`` (duplicates accumulate)."""
    unique, inverse = torch.unique(index, return_inverse=True)
    summed = torch.zeros(unique.shape[0], rows.shape[1], dtype=rows.dtype, device=rows.device)
    return unique, summed.index_add_(0, inverse, rows)


def _apply(table, rows, grads, lr, optimizer, accumulator):
    """SGD or row-wise Adagrad (one accumulator per row: mean of squared gradients)."""
    if optimizer == "rowwise_adagrad":
        sums = accumulator.index_select(0, rows) + grads.pow(2).mean(1).to(accumulator.dtype)
        accumulator.index_copy_(0, rows, sums)
        grads = grads / (sums.to(grads.dtype).sqrt().unsqueeze(1) + ADAGRAD_EPS)
    updated = _compute(table.index_select(0, rows)).sub_(grads, alpha=lr)
    table.index_copy_(0, rows, updated.to(table.dtype))


def dbpr_step(user_table, item_table, users, pos_items, neg_items, weights, lr, optimizer,
              user_accumulator, item_accumulator, l2, reduction):
    """One step; returns (loss, per-triplet margins (B, K)).  Tables change in place."""
    with torch.no_grad():
        u, p, n, margin = gather_and_score(user_table, item_table, users, pos_items, neg_items)
        batch, k = margin.shape
        log_sig = F.logsigmoid(margin).mean(1)
        w = None if weights is None else _compute(weights).to(u.dtype)
        rows = -log_sig if w is None else -w * log_sig
        # The L2 term (l2/2)(|u|^2 + |p|^2 + sum_k |n_k|^2) per triplet, reduced like the loss.
        if l2:
            rows = rows + 0.5 * l2 * (u.pow(2).sum(1) + p.pow(2).sum(1) + n.pow(2).sum((1, 2)))
        scale = 1.0 / batch if reduction == "mean" else 1.0
        loss = rows.sum() * scale

        coef = torch.full((batch,), scale, dtype=u.dtype, device=u.device)
        if w is not None:
            coef = coef * w
        s, s_total = scaled_sigmoid(margin, coef)
        d_u = user_row_gradients(p, n, s, s_total)
        d_p = u * s_total.neg()
        d_n = u.unsqueeze(1) * s.unsqueeze(2)
        if l2:
            d_u.add_(u, alpha=l2 * scale)
            d_p.add_(p, alpha=l2 * scale)
            d_n.add_(n, alpha=l2 * scale)

        user_rows, user_grads = _sum_per_row(users, d_u)
        item_rows, item_grads = _sum_per_row(torch.cat([pos_items, neg_items.reshape(-1)]),
                                             torch.cat([d_p, d_n.reshape(-1, u.shape[1])]))
        _apply(user_table, user_rows, user_grads, lr, optimizer, user_accumulator)
        _apply(item_table, item_rows, item_grads, lr, optimizer, item_accumulator)
    return loss, margin
