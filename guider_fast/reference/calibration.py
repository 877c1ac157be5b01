"""Reference AMSC calibration (GUIDER's modality-disagreement weights), vectorised, no host syncs."""

from __future__ import annotations

import torch

from .._constants import CALIBRATION_IMAGE_OFFSET, CALIBRATION_MINMAX_EPS
from .samples_loss import one_point_divergence, sinkhorn_divergence

# GeomLoss("sinkhorn", p=1, blur=0.1) as called by the reference.
GEOMLOSS_P, GEOMLOSS_BLUR = 1, 0.1


def _compute(t: torch.Tensor) -> torch.Tensor:
    # Half precision cannot hold the expanded |t|^2 - 2 t.v + |v|^2 cost (its
    # cancellation flips clean/noisy decisions): work in float32 at least.
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def modality_distance(t: torch.Tensor, v: torch.Tensor, distance: str) -> torch.Tensor:
    """Per-row disagreement (B,) between text and image representations.

    "geomloss": the value of the reference's ``SamplesLoss("sinkhorn", p=1,
    blur=0.1)(t[:, None], v[:, None] + 1e-8)``; for (B, d) rows the one-point
    closed form ``(C(t,v') + C(v',t))/2 - (C(t,t) + C(v',v'))/2`` with GeomLoss's
    expanded fp32 cost; for (B, n, d) / (B, m, d) clouds the full debiased divergence.
    "euclidean": |t - v| exactly.  Half-precision inputs are computed in float32.
    """
    t, v = _compute(t), _compute(v)
    if distance == "euclidean":
        if t.dim() == 3:
            raise ValueError('distance="euclidean" needs (B, d) rows, not point clouds')
        return torch.linalg.vector_norm(t - v, dim=-1)
    v_shift = v + CALIBRATION_IMAGE_OFFSET
    if t.dim() == 2:
        ones = torch.ones(t.shape[0], 1, dtype=t.dtype, device=t.device)
        return one_point_divergence(ones, t.unsqueeze(1), ones, v_shift.unsqueeze(1),
                                    GEOMLOSS_P, debias=True)
    batch = t.shape[0]
    a = torch.full(t.shape[:2], 1.0 / t.shape[1], dtype=t.dtype, device=t.device)
    b = torch.full(v.shape[:2], 1.0 / v.shape[1], dtype=v.dtype, device=v.device)
    out = sinkhorn_divergence(a, t, b, v_shift, p=GEOMLOSS_P, blur=GEOMLOSS_BLUR)
    return out.view(batch)


def minmax_normalize(d: torch.Tensor) -> torch.Tensor:
    """(d - min) / (max - min + 1e-7) over the batch; all-equal batches give 0 (no branch)."""
    lo = d.amin()
    hi = d.amax()
    return (d - lo) / (hi - lo + CALIBRATION_MINMAX_EPS)


def sign_similarity(code_a: torch.Tensor, code_b: torch.Tensor) -> torch.Tensor:
    """(sign(a) . sign(b)) / bits with sign(0) = 0, i.e. ternary codes as the reference."""
    bits = code_a.shape[-1]
    # Counted in float32 at least: half precision cannot hold counts above 2048, nor
    # count / bits for bits that are not a power of two.
    return (torch.sign(code_a) * torch.sign(code_b)).sum(-1, dtype=_compute(code_a).dtype) / bits


def calibration_weights(clean: torch.Tensor, sim_text: torch.Tensor, sim_image: torch.Tensor):
    """Clean rows: clamp(((s_t + 1)/2 + (s_v + 1)/2)/2, 0, 1); noisy rows: 1."""
    w = (((sim_text + 1) / 2 + (sim_image + 1) / 2) / 2).clamp(0.0, 1.0)
    return torch.where(clean, w, torch.ones_like(w))


def weights_from_similarities(d, sim_text, sim_image, threshold: float):
    """Steps 2-3 and 6 of AMSC from distances d (B,) and code similarities: (weights, clean, normalized)."""
    d = _compute(d)
    normalized = minmax_normalize(d)
    clean = normalized < threshold
    weights = calibration_weights(clean, sim_text.to(d.dtype), sim_image.to(d.dtype))
    return weights, clean, normalized


def weights_from_distance(d, u_code, t_code, v_code, threshold: float):
    """Steps 2-6 of AMSC from per-row distances d (B,): (weights, clean, normalized)."""
    return weights_from_similarities(d, sign_similarity(u_code, t_code),
                                     sign_similarity(u_code, v_code), threshold)


def calibrate(t, v, u_code, t_code, v_code, threshold: float, distance: str):
    """Returns (weights, clean, distance, normalized), all detached."""
    with torch.no_grad():
        d = modality_distance(t, v, distance)
        weights, clean, normalized = weights_from_distance(d, u_code, t_code, v_code, threshold)
    return weights, clean, d, normalized


# ---------------------------------------------------------------- packed ternary codes

_POPCOUNT_BYTE = torch.tensor([bin(v).count("1") for v in range(256)], dtype=torch.int16)


def pack_sign_codes(codes: torch.Tensor):
    """Ternary sign codes (B, bits) packed into 64-bit words: (sign bits, nonzero mask).

    Bit j of word j // 64 holds ``code_j < 0`` in the first tensor and ``code_j != 0``
    in the second (sign(0) = 0 has no sign), so (B, bits) floats become
    2 * ceil(bits / 64) int64 words per row; padding bits are zero in both.
    """
    rows, bits = codes.shape
    words = (bits + 63) // 64
    padded = torch.zeros(rows, words * 64, dtype=codes.dtype, device=codes.device)
    padded[:, :bits] = codes
    weights = torch.ones(64, dtype=torch.int64, device=codes.device) << torch.arange(
        64, dtype=torch.int64, device=codes.device)
    negative = (padded < 0).view(rows, words, 64).to(torch.int64)
    nonzero = (padded != 0).view(rows, words, 64).to(torch.int64)
    # Bit 63 overflows into the sign of the int64 word; the bit pattern is what counts.
    return (negative * weights).sum(-1), (nonzero * weights).sum(-1)


def _popcount(words: torch.Tensor) -> torch.Tensor:
    table = _POPCOUNT_BYTE.to(words.device)
    return table[words.contiguous().view(torch.uint8).long()].view(*words.shape, 8).sum((-1, -2))


def packed_sign_similarity(sign_a, nonzero_a, sign_b, nonzero_b, bits: int) -> torch.Tensor:
    """``(sign(a) . sign(b)) / bits`` from packed codes: (agreeing - disagreeing) bits."""
    both = nonzero_a & nonzero_b
    differ = (sign_a ^ sign_b) & both
    agree = both & ~differ
    return (_popcount(agree) - _popcount(differ)).to(torch.float32) / bits
