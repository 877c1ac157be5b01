"""``guider-fast train``: one option per ``TrainConfig`` field, built from the fields.

Each field's metadata (``config.option``) gives the help text and, where set, the flag
and the choices; the annotation gives the type.  A boolean field that defaults to False
is a switch; one that defaults to True is turned off by its ``--no-...`` flag; one that
defaults to None (the preset decides) takes ``--flag`` and ``--no-flag``.

``run`` prints one line and exits 2 for a user's mistake, and on Ctrl-C says where the last
checkpoint is and the command that resumes it (exit 130), without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import typing
from typing import Dict, List

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


def _interrupted(config: TrainConfig, trainer) -> str:
    """What a Ctrl-C leaves: where the last checkpoint is and how to continue from it."""
    epoch = trainer.state.epoch if trainer is not None else 0
    where = f"after epoch {epoch}" if epoch else "before the first epoch ended"
    if not config.checkpoint:
        return (f"guider-fast train: interrupted {where}; no checkpoint was written (pass --checkpoint PATH "
                f"to be able to resume a run)")
    if trainer is None or not trainer.saved_epoch or not os.path.exists(config.checkpoint):
        if config.resume and os.path.exists(config.checkpoint):
            resumed = dataclasses.replace(config, overwrite=False)
            return (f"guider-fast train: interrupted {where}; the checkpoint {config.checkpoint} is as it was: "
                    f"continue with: {shlex.join(command_line(resumed))}")
        return f"guider-fast train: interrupted {where}; no checkpoint written yet to {config.checkpoint}"
    resumed = dataclasses.replace(config, resume=True, overwrite=False)
    return (f"guider-fast train: interrupted; last checkpoint {config.checkpoint} (epoch {trainer.saved_epoch}); "
            f"continue with: {shlex.join(command_line(resumed))}")


def run(args: argparse.Namespace) -> int:
    from .trainer import Trainer, format_result

    config = config_from_args(args)
    trainer = None
    try:
        trainer = Trainer(config)
        result = trainer.run()
    except KeyboardInterrupt:
        print(_interrupted(config, trainer), file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"guider-fast train: {error}", file=sys.stderr)
        return 2
    print(format_result(result))
    return 0
