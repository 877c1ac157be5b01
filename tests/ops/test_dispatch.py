"""Backend dispatch: what each backend refuses and why, ``auto``'s choice, the environment
override, import hygiene and ``guider-fast info``."""

import importlib.util
import io
import re
import subprocess
import sys

import pytest
import torch

import guider_fast as gf
from guider_fast import _dispatch, cli

from .backends import BACKENDS, KERNEL_BACKENDS, reason

X = torch.randn(2, 4, 3)
Y = torch.randn(2, 5, 3)


@pytest.fixture
def no_test_vehicles(monkeypatch):
    """CPU tensors as a user's machine sees them: no Triton interpreter, no CUDA emulation build,
    no CPU extension built."""
    from guider_fast import _cpu_build, _cuda_build

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("GUIDER_FAST_CUDA_SIM", raising=False)
    monkeypatch.setitem(_cuda_build._STATE, "sim", None)
    monkeypatch.setitem(_cpu_build._STATE, "hidden", True)


def _dbpr_args(device="cpu"):
    return [t.to(device) for t in (torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0]), torch.tensor([1]),
                                   torch.tensor([2]))]


def test_auto_takes_the_first_available_backend(device):
    """``auto`` takes the first backend of the device's order that can run the op (CPU: cpu, torch;
    CUDA: triton, cuda, torch); without a problem size no size rule applies."""
    order = _dispatch._CPU_AUTO_ORDER if device.type == "cpu" else _dispatch._AUTO_ORDER
    for op in _dispatch.registered_ops():
        name, _ = _dispatch.resolve(op, "auto", device, torch.float32)
        available = [b for b in order
                     if b in _dispatch._REGISTRY[op] and reason(op, b, device, torch.float32) is None]
        assert name == available[0], op


def test_auto_on_cpu_follows_the_size_rule_and_never_takes_test_vehicles(no_test_vehicles):
    """Without the CPU extension, auto on CPU is torch; with it, the cpu backend's size rule decides."""
    from guider_fast import _cpu_build

    cpu = torch.device("cpu")
    for op in _dispatch.registered_ops():
        assert _dispatch.resolve(op, "auto", cpu, torch.float32, problem=(64, 64, 16))[0] == "torch", op
    _cpu_build.hide(False)
    if _cpu_build.reason() is not None:
        pytest.skip(f"the CPU extension is not available: {_cpu_build.reason()}")
    for op in ("sinkhorn", "samples_loss"):
        rule = _dispatch._AUTO_RULES[op]["cpu"]
        for problem in ((1, 1, 3), (7, 13, 5), (32, 32, 64), (2048, 2048, 64)):
            want = "cpu" if rule is None or rule(problem) else "torch"
            assert _dispatch.resolve(op, "auto", cpu, torch.float32, problem=problem)[0] == want, (op, problem)
        # float64 stays on the torch reference (the extension computes in float32).
        assert _dispatch.resolve(op, "auto", cpu, torch.float64, problem=(32, 32, 64))[0] == "torch"


def test_auto_on_a_gpu_runs_the_kernels(device):
    """Where a kernel backend is available, sinkhorn under ``auto`` runs it: per-problem
    stopping (a lazily read iteration count) instead of the torch loop's int."""
    if device.type == "cpu":
        pytest.skip("a GPU test: on CPU auto takes the cpu extension or torch (test_auto_on_cpu_follows_the_size_rule...)")
    x = torch.randn(32, 40, 16, device=device)
    y = torch.randn(32, 24, 16, device=device)
    res = gf.sinkhorn(x, y, eps=0.5, n_iters=2000, tol=1e-6)
    assert isinstance(res._n_iters, torch.Tensor)
    assert bool((res.marginal_error <= 1e-6).all()) and res.n_iters < 2000


@pytest.mark.parametrize("backend", sorted(set(KERNEL_BACKENDS) | {"cuda"}))
def test_unavailable_backend_raises_with_the_dispatchers_reason(backend, no_test_vehicles):
    cpu = torch.device("cpu")
    why = _dispatch.unavailable_reason("sinkhorn", backend, cpu, torch.float32)
    assert why, f"{backend} claims to run on CPU tensors without the interpreter"
    with pytest.raises(RuntimeError, match=f"backend='{backend}' cannot run sinkhorn: {re.escape(why)}"):
        gf.sinkhorn(X, Y, eps=0.2, backend=backend)
    with pytest.raises(RuntimeError, match=f"backend='{backend}' cannot run dbpr: .+"):
        gf.dbpr_loss(*_dbpr_args(), backend=backend)


