"""``guider-fast`` console entry point."""

from __future__ import annotations

import argparse
import platform
import sys
from importlib.metadata import PackageNotFoundError, version


def _version_of(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def info(out=sys.stdout) -> int:
    import torch

    import guider_fast
    from guider_fast import _dispatch

    print(f"guider_fast {guider_fast.__version__}", file=out)
    print(f"python      {platform.python_version()} ({platform.machine()})", file=out)
    print(f"torch       {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})", file=out)
    for dist in ("triton", "numpy", "pot", "geomloss", "pytest-benchmark"):
        print(f"{dist:<11} {_version_of(dist)}", file=out)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
        print(f"GPU         {torch.cuda.get_device_name()}", file=out)
    else:
        print("GPU         none visible to torch", file=out)
    print("", file=out)
    print(f"value checks: {'on' if guider_fast.checks_enabled() else 'off'} (GUIDER_FAST_CHECKS)", file=out)
    from guider_fast import _cuda_build  # builds and loads nothing here

    built = _cuda_build.real_built()
    why_not = _cuda_build.real_build_missing() or "it was not built when guider_fast was installed"
    print(f"CUDA C++ extension guider_fast._C: {f'built ({built})' if built else f'not built: {why_not}'}",
          file=out)
    sim = _cuda_build.sim_loaded()
    if sim:
        sim_status = f"loaded ({sim})"
    elif _cuda_build.sim_requested():
        sim_status = "requested by GUIDER_FAST_CUDA_SIM=1 (built and loaded at first use)"
    else:
        sim_status = "not loaded (GUIDER_FAST_CUDA_SIM=1 builds it at first use; a test vehicle)"
    print(f"CUDA C++ emulation build (CPU tensors): {sim_status}", file=out)
    from guider_fast import _cpu_build  # loads nothing here

    print(f"CPU C++ extension (backend='cpu'): {_cpu_build.status()}", file=out)
    for device in devices:
        print(f"backends on {device}:", file=out)
        for name, reason in _dispatch.backend_report(device).items():
            status = "available" if reason is None else f"unavailable: {reason}"
            print(f"  {name:<7} {status}", file=out)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="guider-fast", description="guider_fast command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and which backends can run here (and why not)")
    from . import bench
    from .train import cli as train_cli
    train_cli.add_arguments(sub.add_parser(
        "train", help="train a multi-modal graph recommender with GUIDER (or BPR) and evaluate it"))
    bench.add_arguments(sub.add_parser(
        "bench", help="run the benchmark suite; write a markdown ratio table and a PNG plot"))
    from .train import features
    features.add_arguments(sub.add_parser(
        "text-features", help="write an MMRec text_feat.npy from a tab-separated item-text file "
                              "(sentence embeddings; needs guider_fast[text])"))
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "train":
        return train_cli.run(args)
    if args.command == "bench":
        return bench.run(args)
    if args.command == "text-features":
        return features.run(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
