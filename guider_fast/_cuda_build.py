"""Builds and loading of the CUDA C++ backend (``csrc/``); importing this module builds nothing.

Two builds of the same sources (``csrc/binding.cpp`` and ``csrc/*.cu``):

* **real**: ``guider_fast._C``, a ``CUDAExtension`` built by ``setup.py`` through
  ``extension_modules()`` when torch is a CUDA build and nvcc is found
  (``TORCH_CUDA_ARCH_LIST`` defaults to ``9.0``).  ``GUIDER_FAST_BUILD_CUDA=0``
  skips it, ``=1`` makes a missing prerequisite an error.  Its kernels are
  registered for the CUDA dispatch key as ``torch.ops.guider_fast_cuda.*``.
* **emulation**: the kernels compiled as C++ with ``GUIDER_FAST_CUDA_SIM`` against
  the CPU emulation of CUDA (``csrc/sim``), registered for the CPU key: a test
  vehicle for CPU-only machines, as ``TRITON_INTERPRET=1`` is for Triton.  Built
  just in time with ``torch.utils.cpp_extension.load`` (ninja, incremental; about
  a minute cold on 2 cores, about a second warm), only on request:
  ``load_extension(emulate=True)``, or ``GUIDER_FAST_CUDA_SIM=1``, which builds it
  at the first dispatch of ``backend="cuda"`` on CPU tensors.  Build directory:
  ``$GUIDER_FAST_CUDA_BUILD_DIR`` or ``~/.cache/guider_fast``.

This module imports only the standard library at import time (``setup.py`` may
load it by path), and nothing here initialises CUDA.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path
from typing import List, Optional

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent
CSRC = REPO / "csrc"
BINDING = CSRC / "binding.cpp"
SIM_RUNTIME = CSRC / "sim" / "cuda_sim.cpp"
DEFAULT_ARCH_LIST = "9.0"
# The emulation build's compile flags: the kernels' float math without FMA contraction,
# as in tests/csrc (g++ on x86-64 would not contract anyway; other hosts might).
SIM_CFLAGS = ["-O2", "-ffp-contract=off", "-DGUIDER_FAST_CUDA_SIM"]
SIM_NAME = "guider_fast_cuda_sim"

_LOCK = threading.Lock()
# sim: the emulation library offered to dispatch; sim_library: the one loaded into torch.
_STATE = {"sim": None, "sim_library": None, "real": None, "real_error": None}


def kernel_sources() -> List[Path]:
    return sorted(CSRC.glob("*.cu"))


# ------------------------------------------------------------------ real build (setup.py)

def real_build_missing() -> Optional[str]:
    """None if this environment can build guider_fast._C, else why not."""
    if not BINDING.exists():
        return f"the CUDA sources are not here ({CSRC} is missing: build from a source checkout)"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:  # pragma: no cover - torch is a dependency
        return f"torch is not importable ({e})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (the extension needs a CUDA build of torch)"
    nvcc = Path(cpp_extension.CUDA_HOME or "", "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    if nvcc is None or not nvcc.exists():
        if shutil.which("nvcc") is None:
            return "nvcc was not found (set CUDA_HOME or put the CUDA toolkit's bin/ on PATH)"
    return None


def extension_modules() -> list:
    """setup.py's ext_modules: [CUDAExtension guider_fast._C], or [] (saying why) when it cannot be built."""
    mode = os.environ.get("GUIDER_FAST_BUILD_CUDA", "").strip()
    if mode == "0":
        print("guider_fast: GUIDER_FAST_BUILD_CUDA=0: not building the CUDA extension guider_fast._C")
        return []
    reason = real_build_missing()
    if reason is not None:
        if mode == "1":
            raise RuntimeError(f"GUIDER_FAST_BUILD_CUDA=1 but guider_fast._C cannot be built: {reason}")
        print(f"guider_fast: not building the CUDA extension guider_fast._C: {reason} "
              f"(GUIDER_FAST_BUILD_CUDA=1 makes this an error, =0 silences it)")
        return []
    from torch.utils.cpp_extension import CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    sources = [os.path.relpath(p, REPO) for p in (BINDING, *kernel_sources())]
    print(f"guider_fast: building guider_fast._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    return [CUDAExtension("guider_fast._C", sources, include_dirs=[str(CSRC)],
                          extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})]


