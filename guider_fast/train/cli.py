"""``guider-fast train``: one option per ``TrainConfig`` field, built from the fields.

Each field's metadata (``config.option``) gives the help text and, where set, the flag
and the choices; the annotation gives the type.  A boolean field that defaults to False
is a switch; one that defaults to True is turned off by its ``--no-...`` flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Dict

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
            parser.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true",
                                help=help)
            continue
        choices = f.metadata.get("choices")
        if f.default is not None:
            help += " (default: %(default)s)"
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default, choices=choices, help=help,
                            metavar=None if choices else flag[2:].replace("-", "_").upper())


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in _options().values()})


def run(args: argparse.Namespace) -> int:
    from .trainer import format_result, train

    try:
        result = train(config_from_args(args))
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
        print(f"guider-fast train: {error}", file=sys.stderr)
        return 2
    print(format_result(result))
    return 0
