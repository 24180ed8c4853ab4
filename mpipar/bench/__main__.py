"""python -m mpipar.bench SUBCOMMAND [options]

Examples::

    mpiexec -n 2 python -m mpipar.bench collectives --algorithms ring,rhd --sizes 4K:64M
    python -m mpipar.bench train --model small
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mpipar.bench import SUBCOMMANDS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m mpipar.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:  # import only the chosen module: others may need extras
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_main=mod.main)
    args = parser.parse_args(argv)
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