def build_cmdclass() -> dict:
    """setup.py's cmdclass: torch's BuildExtension when there is an extension to build."""
    if not extension_modules_possible():
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}


def extension_modules_possible() -> bool:
    return os.environ.get("GUIDER_FAST_BUILD_CUDA", "").strip() != "0" and real_build_missing() is None


def real_reason() -> Optional[str]:
    """None once guider_fast._C (the real build) is imported, else why it cannot be."""
    if _STATE["real"] is not None:
        return None
    if _STATE["real_error"] is not None:
        return _STATE["real_error"]
    with _LOCK:
        if importlib.util.find_spec("guider_fast._C") is None:
            why = real_build_missing() or "it was not built when guider_fast was installed"
            _STATE["real_error"] = (f"the CUDA extension guider_fast._C is not built ({why}; reinstall with "
                                    f"a CUDA build of torch and nvcc: pip install --no-build-isolation .)")
        else:
            try:
                _STATE["real"] = importlib.import_module("guider_fast._C")
            except ImportError as e:
                _STATE["real_error"] = f"the CUDA extension guider_fast._C does not import: {e}"
    return _STATE["real_error"]


def real_built() -> Optional[str]:
    """The path of guider_fast._C if it is installed (without importing it), else None."""
    spec = importlib.util.find_spec("guider_fast._C")
    return spec.origin if spec is not None else None


# ------------------------------------------------------------------ emulation build (JIT)

def sim_requested() -> bool:
    return os.environ.get("GUIDER_FAST_CUDA_SIM", "0").strip().lower() in ("1", "true", "on", "yes")


def sim_loaded() -> Optional[str]:
    """The emulation library's path once it is loaded in this process, else None."""
    return _STATE["sim"]


def sim_reason() -> Optional[str]:
    """None when the emulation build serves CPU tensors (building it now if GUIDER_FAST_CUDA_SIM=1)."""
    if _STATE["sim"] is not None:
        return None
    if not sim_requested():
        return ("CPU tensors run the CUDA kernels only through their emulation build, which is not loaded "
                "(set GUIDER_FAST_CUDA_SIM=1 or call guider_fast._cuda_build.load_extension(emulate=True); "
                "it is a test vehicle, slow); otherwise the CUDA extension needs CUDA tensors")
    try:
        load_extension(emulate=True)
    except Exception as e:  # the reason carries the build log's tail
        return f"GUIDER_FAST_CUDA_SIM=1 but the emulation build failed: {e}"
    return None


def default_build_root() -> Path:
    env = os.environ.get("GUIDER_FAST_CUDA_BUILD_DIR", "").strip()
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "guider_fast"


def sim_build_dir(root: Optional[os.PathLike] = None) -> Path:
    """Under ``root`` (default_build_root()), one directory per checkout, Python, torch and compiler: ninja rebuilds what changed inside it."""
    import torch

    cxx = os.environ.get("CXX", "c++")
    try:
        compiler = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        compiler = ""
    key = hashlib.sha256("\0".join([str(CSRC), sys.version, torch.__version__, compiler,
                                    repr(SIM_CFLAGS)]).encode()).hexdigest()[:12]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
    return Path(root or default_build_root()) / f"cuda_sim-{tag}-{key}"


