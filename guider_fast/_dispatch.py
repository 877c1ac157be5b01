"""Backend choice for every op: ``auto``, an explicit name, or the environment override.

Rules
-----
* ``backend="torch"`` (the reference, vectorised torch code) runs everywhere.
* ``backend="triton"`` runs Triton kernels: CUDA tensors with triton installed, or
  CPU tensors under ``TRITON_INTERPRET=1`` (the interpreter, for tests).
* ``backend="cuda"`` runs the CUDA C++ kernels (``csrc/``, ops
  ``torch.ops.guider_fast_cuda.*``): the compiled extension ``guider_fast._C`` on
  CUDA tensors, or, on CPU tensors, their emulation build once it is loaded
  (``GUIDER_FAST_CUDA_SIM=1``, which builds it at the first such dispatch, or
  ``guider_fast._cuda_build.load_extension(emulate=True)``; see that module).
* ``backend="cpu"`` runs the CPU C++ extension (``csrc/cpu/``, ops
  ``torch.ops.guider_fast_cpu.*``) on CPU tensors: fused, vectorised kernels, built by
  ``pip install --no-build-isolation`` or just in time on request
  (``GUIDER_FAST_CPU_JIT=1``; see ``guider_fast._cpu_build``).
* ``backend="auto"`` takes, for the tensors' device, the first available of
  ``triton``, ``cuda``, ``torch`` that implements the op on CUDA tensors, and of
  ``cpu``, ``torch`` on CPU tensors, where an op may also give its ``cpu``
  implementation a size rule (``auto_rule``: where it was measured faster; see the
  op's docstring).  The Triton interpreter and the CUDA emulation are test vehicles,
  never taken by ``auto``.  Triton stays ahead of the CUDA C++ kernels until a GPU has
  measured them faster (``guider-fast bench``); ``backend="cuda"`` picks them.
* ``GUIDER_FAST_BACKEND=<name>`` replaces ``"auto"`` (an explicit argument wins).
* An explicitly requested backend that cannot run raises ``RuntimeError`` saying why.

Nothing here initialises CUDA at import time: probes run on first use.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("torch", "triton", "cuda", "cpu")
_AUTO_ORDER = ("triton", "cuda", "torch")
_CPU_AUTO_ORDER = ("cpu", "torch")

# op name -> backend name -> implementation (kernel modules, and triton, are
# imported by the implementations on first call, never at registration)
_REGISTRY: Dict[str, Dict[str, Callable]] = {}
# op name -> backend name -> dtypes the implementation accepts (None: any)
_DTYPES: Dict[str, Dict[str, Optional[tuple]]] = {}
# op name -> backend name -> callable(problem) -> None or why the problem is out of reach
_LIMITS: Dict[str, Dict[str, Optional[Callable]]] = {}
# op name -> backend name -> callable(problem) -> whether ``auto`` takes it (None: always)
_AUTO_RULES: Dict[str, Dict[str, Optional[Callable]]] = {}


def register(op: str, backend: str, fn: Callable, dtypes: Optional[tuple] = None,
             limits: Optional[Callable] = None, auto_rule: Optional[Callable] = None) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op``.

    ``dtypes``: accepted input dtypes (None: any).  ``limits(problem)``: None when
    the implementation takes that problem (an op-specific tuple of sizes), else
    the reason.  ``auto_rule(problem)``: whether ``backend="auto"`` takes this
    backend for that problem (None: whenever it can run it); only the CPU order
    (``cpu``, ``torch``) consults it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = fn
    _DTYPES.setdefault(op, {})[backend] = dtypes
    _LIMITS.setdefault(op, {})[backend] = limits
    _AUTO_RULES.setdefault(op, {})[backend] = auto_rule


def registered_ops():
    return sorted(_REGISTRY)


def _triton_reason(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'guider_fast[triton]')"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return "tensors are on CPU and TRITON_INTERPRET=1 is not set (Triton needs a GPU otherwise)"
        return None
    if device.type != "cuda":
        return f"Triton kernels do not run on {device.type} tensors"
    return None


def _cuda_reason(device: torch.device) -> Optional[str]:
    from . import _cuda_build

    if device.type == "cuda":
        return _cuda_build.real_reason()
    if device.type == "cpu":
        return _cuda_build.sim_reason()
    return f"the CUDA extension needs CUDA tensors, got {device.type} tensors"


def _cpu_reason(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"the CPU extension runs on CPU tensors, got {device.type} tensors"
    from . import _cpu_build

    return _cpu_build.reason()


def unavailable_reason(op: str, backend: str, device: torch.device,
                       dtype: Optional[torch.dtype] = None, problem=None) -> Optional[str]:
    """None if ``backend`` can run ``op`` on ``device`` (for ``dtype`` and ``problem``), else why not."""
    if backend == "torch":
        return None
    platform = {"triton": _triton_reason, "cuda": _cuda_reason, "cpu": _cpu_reason}[backend]
    platform_reason = platform(device)
    if platform_reason is not None:
        return platform_reason
    if backend not in _REGISTRY.get(op, {}):
        return f"this version of guider_fast has no {backend} kernel for {op}"
    dtypes = _DTYPES[op][backend]
    if dtype is not None and dtypes is not None and dtype not in dtypes:
        names = ", ".join(str(t).replace("torch.", "") for t in dtypes)
        return f"the {backend} kernel for {op} takes {names} inputs, got {str(dtype).replace('torch.', '')}"
    limits = _LIMITS[op][backend]
    if problem is not None and limits is not None:
        return limits(problem)
    return None


def requested_backend(backend: str) -> str:
    if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("GUIDER_FAST_BACKEND", "").strip()
        if env:
            if env not in ("auto",) + BACKENDS:
                raise ValueError(
                    f"GUIDER_FAST_BACKEND must be one of {['auto', *BACKENDS]}, got {env!r}")
            return env
    return backend


def resolve(op: str, backend: str, device: torch.device, dtype: Optional[torch.dtype] = None,
            problem=None):
    """Return ``(backend_name, implementation)`` for ``op`` on ``device``, ``dtype``, ``problem``."""
    choice = requested_backend(backend)
    impls = _REGISTRY.get(op, {})
    if choice == "auto":
        order = _CPU_AUTO_ORDER if device.type == "cpu" else _AUTO_ORDER
        for name in order:
            if name in impls and unavailable_reason(op, name, device, dtype, problem) is None:
                rule = _AUTO_RULES.get(op, {}).get(name) if device.type == "cpu" else None
                if rule is None or problem is None or rule(problem):
                    return name, impls[name]
        raise RuntimeError(f"no backend can run {op} on {device}")  # torch is always registered
    reason = unavailable_reason(op, choice, device, dtype, problem)
    if reason is not None:
        raise RuntimeError(f"backend={choice!r} cannot run {op}: {reason}")
    return choice, impls[choice]


def backend_report(device: torch.device) -> Dict[str, Optional[str]]:
    """Backend name -> None if usable on ``device`` for at least one op, else the reason."""
    report = {}
    for name in BACKENDS:
        reasons = [unavailable_reason(op, name, device) for op in registered_ops()]
        usable = any(r is None for r in reasons)
        report[name] = None if usable else (reasons[0] if reasons else "no ops registered")
    return report
