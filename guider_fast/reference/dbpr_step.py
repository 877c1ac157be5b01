"""Reference fused DBPR training step: forward, backward and optimizer update, in place.

Only the rows that appear in the batch are read and written.  The gradients of
all occurrences of a row are summed, then applied once (as dense autograd
followed by the optimizer).  How, on CPU (measured at 100k users x 1M items,
D = 64, B = 65,536, one thread; see benchmarks/results/dbpr_cpu.md):

* one stable sort of the batch's user and item indices together (int32 keys where
  they fit: torch's radix sort runs twice as fast on them), then per table one
  ``embedding_bag(mode="sum", per_sample_weights=...)`` whose bags are the runs
  of equal sorted indices: it gathers, scales and sums every row's occurrences
  in one pass, in occurrence order.  ``torch.unique`` + ``index_add_`` into a
  zeroed buffer (the previous scheme) made the same sums several times slower:
  ``index_add_`` with random destinations is CPU torch's weak primitive;
* per-occurrence gradients are never materialised: an item occurrence's
  gradient is ``c_o * u_b(o)``, so the item sums read the batch's user rows
  with weights ``c_o``; for K = 1 the user gradient is ``-s_b (p_b - n_b)``, so
  the user sums read the rows of ``p - n``, already formed for the margins;
* SGD folds ``-lr`` into those weights (the sums are then of ``-lr * gradient``:
  equal up to rounding) and applies them with one ``index_add_`` into float32 /
  float64 tables at the distinct, sorted rows (one add per row): no second
  gather of the old rows, no ``index_copy_``.  bfloat16/float16 tables are
  updated in float32 and rounded once on write-back; row-wise Adagrad sums the
  raw gradients, then scales each row;
* the gathered rows live in a per-thread workspace reused across steps: buffers
  above glibc's 32 MiB mmap threshold are otherwise mapped and page-faulted
  afresh on every call, which cost more than the arithmetic
  (``release_workspace()`` frees them).

Deterministic on CPU: stable sorts, every sum in occurrence order, one write
per row.  Math in float32 (float64 for float64 tables).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from .._constants import ADAGRAD_EPS
from .dbpr import _compute, scaled_sigmoid

_LOCAL = threading.local()


def release_workspace() -> None:
    """Free this thread's reusable step buffers (they are reallocated on the next step)."""
    _LOCAL.buffers = {}
    _LOCAL.triplets = None


def _buffer(name, shape, dtype, device):
    """An uninitialised tensor of ``shape``, reused across calls on CPU (per thread, per name)."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _LOCAL.buffers = {}
    numel = 1
    for size in shape:
        numel *= size
    key = (name, dtype)
    flat = buffers.get(key)
    if flat is None or flat.numel() < numel:
        buffers[key] = None  # free the smaller buffer before allocating the larger one
        flat = buffers[key] = torch.empty(numel, dtype=dtype)
    return flat[:numel].view(shape)


def _gather(table, index, name, dtype):
    """``table[index]`` in compute precision, into a workspace buffer."""
    out = _buffer(name, (index.shape[0], table.shape[1]), dtype, table.device)
    if table.dtype == dtype:
        return torch.index_select(table, 0, index, out=out)
    return out.copy_(table.index_select(0, index))


def _rowdot(a, b):
    """Row-wise dot products (B,): vecdot is faster on small batches, bmm (einsum) on large."""
    return torch.linalg.vecdot(a, b) if a.shape[0] <= 8_192 else torch.einsum("bd,bd->b", a, b)


def _item_triplets(batch, k, device):
    """The triplet of each item occurrence: positives 0..B-1, then each triplet's K negatives."""
    key = ("triplets", batch, k, device)
    cache = getattr(_LOCAL, "triplets", None)
    if cache is None or cache[0] != key:
        triplet = torch.arange(batch, device=device)
        cache = _LOCAL.triplets = (key, torch.cat([triplet, triplet.repeat_interleave(k)]))
    return cache[1]


