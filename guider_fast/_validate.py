"""Argument checks shared by every op: errors name the argument at fault.

Two kinds of checks:

* structural (rank, shape, dtype, device, scalar ranges): always on, free;
* value checks (NaN/Inf, index range, weight sums, signs): they read tensor
  contents, which on a GPU costs one device-to-host sync per call (all of a
  call's value checks are folded into that single sync).  They are on by
  default everywhere; ``guider_fast.set_checks(False)`` or the environment
  variable ``GUIDER_FAST_CHECKS=0`` turns them off for production GPU loops.
  On CPU tensors they cost no sync and stay cheap next to the op itself.
"""

from __future__ import annotations

import math
import numbers
import contextlib
import os
from typing import Iterable, Optional, Sequence

import torch

_checks_override: Optional[bool] = None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def set_checks(enabled: Optional[bool]) -> None:
    """Turn value checks on (True) or off (False); None restores the default.

    The default is on, unless the environment variable ``GUIDER_FAST_CHECKS``
    is ``0``/``false``/``off``.  Structural checks (shapes, dtypes, devices)
    always run.
    """
    global _checks_override
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_checks: enabled must be a bool or None, got {type(enabled).__name__}")
    _checks_override = enabled


@contextlib.contextmanager
def checks_off():
    """Value checks off inside the block; the previous setting (override or default) after it."""
    global _checks_override
    previous = _checks_override
    _checks_override = False
    try:
        yield
    finally:
        _checks_override = previous


def checks_enabled() -> bool:
    if _checks_override is not None:
        return _checks_override
    env = os.environ.get("GUIDER_FAST_CHECKS", "1").strip().lower()
    return env not in ("0", "false", "off", "no")


def require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_float(name: str, t: torch.Tensor) -> None:
    require_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {t.dtype}")


def require_index(name: str, t: torch.Tensor) -> None:
    require_tensor(name, t)
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer index tensor, got dtype {t.dtype}")


def require_rank(name: str, t: torch.Tensor, ranks: Sequence[int], what: str) -> None:
    if t.dim() not in ranks:
        expected = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{name} must be {expected} {what}, got shape {tuple(t.shape)}")


def require_shape(name: str, t: torch.Tensor, shape: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        suffix = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(shape)}{suffix}, got {tuple(t.shape)}")


def require_same_device(named: Iterable[tuple]) -> torch.device:
    named = [(n, t) for n, t in named if t is not None]
    device = named[0][1].device
    for n, t in named[1:]:
        if t.device != device:
            raise ValueError(
                f"{n} is on {t.device} but {named[0][0]} is on {device}: all tensors must share a device")
    return device


def require_real(name: str, value) -> None:
    """A finite real number (Python or NumPy scalar, not bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def require_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive real number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def require_choice(name: str, value, choices: Sequence) -> None:
    # True == 1, so without the bool test p=True would pass as p=1.
    if (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


class ValueChecks:
    """Collects value checks and evaluates them with one host sync.

    ``add(condition_is_bad, exc_type, message)`` takes a 0-d bool tensor that is
    True when the input is bad; ``raise_if_any()`` stacks them, reads them back
    once and raises the first failing check's error.
    """

    def __init__(self) -> None:
        self._flags = []
        self._errors = []

    def add(self, bad: torch.Tensor, exc_type, message: str) -> None:
        self._flags.append(bad.reshape(()))
        self._errors.append((exc_type, message))

    # One fused min/max pass per tensor: NaN propagates into both, +-Inf shows up
    # in one of them.  torch.isfinite(t).all() is ~15x slower on CPU.

    def finite(self, name: str, t: Optional[torch.Tensor]) -> None:
        if t is not None and t.numel():
            lo, hi = torch.aminmax(t)
            self.add(~(torch.isfinite(lo) & torch.isfinite(hi)), ValueError,
                     f"{name} contains NaN or Inf")

    def index_range(self, name: str, idx: torch.Tensor, size: int) -> None:
        if idx.numel():
            lo, hi = torch.aminmax(idx)
            self.add((lo < 0) | (hi >= size), IndexError,
                     f"{name} has indices outside [0, {size}) (negative or >= {size})")

    def weights(self, name: str, w: Optional[torch.Tensor]) -> None:
        """Non-negative, finite, each row summing to 1 (relative tolerance by dtype)."""
        if w is None:
            return
        lo, hi = torch.aminmax(w)
        self.add(~(torch.isfinite(lo) & torch.isfinite(hi)), ValueError, f"{name} contains NaN or Inf")
        self.add(lo < 0, ValueError, f"{name} has negative weights")
        # float32-normalised weights (also once upcast to float64) sum to 1 within
        # ~1e-7; half-precision ones within a few 1e-3.
        tol = 2e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-5
        sums = w.sum(-1, dtype=torch.float64)
        self.add(((sums - 1.0).abs() > tol).any(), ValueError,
                 f"{name} must sum to 1 over its last dimension (each problem is a probability vector)")

    def raise_if_any(self) -> None:
        if not self._flags:
            return
        bad = torch.stack(self._flags).cpu().tolist()
        for is_bad, (exc_type, message) in zip(bad, self._errors):
            if is_bad:
                raise exc_type(message)
