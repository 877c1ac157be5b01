"""The GPU benchmark scripts and the device check's sanitizer subset, without a GPU.

* ``--plan`` of ``benchmarks/bench_dbpr_gpu.py`` and ``benchmarks/bench_gpu.py`` names the
  CUDA C++ contenders next to their Triton twins.
* The "CUDA C++ vs Triton" sections: ratios and verdicts from hand-made rows (no timing).
* ``benchmarks/cuda_sanitizer_subset.py`` (what device_check.sh runs under compute-sanitizer)
  passes on CPU tensors through the CUDA C++ emulation build.
* Opt-in (GUIDER_FAST_BENCH_SMOKE=1, ~3 min on 2 vCPUs): both scripts' ``--smoke`` runs end to
  end, with the cuda contenders timed through the emulation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _run(args, env=None, timeout=600):
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def scripts():
    """The two scripts as modules (they import their siblings from benchmarks/)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_dbpr_gpu
        import bench_gpu
        yield bench_dbpr_gpu, bench_gpu
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_plans_name_the_cuda_contenders():
    dbpr = _run([str(BENCHMARKS / "bench_dbpr_gpu.py"), "--plan"])
    assert dbpr.returncode == 0, dbpr.stderr
    for name in ("'guider_fast cuda'", "'dbpr_step cuda sgd'", "'dbpr_step cuda rowwise_adagrad'",
                 "'dbpr_step cuda sgd bf16'", "'dbpr_step cuda sgd atomic'", "'calibrate cuda'",
                 "'calibrate_items cuda'"):
        assert name in dbpr.stdout
    sinkhorn = _run([str(BENCHMARKS / "bench_gpu.py"), "--plan"])
    assert sinkhorn.returncode == 0, sinkhorn.stderr
    assert "tiny_B4096" in sinkhorn.stdout and "tiny_B65536" in sinkhorn.stdout
    assert "(65536, 8, 8, 16)" in sinkhorn.stdout and "'guider_fast cuda'" in sinkhorn.stdout


def test_dbpr_twins_are_the_triton_contenders(scripts):
    dbpr, _ = scripts
    for cuda, triton in dbpr.CUDA_TWINS.items():
        assert " cuda" in cuda and triton == cuda.replace("cuda", "triton")
        known = set(dbpr.FWD_BWD) | set(dbpr.STEP) | {"calibrate triton", "calibrate_items triton"}
        assert triton in known
    # Each twin runs right after its Triton contender: a budget cut keeps the pairs.
    for table in (list(dbpr.FWD_BWD), list(dbpr.STEP), list(dbpr.HUGE_STEP)):
        for i, name in enumerate(table):
            if name in dbpr.CUDA_TWINS:
                assert table[i - 1] == dbpr.CUDA_TWINS[name]


def test_dbpr_cuda_vs_triton_section(scripts):
    dbpr, _ = scripts
    cfg = "B=65,536 D=64 K=1 Baby 19445x7050"
    rows = [dict(config=cfg, mode="step", contender="dbpr_step triton sgd", ms=2.0),
            dict(config=cfg, mode="step", contender="dbpr_step cuda sgd", ms=1.0),
            dict(config=cfg, mode="step", contender="dbpr_step triton sgd atomic", ms=1.0),
            dict(config=cfg, mode="step", contender="dbpr_step cuda sgd atomic", ms=1.0 + dbpr.MATCH_TOL / 2),
            dict(config=cfg, mode="fwd+bwd", contender="guider_fast triton", ms=1.0),
            dict(config=cfg, mode="fwd+bwd", contender="guider_fast cuda", ms=2.0),
            dict(config=cfg, mode="step", contender="dbpr_step triton rowwise_adagrad", ms=1.0),
            dict(config=cfg, mode="step", contender="dbpr_step cuda rowwise_adagrad",
                 skipped="the CUDA extension guider_fast._C is not built")]
    text = "\n".join(dbpr.cuda_vs_triton(rows))
    assert "| dbpr_step cuda sgd | " + cfg + " | step | 1.0000 | 2.0000 | 0.500 | PASS (faster) |" in text
    assert "| 1.015 | PASS (match) |" in text
    assert "| guider_fast cuda | " + cfg + " | fwd+bwd | 2.0000 | 1.0000 | 2.000 | FAIL (slower) |" in text
    assert "- dbpr_step cuda sgd vs dbpr_step triton sgd: 1/1 pairs PASS" in text
    assert "- guider_fast cuda vs guider_fast triton: 0/1 pairs PASS" in text
    assert ("- dbpr_step cuda rowwise_adagrad: not measured in 1 configuration(s) "
            "(the CUDA extension guider_fast._C is not built)") in text


