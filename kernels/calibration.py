"""AMSC calibration in Triton: one pass over the batch's inputs, batch min/max without a host sync.

Two launches.  The first reads each block of rows once and writes, per row, the
modality distance and the clean-row weight candidate (from the hash-code
similarities), plus the block's distance min and max.  The second reduces
those block partials (every program reads all of them: a few KiB that stay in
cache) and writes the normalised distance, the clean mask and the weights.
No value ever travels to the host, so the op can be captured in a CUDA graph.

Two input forms:

* ``rows``: projected features t, v (B, d) and real-valued hash outputs
  (B, bits); the distance is GeomLoss's one-point closed form or |t - v|, the
  similarity ``sign(a) . sign(b) / bits`` with sign(0) = 0 (ternary codes).
* ``cached``: per-item distances and packed codes gathered by item index.
  Packed codes are two int64 words per 64 bits (sign bit, nonzero bit); the
  user's code is packed in-kernel and the similarity is the exact popcount
  difference ``(agreeing - disagreeing) / bits`` over the bits where both are
  nonzero.

This module imports triton; ``guider_fast`` imports it only for the "triton" backend.
"""

import torch
import triton
import triton.language as tl

from guider_fast import _constants

from ._launch import block_size, on_device

# The reference's constants, as constexpr globals the kernels can name.
IMAGE_OFFSET = tl.constexpr(_constants.CALIBRATION_IMAGE_OFFSET)
MINMAX_EPS = tl.constexpr(_constants.CALIBRATION_MINMAX_EPS)
SQRT_FLOOR = tl.constexpr(_constants.GEOMLOSS_SQRT_FLOOR)
FEATURE_CHUNK = 64
CODE_CHUNK = 64
FINISH_BLOCK = 1024


@triton.jit
def _geomloss_p1(sq):
    return tl.sqrt_rn(tl.maximum(sq, SQRT_FLOOR))


@triton.jit
def _clean_weight(sim_text, sim_image):
    """clamp(((s_t + 1)/2 + (s_v + 1)/2)/2, 0, 1), in the reference's operation order."""
    w = ((sim_text + 1.0) / 2.0 + (sim_image + 1.0) / 2.0) / 2.0
    return tl.minimum(tl.maximum(w, 0.0), 1.0)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _popcount64(x):
    """Set bits of each 64-bit word (SWAR, on unsigned words: logical shifts)."""
    x = x.to(tl.uint64, bitcast=True)
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return ((x * 0x0101010101010101) >> 56).to(tl.int32)


@triton.jit
def _packed_score(user_sign, user_nonzero, sign_ptr, nonzero_ptr, items, words, word, ok):
    """(agreeing - disagreeing) bits of one 64-bit word of ternary codes."""
    item_sign = tl.load(sign_ptr + items * words + word, mask=ok, other=0)
    item_nonzero = tl.load(nonzero_ptr + items * words + word, mask=ok, other=0)
    both = user_nonzero & item_nonzero
    differ = (user_sign ^ item_sign) & both
    return _popcount64(both) - 2 * _popcount64(differ)


@triton.jit
def _store_partials(distance, ok, partial_ptr, n_blocks):
    block = tl.program_id(0)
    tl.store(partial_ptr + block, tl.min(tl.where(ok, distance, float("inf")), axis=0))
    tl.store(partial_ptr + n_blocks + block, tl.max(tl.where(ok, distance, float("-inf")), axis=0))


