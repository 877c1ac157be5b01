"""Builds for the csrc tests: the sim test program (plain, ASan+UBSan, TSan), the
ctypes library over csrc/guider_fast_cuda.h, the nvcc/ptxas reports, the syntax
check of the torch binding (csrc/binding.cpp, real build) and the emulation
build of the torch extension (guider_fast._cuda_build).

Builds are object-level jobs (one compile per source and flavour, then a link),
each keyed by a hash of its command, the compiler's version and the sources it
reads (the file itself plus every header under csrc/), and kept in pytest's
cache directory (``.pytest_cache/d/gf_csrc``; the session's tmp dir with
``-p no:cacheprovider``): an unchanged tree rebuilds nothing, an edited test
file recompiles only its objects.  The jobs the selected tests need start right
after collection, at most one per CPU core at a time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parents[1]
CSRC = REPO / "csrc"

KERNELS = sorted(CSRC.glob("*.cu"))
SIM_RUNTIME = CSRC / "sim" / "cuda_sim.cpp"
SIM_TESTS = TESTS / "sim_tests.cpp"
SIM_CAPI = TESTS / "sim_capi.cpp"

GXX = os.environ.get("CXX", "g++")
NVCC = os.environ.get("NVCC", "nvcc")
# -ffp-contract=off: the CPU reference in sim_tests.cpp must not gain FMAs the kernels lack.
COMMON = ["-std=c++17", "-g", "-ffp-contract=off", "-Wall", "-Wextra", "-DGUIDER_FAST_CUDA_SIM", f"-I{CSRC}"]
SANITIZE_ASAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
# torch's extension flags (no implicit half/bfloat16 conversions), sm_90 as the build targets.
NVCC_FLAGS = ["-std=c++17", "-arch=sm_90", "-O3", "-lineinfo", "-Xptxas", "-v", f"-I{CSRC}",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


HEADERS = sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh"))


def _tool_version(tool: str, _cache={}) -> str:
    if tool not in _cache:
        try:
            _cache[tool] = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            _cache[tool] = ""
    return _cache[tool]


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.read_bytes() if isinstance(part, Path) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class Job:
    """One compile or link: cached by key, run on the shared pool once its inputs exist."""

    def __init__(self, name, output: str, cmd, compiler, deps=(), sources=()):
        self.name, self.compiler, self.deps = name, compiler, list(deps)
        key_cmd = [a if isinstance(a, str) else a.key for a in cmd]  # objects by their keys
        self.key = _digest(repr(key_cmd), _tool_version(compiler), *sources, *HEADERS)
        self.dir = _ROOT[0] / f"{name.replace(':', '_').replace('/', '_')}-{self.key}"
        self.output = self.dir / output
        self.log = self.dir / "build.log"
        self.cmd = [a.replace("@OUT@", str(self.output)) if isinstance(a, str) else str(a.output) for a in cmd]
        self.future = None
        self.seconds = None

    def available(self):
        return shutil.which(self.compiler) is not None and all(d.available() for d in self.deps)

    def submit(self):
        if self.future is None:
            for dep in self.deps:
                dep.submit()
            self.future = _pool().submit(self._run)
        return self.future

    def _run(self):
        for dep in self.deps:  # submitted earlier (FIFO pool): never waits on an unstarted job
            ok, _ = dep.future.result()
            if not ok:
                return False, f"{dep.name} failed"
        if self.output.exists() and self.log.exists():
            return True, self.log.read_text()
        self.dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        done = subprocess.run(self.cmd, cwd=REPO, capture_output=True, text=True)
        self.seconds = time.perf_counter() - start
        text = " ".join(self.cmd) + "\n" + done.stdout + done.stderr
        if done.returncode != 0:
            return False, text
        self.log.write_text(text)
        return True, text

    def wait(self):
        """(output path, log); skips without the compiler, fails the test when a build failed."""
        if not self.available():
            pytest.skip(f"{self.compiler} not found")
        ok, text = self.submit().result()
        if not ok:
            pytest.fail(f"build {self.name} failed:\n{text}")
        return self.output, text


class EmulationBuild(Job):
    """The emulation build of the torch extension, through guider_fast._cuda_build: ninja
    keeps it incremental in <cache>/ext (a warm tree rebuilds nothing)."""

    def __init__(self):
        self.name, self.compiler, self.deps = "emulation extension", GXX, []
        self.future = self.seconds = self.output = None

    def _run(self):
        from guider_fast import _cuda_build

        start = time.perf_counter()
        try:
            self.output = _cuda_build.build_emulation(emulation_build_root())
        except Exception as e:  # the build log
            return False, str(e)
        self.seconds = time.perf_counter() - start
        return True, str(self.output)


def emulation_build_root() -> Path:
    return _ROOT[0] / "ext"


_ROOT: list = []
_POOL: list = []


def _pool():
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor
        _POOL.append(ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)))
    return _POOL[0]


def _jobs(config) -> dict:
    """artifact name -> its final Job (the graph is built once per session)."""
    if _JOBS:
        return _JOBS
    cache = getattr(config, "cache", None)
    _ROOT.append(Path(cache.mkdir("gf_csrc")) if cache is not None
                 else Path(config._tmp_path_factory.getbasetemp()) / "gf_csrc")

    def compile_(flavour, src: Path, flags, lang=()):
        cmd = [GXX, *COMMON, *flags, *lang, "-c", str(src), "-o", "@OUT@"]
        return Job(f"{flavour}/{src.name}", src.stem + ".o", cmd, GXX, sources=[src])

    def objects(flavour, flags, runtime_flags=None):
        objs = [compile_(flavour, cu, flags, ["-x", "c++"]) for cu in KERNELS]
        objs.append(compile_(flavour, SIM_RUNTIME, flags if runtime_flags is None else runtime_flags))
        return objs

    def link(name, output, objs, flags):
        return Job(name, output, [GXX, *flags, *objs, "-o", "@OUT@"], GXX, deps=objs)

    plain = ["-O2", "-fPIC"]
    plain_objs = objects("sim", plain)
    _JOBS["sim"] = link("sim", "sim_tests", plain_objs + [compile_("sim", SIM_TESTS, plain)], [])
    _JOBS["capi"] = link("capi", "libgf_sim.so", plain_objs + [compile_("sim", SIM_CAPI, plain)], ["-shared"])
    for cu in KERNELS:
        _JOBS[f"nvcc:{cu.name}"] = Job(f"nvcc/{cu.name}", cu.stem + ".o",
                                       [NVCC, *NVCC_FLAGS, "-c", str(cu), "-o", "@OUT@"], NVCC, sources=[cu])
    asan = ["-O1", *SANITIZE_ASAN]
    _JOBS["asan"] = link("asan", "sim_tests", objects("asan", asan) + [compile_("asan", SIM_TESTS, asan)],
                         SANITIZE_ASAN)
    # TSan: the sim's runtime is NOT instrumented (its scheduler bookkeeping would
    # otherwise be one big race); it announces fibers and happens-before edges instead.
    tsan = ["-O1", "-fsanitize=thread"]
    _JOBS["tsan"] = link("tsan", "sim_tests",
                         objects("tsan", tsan, ["-O1", "-DGF_SIM_TSAN"]) + [compile_("tsan", SIM_TESTS, tsan)],
                         ["-fsanitize=thread"])
    # The real build's binding against the CPU wheel's c10/cuda headers: compiled, not linked.
    from guider_fast import _cuda_build
    import torch
    syntax = _cuda_build.syntax_check_command(emulate=False)
    _JOBS["binding_syntax"] = Job("syntax/binding.cpp", "ok",
                                  ["sh", "-c", " ".join(syntax) + " && touch @OUT@",
                                   f"torch {torch.__version__}"], GXX, sources=[_cuda_build.BINDING])
    _JOBS["emulation"] = EmulationBuild()
    return _JOBS


_JOBS: dict = {}
# fixture -> artifacts it needs, in the order they should start
FIXTURE_BUILDS = {"sim_program": ["sim"], "sim_library": ["capi"],
                  "ptxas_logs": [f"nvcc:{cu.name}" for cu in KERNELS],
                  "asan_program": ["asan"], "tsan_program": ["tsan"],
                  "binding_syntax": ["binding_syntax"], "sim_extension": ["emulation"],
                  "_emulation_library": ["emulation"]}


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session, config, items):
    if config.option.collectonly:
        return
    used = set()
    for item in items:
        if Path(str(item.fspath)).parent == TESTS:
            used |= set(getattr(item, "fixturenames", ()))
    jobs = _jobs(config)
    for fixture, names in FIXTURE_BUILDS.items():
        if fixture in used:
            for name in names:
                if jobs[name].available():
                    jobs[name].submit()


def _wait(request, name):
    return _jobs(request.config)[name].wait()


@pytest.fixture(scope="session")
def sim_program(request) -> Path:
    return _wait(request, "sim")[0]


@pytest.fixture(scope="session")
def sim_library(request) -> Path:
    return _wait(request, "capi")[0]


@pytest.fixture(scope="session")
def binding_syntax(request) -> str:
    """g++ -fsyntax-only's log of csrc/binding.cpp as the real (CUDA) build compiles it."""
    from guider_fast import _cuda_build
    header = _cuda_build.cuda_include_dir() / "cuda_runtime_api.h"
    if not header.exists():
        pytest.skip(f"no CUDA toolkit headers ({header} is missing)")
    return _wait(request, "binding_syntax")[1]


