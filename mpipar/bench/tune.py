"""Measure every algorithm per message size and save the table ``algorithm="auto"`` uses.

    mpiexec -n 2 python -m mpipar.bench tune                       # saves the default table
    mpiexec -n 8 python -m mpipar.bench tune --sizes 4K:64M --out tune.json
    MPIPAR_TUNE_TABLE=tune.json mpiexec -n 8 python -m mpipar.bench collectives --algorithms auto,ring,rhd

The measurement is ``bench collectives`` (median of the slowest rank per call, results
validated); the table lists, per collective and size, every algorithm's median time and the
one ``auto`` should use (``choose_best``: the fastest, unless another algorithm within 5% of
it is better over the neighbouring sizes too). It is valid for this host and world size:
``auto`` ignores a table of another size and falls back to the cost model. See
``mpipar/comm/auto.py`` for the format.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
from typing import Any

from mpipar.bench import collectives as coll_bench
from mpipar.comm import make_communicator
from mpipar.comm.auto import default_table_path, save_table
from mpipar.runtime import print0


def add_arguments(p: argparse.ArgumentParser) -> None:
    coll_bench.add_arguments(p)
    p.set_defaults(collectives="allreduce,reduce_scatter,allgather,broadcast", sizes="8:16M")
    p.add_argument("--out", metavar="FILE", help="table path (default: auto's default for this host and size)")


# An algorithm more than this much slower than the fastest at a size is never chosen there.
SMOOTHING_SLACK = 1.05


def choose_best(entries: list[dict]) -> None:
    """Set each entry's ``best``: among the algorithms within SMOOTHING_SLACK of the fastest at
    that size, the one with the least geometric mean of time / fastest time over that size and
    its neighbours (one power of two either side).

    Medians still move by 5-15% between runs on a shared machine, and where two algorithms
    are equally good (ring and rhd send the same messages at 2 ranks) the raw minimum flips
    between them from size to size at random. An algorithm that is also good next door is
    the better bet; the slack keeps a clear winner at its own size."""
    entries.sort(key=lambda e: e["bytes"])
    rel = []
    for e in entries:
        fastest = min(e["time_us"].values())
        rel.append({a: t / fastest if fastest > 0 else 1.0 for a, t in e["time_us"].items()})
    for i, e in enumerate(entries):
        near = [rel[j] for j in (i - 1, i, i + 1) if 0 <= j < len(entries)]
        ok = [a for a, r in rel[i].items() if r <= SMOOTHING_SLACK]

        def score(a: str) -> float:
            logs = [math.log(r[a]) for r in near if a in r]
            return sum(logs) / len(logs)

        e["best"] = min(ok, key=lambda a: (score(a), rel[i][a]))


def main(args: argparse.Namespace, comm: Any = None) -> int:
    comm = comm or make_communicator()
    meta = coll_bench.header(comm)
    args.algorithms = ",".join(a for a in args.algorithms.split(",") if a != "auto") or "all"
    rows = coll_bench.run(comm, args)
    bad = sum(r["wrong"] for r in rows)
    table: dict = {"host": platform.node(), "ranks": comm.size, "dtype": args.dtype,
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "source": f"python -m mpipar.bench tune --sizes {args.sizes}",
                   "mpi_library": meta["mpi_library"], "thread_level": meta["thread_level"],
                   "collectives": {}}
    for r in rows:
        entries = table["collectives"].setdefault(r["collective"], [])
        entry = next((e for e in entries if e["bytes"] == r["size"]), None)
        if entry is None:
            entry = {"bytes": r["size"], "time_us": {}}
            entries.append(entry)
        entry["time_us"][r["algorithm"]] = round(r["time_us"], 3)
    for entries in table["collectives"].values():
        choose_best(entries)
    if comm.rank == 0:
        if bad:
            print0(f"# {bad} wrong results: not saving a table from a broken run")
            return 1
        path = args.out or str(default_table_path(comm.size))
        save_table(table, path)
        for name, entries in table["collectives"].items():
            picks = ", ".join(f"{e['bytes']}B:{e['best']}" for e in entries)
            print0(f"# {name}: {picks}")
        print0(f"# saved tuned table for {comm.size} ranks on {table['host']} to {path}")
    return 1 if bad else 0
