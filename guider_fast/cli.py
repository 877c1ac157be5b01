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
    for device in devices:
        print(f"backends on {device}:", file=out)
        for name, reason in _dispatch.backend_report(device).items():
            status = "available" if reason is None else f"unavailable: {reason}"
            print(f"  {name:<7} {status}", file=out)
    return 0


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    defaults = TrainConfig()
    add = parser.add_argument
    add("--data", default=defaults.data,
        help="'synthetic' (the default: planted noisy interactions) or an MMRec dataset: a folder with "
             "<name>.inter (+ text_feat.npy / image_feat.npy) or the .inter file")
    add("--epochs", type=int, default=defaults.epochs)
    add("--loss", choices=("guider", "bpr"), default=defaults.loss,
        help="GUIDER (calibration + DBPR) or plain BPR")
    add("--backend", default=defaults.backend, choices=("auto", "torch", "triton", "cuda"))
    add("--device", default=defaults.device, help="cpu or cuda")
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--lr", type=float, default=defaults.lr)
    add("--dim", type=int, default=defaults.dim, help="embedding size")
    add("--layers", type=int, default=defaults.n_layers, help="LightGCN propagation layers")
    add("--knn", type=int, default=defaults.knn, help="neighbours of the item-item graph (0: off)")
    add("--reg-weight", type=float, default=defaults.reg_weight)
    add("--threshold", type=float, default=defaults.threshold, help="calibration clean threshold")
    add("--noisy-weight", type=float, default=defaults.noisy_weight,
        help="DBPR weight of interactions flagged noisy (GUIDER's reference: 1; 0 drops them)")
    add("--align", action="store_true",
        help="fit the image projection onto the text one, so the calibration measures modality "
             "disagreement (the reference keeps both random)")
    add("--distill", choices=("none", "kl", "ot"), default=defaults.distill,
        help="also train a matrix-factorisation student distilled from the model: full-catalogue KL "
             "(streamed) or Sinkhorn OT between the batch's score rows (a B x B problem of dimension B "
             "per step: ~40x the epoch time on one CPU thread at B = 2048)")
    add("--distill-weight", type=float, default=defaults.distill_weight,
        help="a fixed weight of the distillation term (default: the reference's MGDA two-task rule)")
    add("--eval-every", type=int, default=defaults.eval_every)
    add("--patience", type=int, default=defaults.patience,
        help="stop after this many evaluations without a better validation recall@20")
    add("--seed", type=int, default=defaults.seed)
    add("--n-users", type=int, default=defaults.n_users, help="synthetic data: users")
    add("--n-items", type=int, default=defaults.n_items, help="synthetic data: items")
    add("--noise", type=float, default=defaults.noise, help="synthetic data: share of corrupted interactions")
    add("--checkpoint", help="save the training state here after every epoch")
    add("--resume", action="store_true", help="continue from --checkpoint (best model included)")
    add("--metrics-json", help="write the final metrics (and the history) here")
    add("--no-progress", action="store_true", help="no progress bar")


def train_command(args) -> int:
    from .train import TrainConfig, format_result, train

    config = TrainConfig(
        data=args.data, epochs=args.epochs, batch_size=args.batch_size, dim=args.dim, n_layers=args.layers,
        knn=args.knn, lr=args.lr, reg_weight=args.reg_weight, loss=args.loss, threshold=args.threshold,
        align=args.align, noisy_weight=args.noisy_weight,
        backend=args.backend, distill=args.distill, distill_weight=args.distill_weight,
        eval_every=args.eval_every, patience=args.patience, seed=args.seed, device=args.device,
        checkpoint=args.checkpoint, resume=args.resume, metrics_json=args.metrics_json,
        n_users=args.n_users, n_items=args.n_items, noise=args.noise, progress=not args.no_progress)
    try:
        result = train(config)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
        print(f"guider-fast train: {error}", file=sys.stderr)
        return 2
    print(format_result(result))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="guider-fast", description="guider_fast command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and which backends can run here (and why not)")
    _add_train_arguments(sub.add_parser(
        "train", help="train a multi-modal graph recommender with GUIDER (or BPR) and evaluate it"))
    from . import bench
    bench.add_arguments(sub.add_parser(
        "bench", help="run the benchmark suite; write a markdown ratio table and a PNG plot"))
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "train":
        return train_command(args)
    if args.command == "bench":
        return bench.run(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
