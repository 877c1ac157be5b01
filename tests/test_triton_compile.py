"""Every Triton kernel compiles to an sm_90 cubin (Triton's own ptxas; no GPU needed)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def configs():
    text = pathlib.Path(__file__).with_name("triton_sm90_compile.py").read_text()
    return [line for line in text.splitlines() if re.match(r"\s*\(\w*kernels\._", line)]


def test_kernels_compile_for_h100():
    script = pathlib.Path(__file__).with_name("triton_sm90_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok ") == len(configs()), out.stdout
