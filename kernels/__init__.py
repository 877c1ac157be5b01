"""Triton kernels of guider_fast, installed as ``guider_fast.kernels``.

Kernels and their launchers live here (one file per op family); autograd and
dispatch live in ``guider_fast``.  Importing this package must not import triton:
each kernel module imports it itself, so ``guider_fast`` works without triton.
"""


def triton_version():
    """The installed triton's version string, or None when triton is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    try:
        return version("triton")
    except PackageNotFoundError:
        return None
