"""Collective algorithms beside MPI's own, nccl-tests style.

    mpiexec -n 2 python -m mpipar.bench collectives
    mpiexec -n 2 python -m mpipar.bench collectives --collectives allreduce,allgather \\
        --algorithms ring,rhd,tree --sizes 4K:64M --iters 30 --json out.json --plot out.png

For each collective, size and algorithm (``native`` always included), every rank runs
``--warmup`` untimed calls then at least ``--iters`` timed ones; each call is timed on every
rank between a barrier and its return, and the call's time is the slowest rank's. The table
shows the median over calls, algbw = bytes / time and busbw = algbw x the nccl-tests factor
(all-reduce 2(p-1)/p, reduce-scatter and all-gather (p-1)/p, broadcast and reduce 1).
Algorithms take turns in blocks of ``--block`` calls, in a new order every round (the same
on every rank), so that a noisy moment, or the switch from whatever ran before, hurts all of
them alike; each block opens with an untimed call, because the first call after switching
between MPI's collectives and point-to-point pays for the switch (measured: per-call
rotation made whichever algorithm followed another kind up to 1.5x slower).
Every result is validated against the NumPy reference (``#wrong`` counts the elements that
differ), and the header names the MPI library, thread level and world size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from typing import Any

import numpy as np

from mpipar import backend
from mpipar.bench.report import shuffled
from mpipar.comm import get_algorithm, host_algorithm_names, make_communicator, split_counts
from mpipar.comm.mpi_env import library_version, thread_level_name
from mpipar.runtime import print0
from mpipar.sim.report import format_table, parse_sizes, row

COLLECTIVES = ("allreduce", "reduce_scatter", "allgather", "broadcast", "reduce")
EXTRA_COLUMNS = (("algorithm", "algorithm", 10), ("#wrong", "wrong", 7), ("x native", "vs_native", 9))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--collectives", default="allreduce",
                   help=f"comma-separated, from {','.join(COLLECTIVES)} (default allreduce)")
    p.add_argument("--algorithms", default="all",
                   help="comma-separated algorithm names, or 'all' (native is always added)")
    p.add_argument("--sizes", default="8:64M", help="message bytes: 'LO:HI' (powers of two) or a list '4K,1M'")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--op", default="sum")
    p.add_argument("--iters", type=int, default=60, help="timed calls per size and algorithm")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--block", type=int, default=5,
                   help="timed calls in a row per algorithm before the next takes its turn "
                        "(default 5: with --iters 60, twelve rounds spread over the run)")
    p.add_argument("--min-seconds", type=float, default=0.25,
                   help="keep taking rounds until each algorithm has been timed for about this "
                        "long at a size (default 0.25: small messages get thousands of calls, "
                        "since their latency jumps between modes and a median of 60 still moves)")
    p.add_argument("--max-seconds", type=float, default=2.0,
                   help="cap on timed calls per size and algorithm (at least 3 calls always run)")
    p.add_argument("--json", metavar="FILE", help="save every measurement as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw busbw against size, one line per algorithm")


def _algorithms(spec: str, collective: str) -> list[str]:
    names = host_algorithm_names() if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    names = [n for n in names if n != "native" and (n == "auto" or get_algorithm(n).supports(collective))]
    return ["native"] + names


def _inputs(collective: str, count: int, dtype: np.dtype, rank: int, p: int) -> np.ndarray:
    # small integers: every partial sum is exact, so results compare bit for bit
    rng = np.random.default_rng([count, rank])
    n = count if collective != "allgather" else count // p
    return rng.integers(-4, 5, size=n).astype(dtype)


def _reference(collective: str, op: str, count: int, dtype: np.dtype, p: int, root: int) -> np.ndarray:
    xs = [_inputs(collective, count, dtype, r, p) for r in range(p)]
    if collective == "allgather":
        return np.concatenate(xs)
    if collective == "broadcast":
        return xs[root]
    stack = np.stack(xs).astype(np.float64 if dtype.kind == "f" else np.int64)
    red = {"sum": stack.sum, "avg": stack.sum, "max": stack.max, "min": stack.min}[op](axis=0).astype(dtype)
    if op == "avg":
        red = (np.floor_divide(red, p) if dtype.kind == "i" else red / dtype.type(p)).astype(dtype)
    return red


def _call(comm: Any, collective: str, x: Any, op: str, alg: str, root: int, counts: list[int] | None) -> Any:
    if collective == "allreduce":
        return comm.allreduce(x, op=op, algorithm=alg)
    if collective == "reduce_scatter":
        return comm.reduce_scatter(x, op=op, algorithm=alg)
    if collective == "allgather":
        return comm.allgather(x, algorithm=alg, counts=counts)
    if collective == "broadcast":
        return comm.broadcast(x, root=root, algorithm=alg)
    return comm.reduce(x, root=root, op=op, algorithm=alg)


def _expected_part(collective: str, ref: np.ndarray, rank: int, p: int, root: int) -> np.ndarray | None:
    if collective == "reduce_scatter":
        c = split_counts(ref.size, p)
        lo = sum(c[:rank])
        return ref[lo: lo + c[rank]]
    if collective == "reduce" and rank != root:
        return None
    return ref


def run(comm: Any, args: argparse.Namespace) -> list[dict]:
    dtype = backend.resolve_dtype(args.dtype)
    p, rank = comm.size, comm.rank
    rows: list[dict] = []
    for collective in [c.strip() for c in args.collectives.split(",")]:
        if collective not in COLLECTIVES:
            raise SystemExit(f"unknown collective {collective!r}; choose from {', '.join(COLLECTIVES)}")
        algs = _algorithms(args.algorithms, collective)
        for nbytes in parse_sizes(args.sizes):
            count = max(nbytes // dtype.itemsize, 0)
            if collective == "allgather":
                count -= count % p
            if count == 0 and nbytes > 0:
                continue
            root = 0
            x = _inputs(collective, count, dtype, rank, p)
            counts = None
            ref = _reference(collective, args.op, count, dtype, p, root)
            expect = _expected_part(collective, ref, rank, p, root)
            times = {a: [] for a in algs}
            wrong = {a: 0 for a in algs}

            def timed_call(alg: str, check: bool) -> float:
                comm.barrier()
                t0 = time.perf_counter()
                out = _call(comm, collective, x, args.op, alg, root, counts)
                dt = time.perf_counter() - t0
                if check and expect is not None:
                    got = backend.to_host(out).reshape(-1)
                    bad = int(np.count_nonzero(got != expect)) if got.shape == expect.shape else expect.size
                    wrong[alg] = max(wrong[alg], bad)
                return dt

            for alg in algs:  # warm-up, and the first validation
                for k in range(max(args.warmup, 1)):
                    timed_call(alg, check=k == 0)
            budget_start = time.perf_counter()
            rounds = 0
            while True:
                # a new order every round (the same on every rank: seeded by the round):
                # what runs just before a block (MPI's own collective or another
                # algorithm's point-to-point) changes its first calls, and a fixed order, or
                # a rotation of one, would charge that to the same algorithm every time
                order = shuffled(algs, rounds)
                rounds += 1
                for alg in order:
                    # each block opens with one untimed call: switching between MPI's own
                    # collectives and point-to-point costs the first call after the switch,
                    # which would otherwise be charged to whichever algorithm comes next
                    timed_call(alg, check=False)
                    for _ in range(args.block):
                        times[alg].append(timed_call(alg, check=False))
                # both figures agreed by every rank, so that all leave the loop together
                spent, least = comm.allreduce(np.array([time.perf_counter() - budget_start,
                                                        -min(sum(v) for v in times.values())]), op="max")
                done = len(times[algs[0]]) >= args.iters and -least >= args.min_seconds
                if done or (len(times[algs[0]]) >= 3 and spent > args.max_seconds * len(algs)):
                    break
            for alg in algs:  # validate the last result too
                timed_call(alg, check=True)
            for alg in algs:
                per_call = comm.allreduce(np.array(times[alg]), op="max")  # slowest rank per call
                bad = int(comm.allreduce(np.array([wrong[alg]], dtype=np.int64), op="max")[0])
                r = row(collective, p, nbytes, count, dtype.name, float(np.median(per_call)))
                rows.append(r | dict(collective=collective, algorithm=alg, op=args.op, ranks=p, wrong=bad,
                                calls=len(per_call), times_us=[float(v) * 1e6 for v in per_call]))
            native = next(r for r in rows[-len(algs):] if r["algorithm"] == "native")
            for r in rows[-len(algs):]:
                r["vs_native"] = r["busbw"] / native["busbw"] if native["busbw"] > 0 else float("nan")
    return rows


def header(comm: Any) -> dict:
    return {"mpi_library": library_version(), "thread_level": thread_level_name(), "ranks": comm.size,
            "host": platform.node(), "python": platform.python_version(), "numpy": np.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def plot(rows: list[dict], meta: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    collectives = sorted({r["collective"] for r in rows}, key=COLLECTIVES.index)
    fig, axes = plt.subplots(1, len(collectives), figsize=(6.5 * len(collectives), 4.5), squeeze=False)
    for ax, coll in zip(axes[0], collectives):
        for alg in dict.fromkeys(r["algorithm"] for r in rows if r["collective"] == coll):
            pts = [(r["size"], r["busbw"]) for r in rows if r["collective"] == coll and r["algorithm"] == alg]
            ax.plot(*zip(*pts), marker="o", ms=3, label=alg, lw=2.5 if alg == "native" else 1.5,
                    ls="--" if alg == "native" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("busbw (GB/s)")
        ax.set_title(f"{coll}, {meta['ranks']} ranks")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"{meta['mpi_library']}, thread level {meta['thread_level']}, {meta['host']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args: argparse.Namespace, comm: Any = None) -> int:
    comm = comm or make_communicator()
    meta = header(comm)
    rows = run(comm, args)
    if comm.rank == 0:
        print0(f"# mpipar collectives benchmark: {meta['ranks']} ranks, {meta['mpi_library']}, "
               f"MPI thread level {meta['thread_level']} (native measured at the same level), {meta['host']}")
        print0(f"# median over calls of the slowest rank's time; dtype {args.dtype}, op {args.op}; "
               f"ratio = busbw / native busbw")
        for coll in dict.fromkeys(r["collective"] for r in rows):
            print0(format_table([r for r in rows if r["collective"] == coll], title=coll,
                                extra_columns=EXTRA_COLUMNS))
        bad = sum(r["wrong"] for r in rows)
        print0(f"# validation: {'all results correct' if bad == 0 else f'{bad} WRONG elements'}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "rows": rows}, f, indent=1)
            print0(f"# saved {args.json}")
        if args.plot:
            plot(rows, meta, args.plot)
            print0(f"# plotted {args.plot}")
    bad = sum(r["wrong"] for r in rows)
    return 1 if bad else 0
