"""DBPR in Triton: gather-and-score forward, scatter or segment-sum backward, fused training step.

Notation (``guider_fast.reference.dbpr``): triplet b has user row u_b and K+1 item
rows i_b0 = p_b (positive), i_bk = n_bk (negatives).  The per-triplet term is
``-w_b mean_k logsigmoid(<u,p> - <u,n_k>)`` and its derivative with respect to
the scores ``<u_b, i_bj>`` is the coefficient matrix G (B, K+1):

    G_b0 = -c_b sum_k s_bk,   G_bk = c_b s_bk,   s_bk = sigmoid(-margin_bk),  c_b = scale w_b / K

The forward stores G, so the backward never recomputes a score: it only reads
rows and forms ``dL/du_b = sum_j G_bj i_bj`` and ``dL/di_bj = G_bj u_b``.

Duplicate rows (popular items repeat many times per batch) are summed in one of
two ways (the atomics are relaxed: each is an independent sum, nothing orders on them):

* **atomic**: one program per block of triplets adds its rows' gradients with
  ``tl.atomic_add`` (fastest; summation order varies run to run on a GPU);
* **sorted segments**: occurrences sorted by row (a stable ``torch.sort``), and the
  program at the start of each run of equal rows sums the run in sorted order, in
  chunks of ``SEGMENT_CHUNK`` rows with a fixed reduction tree, then writes the
  row once.  Bit-identical across runs, and the only way to apply an update that
  needs the whole row gradient (row-wise Adagrad) in place.

The exact fused step (``dbpr_step``, the default) runs three launches over sorted segments: user
segments compute the forward (G, losses, margins) and each user's summed
gradient into a stash; item segments read the (still unchanged) user rows and
update the item rows in place; a last launch applies the stashed user gradients.
Every row of the batch is read before it is written, so the step equals dense
autograd followed by the optimizer.  The "atomic" SGD step is one launch that
scores each block of triplets and atomically adds its updates (Hogwild, as
``implicit``'s BPR): (K+2) row reads and (K+2) atomic row updates per triplet,
no sort, not deterministic, and blocks sharing rows may see each other's updates.

Tables may be float32, float16 or bfloat16 (loaded, then float32 math, rounded
once on store); index tensors any integer dtype.  This module imports triton;
``guider_fast`` imports it only when the "triton" backend is used.
"""

import torch
import triton
import triton.language as tl

from guider_fast._constants import ADAGRAD_EPS as _ADAGRAD_EPS

from ._launch import block_size, on_device

# Sorted occurrences summed per loop iteration of a segment program.
SEGMENT_CHUNK = 8
# What a segment program does with a row's summed gradient (its MODE): constexpr
# globals, so the kernels can compare MODE with them by name.
UPDATE_GRADIENT, UPDATE_SGD, UPDATE_ADAGRAD, UPDATE_STASH = (tl.constexpr(mode) for mode in range(4))
ADAGRAD_EPS = tl.constexpr(_ADAGRAD_EPS)


@triton.jit
def _logsigmoid_and_sigmoid_neg(x):
    """(logsigmoid(x), sigmoid(-x)) without overflow for any finite x."""
    e = tl.exp(-tl.abs(x))
    log_sig = tl.minimum(x, 0.0) - tl.log(1.0 + e)
    sig_neg = tl.where(x >= 0, e / (1.0 + e), 1.0 / (1.0 + e))
    return log_sig, sig_neg