_RADIX_MIN = 32_768  # torch 2.13's CPU sort: radix sort from this many elements
_PAD_MIN = 3_072  # from here, padding up to _RADIX_MIN beats the comparison sort


def _stable_sort(index):
    """``torch.sort(index, stable=True)``, by the fastest route torch 2.13 offers on CPU.

    Every route gives the same (sorted keys, order); only the speed differs.  From
    32,768 elements torch radix-sorts, twice as fast on int32 keys as on int64; below
    that it runs a comparison sort, ~40 ns an element on fresh data (repeating one
    input trains the branch predictor and hides that), so from ~3,000 elements the
    keys are padded to 32,768 with a key past every index (~140 us flat).
    """
    n = index.shape[0]
    if index.device.type != "cpu" or n < _PAD_MIN or int(index.max()) >= 2**31 - 1:
        return torch.sort(index, stable=True)
    keys = index.int()
    if n < _RADIX_MIN:
        keys = torch.cat([keys, keys.new_full((_RADIX_MIN - n,), 2**31 - 1)])
    sorted_keys, order = torch.sort(keys, stable=True)
    return sorted_keys[:n], order[:n]


def _sort_rows(users, item_index, n_users):
    """Stable sorts of ``users`` and ``item_index`` as one sort (one fixed cost).

    Item keys are offset by ``n_users``, so the B user occurrences come first in the
    sorted order, in the order a sort of ``users`` alone gives, then the items'.
    """
    batch = users.shape[0]
    sorted_keys, order = _stable_sort(torch.cat([users, item_index + n_users]))
    return ((sorted_keys[:batch], order[:batch]),
            (sorted_keys[batch:] - n_users, order[batch:] - batch))


def _segment_sum(sorted_rows, source, source_ids=None, weights=None, extra=None):
    """Distinct rows and, per row, the sum over its occurrences o of
    ``weights[o] * source[source_ids[o]]`` (ids default to o, weights to 1).

    ``sorted_rows`` = (sorted row indices, occurrence order) from a stable sort;
    ``extra=(source2, alpha)`` adds ``alpha * sum_o source2[o]``.  The bags of one
    ``embedding_bag(mode="sum")`` are the runs of equal sorted indices: it gathers,
    scales and sums each row's occurrences in one pass, in occurrence order.
    """
    sorted_keys, order = sorted_rows
    rows, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
    starts = counts.cumsum(0).sub_(counts)
    ids = order if source_ids is None else source_ids.index_select(0, order)
    per_sample = None if weights is None else weights.index_select(0, order)
    summed = F.embedding_bag(ids, source, starts, mode="sum", per_sample_weights=per_sample)
    if extra is not None:
        summed.add_(F.embedding_bag(order, extra[0], starts, mode="sum"), alpha=extra[1])
    return rows.long(), summed


def _apply(table, rows, grads, old_rows, lr, optimizer, accumulator):
    """SGD or row-wise Adagrad (one accumulator per row: mean of squared gradients).

    For SGD, ``grads`` already holds ``-lr *`` the summed gradients; for Adagrad the
    summed gradients, overwritten by the step.  ``old_rows()`` gives the rows'
    current values in compute precision (used for low-precision tables only).
    """
    if optimizer == "rowwise_adagrad":
        mean_sq = _rowdot(grads, grads).div_(grads.shape[1])
        sums = accumulator.index_select(0, rows).add_(mean_sq.to(accumulator.dtype))
        accumulator.index_copy_(0, rows, sums)
        step = (sums.to(grads.dtype).sqrt_().add_(ADAGRAD_EPS)).reciprocal_().mul_(-lr)
        grads.mul_(step.unsqueeze(1))
    if table.dtype == grads.dtype:
        table.index_add_(0, rows, grads)  # rows are distinct: one add per row
    else:
        table.index_copy_(0, rows, old_rows().add_(grads).to(table.dtype))


