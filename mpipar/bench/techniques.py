"""python -m mpipar.bench training-techniques: mixed precision, gradient compression and
parameter-server training, each beside its baseline, in one run.

Examples::

    mpiexec -n 3 python -m mpipar.bench training-techniques              # every part
    mpiexec -n 3 python -m mpipar.bench training-techniques --parts ps --json tt.json
    mpiexec -n 3 python -m mpipar.bench training-techniques --model tiny --steps 10

The parts are the three benchmarks, run one after the other on sub-communicators of this
world, with their own defaults (``python -m mpipar.bench precision|compression|ps --help``
says what each measures and how):

=============  ===========================  =================================================
part           ranks                        baseline in the same run
=============  ===========================  =================================================
precision      the first min(2, world)      fp32 (dp = those ranks: bytes counted on the wire)
compression    the first min(2, world)      uncompressed (``none``) at the same dp
ps             the first 3 (1 server and 2     sync, and all-reduce over the same workers
               workers, worker 1 slowed 2x)
=============  ===========================  =================================================

A rank outside a part waits for it without spinning a core (a receive polled with a
sleep), so a part timed on 2 of 3 ranks has the machine's cores to itself. ``--steps`` and
``--model`` override every part's; ``--json`` writes one file of every part's rows
(rank 0).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from mpipar.comm import make_communicator
from mpipar.runtime import print0

# part -> (module, the ranks it runs on given the world size: a count, 0 = cannot run)
PARTS: dict[str, tuple[str, Any]] = {
    "precision": ("mpipar.bench.precision", lambda n: min(2, n)),
    "compression": ("mpipar.bench.compression", lambda n: min(2, n)),
    "ps": ("mpipar.bench.ps", lambda n: 3 if n >= 3 else 0),   # its default: 1 server + 2 workers
}
TAG_DONE = 7301          # a part's end, rank 0 to the ranks outside it
POLL_S = 1e-3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated, of {', '.join(PARTS)} (default: all)")
    p.add_argument("--model", default=None, help="GPT preset for every part (default: each part's)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps for every part (default: each part's)")
    p.add_argument("--json", default=None, help="write every part's rows here (rank 0)")


def parse_parts(text: str) -> list[str]:
    """``--parts``'s names, in the order given; ValueError naming an unknown one."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in PARTS]
    if bad or not names:
        raise ValueError(f"parts {text!r}: a comma-separated list of {', '.join(PARTS)}")
    return names


def part_arguments(name: str, args: argparse.Namespace, json_path: str) -> argparse.Namespace:
    """The part's own defaults, with this run's overrides and its --json file."""
    mod = importlib.import_module(PARTS[name][0])
    parser = argparse.ArgumentParser(prog=f"bench {name}")
    mod.add_arguments(parser)
    argv = ["--json", json_path]
    if args.model is not None:
        argv += ["--model", args.model]
    if args.steps is not None:
        argv += ["--steps", str(args.steps)]
    return parser.parse_args(argv)


def _wait_quietly(world: Any) -> None:
    """Outside a part: wait for rank 0's word that it ended, sleeping between polls (an MPI
    wait spins a core, which the part's ranks need)."""
    req = world.irecv(np.zeros(1), 0, TAG_DONE)
    while not req.test():
        time.sleep(POLL_S)


def main(args: argparse.Namespace, comm: Any = None) -> int:
    try:
        names = parse_parts(args.parts)
    except ValueError as e:
        raise SystemExit(f"python -m mpipar.bench training-techniques: error: --parts: {e}") from None
    world = comm if comm is not None else make_communicator()
    out: dict[str, Any] = {"world": world.size, "parts": {}}
    tmp = tempfile.mkdtemp(prefix="mpipar-tt-") if world.rank == 0 else ""
    for name in names:
        n = PARTS[name][1](world.size)
        if n == 0:
            print0(f"\n== {name}: skipped (needs 3 ranks; run under mpiexec -n 3)")
            continue
        print0(f"\n== {name} on {n} of {world.size} rank(s)", flush=True)
        path = os.path.join(tmp, f"{name}.json")
        sub = world.split(0 if world.rank < n else None, world.rank)
        if sub is not None:
            rc = importlib.import_module(PARTS[name][0]).main(part_arguments(name, args, path),
                                                              sub)
            sub.free()
            if world.rank == 0:
                for r in range(n, world.size):
                    world.send(np.zeros(1), r, TAG_DONE)
        else:
            rc = 0
            _wait_quietly(world)
        world.barrier()
        if rc:
            return rc
        if world.rank == 0:
            with open(path) as f:
                out["parts"][name] = json.load(f)
    if args.json and world.rank == 0:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0