@pytest.fixture(scope="session")
def _emulation_library(request) -> str:
    from guider_fast import _cuda_build
    _wait(request, "emulation")
    path = _cuda_build.load_extension(emulate=True, build_dir=emulation_build_root())
    _cuda_build.deactivate_emulation()  # offered to dispatch only inside tests that ask (below)
    return path


@pytest.fixture
def sim_extension(_emulation_library):
    """The emulation build, loaded and offered to dispatch for this test only (the other
    tests of the session see backend="cuda" unavailable on CPU, as without it)."""
    from guider_fast import _cuda_build
    path = _cuda_build.load_extension(emulate=True, build_dir=emulation_build_root())
    assert path == _emulation_library
    yield path
    _cuda_build.deactivate_emulation()


def _sanitizer_probe(flag: str, tmp: Path):
    """None if g++ can build and run a program with -fsanitize=flag, else why not."""
    if shutil.which(GXX) is None:
        return f"{GXX} not found"
    src = tmp / "probe.cpp"
    src.write_text("#include <cstdio>\nint main() { std::puts(\"ok\"); return 0; }\n")
    exe = tmp / f"probe_{flag}"
    built = subprocess.run([GXX, f"-fsanitize={flag}", str(src), "-o", str(exe)], capture_output=True, text=True)
    if built.returncode != 0:
        return f"{GXX} has no -fsanitize={flag} runtime: {built.stderr.strip()[:300]}"
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    if ran.returncode != 0 or "ok" not in ran.stdout:
        return f"a -fsanitize={flag} program does not run here: {(ran.stderr or ran.stdout).strip()[:300]}"
    return None