def test_sinkhorn_cuda_vs_triton_section(scripts):
    _, sinkhorn = scripts
    rows = [dict(config="B4096_n32_m32_d64", mode="forward", contender="guider_fast triton", ms=3.0),
            dict(config="B4096_n32_m32_d64", mode="forward", contender="guider_fast cuda", ms=1.5),
            dict(config="B4096_n8_m8_d16", mode="forward", contender="guider_fast triton", ms=1.0),
            dict(config="B4096_n8_m8_d16", mode="forward", contender="guider_fast cuda", ms=1.0),
            dict(config="B1024_n64_m64_d64", mode="forward", contender="guider_fast cuda",
                 skipped="clouds of 64 points exceed the CUDA tiny-cloud kernel's 32")]
    text = "\n".join(sinkhorn.cuda_vs_triton(rows))
    assert "| B4096_n32_m32_d64 | forward | 1.5000 | 3.0000 | 0.500 | PASS (faster) |" in text
    # The tiny-cloud target is to beat Triton: a tie is not a pass.
    assert "| B4096_n8_m8_d16 | forward | 1.0000 | 1.0000 | 1.000 | FAIL (not faster) |" in text
    assert "1/2 pairs PASS" in text
    assert "not compared in 1 case(s) (clouds of 64 points exceed" in text


def _emulation_env(request):
    # The emulation build the op tests use (tests/ops/conftest.py), so that it is warm here.
    cache = getattr(request.config, "cache", None)
    return {"GUIDER_FAST_CUDA_BUILD_DIR": str(cache.mkdir("gf_csrc") / "ext")} if cache is not None else {}


def test_sanitizer_subset_passes_through_the_emulation(request):
    out = _run([str(BENCHMARKS / "cuda_sanitizer_subset.py"), "--device", "cpu"], env=_emulation_env(request))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "15/15 cases ok" in out.stdout
    for op in ("calibrate rows", "calibrate_items", "dbpr_loss", "dbpr_step sorted sgd",
               "dbpr_step sorted rowwise_adagrad", "dbpr_step atomic", "sinkhorn tiny + envelope"):
        assert f"ok   {op}" in out.stdout


@pytest.mark.skipif(os.environ.get("GUIDER_FAST_BENCH_SMOKE") != "1",
                    reason="the --smoke runs take ~3 min on 2 vCPUs: set GUIDER_FAST_BENCH_SMOKE=1")
@pytest.mark.parametrize("script, cuda_contenders", [
    ("bench_dbpr_gpu.py", {"guider_fast cuda", "dbpr_step cuda sgd", "dbpr_step cuda rowwise_adagrad",
                           "dbpr_step cuda sgd bf16", "dbpr_step cuda sgd atomic", "calibrate cuda",
                           "calibrate_items cuda"}),
    ("bench_gpu.py", {"guider_fast cuda"}),
])
def test_smoke_runs_time_the_cuda_contenders(request, tmp_path, script, cuda_contenders):
    doc = tmp_path / "run.json"
    out = _run([str(BENCHMARKS / script), "--smoke", "--json", str(doc), "--summary", str(tmp_path / "s.md")],
               env=_emulation_env(request), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads(doc.read_text())["rows"]
    timed = {r["contender"] for r in rows if r.get("median") is not None}
    assert cuda_contenders <= timed
    assert "CUDA C++ vs Triton" in (tmp_path / "s.md").read_text()