def dbpr_step(user_table, item_table, users, pos_items, neg_items, weights, lr, optimizer,
              user_accumulator, item_accumulator, l2, reduction):
    """One step; returns (loss, per-triplet margins (B, K)).  Tables change in place."""
    with torch.no_grad():
        batch, k = neg_items.shape
        dim = user_table.shape[1]
        device = user_table.device
        cdt = user_table.dtype if user_table.dtype in (torch.float32, torch.float64) else torch.float32
        item_index = torch.cat([pos_items, neg_items.reshape(-1)])  # (B (K + 1),)

        u = _gather(user_table, users, "u", cdt)
        item_rows = _gather(item_table, item_index, "items", cdt)
        p = item_rows[:batch]
        n = item_rows[batch:].view(batch, k, dim)
        if k == 1:
            diff = torch.sub(p, n[:, 0], out=_buffer("du", (batch, dim), cdt, device))
            margin = _rowdot(u, diff).unsqueeze(1)
        else:
            margin = _rowdot(u, p).unsqueeze(1) - torch.einsum("bkd,bd->bk", n, u)

        log_sig = F.logsigmoid(margin).mean(1)
        w = None if weights is None else _compute(weights).to(cdt)
        loss_rows = -log_sig if w is None else -w * log_sig
        # The L2 term (l2/2)(|u|^2 + |p|^2 + sum_k |n_k|^2) per triplet, reduced like the loss.
        if l2:
            item_sq = _rowdot(item_rows, item_rows)
            loss_rows = loss_rows + 0.5 * l2 * (_rowdot(u, u) + item_sq[:batch]
                                                + item_sq[batch:].view(batch, k).sum(1))
        scale = 1.0 / batch if reduction == "mean" else 1.0
        loss = loss_rows.sum() * scale

        # SGD folds -lr into the per-occurrence coefficients: the sums are then of
        # -lr * gradient (the same sums up to rounding), with no extra pass.
        g_scale = scale * -lr if optimizer == "sgd" else scale
        coef = torch.full((batch,), g_scale, dtype=cdt, device=device) if w is None else w * g_scale
        s, s_total = scaled_sigmoid(margin, coef)
        l2_scale = l2 * g_scale

        # dL/du_b = -(S_b p_b - sum_k s_bk n_bk) (+ l2 u_b): for K = 1, -s_b (p_b - n_b),
        # so the sums weight the rows of diff = p - n by -s (no (B, D) pass).
        if k == 1 and not l2:
            user_source, user_weights = diff, s.neg().reshape(-1)
        else:
            if k == 1:
                d_u = diff.mul_(s.neg())
            else:
                d_u = _buffer("du", (batch, dim), cdt, device)
                torch.bmm(s.unsqueeze(1), n, out=d_u.unsqueeze(1))  # sum_k s_bk n_bk
                d_u.addcmul_(p, s_total, value=-1.0)
            if l2:
                d_u.add_(u, alpha=l2_scale)
            user_source, user_weights = d_u, None
        user_sorted, item_sorted = _sort_rows(users, item_index, user_table.shape[0])
        user_ids, user_grads = _segment_sum(user_sorted, user_source, weights=user_weights)

        # Item occurrence o (the positives, then the (B, K) negatives row-major) of
        # triplet b(o) has gradient c_o u_b(o) (+ l2 row_o): c = -S_b for a positive,
        # s_bk for a negative.  So the item sums gather the batch's user rows.
        item_coef = torch.cat([s_total.neg().reshape(-1), s.reshape(-1)])
        item_ids, item_grads = _segment_sum(item_sorted, u, _item_triplets(batch, k, device), item_coef,
                                            extra=(item_rows, l2_scale) if l2 else None)

        _apply(user_table, user_ids, user_grads, lambda: _compute(user_table.index_select(0, user_ids)),
               lr, optimizer, user_accumulator)
        _apply(item_table, item_ids, item_grads, lambda: _compute(item_table.index_select(0, item_ids)),
               lr, optimizer, item_accumulator)
    return loss, margin