@triton.jit
def _calibration_rows_kernel(
    t_ptr, v_ptr, uc_ptr, tc_ptr, vc_ptr, dist_ptr, cand_ptr, partial_ptr,
    batch, dim, bits, n_blocks,
    stride_t, stride_td, stride_v, stride_vd, stride_uc, stride_ucb, stride_tc, stride_tcb,
    stride_vc, stride_vcb,
    EUCLIDEAN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < batch
    feats = tl.arange(0, BLOCK_D)
    tt = tl.zeros((BLOCK_R,), dtype=tl.float32)
    vv = tl.zeros((BLOCK_R,), dtype=tl.float32)
    tv = tl.zeros((BLOCK_R,), dtype=tl.float32)
    diff = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        mask = ok[:, None] & ((start + feats) < dim)[None, :]
        t = tl.load(t_ptr + rows[:, None] * stride_t + (start + feats)[None, :] * stride_td,
                    mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rows[:, None] * stride_v + (start + feats)[None, :] * stride_vd,
                    mask=mask, other=0.0).to(tl.float32)
        if EUCLIDEAN:
            delta = t - v
            diff += tl.sum(delta * delta, axis=1)
        else:
            v = tl.where(mask, v + IMAGE_OFFSET, 0.0)
            tt += tl.sum(t * t, axis=1)
            vv += tl.sum(v * v, axis=1)
            tv += tl.sum(t * v, axis=1)
    if EUCLIDEAN:
        distance = tl.sqrt_rn(diff)
    else:
        # Debiased one-point divergence: C(t,v') - (C(t,t) + C(v',v'))/2 with GeomLoss's
        # expanded p=1 cost (C(t,v') = C(v',t) here: one dot product serves both).
        cross = _geomloss_p1((tt - 2.0 * tv) + vv)
        distance = cross - (_geomloss_p1((tt - 2.0 * tt) + tt) + _geomloss_p1((vv - 2.0 * vv) + vv)) / 2.0

    codes = tl.arange(0, BLOCK_C)
    agree_t = tl.zeros((BLOCK_R,), dtype=tl.float32)
    agree_v = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, bits, BLOCK_C):
        mask = ok[:, None] & ((start + codes) < bits)[None, :]
        cols = (start + codes)[None, :]
        su = _sign(tl.load(uc_ptr + rows[:, None] * stride_uc + cols * stride_ucb, mask=mask,
                           other=0.0).to(tl.float32))
        st = _sign(tl.load(tc_ptr + rows[:, None] * stride_tc + cols * stride_tcb, mask=mask,
                           other=0.0).to(tl.float32))
        sv = _sign(tl.load(vc_ptr + rows[:, None] * stride_vc + cols * stride_vcb, mask=mask,
                           other=0.0).to(tl.float32))
        agree_t += tl.sum(su * st, axis=1)
        agree_v += tl.sum(su * sv, axis=1)
    tl.store(dist_ptr + rows, distance, mask=ok)
    tl.store(cand_ptr + rows, _clean_weight(agree_t / bits, agree_v / bits), mask=ok)
    _store_partials(distance, ok, partial_ptr, n_blocks)


