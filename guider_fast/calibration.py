"""Public AMSC calibration: ``calibrate`` -> ``Calibration`` (weights, clean mask, distances)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _dispatch
from . import _validate as V
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


def _calibrate_torch(t, v, u_code, t_code, v_code, threshold, distance):
    return ref.calibrate(t, v, u_code, t_code, v_code, threshold, distance)


_dispatch.register("calibrate", "torch", _calibrate_torch)


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
    """
    _check_calibrate(t, v, u_code, t_code, v_code, threshold, distance)
    _, impl = _dispatch.resolve("calibrate", backend, t.device, t.dtype)
    weights, clean, d, normalized = impl(t, v, u_code, t_code, v_code, float(threshold), distance)
    return Calibration(weights=weights, clean=clean, distance=d, normalized=normalized)
