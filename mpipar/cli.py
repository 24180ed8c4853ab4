"""What every mpipar command line shares: argument types and a parser that speaks once.

A bad argument ends a command with one ``PROG: error: ...`` line from rank 0 and exit code
2, never a traceback and never the same message from every rank: ``Parser.error`` raises
``UsageError`` instead of exiting, and the command's ``main`` prints it on rank 0.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import IO, Any, NoReturn

from mpipar import runtime
from mpipar.comm.network import Profile, load_profile
from mpipar.sim.spec import MODEL_FIELDS, MODELS


class UsageError(ValueError):
    """A bad argument or input file, reported before any training (and any collective)."""


# ---------------------------------------------------------------------------- arguments
def _number(kind: type, lowest: float, strict: bool) -> Any:
    """An argparse type: a finite ``kind`` above (``strict``) or at least ``lowest``."""
    bound = f"> {lowest:g}" if strict else f">= {lowest:g}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < lowest or (strict and value == lowest):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number {bound}")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT, COUNT = _number(int, 0, True), _number(int, 0, False)
POSITIVE, NON_NEGATIVE = _number(float, 0.0, True), _number(float, 0.0, False)


class Parser(argparse.ArgumentParser):
    """argparse that speaks once: errors become a UsageError (printed by ``main`` on rank 0
    only), and help goes to rank 0's stdout only."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def _print_message(self, message: str, file: IO[str] | None = None) -> None:
        if runtime.world_rank() == 0:
            super()._print_message(message, file)


def check_output_path(path: str, flag: str) -> Path:
    """``path`` as a file this process can create or overwrite, checked before any work
    starts: its directory exists and is writable, and it is not itself a directory."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a directory, not a file")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable")
    return p


# ---------------------------------------------------------------------------- the simulator's model
def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The GPT and batch of ``python -m mpipar.sim train`` and ``python -m mpipar.plan``."""
    p.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="a model preset; the model flags below override its fields")
    for flag, what in (("--n-layer", "blocks"), ("--n-embd", "width"), ("--n-head", "attention heads"),
                       ("--block-size", "sequence length"), ("--vocab-size", "vocabulary")):
        p.add_argument(flag, type=POSITIVE_INT, default=None, help=what)
    p.add_argument("--global-batch", type=POSITIVE_INT, required=True,
                   help="sequences per optimiser step over all data-parallel ranks")


def model_from_args(args: argparse.Namespace) -> dict[str, int]:
    """The model fields (``MODEL_FIELDS``): the preset's, overridden by the flags given."""
    model = dict(zip(MODEL_FIELDS, MODELS[args.model])) if args.model else {}
    for f in MODEL_FIELDS:
        v = getattr(args, f)
        if v is not None:
            model[f] = v
    missing = [f"--{f.replace('_', '-')}" for f in MODEL_FIELDS if f not in model]
    if missing:
        raise UsageError(f"the model needs {', '.join(missing)} (or --model NAME)")
    return model


def load_cluster(name: str, flag: str = "--cluster") -> Profile:
    """The profile ``name`` (a shipped name or a JSON path); UsageError naming ``flag``."""
    try:
        return load_profile(name)
    except FileNotFoundError as e:
        raise UsageError(f"{flag}: {e}") from None
    except (ValueError, KeyError) as e:
        raise UsageError(f"{flag} {name}: not a valid profile ({e})") from None
