"""What every mpipar command line shares: argument types and a parser that speaks once.

A bad argument ends a command with one ``PROG: error: ...`` line from rank 0 and exit code
2, never a traceback and never the same message from every rank: ``Parser.error`` raises
``UsageError`` instead of exiting, and the command's ``main`` prints it on rank 0.

Config files: a command whose parser calls ``add_config_arguments`` takes ``--config
FILE.toml``, whose keys are the flags' destinations (``batch_size`` or ``batch-size`` for
``--batch-size``); the file's values are defaults that the command line overrides, checked by
the flags' own types and choices. ``--print-config`` prints the resolved configuration as
TOML that ``--config`` reads back to the same values, and exits 0.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

if sys.version_info >= (3, 11):
    import tomllib
else:                                    # Python 3.10: the same parser, as a package
    import tomli as tomllib

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


# what a config file cannot set: the parser's own options
_NOT_KEYS = frozenset({"help", "config", "print_config"})


class Parser(argparse.ArgumentParser):
    """argparse that speaks once: errors become a UsageError (printed by ``main`` on rank 0
    only), and help goes to rank 0's stdout only; with ``add_config_arguments``, a TOML file
    of flag values (see the module's docstring)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def _print_message(self, message: str, file: IO[str] | None = None) -> None:
        if runtime.world_rank() == 0:
            super()._print_message(message, file)

    # -- config files ---------------------------------------------------------------------
    def add_config_arguments(self) -> None:
        """``--config FILE.toml`` and ``--print-config`` for this parser's flags."""
        self.add_argument("--config", metavar="FILE.toml", default=None,
                          help="TOML file of flag values (keys: flag names without the dashes, "
                               "- or _); flags given here override it")
        self.add_argument("--print-config", action="store_true",
                          help="print the resolved configuration as TOML (what --config reads) "
                               "and exit")

    def _configurable(self) -> bool:
        return any(a.dest == "print_config" for a in self._actions)

    def _keys(self) -> dict[str, list[argparse.Action]]:
        """The actions a config file can set, by destination, in the parser's order."""
        keys: dict[str, list[argparse.Action]] = {}
        for a in self._actions:
            if a.dest not in _NOT_KEYS and a.dest != argparse.SUPPRESS and a.option_strings:
                keys.setdefault(a.dest, []).append(a)
        return keys

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        if not self._configurable():
            return super().parse_known_args(args, namespace)
        args = list(sys.argv[1:] if args is None else args)
        finder = Parser(add_help=False, allow_abbrev=False)
        finder.add_argument("--config", default=None)
        path = finder.parse_known_args(args)[0].config
        values = self.read_config(path) if path else {}
        namespace = namespace if namespace is not None else argparse.Namespace()
        for dest, value in values.items():       # starting values: the command line overrides
            setattr(namespace, dest, value)
        given = [a for a in self._actions if a.required and a.dest in values]
        for a in given:                  # a required flag the file gives is no longer missing
            a.required = False
        try:
            ns, extra = super().parse_known_args(args, namespace)
        finally:
            for a in given:
                a.required = True
        if ns.print_config:
            self._print_message(self.format_config(ns), sys.stdout)
            self.exit(0)
        return ns, extra

    def read_config(self, path: str) -> dict[str, Any]:
        """The values of the TOML file ``path`` by destination, converted and checked as the
        flags' own values are; UsageError naming the file, the key and the value."""
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except FileNotFoundError:
            raise UsageError(f"--config {path}: not found") from None
        except IsADirectoryError:
            raise UsageError(f"--config {path}: is a directory, not a file") from None
        except OSError as e:
            raise UsageError(f"--config {path}: {e.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"--config {path}: not valid TOML: {e}") from None
        return self.config_values(table, path)

    def config_values(self, table: dict[str, Any], path: str) -> dict[str, Any]:
        """``table`` (parsed TOML) as values by destination; see ``read_config``."""
        keys = self._keys()
        unknown = [k for k in table if k.replace("-", "_") not in keys or k.replace("-", "_") in _NOT_KEYS]
        if unknown:
            names = sorted({n for k in keys for n in (k, k.replace("_", "-"))})
            said = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=3)
                said.append(f"{k!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            raise UsageError(f"--config {path}: unknown key{'s' if len(said) > 1 else ''} "
                             f"{', '.join(said)}")
        values: dict[str, Any] = {}
        for key, value in table.items():
            dest = key.replace("-", "_")
            if dest in values:
                raise UsageError(f"--config {path}: {dest} is given twice (as - and _)")
            values[dest] = self._config_value(path, key, value, keys[dest])
        return values

    def _config_value(self, path: str, key: str, value: Any, actions: list[argparse.Action]) -> Any:
        where = f"--config {path}: {key} = {_toml(value)}"
        if all(a.nargs == 0 for a in actions):            # store_true / store_false / const
            allowed = [a.const for a in actions] + [actions[0].default]
            if not any(value is v or (type(value) is type(v) and value == v) for v in allowed):
                shown = " or ".join(dict.fromkeys(_toml(v) for v in allowed if v is not None))
                raise UsageError(f"{where}: expected {shown}")
            return value
        action = actions[0]
        if isinstance(value, dict) or (isinstance(value, bool) and action.type is not None):
            raise UsageError(f"{where}: not a value for {action.option_strings[0]}")
        items = value if isinstance(value, list) else [value]
        tokens = [v if isinstance(v, str) else _toml(v) for v in items]
        if action.nargs in (None, "?"):               # a list is the flag's comma-separated text
            tokens = [",".join(tokens)]
        try:
            return self._get_values(action, tokens)
        except argparse.ArgumentError as e:
            raise UsageError(f"{where}: {e.message}") from None

    def format_config(self, ns: argparse.Namespace) -> str:
        """``ns`` as TOML that ``--config`` reads back to the same values (unset flags left out).
        A flag whose type parses text into something else gives that type a ``to_text``
        attribute, the inverse (``A:B`` from a pair, ``a,b`` from a set)."""
        lines = [f"# {self.prog}: the resolved configuration (read back by --config FILE)"]
        for dest, actions in self._keys().items():
            v = getattr(ns, dest, None)
            if v is None or (isinstance(v, (set, frozenset)) and not v):
                continue
            to_text = getattr(actions[0].type, "to_text", None)
            if to_text is not None:
                v = to_text(v)
            elif isinstance(v, (list, tuple)) and actions[0].nargs in (None, "?"):
                v = ",".join(map(str, v))
            lines.append(f"{dest} = {_toml(v)}")
        return "\n".join(lines) + "\n"


def _toml(v: Any) -> str:
    """A TOML value: booleans, numbers, strings and arrays of them (others as strings)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False).replace("\x7f", "\\u007f")


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
