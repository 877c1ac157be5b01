"""Public DBPR loss: BPR weighted per interaction, gathering rows of the embedding tables."""

from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch
from . import _validate as V
from .reference.dbpr import dbpr_rows

REDUCTIONS = ("mean", "sum", "none")


def _dbpr_torch(user_emb, item_emb, users, pos_items, neg_items, weights):
    return dbpr_rows(user_emb, item_emb, users, pos_items, neg_items, weights)


_dispatch.register("dbpr", "torch", _dbpr_torch)


def _check_dbpr(user_emb, item_emb, users, pos_items, neg_items, weights):
    for name, table in (("user_emb", user_emb), ("item_emb", item_emb)):
        V.require_float(name, table)
        V.require_rank(name, table, (2,), "embedding table (rows, D)")
    if item_emb.dtype != user_emb.dtype:
        raise TypeError(f"item_emb must have the dtype of user_emb ({user_emb.dtype}), got {item_emb.dtype}")
    if user_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(f"user_emb and item_emb must have the same embedding size D, "
                         f"got {user_emb.shape[1]} and {item_emb.shape[1]}")
    for name, idx in (("users", users), ("pos_items", pos_items), ("neg_items", neg_items)):
        V.require_index(name, idx)
    V.require_rank("users", users, (1,), "index vector (B,)")
    batch = users.shape[0]
    if batch == 0:
        raise ValueError("users is empty: DBPR needs at least one (user, positive, negative) triplet")
    V.require_shape("pos_items", pos_items, (batch,), "one positive item per user index")
    V.require_rank("neg_items", neg_items, (1, 2), "index tensor (B,) or (B, K)")
    if neg_items.shape[0] != batch or neg_items.numel() == 0:
        raise ValueError(f"neg_items must have shape ({batch},) or ({batch}, K) with K >= 1, "
                         f"got {tuple(neg_items.shape)}")
    if weights is not None:
        V.require_float("weights", weights)
        V.require_shape("weights", weights, (batch,), "one weight per triplet")
    V.require_same_device([("user_emb", user_emb), ("item_emb", item_emb), ("users", users),
                           ("pos_items", pos_items), ("neg_items", neg_items), ("weights", weights)])
    if V.checks_enabled():
        checks = V.ValueChecks()
        checks.index_range("users", users, user_emb.shape[0])
        checks.index_range("pos_items", pos_items, item_emb.shape[0])
        checks.index_range("neg_items", neg_items, item_emb.shape[0])
        checks.finite("weights", weights)
        checks.raise_if_any()


def dbpr_loss(user_emb: torch.Tensor, item_emb: torch.Tensor, users: torch.Tensor,
              pos_items: torch.Tensor, neg_items: torch.Tensor,
              weights: Optional[torch.Tensor] = None, *, reduction: str = "mean",
              backend: str = "auto") -> torch.Tensor:
    """DBPR: ``-(1/B) sum_b w_b * mean_k logsigmoid(<u_b, p_b> - <u_b, n_bk>)``.

    Parameters
    ----------
    user_emb : (n_users, D) table; item_emb : (n_items, D) table (float16/bfloat16
        tables are read in float32 and receive gradients in their own dtype).
    users, pos_items : (B,) integer indices; neg_items : (B,) or (B, K) (mean over K).
    weights : (B,) per-triplet weights (GUIDER's calibration weights) or None (= 1).
    reduction : "mean" (default, divides by B), "sum", or "none" (per-triplet (B,)).

    Gradients reach ``user_emb`` and ``item_emb`` (scatter-added, duplicate
    indices accumulate) and ``weights`` if it requires grad.  Like autograd, it
    keeps the gathered (B, K+2, D) rows for backward.

    Value checks cover the indices (range) and ``weights`` (finite); the tables
    are not scanned for NaN/Inf, which would read every row each step: a
    non-finite gathered row shows up as a non-finite loss.
    """
    V.require_choice("reduction", reduction, REDUCTIONS)
    _check_dbpr(user_emb, item_emb, users, pos_items, neg_items, weights)
    return _dbpr_unchecked(user_emb, item_emb, users, pos_items, neg_items, weights,
                           reduction, backend)


def _dbpr_unchecked(user_emb, item_emb, users, pos_items, neg_items, weights, reduction, backend):
    _, impl = _dispatch.resolve("dbpr", backend, user_emb.device, user_emb.dtype)
    negatives = neg_items.unsqueeze(1) if neg_items.dim() == 1 else neg_items
    rows = impl(user_emb, item_emb, users.long(), pos_items.long(), negatives.long(), weights)
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows
