"""Backend dispatch, the environment override, import hygiene and the CLI."""

import io
import subprocess
import sys

import pytest
import torch

import guider_fast as gf
from guider_fast import _dispatch, cli

X = torch.randn(2, 4, 3)
Y = torch.randn(2, 5, 3)


def test_auto_and_torch_agree():
    auto = gf.sinkhorn(X, Y, eps=0.2, n_iters=20).value
    torch.testing.assert_close(gf.sinkhorn(X, Y, eps=0.2, n_iters=20, backend="torch").value, auto)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unavailable_backend_raises_with_reason(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=f"backend='{backend}' cannot run sinkhorn: .+"):
        gf.sinkhorn(X, Y, eps=0.2, backend=backend)
    with pytest.raises(RuntimeError, match=f"backend='{backend}' cannot run dbpr"):
        gf.dbpr_loss(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0]), torch.tensor([1]),
                     torch.tensor([2]), backend=backend)


def test_cuda_reason_names_the_device():
    reason = _dispatch.unavailable_reason("sinkhorn", "cuda", torch.device("cpu"))
    assert "CUDA tensors" in reason


def test_environment_override(monkeypatch):
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


def test_every_public_op_has_a_torch_path():
    assert set(_dispatch.registered_ops()) >= {"sinkhorn", "samples_loss", "dbpr", "calibrate"}


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
    for name in ("triton", "cuda"):
        line = next(l for l in backend_lines if l.strip().startswith(name + " "))
        status = line.split(None, 1)[1]
        assert status == "available" or (status.startswith("unavailable: ")
                                          and len(status) > len("unavailable: ") + 10)


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "guider_fast.cli", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "backends on cpu" in out.stdout