@triton.jit
def _calibration_cached_kernel(
    items_ptr, item_dist_ptr, uc_ptr, ts_ptr, tn_ptr, vs_ptr, vn_ptr,
    dist_ptr, cand_ptr, partial_ptr,
    batch, bits, words, n_blocks, stride_uc, stride_ucb,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < batch
    items = tl.load(items_ptr + rows, mask=ok, other=0).to(tl.int64)
    distance = tl.load(item_dist_ptr + items, mask=ok, other=0.0).to(tl.float32)
    lanes = tl.arange(0, 64)
    bit_values = tl.full((64,), 1, tl.int64) << lanes.to(tl.int64)
    score_t = tl.zeros((BLOCK_R,), dtype=tl.int32)
    score_v = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for word in range(0, words):
        cols = word * 64 + lanes
        code = tl.load(uc_ptr + rows[:, None] * stride_uc + cols[None, :] * stride_ucb,
                       mask=ok[:, None] & (cols < bits)[None, :], other=0.0)
        # Distinct powers of two: their sum is their bitwise OR (bit 63 wraps to the sign).
        user_sign = tl.sum(tl.where(code < 0, bit_values[None, :], 0), axis=1)
        user_nonzero = tl.sum(tl.where(code != 0, bit_values[None, :], 0), axis=1)
        score_t += _packed_score(user_sign, user_nonzero, ts_ptr, tn_ptr, items, words, word, ok)
        score_v += _packed_score(user_sign, user_nonzero, vs_ptr, vn_ptr, items, words, word, ok)
    tl.store(dist_ptr + rows, distance, mask=ok)
    tl.store(cand_ptr + rows, _clean_weight(score_t.to(tl.float32) / bits,
                                            score_v.to(tl.float32) / bits), mask=ok)
    _store_partials(distance, ok, partial_ptr, n_blocks)


@triton.jit
def _calibration_finish_kernel(dist_ptr, cand_ptr, partial_ptr, norm_ptr, clean_ptr, weight_ptr,
                               batch, n_blocks, threshold,
                               BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    lanes = tl.arange(0, BLOCK_P)
    lo = tl.full((BLOCK_P,), float("inf"), tl.float32)
    hi = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    for start in range(0, n_blocks, BLOCK_P):
        part_ok = (start + lanes) < n_blocks
        lo = tl.minimum(lo, tl.load(partial_ptr + start + lanes, mask=part_ok, other=float("inf")))
        hi = tl.maximum(hi, tl.load(partial_ptr + n_blocks + start + lanes, mask=part_ok,
                                    other=float("-inf")))
    d_min = tl.min(lo, axis=0)
    d_max = tl.max(hi, axis=0)
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < batch
    distance = tl.load(dist_ptr + rows, mask=ok, other=0.0)
    normalized = (distance - d_min) / ((d_max - d_min) + MINMAX_EPS)
    clean = normalized < threshold
    candidate = tl.load(cand_ptr + rows, mask=ok, other=1.0)
    tl.store(norm_ptr + rows, normalized, mask=ok)
    tl.store(clean_ptr + rows, clean.to(tl.uint8), mask=ok)
    tl.store(weight_ptr + rows, tl.where(clean, candidate, 1.0), mask=ok)


def _finish(distance, candidate, partials, n_blocks, threshold):
    batch = distance.shape[0]
    normalized = torch.empty_like(distance)
    clean = torch.empty(batch, dtype=torch.uint8, device=distance.device)
    weights = torch.empty_like(distance)
    block = min(FINISH_BLOCK, block_size(batch))
    _calibration_finish_kernel[(triton.cdiv(batch, block),)](
        distance, candidate, partials, normalized, clean, weights, batch, n_blocks,
        float(threshold), BLOCK=block, BLOCK_P=min(1024, block_size(n_blocks)), num_warps=4,
    )
    return weights, clean.view(torch.bool), distance, normalized


def _row_outputs(batch: int, device):
    """Row block, block count, and the first launch's outputs: distance and clean-weight
    candidate per row, min/max partials per block."""
    block_r = min(64, block_size(batch, floor=1))
    n_blocks = triton.cdiv(batch, block_r)
    distance = torch.empty(batch, dtype=torch.float32, device=device)
    candidate = torch.empty(batch, dtype=torch.float32, device=device)
    partials = torch.empty(2 * n_blocks, dtype=torch.float32, device=device)
    return block_r, n_blocks, distance, candidate, partials


def calibrate_rows(t, v, u_code, t_code, v_code, threshold: float, euclidean: bool):
    """(weights, clean, distance, normalized) for (B, d) feature rows and (B, bits) hash outputs."""
    batch, dim = t.shape
    bits = u_code.shape[1]
    block_r, n_blocks, distance, candidate, partials = _row_outputs(batch, t.device)
    with on_device(t):
        _calibration_rows_kernel[(n_blocks,)](
            t, v, u_code, t_code, v_code, distance, candidate, partials,
            batch, dim, bits, n_blocks,
            t.stride(0), t.stride(1), v.stride(0), v.stride(1), u_code.stride(0), u_code.stride(1),
            t_code.stride(0), t_code.stride(1), v_code.stride(0), v_code.stride(1),
            EUCLIDEAN=euclidean, BLOCK_R=block_r, BLOCK_D=min(FEATURE_CHUNK, block_size(dim)),
            BLOCK_C=min(CODE_CHUNK, block_size(bits)), num_warps=4,
        )
        return _finish(distance, candidate, partials, n_blocks, threshold)


def calibrate_cached(items, item_distance, u_code, text_sign, text_nonzero, image_sign,
                     image_nonzero, threshold: float):
    """Calibration from per-item distances and packed codes gathered at ``items`` (B,)."""
    batch = items.shape[0]
    bits = u_code.shape[1]
    words = text_sign.shape[1]
    block_r, n_blocks, distance, candidate, partials = _row_outputs(batch, u_code.device)
    with on_device(u_code):
        _calibration_cached_kernel[(n_blocks,)](
            items, item_distance, u_code, text_sign, text_nonzero, image_sign, image_nonzero,
            distance, candidate, partials, batch, bits, words, n_blocks,
            u_code.stride(0), u_code.stride(1), BLOCK_R=block_r, num_warps=4,
        )
        return _finish(distance, candidate, partials, n_blocks, threshold)
