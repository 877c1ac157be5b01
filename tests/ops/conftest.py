"""The ``backend`` and ``device`` parameters of the op tests (lists in ops/backends.py).

``device`` is "cpu" or "cuda"; CUDA is queried when a test runs, never at
collection, and a test whose device cannot be used is skipped with the reason.
Params marked ``cuda_only`` (GPU-sized problems: 10^7-row tables, 64-bit
offsets) run on the cuda device only.
"""

import os

import pytest
import torch

from conftest import cuda_unavailable_reason

from .backends import BACKENDS, DEVICES


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_only: a GPU-sized case, skipped on the cpu device")


# Session scope: hypothesis property tests take these too (function-scoped
# fixtures are not reset between its examples).
@pytest.fixture(scope="session", params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="session", params=DEVICES)
def device(request):
    if request.param == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
    return torch.device(request.param)


@pytest.fixture(scope="session", autouse=True)
def cuda_emulation(request):
    """The CUDA C++ kernels on CPU tensors: their emulation build, shared with tests/csrc.

    Like TRITON_INTERPRET=1 for Triton, it lets the "cuda" backend run here without a GPU.
    GUIDER_FAST_TEST_CUDA_SIM=0 leaves it out (those tests then skip with the reason).
    """
    from guider_fast import _cuda_build

    if os.environ.get("GUIDER_FAST_TEST_CUDA_SIM", "1") == "0" or _cuda_build.sim_loaded() is not None:
        yield
        return
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    _cuda_build.load_extension(emulate=True,
                               build_dir=cache.mkdir("gf_csrc") / "ext" if cache is not None else None)
    yield
    _cuda_build.deactivate_emulation()


@pytest.fixture(scope="session", autouse=True)
def cpu_extension(request):
    """The CPU C++ extension (backend="cpu"): the installed build, else a JIT build into
    pytest's cache (~15-40 s once, then ninja's no-op).  GUIDER_FAST_TEST_CPU_EXT=0 leaves
    it out: the "cpu" tests then skip with the dispatcher's reason."""
    from guider_fast import _cpu_build

    if os.environ.get("GUIDER_FAST_TEST_CPU_EXT", "1") == "0" or _cpu_build.loaded() is not None:
        yield
        return
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    _cpu_build.load(build=True, build_dir=cache.mkdir("gf_cpu") / "ext" if cache is not None else None)
    yield


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda_only") is None:
        return
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("device") == "cpu":
        pytest.skip("GPU-sized case: runs on the cuda device only")