def test_cuda_reason_names_the_device_or_the_extension(device, no_test_vehicles):
    why = _dispatch.unavailable_reason("calibrate", "cuda", device)
    if device.type == "cpu":
        assert "CUDA tensors" in why
    elif importlib.util.find_spec("guider_fast._C") is None:
        assert "guider_fast._C" in why


def test_what_the_triton_backend_refuses(gen):
    """Each refusal carries the dispatcher's reason (dtype, size, gradient mode, layout)."""
    from .backends import require

    require("sinkhorn", "triton", "cpu", torch.float32)
    x = torch.randn(2, 5, 3, generator=gen)
    y = torch.randn(2, 6, 3, generator=gen)
    with pytest.raises(RuntimeError, match="takes float16, bfloat16, float32 inputs, got float64"):
        gf.sinkhorn(x.double(), y.double(), eps=0.3, backend="triton")
    with pytest.raises(RuntimeError, match="300 points exceed the on-chip Triton kernel"):
        gf.SamplesLoss(backend="triton")(torch.randn(1, 300, 3), torch.randn(1, 5, 3))
    with pytest.raises(RuntimeError, match="grad='autodiff'"):
        gf.sinkhorn(x, y, eps=0.3, grad="autodiff", backend="triton")
    # auto on CPU stays on the torch reference even when the interpreter is on.
    assert gf.sinkhorn(x, y, eps=0.3, grad="autodiff").value.requires_grad is False
    user, item, users, pos, neg = _dbpr_args()
    for call in (lambda: gf.dbpr_loss(user.double(), item.double(), users, pos, neg, backend="triton"),
                 lambda: gf.dbpr_step(user.double(), item.double(), users, pos, neg, lr=0.1, backend="triton")):
        with pytest.raises(RuntimeError, match="float32, float16, bfloat16"):
            call()
    t, v = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    codes = [torch.randn(4, 16, generator=gen) for _ in range(3)]
    with pytest.raises(RuntimeError, match="point clouds"):
        gf.calibrate(t.view(4, 2, 4), v.view(4, 2, 4), *codes, backend="triton")
    with pytest.raises(RuntimeError, match="float32, float16, bfloat16"):
        gf.calibrate(t.double(), v.double(), *(c.double() for c in codes), backend="triton")


def test_environment_override(monkeypatch, no_test_vehicles):
    monkeypatch.setenv("GUIDER_FAST_BACKEND", "torch")
    assert _dispatch.resolve("sinkhorn", "auto", torch.device("cpu"))[0] == "torch"
    monkeypatch.setenv("GUIDER_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
        gf.sinkhorn(X, Y, eps=0.2)
    # An explicit argument wins over the environment.
    assert gf.sinkhorn(X, Y, eps=0.2, backend="torch").value.shape == (2,)
    monkeypatch.setenv("GUIDER_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="GUIDER_FAST_BACKEND must be one of"):
        gf.sinkhorn(X, Y, eps=0.2)


def test_every_public_op_has_a_torch_path_and_the_tests_know_every_backend():
    assert set(_dispatch.registered_ops()) >= {"sinkhorn", "samples_loss", "dbpr", "dbpr_step", "calibrate",
                                               "calibrate_items"}
    for op in _dispatch.registered_ops():
        assert "torch" in _dispatch._REGISTRY[op], op
        # A backend registered for an op but missing from tests/ops/backends.py would go untested.
        assert set(_dispatch._REGISTRY[op]) <= set(BACKENDS), (op, set(_dispatch._REGISTRY[op]))


def test_import_neither_initialises_cuda_nor_imports_triton():
    # Any CUDA query at import (even on a CPU-only torch) trips these patches.
    code = ("import sys, torch\n"
            "def boom(*a, **k):\n"
            "    raise RuntimeError('CUDA touched at import')\n"
            "torch.cuda._lazy_init = boom\n"
            "torch.cuda.is_available = boom\n"
            "torch.cuda.device_count = boom\n"
            "import guider_fast, guider_fast.kernels\n"
            "assert 'triton' not in sys.modules\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_cli_info_lists_backends_and_reasons():
    buffer = io.StringIO()
    assert cli.info(out=buffer) == 0
    text = buffer.getvalue()
    assert f"guider_fast {gf.__version__}" in text
    assert "torch   available" in text
    backend_lines = text.split("backends on cpu:", 1)[1].splitlines()
    assert "CPU C++ extension" in text
    for name in ("triton", "cuda", "cpu"):
        line = next(l for l in backend_lines if l.strip().startswith(name + " "))
        status = line.split(None, 1)[1]
        assert status == "available" or (status.startswith("unavailable: ")
                                          and len(status) > len("unavailable: ") + 10)


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "guider_fast.cli", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "backends on cpu" in out.stdout
