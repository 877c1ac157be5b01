"""Fake (meta) kernels of the CPU extension's ops, ``torch.ops.guider_fast_cpu.*``.

The schemas are defined by the C++ files themselves (``csrc/cpu/*.cpp``,
``TORCH_LIBRARY_FRAGMENT(guider_fast_cpu, ...)``), so these fakes are registered by
``guider_fast._cpu_build`` right after it loads the library: torch.compile only ever
traces these ops on a path that loaded it.  Each C++ file's ops get their fakes here.
"""

from __future__ import annotations

import torch

_REGISTERED = []


def _sinkhorn_fake(cost, a, b, eps, n_iters, tol):
    batch, n, m = cost.shape
    return (cost.new_empty(batch, n), cost.new_empty(batch, m), cost.new_empty(batch),
            cost.new_empty(batch, dtype=torch.int32))


def _plan_weights_fake(cost, a, b, f, g, eps, p, scale):
    batch, rows, m = cost.shape
    return cost.new_empty(batch, rows), cost.new_empty(batch, m)


def _softmax_weights_fake(cost, col, scale, eps, p):
    return cost.new_empty(cost.shape[0], cost.shape[1])


def _samples_loss_fake(c_xy, c_xx, c_yy, a, b, a_log, b_log, eps_list):
    batch, n, m = c_xy.shape
    return c_xy.new_empty(batch, 2 * (n + m) * (2 if c_xx is not None else 1))


FAKES = {
    "sinkhorn": _sinkhorn_fake,
    "plan_weights_": _plan_weights_fake,
    "softmax_weights_": _softmax_weights_fake,
    "samples_loss": _samples_loss_fake,
}


def register_fakes() -> None:
    """Register every fake whose op the loaded library defines (idempotent)."""
    for name, fake in FAKES.items():
        if name in _REGISTERED or not hasattr(torch.ops.guider_fast_cpu, name):
            continue
        torch.library.register_fake(f"guider_fast_cpu::{name}")(fake)
        _REGISTERED.append(name)
