"""Reference DBPR (weighted BPR) with gather-and-score forward and a hand-derived backward.

Forward gathers u = U[users], p = I[pos], n = I[neg] (K negatives per triplet),
scores ``x_bk = <u_b, p_b> - <u_b, n_bk>`` and returns per-triplet terms
``-w_b * mean_k logsigmoid(x_bk)``.  Backward uses ``s_bk = sigmoid(-x_bk)``:

    dL/du_b  = -c_b (S_b p_b - sum_k s_bk n_bk),   S_b = sum_k s_bk
    dL/dp_b  = -c_b S_b u_b
    dL/dn_bk = +c_b s_bk u_b,                      c_b = grad_b * w_b / K

scatter-added into dense gradient tables (duplicate indices accumulate); the
positive and negative item rows go through a single ``index_add_``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def gather_and_score(user_table, item_table, users, pos_items, neg_items):
    """Rows u (B, D), p (B, D), n (B, K, D) in compute precision and margins (B, K)."""
    batch, k = neg_items.shape
    u = _compute(user_table.index_select(0, users))
    p = _compute(item_table.index_select(0, pos_items))
    n = _compute(item_table.index_select(0, neg_items.reshape(-1))).view(batch, k, -1)
    # einsum reduces without a (B, D) temporary: large temporaries cost more
    # in page faults than in arithmetic here.
    margin = torch.einsum("bd,bd->b", u, p).unsqueeze(1) - torch.einsum("bkd,bd->bk", n, u)
    return u, p, n, margin


def scaled_sigmoid(margin, coef):
    """``c_b * s_bk`` with ``s = sigmoid(-margin)``, ``c_b = coef_b / K``, and its row sums."""
    s = torch.sigmoid(-margin).mul_((coef / margin.shape[1]).unsqueeze(1))
    return s, s.sum(1, keepdim=True)


def user_row_gradients(p, n, s, s_total):
    """dL/du_b = -(S_b p_b - sum_k s_bk n_bk) for the scaled sigmoids s."""
    if n.shape[1] == 1:
        return (n[:, 0] - p).mul_(s)
    return (n * s.unsqueeze(2)).sum(1).sub_(s_total * p)


class DBPRRows(torch.autograd.Function):
    """Per-triplet DBPR terms (B,) from full tables; weights may be None.

    Row-wise dot products use multiply-and-sum: batched (1 x D) @ (D x 1)
    products through ``bmm`` are several times slower on CPU.
    """

    @staticmethod
    def forward(ctx, user_emb, item_emb, users, pos_items, neg_items, weights):
        u, p, n, margin = gather_and_score(user_emb, item_emb, users, pos_items, neg_items)
        log_sig = F.logsigmoid(margin).mean(1)
        w = None if weights is None else _compute(weights)
        rows = -log_sig if w is None else -w * log_sig
        # Keeping the gathered rows (as autograd would) measured 15-20% faster on CPU
        # than gathering again in backward.
        ctx.save_for_backward(u, p, n, margin, log_sig, users, pos_items, neg_items, weights)
        ctx.table_meta = (user_emb.shape, item_emb.shape, user_emb.dtype)
        return rows.to(user_emb.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        u, p, n, margin, log_sig, users, pos_items, neg_items, weights = ctx.saved_tensors
        user_shape, item_shape, table_dtype = ctx.table_meta
        batch, k = margin.shape
        dim = u.shape[1]
        grad_rows = _compute(grad_rows).to(u.dtype)
        coef = grad_rows if weights is None else grad_rows * _compute(weights)
        s, s_total = scaled_sigmoid(margin, coef)
        grad_user = grad_item = grad_weights = None
        if ctx.needs_input_grad[0]:
            d_u = user_row_gradients(p, n, s, s_total)
            grad_user = torch.zeros(user_shape, dtype=u.dtype, device=u.device)
            grad_user.index_add_(0, users, d_u)
            grad_user = grad_user.to(table_dtype)
        if ctx.needs_input_grad[1]:
            grad_item = torch.zeros(item_shape, dtype=u.dtype, device=u.device)
            if k == 1:
                # dL/dn = c s u = -dL/dp: one (B, D) product feeds both scatters.
                scaled_u = u * s
                grad_item.index_add_(0, neg_items[:, 0], scaled_u)
                grad_item.index_add_(0, pos_items, scaled_u, alpha=-1.0)
            else:
                # Positive and negative rows in one buffer -> a single scatter-add.
                item_rows = torch.empty(batch * (k + 1), dim, dtype=u.dtype, device=u.device)
                torch.mul(u, s_total.neg(), out=item_rows[:batch])
                torch.mul(u.unsqueeze(1), s.unsqueeze(2), out=item_rows[batch:].view(batch, k, dim))
                grad_item.index_add_(0, torch.cat([pos_items, neg_items.reshape(-1)]), item_rows)
            grad_item = grad_item.to(table_dtype)
        if ctx.needs_input_grad[5]:
            grad_weights = (-grad_rows * log_sig).to(weights.dtype)
        return grad_user, grad_item, None, None, None, grad_weights


def dbpr_rows(user_emb, item_emb, users, pos_items, neg_items, weights=None):
    """(B,) terms ``-w_b * mean_k logsigmoid(<u,p> - <u,n_k>)``; neg_items is (B, K)."""
    return DBPRRows.apply(user_emb, item_emb, users, pos_items, neg_items, weights)
