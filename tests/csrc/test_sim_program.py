"""The C++ test program (sim_tests.cpp): kernels through the sim, sim self-tests, sanitizer builds."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent / "sim_tests.cpp"
_TEXT = SOURCE.read_text()
# The registry, read from the source: collection needs no build.
TESTS = re.findall(r"^TEST\((\w+)\)", _TEXT, re.M)
PLANTED = re.findall(r"^PLANTED\((\w+)\)", _TEXT, re.M)

# Tests that deliberately run a racy kernel or abandon fibers mid-collective:
# they check the sim's own reports, not sanitizer cleanliness.
NOT_UNDER_TSAN = {"sim_missing_barrier_is_order_dependent"} | {t for t in TESTS if t.startswith(
    ("sim_barrier", "sim_shuffle", "sim_collective_mismatch", "sim_deadlock", "sim_invalid"))}


def _line_of(marker: str) -> int:
    for number, line in enumerate(_TEXT.splitlines(), 1):
        if marker in line:
            return number
    raise AssertionError(f"{marker!r} not in {SOURCE.name}")


def _run(program: Path, *args, timeout=120, env=None):
    return subprocess.run([str(program), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_registry_is_read():
    assert {"calibration_rows", "calibration_cached", "sim_deadlock"} <= set(TESTS)
    assert {"planted_oob_shared", "planted_oob_global", "planted_race", "planted_missing_barrier"} <= set(PLANTED)


@pytest.mark.parametrize("name", TESTS)
def test_sim(sim_program, name):
    out = _run(sim_program, "run", name)
    assert out.returncode == 0 and f"PASS {name}" in out.stdout, out.stdout + out.stderr


def test_thread_order_from_environment(sim_program):
    # GF_SIM_ORDER selects the default order: the racy kernel's planted run still
    # completes under every order (it is a wrong result, not a crash).
    for order in ("forward", "reverse", "random"):
        out = _run(sim_program, "run", "planted_missing_barrier", env={"GF_SIM_ORDER": order, "GF_SIM_SEED": "3"})
        assert out.returncode == 0, out.stdout + out.stderr
    bad = _run(sim_program, "run", "planted_missing_barrier", env={"GF_SIM_ORDER": "sideways"})
    assert bad.returncode != 0 and "GF_SIM_ORDER=sideways" in bad.stderr


# ------------------------------------------------------------------ ASan + UBSan

def _clean(out):
    text = out.stdout + out.stderr
    return out.returncode == 0 and "Sanitizer" not in text and "runtime error" not in text


def test_asan_ubsan_clean(asan_program):
    out = _run(asan_program, "all", timeout=300)
    assert _clean(out), out.stdout + out.stderr[-4000:]
    assert out.stdout.count("PASS ") == len(TESTS)


@pytest.mark.parametrize("name, reports, marker", [
    # UBSan's object-size check sees the static __shared__ array first; ASan alone reports
    # "global-buffer-overflow" there.  Either names the kernel's line.
    ("planted_oob_shared", ["AddressSanitizer: global-buffer-overflow", "runtime error: store to address"],
     "PLANTED: thread 63 writes tile[64]"),
    ("planted_oob_global", ["AddressSanitizer: heap-buffer-overflow"], "PLANTED: no bound check against n"),
])
def test_asan_reports_planted_out_of_bounds_write(asan_program, name, reports, marker):
    out = _run(asan_program, "run", name)
    assert out.returncode != 0
    assert any(r in out.stderr for r in reports), out.stderr[-4000:]
    assert f"sim_tests.cpp:{_line_of(marker)}" in out.stderr, out.stderr[-4000:]


# ------------------------------------------------------------------ TSan (fiber-aware)

def test_tsan_clean(tsan_program):
    # The full sweeps run as their *_small shares (TSan's fiber switches cost ~10x).
    names = [t for t in TESTS if t not in NOT_UNDER_TSAN and f"{t}_small" not in TESTS]
    out = _run(tsan_program, "run", *names, timeout=300)
    assert _clean(out), out.stdout + out.stderr[-4000:]
    assert out.stdout.count("PASS ") == len(names)


@pytest.mark.parametrize("name, markers", [
    # Two threads' non-atomic += on one __shared__ int, no barrier between them.
    ("planted_race", ["PLANTED: non-atomic += from two threads"]),
    # A thread reads its neighbour's __shared__ slot without the barrier after the write.
    ("planted_missing_barrier", ["slot[threadIdx.x] = 3.0f", "out[threadIdx.x] = slot[(threadIdx.x + 1) % 64]"]),
])
def test_tsan_reports_planted_race(tsan_program, name, markers):
    out = _run(tsan_program, "run", name)
    assert "WARNING: ThreadSanitizer: data race" in out.stderr, out.stdout + out.stderr[-4000:]
    for marker in markers:
        assert f"sim_tests.cpp:{_line_of(marker)}" in out.stderr, out.stderr[-4000:]
    assert out.returncode != 0  # TSan's exitcode (66) once it reported
