"""Public AMSC calibration: ``calibrate`` -> ``Calibration`` (weights, clean mask, distances)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

import torch

from . import _dispatch, _library, _library_cuda
from . import _validate as V
from ._constants import CALIBRATION_MINMAX_EPS
from .reference import calibration as ref

DISTANCES = ("geomloss", "euclidean")


@dataclass
class Calibration:
    """Per-interaction calibration of one batch (all fields detached, shape (B,)).

    weights : DBPR weights (noisy rows 1, clean rows the hash-code similarity).
    clean : True where the normalised distance is below the threshold.
    distance : text/image disagreement per interaction.
    normalized : batch min-max normalised distance in [0, 1).
    """

    weights: torch.Tensor
    clean: torch.Tensor
    distance: torch.Tensor
    normalized: torch.Tensor


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _calibrate_torch(t, v, u_code, t_code, v_code, threshold, distance):
    return ref.calibrate(t, v, u_code, t_code, v_code, threshold, distance)


def _calibrate_triton(t, v, u_code, t_code, v_code, threshold, distance):
    return _library.calibrate_rows(t, v, u_code, t_code, v_code, threshold,
                                   distance == "euclidean")


def _calibrate_cuda(t, v, u_code, t_code, v_code, threshold, distance):
    return _library_cuda.ops().calibrate_rows(t, v, u_code, t_code, v_code, threshold,
                                              distance == "euclidean")


def _kernel_limits(kernel):
    """limits(problem) of the fused kernels: (B, d) rows, float32/16 codes."""
    def limits(problem):
        features_dim, code_dtype = problem
        if features_dim == 3:
            return f"the {kernel} calibration kernel takes (B, d) rows, not (B, n, d) point clouds"
        if code_dtype not in TRITON_DTYPES:
            return f"the {kernel} calibration kernel takes float32/16 hash codes, got {code_dtype}"
        return None
    return limits


_dispatch.register("calibrate", "torch", _calibrate_torch)
_dispatch.register("calibrate", "triton", _calibrate_triton, dtypes=TRITON_DTYPES,
                   limits=_kernel_limits("Triton"))
_dispatch.register("calibrate", "cuda", _calibrate_cuda, dtypes=TRITON_DTYPES,
                   limits=_kernel_limits("CUDA"))


def _check_calibrate(t, v, u_code, t_code, v_code, threshold, distance):
    V.require_choice("distance", distance, DISTANCES)
    V.require_real("threshold", threshold)
    for name, x in (("t", t), ("v", v), ("u_code", u_code), ("t_code", t_code), ("v_code", v_code)):
        V.require_float(name, x)
    V.require_rank("t", t, (2, 3), "(B, d) rows or (B, n, d) clouds")
    V.require_rank("v", v, (2, 3), "(B, d) rows or (B, m, d) clouds")
    if t.dim() != v.dim():
        raise ValueError(f"t and v must both be rows or both be clouds, got shapes {tuple(t.shape)} and {tuple(v.shape)}")
    batch = t.shape[0]
    if batch == 0:
        raise ValueError("t is empty: calibration needs at least one interaction")
    if v.shape[0] != batch:
        raise ValueError(f"v must have batch size {batch} like t, got {tuple(v.shape)}")
    if t.shape[-1] != v.shape[-1]:
        raise ValueError(f"t and v must have the same feature size, got {t.shape[-1]} and {v.shape[-1]}")
    if t.dim() == 3 and (t.shape[1] == 0 or v.shape[1] == 0):
        raise ValueError(f"t and v clouds must be non-empty, got {tuple(t.shape)} and {tuple(v.shape)}")
    V.require_rank("u_code", u_code, (2,), "(B, bits) hash-layer output")
    V.require_shape("u_code", u_code, (batch, u_code.shape[1]), "one code per interaction")
    for name, code in (("t_code", t_code), ("v_code", v_code)):
        V.require_shape(name, code, tuple(u_code.shape), "same (B, bits) as u_code")
    if u_code.shape[1] == 0:
        raise ValueError("u_code has zero bits")
    if v.dtype != t.dtype:
        raise TypeError(f"v must have the dtype of t ({t.dtype}), got {v.dtype}")
    for name, code in (("t_code", t_code), ("v_code", v_code)):
        if code.dtype != u_code.dtype:
            raise TypeError(f"{name} must have the dtype of u_code ({u_code.dtype}), got {code.dtype}")
    V.require_same_device([("t", t), ("v", v), ("u_code", u_code), ("t_code", t_code), ("v_code", v_code)])
    # Value checks only where they cost no device sync: calibrate runs inside
    # the training step and promises no host syncs on the GPU.
    if V.checks_enabled() and t.device.type == "cpu":
        checks = V.ValueChecks()
        for name, x in (("t", t), ("v", v), ("u_code", u_code), ("t_code", t_code), ("v_code", v_code)):
            checks.finite(name, x)
        checks.raise_if_any()


def calibrate(t: torch.Tensor, v: torch.Tensor, u_code: torch.Tensor, t_code: torch.Tensor,
              v_code: torch.Tensor, *, threshold: float = 0.7, distance: str = "geomloss",
              backend: str = "auto") -> Calibration:
    """GUIDER's adaptive modality similarity calibration (AMSC) for one batch.

    Parameters
    ----------
    t, v : (B, d) projected text / image features of the positive items, or
        (B, n, d) / (B, m, d) clouds (several vectors per modality and item).
    u_code, t_code, v_code : (B, bits) real-valued hash-layer outputs; the sign
        is taken inside (sign(0) = 0, ternary codes, as the reference).
    threshold : rows whose min-max normalised distance is below it are clean.
    distance : "geomloss" (the exact value of the reference's debiased
        ``SamplesLoss("sinkhorn", p=1, blur=0.1)`` on t and v + 1e-8; a closed
        form for (B, d) rows) or "euclidean" (|t - v|).

    No host syncs and no Python branches on tensor values for (B, d) rows (clouds
    need the bounding-box diameter on the host); nothing returned carries
    gradients.  Half-precision inputs are computed in float32, and the float
    outputs are float32 (float64 for float64 inputs).

    backend : "auto" | "torch" | "triton" | "cuda".  The Triton kernel and the
        CUDA C++ one (float32/16 (B, d) rows) read their inputs once and find the
        batch min/max on the device; they compute the same values.
        Its "geomloss" distance takes C(t,t) = C(v',v') = sqrt(1e-8) exactly,
        where GeomLoss's expanded cost leaves fp32 cancellation residue (up to
        ~sqrt(ulp(|t|^2))), so the two agree to that residue, not bit for bit.
    """
    _check_calibrate(t, v, u_code, t_code, v_code, threshold, distance)
    _, impl = _dispatch.resolve("calibrate", backend, t.device, t.dtype,
                                problem=(t.dim(), u_code.dtype))
    # The weights carry no gradient (GUIDER detaches them): no backend records a graph.
    t, v, u_code, t_code, v_code = (x.detach() for x in (t, v, u_code, t_code, v_code))
    weights, clean, d, normalized = impl(t, v, u_code, t_code, v_code, float(threshold), distance)
    return Calibration(weights=weights, clean=clean, distance=d, normalized=normalized)


# ------------------------------------------------------------------- frozen-item cache

@dataclass
class ItemCalibration:
    """Per-item calibration inputs for frozen projections (GUIDER's reference never trains them).

    distance : (n_items,) float32 text/image disagreement of every item.
    text_sign, text_nonzero, image_sign, image_nonzero : (n_items, ceil(bits/64)) int64
        packed ternary hash codes (bit j of word j // 64: code_j < 0, code_j != 0).
    bits : code length.

    16 bytes per item and modality for 64-bit codes (an int8 code would take 64).
    Build with ``precompute_item_calibration``; use with ``calibrate_items``.
    """

    distance: torch.Tensor
    text_sign: torch.Tensor
    text_nonzero: torch.Tensor
    image_sign: torch.Tensor
    image_nonzero: torch.Tensor
    bits: int

    @property
    def n_items(self) -> int:
        return self.distance.shape[0]

    def to(self, device) -> "ItemCalibration":
        return ItemCalibration(*(x.to(device) for x in (self.distance, self.text_sign, self.text_nonzero,
                                                        self.image_sign, self.image_nonzero)), self.bits)


def precompute_item_calibration(t: torch.Tensor, v: torch.Tensor, t_code: torch.Tensor,
                                v_code: torch.Tensor, *, distance: str = "geomloss",
                                chunk_size: int = 65536) -> ItemCalibration:
    """Every item's distance and packed codes, from its projected features t, v (n_items, d)
    (or clouds) and hash outputs (n_items, bits); processed ``chunk_size`` items at a time."""
    V.require_choice("distance", distance, DISTANCES)
    V.require_positive("chunk_size", chunk_size)
    V.require_float("t_code", t_code)
    V.require_rank("t_code", t_code, (2,), "(n_items, bits) hash-layer output")
    # The item codes stand in for the per-batch user codes in the shared checks.
    _check_calibrate(t, v, t_code, t_code, v_code, 0.5, distance)
    distances, text_words, image_words = [], [], []
    with torch.no_grad():
        for start in range(0, t.shape[0], chunk_size):
            stop = start + chunk_size
            distances.append(ref.modality_distance(t[start:stop], v[start:stop], distance).float())
            text_words.append(ref.pack_sign_codes(t_code[start:stop]))
            image_words.append(ref.pack_sign_codes(v_code[start:stop]))
    text_sign, text_nonzero = (torch.cat(part).contiguous() for part in zip(*text_words))
    image_sign, image_nonzero = (torch.cat(part).contiguous() for part in zip(*image_words))
    return ItemCalibration(torch.cat(distances), text_sign, text_nonzero, image_sign, image_nonzero,
                           t_code.shape[1])


def _calibrate_items_torch(cache, u_code, items, threshold):
    d = cache.distance.index_select(0, items)
    user_sign, user_nonzero = ref.pack_sign_codes(u_code)
    sims = [ref.packed_sign_similarity(user_sign, user_nonzero, sign.index_select(0, items),
                                       nonzero.index_select(0, items), cache.bits)
            for sign, nonzero in ((cache.text_sign, cache.text_nonzero),
                                  (cache.image_sign, cache.image_nonzero))]
    weights, clean, normalized = ref.weights_from_similarities(d, sims[0], sims[1], threshold)
    return weights, clean, d, normalized


def _calibrate_items_triton(cache, u_code, items, threshold):
    return _library.calibrate_cached(items.contiguous(), cache.distance, u_code, cache.text_sign,
                                     cache.text_nonzero, cache.image_sign, cache.image_nonzero,
                                     threshold)


def _calibrate_items_cuda(cache, u_code, items, threshold):
    return _library_cuda.ops().calibrate_cached(items.contiguous(), cache.distance, u_code,
                                                cache.text_sign, cache.text_nonzero,
                                                cache.image_sign, cache.image_nonzero, threshold)


_dispatch.register("calibrate_items", "torch", _calibrate_items_torch)
_dispatch.register("calibrate_items", "triton", _calibrate_items_triton, dtypes=TRITON_DTYPES)
_dispatch.register("calibrate_items", "cuda", _calibrate_items_cuda, dtypes=TRITON_DTYPES)


def calibrate_items(cache: ItemCalibration, u_code: torch.Tensor, items: torch.Tensor, *,
                    threshold: float = 0.7, backend: str = "auto") -> Calibration:
    """``calibrate`` for a batch of positive ``items`` (B,) from a frozen-item cache.

    Only the user codes u_code (B, bits) are new per batch: distances and packed
    item codes are gathered from ``cache`` and the similarities are exact
    popcounts of the packed ternary codes.  Same outputs as ``calibrate`` on the
    items' features.  The Triton and CUDA C++ kernels (backend "triton" /
    "cuda") pack the user codes in registers and take the batch min/max on the
    device (no host sync).
    """
    if not isinstance(cache, ItemCalibration):
        raise TypeError(f"cache must be an ItemCalibration (from precompute_item_calibration), "
                        f"got {type(cache).__name__}")
    V.require_real("threshold", threshold)
    V.require_float("u_code", u_code)
    V.require_rank("u_code", u_code, (2,), "(B, bits) hash-layer output")
    V.require_index("items", items)
    V.require_rank("items", items, (1,), "index vector (B,)")
    if items.shape[0] == 0:
        raise ValueError("items is empty: calibration needs at least one interaction")
    V.require_shape("u_code", u_code, (items.shape[0], cache.bits),
                    f"one {cache.bits}-bit code per item of the batch")
    V.require_same_device([("u_code", u_code), ("items", items), ("cache.distance", cache.distance)])
    if V.checks_enabled() and u_code.device.type == "cpu":
        checks = V.ValueChecks()
        checks.index_range("items", items, cache.n_items)
        checks.finite("u_code", u_code)
        checks.raise_if_any()
    return _calibrate_items_unchecked(cache, u_code, items, threshold, backend)


def _calibrate_items_unchecked(cache, u_code, items, threshold, backend):
    # For callers that validated items against the cache already (GuiderLoss): no second check pass.
    _, impl = _dispatch.resolve("calibrate_items", backend, u_code.device, u_code.dtype)
    weights, clean, d, normalized = impl(cache, u_code.detach(), items.long(), float(threshold))
    return Calibration(weights=weights, clean=clean, distance=d, normalized=normalized)


# ------------------------------------------------------------ a batch split over processes

def batch_bounds(distance: torch.Tensor, reduce_max: Callable[[torch.Tensor], torch.Tensor]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (min, max) of a batch's distances when each process holds a part of the batch.

    ``distance`` is this process's part (possibly empty); ``reduce_max`` returns the
    elementwise maximum of its argument over the processes (e.g. an all-reduce with
    ``ReduceOp.MAX``).  One 2-element reduction of ``(-min, max)`` in ``distance``'s dtype:
    8 bytes for float32.  Every process must call it, an empty part included.
    """
    if distance.numel():
        local = torch.stack([-distance.amin(), distance.amax()])
    else:  # the identity of the maximum: this process holds none of the batch
        local = torch.full((2,), float("-inf"), dtype=distance.dtype, device=distance.device)
    bounds = reduce_max(local)
    return -bounds[0], bounds[1]


def with_batch_bounds(calibration: Calibration, lo: torch.Tensor, hi: torch.Tensor,
                      threshold: float) -> Calibration:
    """``calibration`` of a part of the batch re-normalised by the whole batch's ``lo`` / ``hi``.

    ``calibration`` must come from a call with a threshold above 1 (every row clean: the
    normalised distance lies in [0, 1)), so that its weights are every row's clean-row weight (the hash-code similarity).  The normalised distance and
    the clean test are the reference's (``(d - lo) / (hi - lo + 1e-7) < threshold``), so the
    parts of a split batch get exactly the flags and weights of the whole batch.
    """
    d = calibration.distance
    normalized = (d - lo) / (hi - lo + CALIBRATION_MINMAX_EPS)
    clean = normalized < threshold
    weights = torch.where(clean, calibration.weights, torch.ones_like(calibration.weights))
    return Calibration(weights=weights, clean=clean, distance=d, normalized=normalized)