@pytest.fixture(scope="session")
def asan_program(request, tmp_path_factory) -> Path:
    reason = _sanitizer_probe("address,undefined", tmp_path_factory.mktemp("probe_asan"))
    if reason:
        pytest.skip(reason)
    return _wait(request, "asan")[0]


@pytest.fixture(scope="session")
def tsan_program(request, tmp_path_factory) -> Path:
    reason = _sanitizer_probe("thread", tmp_path_factory.mktemp("probe_tsan"))
    if reason:
        pytest.skip(reason)
    return _wait(request, "tsan")[0]


@pytest.fixture(scope="session")
def ptxas_logs(request) -> dict:
    """{kernel file name: nvcc's -Xptxas -v output}."""
    if shutil.which(NVCC) is None:
        pytest.skip(f"{NVCC} not found: the ptxas gate needs the CUDA toolkit")
    return {cu.name: _wait(request, f"nvcc:{cu.name}")[1] for cu in KERNELS}


def _all_jobs():
    seen, order = set(), []

    def visit(job):
        if job.name not in seen:
            seen.add(job.name)
            for dep in job.deps:
                visit(dep)
            order.append(job)
    for job in _JOBS.values():
        visit(job)
    return order


def pytest_terminal_summary(terminalreporter):
    built = [j for j in _all_jobs() if j.seconds is not None]
    if built:
        total = sum(j.seconds for j in built)
        slowest = ", ".join(f"{j.name} {j.seconds:.1f} s" for j in sorted(built, key=lambda j: -j.seconds)[:4])
        terminalreporter.write_line(f"csrc: built {len(built)} jobs, {total:.1f} s of compiler time "
                                    f"(slowest: {slowest})")


# ------------------------------------------------------------------ per-kernel ctypes libraries
# The ctypes libraries of test_sim_sinkhorn.py and test_sim_samples_loss.py: the plain sim
# objects of _jobs (the capi library's; csrc/*.cu include every kernel) linked with the
# kernel's own C API file, which includes sim_capi.cpp.  Added to the graph once _jobs has built it.
KERNEL_CAPIS = {  # job name: (C API source, library file)
    "sinkhorn_capi": (TESTS / "sinkhorn_capi.cpp", "libgf_sim_sinkhorn.so"),
    "samples_loss_capi": (TESTS / "samples_loss_capi.cpp", "libgf_sim_samples_loss.so"),
}
FIXTURE_BUILDS["sinkhorn_library"] = ["sinkhorn_capi"]
FIXTURE_BUILDS["samples_loss_library"] = ["samples_loss_capi"]
_jobs_without_kernel_capis = _jobs


def _jobs(config) -> dict:  # noqa: F811 (extends the graph above)
    jobs = _jobs_without_kernel_capis(config)
    objs = [dep for dep in jobs["capi"].deps if dep.name != f"sim/{SIM_CAPI.name}"]
    for name, (source, library) in KERNEL_CAPIS.items():
        if name in jobs:
            continue
        wrapper = Job(f"sim/{source.name}", source.stem + ".o",
                      [GXX, *COMMON, "-O2", "-fPIC", "-c", str(source), "-o", "@OUT@"], GXX,
                      sources=[source, SIM_CAPI])
        jobs[name] = Job(name, library, [GXX, "-shared", *objs, wrapper, "-o", "@OUT@"], GXX,
                         deps=objs + [wrapper])
    return jobs


@pytest.fixture(scope="session")
def sinkhorn_library(request) -> Path:
    return _wait(request, "sinkhorn_capi")[0]


@pytest.fixture(scope="session")
def samples_loss_library(request) -> Path:
    return _wait(request, "samples_loss_capi")[0]
