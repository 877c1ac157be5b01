"""``guider-fast train``: one option per ``TrainConfig`` field, built from the fields.

Each field's metadata (``config.option``) gives the help text and, where set, the flag
and the choices; the annotation gives the type.  A boolean field that defaults to False
is a switch; one that defaults to True is turned off by its ``--no-...`` flag; one that
defaults to None (the preset decides) takes ``--flag`` and ``--no-flag``.

``run`` prints one line and exits 2 for a user's mistake, and on Ctrl-C says where the last
checkpoint is and the command that resumes it (exit 130), without a traceback.

``--nproc N`` is not a setting of the run but of its launch: it starts torchrun with N
processes of this machine, each running this command without it.  Under torchrun (the
environment names a process group), ``run`` joins the group and every process trains its
share (``guider_fast.train.distributed``); only process 0 prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import typing
from typing import Dict, List

import torch

from .config import TrainConfig


def _value_type(annotation):
    """``int``, ``float``, ``str`` or ``bool`` from a field annotation (``Optional[X]`` gives X)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    kind = args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation
    if kind not in (int, float, str, bool):
        raise TypeError(f"a command-line option needs an int, float, str or bool field, got {annotation}; "
                        f"mark the field cli=False")
    return kind


def _options() -> Dict[str, dataclasses.Field]:
    """The fields offered on the command line, by their flag."""
    return {f.metadata.get("flag") or "--" + f.name.replace("_", "-"): f
            for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)}


# Options of the launch, not of the run (not TrainConfig fields).
LAUNCH_OPTIONS = ("nproc",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="train on N processes of this machine (starts torchrun --nproc-per-node N; users "
                             "sharded, items replicated; on several machines run torchrun yourself)")
    hints = typing.get_type_hints(TrainConfig)
    for flag, f in _options().items():
        kind, help = _value_type(hints[f.name]), f.metadata["help"]
        if kind is bool:
            action = (argparse.BooleanOptionalAction if f.default is None
                      else "store_false" if f.default else "store_true")
            parser.add_argument(flag, dest=f.name, action=action, default=f.default, help=help)
            continue
        choices = f.metadata.get("choices")
        if f.default is not None:
            help += " (default: %(default)s)"
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default, choices=choices, help=help,
                            metavar=None if choices else flag[2:].replace("-", "_").upper())


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in _options().values()})


def command_line(config: TrainConfig) -> List[str]:
    """``guider-fast train`` arguments that rebuild ``config`` (the options that differ from
    their defaults)."""
    argv = ["guider-fast", "train"]
    for flag, f in _options().items():
        value = getattr(config, f.name)
        if value == f.default:
            continue
        if isinstance(value, bool):
            argv.append(flag if f.default is not None or value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def _resume_command(config: TrainConfig, world_size: int) -> str:
    argv = command_line(config)
    if world_size > 1:
        argv[2:2] = ["--nproc", str(world_size)]
    return shlex.join(argv)


def _interrupted(config: TrainConfig, trainer, world_size: int = 1) -> str:
    """What a Ctrl-C leaves: where the last checkpoint is and how to continue from it
    (``world_size`` processes: the same number again)."""
    epoch = trainer.state.epoch if trainer is not None else 0
    where = f"after epoch {epoch}" if epoch else "before the first epoch ended"
    if not config.checkpoint:
        return (f"guider-fast train: interrupted {where}; no checkpoint was written (pass --checkpoint PATH "
                f"to be able to resume a run)")
    if trainer is None or not trainer.saved_epoch or not os.path.exists(config.checkpoint):
        if config.resume and os.path.exists(config.checkpoint):
            resumed = dataclasses.replace(config, overwrite=False)
            return (f"guider-fast train: interrupted {where}; the checkpoint {config.checkpoint} is as it was: "
                    f"continue with: {_resume_command(resumed, world_size)}")
        return f"guider-fast train: interrupted {where}; no checkpoint written yet to {config.checkpoint}"
    resumed = dataclasses.replace(config, resume=True, overwrite=False)
    return (f"guider-fast train: interrupted; last checkpoint {config.checkpoint} (epoch {trainer.saved_epoch}); "
            f"continue with: {_resume_command(resumed, world_size)}")


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    nproc = getattr(args, "nproc", None)
    if nproc is not None:
        from .distributed import check_launch, launch

        try:
            check_launch(config, nproc)
        except (ValueError, OSError) as error:
            print(f"guider-fast train: {error}", file=sys.stderr)
            return 2
        return launch(nproc, command_line(config)[1:])
    from . import distributed

    joined = False
    if distributed.launched_by_torchrun() and not torch.distributed.is_initialized():
        try:
            distributed.init_from_env(config.device)
        except (ValueError, RuntimeError) as error:
            print(f"guider-fast train: {error}", file=sys.stderr)
            return 2
        joined = True
    code = 1
    try:
        code = _train(config)
        return code
    finally:
        if joined:
            if code == 0:
                # Every process is past its last collective before any tears its connections
                # down (a peer closing while gloo still reads can abort the process).
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _train(config: TrainConfig) -> int:
    from .trainer import format_result, make_trainer

    group = torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if group else 0
    world_size = torch.distributed.get_world_size() if group else 1
    trainer = None
    try:
        trainer = make_trainer(config)
        result = trainer.run()
    except KeyboardInterrupt:
        if rank == 0:
            print(_interrupted(config, trainer, world_size), file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        # A user's mistake is found alike by every process: process 0 says it.  Other errors
        # may be one process's own: each says its own, with its rank.
        if rank == 0:
            print(f"guider-fast train: {error}", file=sys.stderr)
        elif not isinstance(error, (ValueError, TypeError)):
            print(f"guider-fast train (process {rank}): {error}", file=sys.stderr)
        return 2
    if rank == 0:
        print(format_result(result))
    return 0
