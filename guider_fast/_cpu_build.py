"""Build and loading of the CPU C++ extension (``csrc/cpu/*.cpp``, ops ``torch.ops.guider_fast_cpu.*``).

One extension from every ``csrc/cpu/*.cpp``; each file registers its own ops
(``TORCH_LIBRARY_FRAGMENT(guider_fast_cpu, ...)`` and ``TORCH_LIBRARY_IMPL(guider_fast_cpu, CPU, ...)``)
and their fake kernels live in ``guider_fast/_library_cpu.py``, registered when the library loads.
Importing this module (or guider_fast) builds and loads nothing, and nothing here touches CUDA.

Instruction set: the sources use ATen's ``at::vec::Vectorized<float>``, which is compiled for one
instruction set (``CPU_CAPABILITY``).  A build is made for the build machine's (what torch's
own kernels use there: ``torch.backends.cpu.get_cpu_capability()``; ``GUIDER_FAST_CPU_ISA=avx2``
or ``default`` asks for less) and is named after it, ``guider_fast._cpu_<isa>``
(``_cpu_avx512``, ``_cpu_avx2``, ``_cpu_default``), so that a library is never loaded on a
CPU that lacks its instructions (it would die of SIGILL, not raise).

Two ways to build it, same sources and flags:

* **setup.py** (``extension_modules()``): when torch is importable at build time, i.e.
  ``pip install --no-build-isolation -e .`` after installing torch (pip's default isolated
  build environment has no torch; .ci/run does this).  ``GUIDER_FAST_BUILD_CPU=0`` skips it,
  ``=1`` makes a missing prerequisite an error.  About 40 s on 2 cores.
* **just in time**, on request: ``guider_fast._cpu_build.load(build=True)``, or
  ``GUIDER_FAST_CPU_JIT=1``, which builds it at the first dispatch that could use it (ninja,
  incremental: ~40 s cold, ~1 s warm).  Build directory: ``$GUIDER_FAST_CPU_BUILD_DIR`` or
  ``~/.cache/guider_fast/cpu-...`` (one per checkout, Python, torch, compiler, flags);
  deleting it is always safe.

``guider-fast info`` says which library is loaded or found, or why there is none; without
one, ``backend="cpu"`` raises with that reason and ``backend="auto"`` runs the torch path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import List, Optional

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent
CSRC_CPU = REPO / "csrc" / "cpu"
NAMESPACE = "guider_fast_cpu"

# Flags per instruction set, best first.  CPU_CAPABILITY_* selects ATen's Vectorized<float>
# implementation (vec512 / vec256 / the scalar fallback); -m* lets the compiler emit it.
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}
ISAS = tuple(ISA_FLAGS)
# -fno-math-errno: std::log / std::exp in the scalar tails need not set errno (and may inline).
COMMON_FLAGS = ["-O3", "-fno-math-errno"]

_LOCK = threading.Lock()
_STATE = {"loaded": None, "error": None, "hidden": False}


def sources() -> List[Path]:
    return sorted(CSRC_CPU.glob("*.cpp"))


def _torch_capability() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability()).lower()


def usable_isas() -> List[str]:
    """Instruction sets this CPU runs, best first (torch's capability, as its own kernels use)."""
    capability = _torch_capability()
    if capability.startswith("avx512"):
        return ["avx512", "avx2", "default"]
    if capability.startswith("avx2"):
        return ["avx2", "default"]
    return ["default"]


def build_isa() -> str:
    """The instruction set a build here targets: the best usable one, or GUIDER_FAST_CPU_ISA."""
    usable = usable_isas()
    wanted = os.environ.get("GUIDER_FAST_CPU_ISA", "").strip().lower()
    if not wanted:
        return usable[0]
    if wanted not in ISAS:
        raise ValueError(f"GUIDER_FAST_CPU_ISA must be one of {list(ISAS)}, got {wanted!r}")
    if wanted not in usable:
        raise ValueError(f"GUIDER_FAST_CPU_ISA={wanted} but this CPU runs only {usable}")
    return wanted


def module_name(isa: str) -> str:
    return f"guider_fast._cpu_{isa}"


def compile_flags(isa: str) -> List[str]:
    return COMMON_FLAGS + ISA_FLAGS[isa]


# ------------------------------------------------------------------ setup.py build

def build_missing() -> Optional[str]:
    """None if this environment can build the extension now, else why not."""
    if not sources():
        return f"the C++ sources are not here ({CSRC_CPU} has no .cpp: build from a source checkout)"
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension  # noqa: F401
    except ImportError as e:
        return (f"torch is not importable at build time ({e}): pip's isolated build environment has "
                f"no torch; install torch first, then pip install --no-build-isolation -e .")
    return None


def extension_modules() -> list:
    """setup.py's ext_modules: [CppExtension guider_fast._cpu_<isa>], or [] (saying why)."""
    mode = os.environ.get("GUIDER_FAST_BUILD_CPU", "").strip()
    if mode == "0":
        print("guider_fast: GUIDER_FAST_BUILD_CPU=0: not building the CPU extension")
        return []
    reason = build_missing()
    if reason is not None:
        if mode == "1":
            raise RuntimeError(f"GUIDER_FAST_BUILD_CPU=1 but the CPU extension cannot be built: {reason}")
        print(f"guider_fast: not building the CPU extension: {reason} "
              f"(GUIDER_FAST_BUILD_CPU=1 makes this an error, =0 silences it)")
        return []
    from torch.utils.cpp_extension import CppExtension

    isa = build_isa()
    print(f"guider_fast: building the CPU extension {module_name(isa)} from {len(sources())} source(s)")
    return [CppExtension(module_name(isa), [os.path.relpath(p, REPO) for p in sources()],
                         extra_compile_args={"cxx": compile_flags(isa)})]


# ------------------------------------------------------------------ JIT build

def jit_requested() -> bool:
    return os.environ.get("GUIDER_FAST_CPU_JIT", "0").strip().lower() in ("1", "true", "on", "yes")


def default_build_root() -> Path:
    env = os.environ.get("GUIDER_FAST_CPU_BUILD_DIR", "").strip()
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "guider_fast"


def jit_build_dir(isa: str, root: Optional[os.PathLike] = None) -> Path:
    """One directory per checkout, Python, torch, compiler and flags: ninja rebuilds what changed inside it."""
    import torch

    cxx = os.environ.get("CXX", "c++")
    try:
        compiler = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        compiler = ""
    key = hashlib.sha256("\0".join([str(CSRC_CPU), sys.version, torch.__version__, compiler,
                                    repr(compile_flags(isa))]).encode()).hexdigest()[:12]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-{isa}"
    return Path(root or default_build_root()) / f"cpu-{tag}-{key}"


def build_jit(build_dir: Optional[os.PathLike] = None, verbose: bool = False) -> Path:
    """Compile (incrementally) the library for this machine and return its path; does not load it."""
    reason = build_missing()
    if reason is not None:
        raise RuntimeError(reason)
    from torch.utils import cpp_extension

    isa = build_isa()
    directory = jit_build_dir(isa, build_dir)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"guider_fast_cpu_{isa}"
    cpp_extension.load(name, [str(p) for p in sources()], extra_cflags=compile_flags(isa),
                       build_directory=str(directory), is_python_module=False, is_standalone=False,
                       with_cuda=False, verbose=verbose)
    library = directory / f"{name}.so"
    if not library.exists():
        raise RuntimeError(f"the JIT build produced no {library}")
    return library


# ------------------------------------------------------------------ loading

def installed() -> Optional[str]:
    """Path of the setup.py-built library for the best instruction set this CPU runs, else None."""
    for isa in usable_isas():
        spec = importlib.util.find_spec(module_name(isa))
        if spec is not None and spec.origin:
            return spec.origin
    return None


def loaded() -> Optional[str]:
    """Path of the library loaded in this process (None if none)."""
    return None if _STATE["hidden"] else _STATE["loaded"]


def _load_path(path: str) -> str:
    import torch

    torch.ops.load_library(path)
    from . import _library_cpu

    _library_cpu.register_fakes()
    _STATE["loaded"] = str(path)
    return str(path)


def load(build: Optional[bool] = None, build_dir: Optional[os.PathLike] = None, verbose: bool = False) -> str:
    """Load the extension into torch.ops.guider_fast_cpu and return its path.

    The setup.py build if installed; else, when ``build`` is True (default: GUIDER_FAST_CPU_JIT=1),
    a JIT build (compiled if needed).  Raises RuntimeError saying why when there is none.
    Idempotent: a library, once loaded, stays loaded for the process.
    """
    with _LOCK:
        if _STATE["loaded"] is not None:
            _STATE["hidden"] = False
            return _STATE["loaded"]
        path = installed()
        if path is None:
            if not (jit_requested() if build is None else build):
                why = build_missing() or "it was not built when guider_fast was installed"
                raise RuntimeError(
                    f"the CPU extension is not built ({why}; pip install --no-build-isolation -e . with "
                    f"torch installed builds it, or GUIDER_FAST_CPU_JIT=1 builds it at first use)")
            try:
                path = str(build_jit(build_dir, verbose))
            except Exception as e:
                raise RuntimeError(f"the JIT build of the CPU extension failed: {str(e).strip()[-3000:]}") from e
        try:
            return _load_path(path)
        except Exception as e:  # e.g. built against another torch: undefined symbols
            raise RuntimeError(f"the CPU extension {path} does not load ({e}); rebuild it "
                               f"(pip install --no-build-isolation -e ., or delete the JIT cache)") from e


def reason() -> Optional[str]:
    """None once the extension serves dispatch (loading an installed build now), else why not."""
    if _STATE["hidden"]:
        return "the CPU extension is hidden from dispatch (guider_fast._cpu_build.hide(), for tests)"
    if _STATE["loaded"] is not None:
        return None
    if _STATE["error"] is not None:
        return _STATE["error"]
    try:
        load()
    except RuntimeError as e:
        # Asked once per process (dispatch runs this on every call); load() still retries.
        _STATE["error"] = str(e)
        return str(e)
    return None


def hide(hidden: bool = True) -> None:
    """Dispatch stops (or resumes) offering the loaded extension: tests see a machine without it."""
    _STATE["hidden"] = hidden


def status() -> str:
    """One line for ``guider-fast info``."""
    if _STATE["loaded"] is not None:
        return f"loaded ({_STATE['loaded']})"
    path = installed()
    if path is not None:
        return f"built ({path}; loaded at first use)"
    if jit_requested():
        return "requested by GUIDER_FAST_CPU_JIT=1 (built and loaded at first use)"
    why = build_missing() or "it was not built when guider_fast was installed"
    return (f"not built: {why} (pip install --no-build-isolation -e . builds it; "
            f"GUIDER_FAST_CPU_JIT=1 builds it at first use)")


def ops():
    """``torch.ops.guider_fast_cpu`` (implementations present once the library is loaded)."""
    import torch

    return getattr(torch.ops, NAMESPACE)