@triton.jit
def _load_rows(table_ptr, index, ok, feats, feat_ok, stride_row, stride_col):
    """Gather rows ``table[index]`` as a float32 (len(index), BLOCK_D) tile."""
    ptrs = table_ptr + index.to(tl.int64)[:, None] * stride_row + feats[None, :] * stride_col
    return tl.load(ptrs, mask=ok[:, None] & feat_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_triplet_block(users_ptr, pos_ptr, user_ptr, batch, dim, stride_ur, stride_uc,
                   BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's block of triplets: (triplet ids, their mask, feature lanes, their mask,
    user ids, positive ids, the user rows as float32)."""
    trip = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    ok = trip < batch
    feats = tl.arange(0, BLOCK_D)
    feat_ok = feats < dim
    users = tl.load(users_ptr + trip, mask=ok, other=0).to(tl.int64)
    pos = tl.load(pos_ptr + trip, mask=ok, other=0).to(tl.int64)
    u = _load_rows(user_ptr, users, ok, feats, feat_ok, stride_ur, stride_uc)
    return trip, ok, feats, feat_ok, users, pos, u


@triton.jit
def _triplet_weights(w_ptr, trip, ok, stride_w, scale, k_neg, HAS_WEIGHTS: tl.constexpr,
                     ROWS: tl.constexpr):
    """(w_b, c_b = w_b scale / K) of the triplets ``trip`` (w = 1 without weights)."""
    if HAS_WEIGHTS:
        w = tl.load(w_ptr + trip * stride_w, mask=ok, other=0.0).to(tl.float32)
    else:
        w = tl.full((ROWS,), 1.0, tl.float32)
    return w, w * (scale / k_neg)


@triton.jit
def _score_positive(u, p, u_squared, w_ptr, trip, mask, stride_w, scale, k_neg,
                    HAS_WEIGHTS: tl.constexpr, ROWS: tl.constexpr):
    """ROWS triplets' positive scores, squared norms so far, weights, and zeroed negative sums."""
    w, c = _triplet_weights(w_ptr, trip, mask, stride_w, scale, k_neg, HAS_WEIGHTS, ROWS)
    zeros = tl.zeros((ROWS,), dtype=tl.float32)
    return tl.sum(u * p, axis=1), u_squared + tl.sum(p * p, axis=1), w, c, zeros, zeros


@triton.jit
def _score_negative(pos_score, u, n, c, trip, k, k_neg, mask, margin_ptr, coef_ptr):
    """Store negative k's margins and coefficients G; return (logsigmoid, sigmoid(-margin))."""
    margin = pos_score - tl.sum(u * n, axis=1)
    log_sig, sig_neg = _logsigmoid_and_sigmoid_neg(margin)
    tl.store(margin_ptr + trip * k_neg + k, margin, mask=mask)
    tl.store(coef_ptr + trip * (k_neg + 1) + 1 + k, c * sig_neg, mask=mask)
    return log_sig, sig_neg


@triton.jit
def _dbpr_forward_kernel(
    user_ptr, item_ptr, users_ptr, pos_ptr, neg_ptr, w_ptr,
    rows_ptr, coef_ptr, log_sig_ptr, margin_ptr,
    batch, k_neg, dim,
    stride_ur, stride_uc, stride_ir, stride_ic, stride_nb, stride_nk, stride_w,
    scale, l2,
    HAS_WEIGHTS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per block of triplets: margins (B, K), coefficients G (B, K+1), terms and mean logsigmoids."""
    trip, ok, feats, feat_ok, _, pos, u = _load_triplet_block(
        users_ptr, pos_ptr, user_ptr, batch, dim, stride_ur, stride_uc, BLOCK_B, BLOCK_D)
    p = _load_rows(item_ptr, pos, ok, feats, feat_ok, stride_ir, stride_ic)
    pos_score, squares, w, c, log_sig_sum, sig_sum = _score_positive(
        u, p, tl.sum(u * u, axis=1), w_ptr, trip, ok, stride_w, scale, k_neg, HAS_WEIGHTS, BLOCK_B)
    for k in range(0, k_neg):
        neg = tl.load(neg_ptr + trip * stride_nb + k * stride_nk, mask=ok, other=0)
        n = _load_rows(item_ptr, neg, ok, feats, feat_ok, stride_ir, stride_ic)
        log_sig, sig_neg = _score_negative(pos_score, u, n, c, trip, k, k_neg, ok, margin_ptr, coef_ptr)
        log_sig_sum += log_sig
        sig_sum += sig_neg
        squares += tl.sum(n * n, axis=1)
    tl.store(coef_ptr + trip * (k_neg + 1), -c * sig_sum, mask=ok)
    log_sig_mean = log_sig_sum / k_neg
    tl.store(log_sig_ptr + trip, log_sig_mean, mask=ok)
    tl.store(rows_ptr + trip, -w * log_sig_mean + (0.5 * l2) * squares, mask=ok)


@triton.jit
def _dbpr_scatter_kernel(
    user_ptr, item_ptr, users_ptr, pos_ptr, neg_ptr, coef_ptr, grad_rows_ptr,
    grad_user_ptr, grad_item_ptr,
    batch, k_neg, dim,
    stride_ur, stride_uc, stride_ir, stride_ic, stride_nb, stride_nk, stride_gr,
    PER_OCCURRENCE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward per block of triplets: atomically add row gradients into dense float32
    tables, or (PER_OCCURRENCE) store one gradient row per occurrence (sparse COO values:
    users in triplet order; items positives first, then negatives in (b, k) order)."""
    trip, ok, feats, feat_ok, users, pos, u = _load_triplet_block(
        users_ptr, pos_ptr, user_ptr, batch, dim, stride_ur, stride_uc, BLOCK_B, BLOCK_D)
    mask = ok[:, None] & feat_ok[None, :]
    grad_rows = tl.load(grad_rows_ptr + trip * stride_gr, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(coef_ptr + trip * (k_neg + 1), mask=ok, other=0.0) * grad_rows
    d_user = g[:, None] * _load_rows(item_ptr, pos, ok, feats, feat_ok, stride_ir, stride_ic)
    if PER_OCCURRENCE:
        tl.store(grad_item_ptr + trip[:, None] * dim + feats[None, :], g[:, None] * u, mask=mask)
    else:
        tl.atomic_add(grad_item_ptr + pos[:, None] * dim + feats[None, :], g[:, None] * u, mask=mask,
                      sem="relaxed")
    for k in range(0, k_neg):
        neg = tl.load(neg_ptr + trip * stride_nb + k * stride_nk, mask=ok, other=0).to(tl.int64)
        g = tl.load(coef_ptr + trip * (k_neg + 1) + 1 + k, mask=ok, other=0.0) * grad_rows
        d_user += g[:, None] * _load_rows(item_ptr, neg, ok, feats, feat_ok, stride_ir, stride_ic)
        if PER_OCCURRENCE:
            slot = batch + trip * k_neg + k
            tl.store(grad_item_ptr + slot[:, None] * dim + feats[None, :], g[:, None] * u, mask=mask)
        else:
            tl.atomic_add(grad_item_ptr + neg[:, None] * dim + feats[None, :], g[:, None] * u,
                          mask=mask, sem="relaxed")
    if PER_OCCURRENCE:
        tl.store(grad_user_ptr + trip[:, None] * dim + feats[None, :], d_user, mask=mask)
    else:
        tl.atomic_add(grad_user_ptr + users[:, None] * dim + feats[None, :], d_user, mask=mask,
                      sem="relaxed")


@triton.jit
def _dbpr_atomic_sgd_kernel(
    user_ptr, item_ptr, users_ptr, pos_ptr, neg_ptr, w_ptr, rows_ptr, margin_ptr,
    batch, k_neg, dim,
    stride_ur, stride_uc, stride_ir, stride_ic, stride_nb, stride_nk, stride_w,
    scale, l2, lr,
    HAS_WEIGHTS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One-pass SGD step: score a block of triplets, then atomically add ``-lr * grad`` to
    their rows (float32 tables).  Rows are read once, before this block writes; blocks
    that share rows may see each other's updates (Hogwild)."""
    trip, ok, feats, feat_ok, users, pos, u = _load_triplet_block(
        users_ptr, pos_ptr, user_ptr, batch, dim, stride_ur, stride_uc, BLOCK_B, BLOCK_D)
    mask = ok[:, None] & feat_ok[None, :]
    p = _load_rows(item_ptr, pos, ok, feats, feat_ok, stride_ir, stride_ic)
    pos_score = tl.sum(u * p, axis=1)
    squares = tl.sum(u * u, axis=1) + tl.sum(p * p, axis=1)
    w, c = _triplet_weights(w_ptr, trip, ok, stride_w, scale, k_neg, HAS_WEIGHTS, BLOCK_B)
    l2_scale = l2 * scale
    log_sig_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    sig_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    d_user = l2_scale * u
    # Every row of the block is read before the block adds to any (a negative may
    # repeat another negative or a positive of the block).  The negatives'
    # coefficients wait in registers: reading back a global store from other
    # threads of the program would race.
    k_lanes = tl.arange(0, BLOCK_K)
    neg_coef = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    for k in range(0, k_neg):
        neg = tl.load(neg_ptr + trip * stride_nb + k * stride_nk, mask=ok, other=0).to(tl.int64)
        n = _load_rows(item_ptr, neg, ok, feats, feat_ok, stride_ir, stride_ic)
        margin = pos_score - tl.sum(u * n, axis=1)
        log_sig, sig_neg = _logsigmoid_and_sigmoid_neg(margin)
        tl.store(margin_ptr + trip * k_neg + k, margin, mask=ok)
        g = c * sig_neg
        neg_coef = tl.where(k_lanes[None, :] == k, g[:, None], neg_coef)
        d_user += g[:, None] * n
        log_sig_sum += log_sig
        sig_sum += sig_neg
        squares += tl.sum(n * n, axis=1)
    for k in range(0, k_neg):
        neg = tl.load(neg_ptr + trip * stride_nb + k * stride_nk, mask=ok, other=0).to(tl.int64)
        g = tl.sum(tl.where(k_lanes[None, :] == k, neg_coef, 0.0), axis=1)
        step = g[:, None] * u
        if l2 != 0.0:
            # The decay reads the row again: it may include this block's earlier additions.
            step += l2_scale * _load_rows(item_ptr, neg, ok, feats, feat_ok, stride_ir, stride_ic)
        tl.atomic_add(item_ptr + neg[:, None] * stride_ir + feats[None, :] * stride_ic, -lr * step,
                      mask=mask, sem="relaxed")
    g = -c * sig_sum
    d_user += g[:, None] * p
    tl.atomic_add(item_ptr + pos[:, None] * stride_ir + feats[None, :] * stride_ic,
                  -lr * (g[:, None] * u + l2_scale * p), mask=mask, sem="relaxed")
    tl.atomic_add(user_ptr + users[:, None] * stride_ur + feats[None, :] * stride_uc, -lr * d_user,
                  mask=mask, sem="relaxed")
    tl.store(rows_ptr + trip, -w * (log_sig_sum / k_neg) + (0.5 * l2) * squares, mask=ok)


@triton.jit
def _segment_start(keys_ptr, position):
    """(row key, whether ``position`` starts a run of equal keys) in a sorted key vector."""
    key = tl.load(keys_ptr + position)
    previous = tl.load(keys_ptr + position - 1, mask=position > 0, other=-1)
    # Keys may be sorted as int32; row offsets need 64 bits (10^7 rows x 256 > 2^31).
    return key.to(tl.int64), (position == 0) | (previous != key)


@triton.jit
def _run_start(position, dim, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
    """The state of a segment program walking its run of equal keys from ``position``."""
    feats = tl.arange(0, BLOCK_D)
    lanes = tl.arange(0, CHUNK)
    grad = tl.zeros((BLOCK_D,), dtype=tl.float32)
    count = position.to(tl.float32) * 0.0
    return feats, feats < dim, lanes, grad, count, position >= 0


@triton.jit
def _run_advance(in_run, count, position, CHUNK: tl.constexpr):
    """Count the chunk's occurrences of the run; the run goes on while a chunk is full."""
    n_in_run = tl.sum(in_run.to(tl.int32), axis=0)
    return count + n_in_run.to(tl.float32), n_in_run == CHUNK, position + CHUNK


@triton.jit
def _finish_row(grad, key, position, count, table_ptr, out_ptr, acc_ptr, dim, feats, feat_ok,
                stride_r, stride_c, lr, l2_scale, MODE: tl.constexpr):
    """Dispose of a row's summed gradient: store it (dense grad or stash) or update the row."""
    if MODE == UPDATE_GRADIENT:
        tl.store(out_ptr + key * dim + feats, grad, mask=feat_ok)
    elif MODE == UPDATE_STASH:
        # Stash for _apply_stash_kernel: the gradient, and the run length in acc_ptr.
        tl.store(out_ptr + position * dim + feats, grad, mask=feat_ok)
        tl.store(acc_ptr + position, count)
    else:
        row_ptrs = table_ptr + key * stride_r + feats * stride_c
        old = tl.load(row_ptrs, mask=feat_ok, other=0.0).to(tl.float32)
        # Every occurrence of the row adds l2 * scale * row to its gradient.
        grad = grad + (l2_scale * count) * old
        if MODE == UPDATE_ADAGRAD:
            total = tl.load(acc_ptr + key) + tl.sum(grad * grad, axis=0) / dim
            tl.store(acc_ptr + key, total)
            grad = grad / (tl.sqrt_rn(total) + ADAGRAD_EPS)
        tl.store(row_ptrs, (old - lr * grad).to(table_ptr.dtype.element_ty), mask=feat_ok)


@triton.jit
def _item_segments_kernel(
    keys_ptr, order_ptr, n_occurrences, user_ptr, users_ptr, coef_ptr, grad_rows_ptr,
    table_ptr, out_ptr, acc_ptr,
    batch, k_neg, dim, stride_ur, stride_uc, stride_tr, stride_tc, stride_gr,
    lr, l2_scale,
    MODE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Item rows: sum ``G_bj grad_b u_b`` over each run of equal sorted item keys.

    Occurrence o < B is triplet o's positive, o >= B negative (o - B) of triplet (o - B) // K.
    """
    position = tl.program_id(0).to(tl.int64)
    key, starts = _segment_start(keys_ptr, position)
    if starts:
        feats, feat_ok, lanes, grad, count, more = _run_start(position, dim, BLOCK_D, CHUNK)
        while more:
            offs = position + lanes
            in_run = tl.load(keys_ptr + offs, mask=offs < n_occurrences, other=-1) == key
            occ = tl.load(order_ptr + offs, mask=in_run, other=0).to(tl.int64)
            is_neg = occ >= batch
            neg_slot = occ - batch
            trip = tl.where(is_neg, neg_slot // k_neg, occ)
            column = tl.where(is_neg, 1 + neg_slot % k_neg, 0)
            g = tl.load(coef_ptr + trip * (k_neg + 1) + column, mask=in_run, other=0.0)
            g = g * tl.load(grad_rows_ptr + trip * stride_gr, mask=in_run, other=0.0).to(tl.float32)
            users = tl.load(users_ptr + trip, mask=in_run, other=0)
            u = _load_rows(user_ptr, users, in_run, feats, feat_ok, stride_ur, stride_uc)
            grad += tl.sum(g[:, None] * u, axis=0)
            count, more, position = _run_advance(in_run, count, position, CHUNK)
        _finish_row(grad, key, tl.program_id(0).to(tl.int64), count, table_ptr, out_ptr, acc_ptr,
                    dim, feats, feat_ok, stride_tr, stride_tc, lr, l2_scale, MODE)


@triton.jit
def _user_segments_kernel(
    keys_ptr, order_ptr, user_ptr, item_ptr, pos_ptr, neg_ptr, w_ptr, coef_ptr, grad_rows_ptr,
    rows_ptr, margin_ptr, out_ptr, acc_ptr,
    batch, k_neg, dim, stride_ur, stride_uc, stride_ir, stride_ic, stride_nb, stride_nk,
    stride_w, stride_gr, scale, l2, lr,
    FORWARD: tl.constexpr, HAS_WEIGHTS: tl.constexpr, MODE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """User rows: sum ``sum_j G_bj grad_b i_bj`` over each run of equal sorted user keys.

    With FORWARD the same pass first scores the run's triplets (the user row is read
    once per run) and stores G, the per-triplet terms and the margins.
    """
    position = tl.program_id(0).to(tl.int64)
    key, starts = _segment_start(keys_ptr, position)
    if starts:
        feats, feat_ok, lanes, grad, count, more = _run_start(position, dim, BLOCK_D, CHUNK)
        u = tl.load(user_ptr + key * stride_ur + feats * stride_uc, mask=feat_ok,
                    other=0.0).to(tl.float32)
        u_squared = tl.sum(u * u, axis=0)
        while more:
            offs = position + lanes
            in_run = tl.load(keys_ptr + offs, mask=offs < batch, other=-1) == key
            trip = tl.load(order_ptr + offs, mask=in_run, other=0).to(tl.int64)
            grad_rows = tl.load(grad_rows_ptr + trip * stride_gr, mask=in_run,
                                other=0.0).to(tl.float32)
            p = _load_rows(item_ptr, tl.load(pos_ptr + trip, mask=in_run, other=0), in_run, feats,
                           feat_ok, stride_ir, stride_ic)
            if FORWARD:
                pos_score, squares, w, c, log_sig_sum, sig_sum = _score_positive(
                    u[None, :], p, u_squared, w_ptr, trip, in_run, stride_w, scale, k_neg, HAS_WEIGHTS, CHUNK)
            for k in range(0, k_neg):
                neg = tl.load(neg_ptr + trip * stride_nb + k * stride_nk, mask=in_run, other=0)
                n = _load_rows(item_ptr, neg, in_run, feats, feat_ok, stride_ir, stride_ic)
                if FORWARD:
                    log_sig, sig_neg = _score_negative(pos_score, u[None, :], n, c, trip, k, k_neg, in_run,
                                                       margin_ptr, coef_ptr)
                    g = c * sig_neg
                    log_sig_sum += log_sig
                    sig_sum += sig_neg
                    squares += tl.sum(n * n, axis=1)
                else:
                    g = tl.load(coef_ptr + trip * (k_neg + 1) + 1 + k, mask=in_run, other=0.0)
                grad += tl.sum((g * grad_rows)[:, None] * n, axis=0)
            if FORWARD:
                g = -c * sig_sum
                tl.store(coef_ptr + trip * (k_neg + 1), g, mask=in_run)
                tl.store(rows_ptr + trip, -w * (log_sig_sum / k_neg) + (0.5 * l2) * squares,
                         mask=in_run)
            else:
                g = tl.load(coef_ptr + trip * (k_neg + 1), mask=in_run, other=0.0)
            grad += tl.sum((g * grad_rows)[:, None] * p, axis=0)
            count, more, position = _run_advance(in_run, count, position, CHUNK)
        _finish_row(grad, key, tl.program_id(0).to(tl.int64), count, user_ptr, out_ptr, acc_ptr,
                    dim, feats, feat_ok, stride_ur, stride_uc, lr, l2 * scale, MODE)


@triton.jit
def _apply_stash_kernel(keys_ptr, stash_ptr, count_ptr, table_ptr, acc_ptr, dim,
                        stride_r, stride_c, lr, l2_scale,
                        MODE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Apply each run's stashed gradient (stored at the run's first sorted position)."""
    position = tl.program_id(0).to(tl.int64)
    key, starts = _segment_start(keys_ptr, position)
    if starts:
        feats = tl.arange(0, BLOCK_D)
        feat_ok = feats < dim
        grad = tl.load(stash_ptr + position * dim + feats, mask=feat_ok, other=0.0)
        count = tl.load(count_ptr + position)
        _finish_row(grad, key.to(tl.int64), position, count, table_ptr, stash_ptr, acc_ptr, dim,
                    feats, feat_ok, stride_r, stride_c, lr, l2_scale, MODE)


# ----------------------------------------------------------------------------- launchers

def _feature_block(dim: int) -> int:
    return block_size(dim, floor=16)


def _triplet_block(dim: int) -> int:
    # About 4K float32 elements per (triplets, features) tile: three live tiles per program.
    return max(1, min(128, 4096 // _feature_block(dim)))


def _row_warps(dim: int) -> int:
    return 1 if dim <= 64 else (2 if dim <= 256 else 4)


def _table_strides(table):
    return table.stride(0), table.stride(1)


def _triplet_block_args(user_table, item_table, users, pos_items, neg_items, weights, outputs):
    """Leading arguments of the triplet-blocked kernels: inputs, outputs, sizes, strides.

    Without weights the kernel never reads its weight pointer: the first output stands in.
    """
    batch, k_neg = neg_items.shape
    return (user_table, item_table, users, pos_items, neg_items,
            weights if weights is not None else outputs[0], *outputs,
            batch, k_neg, user_table.shape[1], *_table_strides(user_table), *_table_strides(item_table),
            neg_items.stride(0), neg_items.stride(1), weights.stride(0) if weights is not None else 0)


def forward(user_table, item_table, users, pos_items, neg_items, weights, scale: float = 1.0,
            l2: float = 0.0):
    """Triplet-blocked forward: (terms (B,), coefficients G (B, K+1), mean logsigmoid (B,), margins (B, K))."""
    batch, k_neg = neg_items.shape
    dim = user_table.shape[1]
    device = user_table.device
    rows = torch.empty(batch, dtype=torch.float32, device=device)
    coef = torch.empty(batch, k_neg + 1, dtype=torch.float32, device=device)
    log_sig = torch.empty(batch, dtype=torch.float32, device=device)
    margins = torch.empty(batch, k_neg, dtype=torch.float32, device=device)
    block_b = _triplet_block(dim)
    with on_device(user_table):
        _dbpr_forward_kernel[(triton.cdiv(batch, block_b),)](
            *_triplet_block_args(user_table, item_table, users, pos_items, neg_items, weights,
                                 (rows, coef, log_sig, margins)),
            float(scale), float(l2),
            HAS_WEIGHTS=weights is not None, BLOCK_B=block_b, BLOCK_D=_feature_block(dim),
            num_warps=4,
        )
    return rows, coef, log_sig, margins


def _sort_keys(keys, n_rows):
    # Radix sort passes scale with the key width: sort 32-bit keys when the rows fit.
    keys = keys.to(torch.int32 if n_rows < 2**31 else torch.int64)
    return torch.sort(keys, stable=True)


def _sorted_occurrences(users, pos_items, neg_items, n_users, n_items):
    """Stable sorts of the user keys and of the item occurrences (positives, then negatives)."""
    user_keys, user_order = _sort_keys(users, n_users)
    item_keys, item_order = _sort_keys(torch.cat([pos_items.reshape(-1), neg_items.reshape(-1)]),
                                       n_items)
    return user_keys, user_order, item_keys, item_order


def backward(user_table, item_table, users, pos_items, neg_items, coef, grad_rows,
             mode: str):
    """Table gradients from the forward's coefficients G and the per-triplet output grads.

    mode "atomic" / "deterministic": dense float32 (rows, D) gradients; "sparse":
    per-occurrence float32 rows (users (B, D); items (B (K+1), D), positives first).
    """
    batch, k_neg = neg_items.shape
    dim = user_table.shape[1]
    device = user_table.device
    block_d = _feature_block(dim)
    grad_rows = grad_rows.float()
    if mode == "sparse":
        grad_user = torch.empty(batch, dim, dtype=torch.float32, device=device)
        grad_item = torch.empty(batch * (k_neg + 1), dim, dtype=torch.float32, device=device)
    else:
        grad_user = torch.zeros(user_table.shape[0], dim, dtype=torch.float32, device=device)
        grad_item = torch.zeros(item_table.shape[0], dim, dtype=torch.float32, device=device)
    with on_device(user_table):
        if mode in ("atomic", "sparse"):
            block_b = _triplet_block(dim)
            _dbpr_scatter_kernel[(triton.cdiv(batch, block_b),)](
                user_table, item_table, users, pos_items, neg_items, coef, grad_rows,
                grad_user, grad_item, batch, k_neg, dim,
                *_table_strides(user_table), *_table_strides(item_table),
                neg_items.stride(0), neg_items.stride(1), grad_rows.stride(0),
                PER_OCCURRENCE=mode == "sparse", BLOCK_B=block_b, BLOCK_D=block_d, num_warps=4,
            )
            return grad_user, grad_item
        user_keys, user_order, item_keys, item_order = _sorted_occurrences(
            users, pos_items, neg_items, user_table.shape[0], item_table.shape[0])
        _user_segments_kernel[(batch,)](
            user_keys, user_order, user_table, item_table, pos_items, neg_items, coef, coef,
            grad_rows, coef, coef, grad_user, coef,
            batch, k_neg, dim, *_table_strides(user_table), *_table_strides(item_table),
            neg_items.stride(0), neg_items.stride(1), 0, grad_rows.stride(0), 1.0, 0.0, 0.0,
            FORWARD=False, HAS_WEIGHTS=False, MODE=UPDATE_GRADIENT, CHUNK=SEGMENT_CHUNK,
            BLOCK_D=block_d, num_warps=_row_warps(dim),
        )
        _item_segments_kernel[(item_keys.shape[0],)](
            item_keys, item_order, item_keys.shape[0], user_table, users, coef, grad_rows,
            grad_item, grad_item, coef,
            batch, k_neg, dim, *_table_strides(user_table), dim, 1, grad_rows.stride(0),
            0.0, 0.0,
            MODE=UPDATE_GRADIENT, CHUNK=SEGMENT_CHUNK, BLOCK_D=block_d, num_warps=_row_warps(dim),
        )
    return grad_user, grad_item


def fused_step(user_table, item_table, users, pos_items, neg_items, weights, user_accumulator,
               item_accumulator, lr: float, l2: float, scale: float):
    """Forward, backward and SGD / row-wise Adagrad (accumulators given) in place.

    Returns the per-triplet terms (B,) (loss = terms.sum() * scale) and margins (B, K).
    """
    batch, k_neg = neg_items.shape
    dim = user_table.shape[1]
    device = user_table.device
    block_d = _feature_block(dim)
    warps = _row_warps(dim)
    adagrad = user_accumulator is not None
    mode = UPDATE_ADAGRAD if adagrad else UPDATE_SGD
    rows = torch.empty(batch, dtype=torch.float32, device=device)
    coef = torch.empty(batch, k_neg + 1, dtype=torch.float32, device=device)
    margins = torch.empty(batch, k_neg, dtype=torch.float32, device=device)
    stash = torch.empty(batch, dim, dtype=torch.float32, device=device)
    run_lengths = torch.empty(batch, dtype=torch.float32, device=device)
    unit = torch.ones(1, dtype=torch.float32, device=device)
    user_keys, user_order, item_keys, item_order = _sorted_occurrences(
        users, pos_items, neg_items, user_table.shape[0], item_table.shape[0])
    acc_user = user_accumulator if adagrad else unit
    acc_item = item_accumulator if adagrad else unit
    with on_device(user_table):
        _user_segments_kernel[(batch,)](
            user_keys, user_order, user_table, item_table, pos_items, neg_items,
            weights if weights is not None else unit, coef, unit, rows, margins, stash, run_lengths,
            batch, k_neg, dim, *_table_strides(user_table), *_table_strides(item_table),
            neg_items.stride(0), neg_items.stride(1),
            weights.stride(0) if weights is not None else 0, 0, float(scale), float(l2), 0.0,
            FORWARD=True, HAS_WEIGHTS=weights is not None, MODE=UPDATE_STASH,
            CHUNK=SEGMENT_CHUNK, BLOCK_D=block_d, num_warps=warps,
        )
        _item_segments_kernel[(item_keys.shape[0],)](
            item_keys, item_order, item_keys.shape[0], user_table, users, coef, unit,
            item_table, unit, acc_item,
            batch, k_neg, dim, *_table_strides(user_table), *_table_strides(item_table), 0,
            float(lr), float(l2) * float(scale),
            MODE=mode, CHUNK=SEGMENT_CHUNK, BLOCK_D=block_d, num_warps=warps,
        )
        _apply_stash_kernel[(batch,)](
            user_keys, stash, run_lengths, user_table, acc_user, dim, *_table_strides(user_table),
            float(lr), float(l2) * float(scale), MODE=mode, BLOCK_D=block_d, num_warps=warps,
        )
    return rows, margins


def atomic_sgd_step(user_table, item_table, users, pos_items, neg_items, weights, lr: float,
                    l2: float, scale: float):
    """Hogwild SGD step on float32 tables: (terms (B,), margins (B, K)); one launch, no sort."""
    batch, k_neg = neg_items.shape
    dim = user_table.shape[1]
    device = user_table.device
    rows = torch.empty(batch, dtype=torch.float32, device=device)
    margins = torch.empty(batch, k_neg, dtype=torch.float32, device=device)
    block_b = _triplet_block(dim)
    with on_device(user_table):
        _dbpr_atomic_sgd_kernel[(triton.cdiv(batch, block_b),)](
            *_triplet_block_args(user_table, item_table, users, pos_items, neg_items, weights,
                                 (rows, margins)),
            float(scale), float(l2), float(lr),
            HAS_WEIGHTS=weights is not None, BLOCK_B=block_b, BLOCK_D=_feature_block(dim),
            BLOCK_K=block_size(k_neg, floor=2), num_warps=4,
        )
    return rows, margins