def _write_if_changed(path: Path, text: str) -> None:
    # An unchanged wrapper keeps its mtime, so ninja does not recompile it.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _sim_sources(build_dir: Path) -> List[str]:
    """binding.cpp, the sim runtime, and one C++ wrapper per kernel file (load() compiles .cu with nvcc)."""
    wrappers = build_dir / "wrappers"
    wrappers.mkdir(parents=True, exist_ok=True)
    sources = [str(BINDING), str(SIM_RUNTIME)]
    for cu in kernel_sources():
        wrapper = wrappers / f"{cu.stem}_cu.cpp"
        _write_if_changed(wrapper, f"// generated by guider_fast/_cuda_build.py: {cu.name} as C++ for the sim\n"
                                   f'#include "{cu}"\n')
        sources.append(str(wrapper))
    return sources


def build_emulation(build_dir: Optional[os.PathLike] = None, verbose: bool = False) -> Path:
    """Compile (incrementally) the emulation library and return its path; does not load it."""
    if not BINDING.exists():
        raise RuntimeError(f"the CUDA sources are not here ({CSRC} is missing: use a source checkout)")
    from torch.utils import cpp_extension

    directory = sim_build_dir(build_dir)
    directory.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(SIM_NAME, _sim_sources(directory), extra_cflags=SIM_CFLAGS,
                       extra_include_paths=[str(CSRC)], build_directory=str(directory),
                       is_python_module=False, is_standalone=False, with_cuda=False, verbose=verbose)
    library = directory / f"{SIM_NAME}.so"
    if not library.exists():  # load() names it after the extension
        raise RuntimeError(f"the emulation build produced no {library}")
    return library


def load_extension(emulate: bool = False, build_dir: Optional[os.PathLike] = None,
                   verbose: bool = False) -> str:
    """Load the CUDA backend's kernels into torch.ops.guider_fast_cuda; returns the library's path.

    emulate=False: import guider_fast._C (the real build; CUDA tensors).
    emulate=True: build if needed and load the CPU emulation build (CPU tensors).
    Raises RuntimeError saying why when it cannot.  Idempotent.
    """
    from . import _library_cuda  # noqa: F401  (the schemas, before any implementation)

    if not emulate:
        reason = real_reason()
        if reason is not None:
            raise RuntimeError(reason)
        return _STATE["real"].__file__
    with _LOCK:
        if _STATE["sim_library"] is None:  # once per process: a loaded library cannot be replaced
            import torch

            try:
                library = build_emulation(build_dir, verbose)
            except Exception as e:
                text = str(e).strip()
                raise RuntimeError(f"the emulation build of the CUDA kernels failed: {text[-3000:]}") from e
            torch.ops.load_library(str(library))
            _STATE["sim_library"] = str(library)
        _STATE["sim"] = _STATE["sim_library"]
    return _STATE["sim"]


def deactivate_emulation() -> None:
    """Dispatch stops offering the emulation to CPU tensors (the library stays loaded in
    torch; ``load_extension(emulate=True)`` offers it again).  For tests that scope it."""
    with _LOCK:
        _STATE["sim"] = None


def syntax_check_command(emulate: bool) -> List[str]:
    """g++ -fsyntax-only of csrc/binding.cpp against torch's headers (real build: c10/cuda's too).

    The CPU torch wheel ships the ATen/cuda and c10/cuda headers without the CUDA
    libraries: the real binding can be checked, not linked, on a CPU machine.
    """
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    cmd = [os.environ.get("CXX", "g++"), "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
           *[f"-isystem{p}" for p in includes], f"-I{CSRC}"]
    if emulate:
        cmd.append("-DGUIDER_FAST_CUDA_SIM")
    else:
        cmd += [f"-isystem{cuda_include_dir()}", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    return cmd + [str(BINDING)]


def cuda_include_dir() -> Path:
    """The CUDA toolkit's include directory (torch's CUDA_HOME, else /usr/local/cuda)."""
    from torch.utils import cpp_extension

    return Path(cpp_extension.CUDA_HOME or "/usr/local/cuda") / "include"
