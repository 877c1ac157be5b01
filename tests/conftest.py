"""Shared fixtures: fresh random inputs (never zeros/ones), ragged batches, tolerance tables.

The op tests (tests/ops/) add their backend x device parametrisation, one problem
builder per op family and their tolerance table on top of these (see
tests/ops/__init__.py).  Everything here stays importable by every test module
(``from conftest import gen, ...``).
"""

import os

# Triton's interpreter runs the kernels on CPU tensors; the switch must be set before
# triton is first imported.  On a GPU machine set TRITON_INTERPRET=0 to test the
# compiled kernels instead (benchmarks/device_check.sh does).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

try:  # the property tests' profile: the same examples on every run, nothing stored
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a dev extra; only the property tests need it
    settings = None
else:
    settings.register_profile(
        "ci", derandomize=True, database=None, deadline=None, max_examples=8, print_blob=True,
        # Interpreted Triton kernels are slow per example; that is not a test failure.
        suppress_health_check=[HealthCheck.too_slow])
    # More examples locally: HYPOTHESIS_PROFILE=thorough (still derandomised).
    settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=100)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Per-dtype tolerances for comparisons against a float64 computation.
# Half-precision inputs are rounded before the solve, so their error is the
# input rounding propagated through the cost (~2^-8 relative for bfloat16).
# (The op tests' per-backend table is tests/ops/tolerances.py.)
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def cuda_unavailable_reason():
    """None if the tests can use a CUDA device now, else why not (queried at run time)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ("Triton's interpreter is on (TRITON_INTERPRET=1): set TRITON_INTERPRET=0 "
                "to test the compiled kernels")
    return None


@pytest.fixture
def cuda():
    """The CUDA device for the GPU tests: queried when a test runs, never at collection."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    pytest.importorskip("triton")
    return torch.device("cuda")


@pytest.fixture
def gen():
    """A seeded generator per test, so failures reproduce."""
    return torch.Generator().manual_seed(20250427)


def random_weights(batch, n, lengths, gen, dtype=torch.float64):
    """(batch, n) random positive weights on the first lengths[b] entries, zeros after, rows summing to 1."""
    w = torch.rand(batch, n, generator=gen, dtype=torch.float64) + 0.2
    mask = torch.arange(n).unsqueeze(0) < torch.as_tensor(lengths).unsqueeze(1)
    w = w * mask
    return (w / w.sum(1, keepdim=True)).to(dtype)


def ragged_lengths(batch, n, gen, minimum=1):
    lengths = torch.randint(minimum, n + 1, (batch,), generator=gen)
    lengths[0] = n  # at least one full problem
    return lengths.tolist()


def assert_close(actual, expected, dtype, scale=1.0, msg=""):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=RTOL[dtype],
                               atol=ATOL[dtype] * scale, msg=msg or None)
