"""Where the op tests run: backends x devices, and the skip rule.

Adding a backend (e.g. the CUDA C++ extension) is one entry in ``BACKENDS``:
every op test then runs it too, skipped with the dispatcher's reason wherever
it cannot run (no extension built, CPU tensors, a dtype it does not take).
"""

import pytest
import torch

from guider_fast import _dispatch

BACKENDS = ["torch", "triton", "cuda", "cpu"]
# Backends with fused kernels (everything but the torch reference): the ones the
# torch.compile(fullgraph=True) contract and the kernel-only tests apply to.
KERNEL_BACKENDS = [name for name in BACKENDS if name != "torch"]
# "cuda" is queried when a test runs (tests/ops/conftest.py), never at collection.
DEVICES = ["cpu", "cuda"]

FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def reason(op, backend, device, dtype=None, problem=None):
    """The dispatcher's reason why ``backend`` cannot run ``op`` here, or None."""
    return _dispatch.unavailable_reason(op, backend, torch.device(device), dtype, problem)


def require(op, backend, device, dtype=None, problem=None):
    """Skip the test with the dispatcher's reason unless ``backend`` runs ``op`` here."""
    why = reason(op, backend, device, dtype, problem)
    if why is not None:
        pytest.skip(f"{backend} on {torch.device(device).type}: {why}")


def dtypes_for(op, backend, device, dtypes=FLOAT_DTYPES):
    """The dtypes ``backend`` takes for ``op`` on ``device`` (for property-test strategies)."""
    return [dtype for dtype in dtypes if reason(op, backend, device, dtype) is None]
