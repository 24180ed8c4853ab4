"""python -m mpipar.bench calibrate: measure alpha, beta and gamma here and save a network profile.

Examples::

    mpiexec -n 2 python -m mpipar.bench calibrate                       # -> ./profile-<host>.json
    mpiexec -n 2 python -m mpipar.bench calibrate --output mpipar/sim/profiles/local.json \\
        --name local --sizes 8:4M --split 64K,256K --repeats 30
    python -m mpipar.sim collectives --ranks 64 --profile ./profile-<host>.json

alpha and beta come from a ping-pong between ranks 0 and 1 through mpipar's own MPI transport
(the path the algorithms use, Python overhead included): for each size the one-way time is
half the MEDIAN round trip, and each size class (``--split`` boundaries, e.g. MPI's eager /
rendezvous switch) gets a least-squares line ``t = alpha + n * beta`` through its sizes.
gamma is the MEDIAN time of ``op.combine`` (what ``reduce_local`` runs) per byte on float32
buffers. Other ranks, if any, wait. Place the two ranks as you want them measured: on one node
this is the shared-memory path; with ``-ppn 1`` on two nodes, the network.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import statistics
import time
from typing import Any

import numpy as np

from mpipar.bench.report import format_size, parse_size, parse_sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="8:4M", help="message sizes in bytes, a:b = powers of two (default 8:4M)")
    p.add_argument("--split", default="64K,256K",
                   help="size-class boundaries, comma-separated; the first is taken as the eager "
                        "limit (default 64K,256K: MPICH's shared-memory eager and large-message "
                        "paths); 'each': one class per measured size (a step function through "
                        "the measurements, which follows a library's protocol switches)")
    p.add_argument("--method", default="pingpong", choices=("pingpong", "exchange"),
                   help="pingpong: one-way time of a message (half a round trip); exchange: "
                        "both ranks send and receive n bytes at once (sendrecv), the step of "
                        "every pairwise algorithm (ring, rhd, ... at 2 ranks)")
    p.add_argument("--eager", default=None,
                   help="eager limit in bytes (default: the first --split boundary, or 64K)")
    p.add_argument("--repeats", type=int, default=30, help="timed round trips per size (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed round trips per size")
    p.add_argument("--gamma-bytes", default="16M",
                   help="buffer size for timing op.combine and the input copy (large: the "
                        "collectives that these costs matter for do not fit in cache)")
    p.add_argument("--name", default=None, help="profile name (default: the host name)")
    p.add_argument("--output", default=None, help="where to write the JSON (default ./profile-<host>.json)")


def pingpong(t: Any, sizes: list[int], repeats: int, warmup: int) -> dict[int, float]:
    """Median one-way time (seconds) per size of a message between ranks 0 and 1 (rank 0's
    answer; others get {}). Sizes are interleaved within each repeat, so that a burst of load
    from elsewhere on the machine lands on all sizes alike rather than bending the fit."""
    from mpipar.comm.transport.base import recv, send  # noqa: PLC0415

    bufs = {n: np.zeros(n, dtype=np.uint8) for n in sizes}
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for i in range(warmup + repeats):
        for n in sizes:
            buf = bufs[n]
            if t.rank == 0:
                t0 = time.perf_counter()
                send(t, buf, 1, 7)
                recv(t, buf, 1, 7)
                if i >= warmup:
                    times[n].append((time.perf_counter() - t0) / 2)
            elif t.rank == 1:
                recv(t, buf, 0, 7)
                send(t, buf, 0, 7)
    return {n: statistics.median(v) for n, v in times.items() if v}


def exchange(t: Any, sizes: list[int], repeats: int, warmup: int) -> dict[int, float]:
    """Median time (seconds, rank 0's) for ranks 0 and 1 to swap ``n`` bytes with one
    ``sendrecv`` each, both directions at once, after a barrier."""
    from mpipar.comm.transport.base import sendrecv  # noqa: PLC0415

    send_bufs = {n: np.zeros(n, dtype=np.uint8) for n in sizes}
    recv_bufs = {n: np.zeros(n, dtype=np.uint8) for n in sizes}
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for i in range(warmup + repeats):
        for n in sizes:
            t.barrier()
            if t.rank in (0, 1):
                peer = 1 - t.rank
                t0 = time.perf_counter()
                sendrecv(t, send_bufs[n], peer, recv_bufs[n], peer, 8)
                if t.rank == 0 and i >= warmup:
                    times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items() if v}


def fit_line(sizes: list[int], times: list[float]) -> tuple[float, float]:
    """Least-squares (alpha, beta) of ``t = alpha + n beta`` on relative error, both kept
    non-negative."""
    if len(sizes) == 1:
        return max(times[0], 0.0), 0.0
    # weights 1/t: relative residuals, so the largest sizes do not decide alpha alone
    y = np.asarray(times, dtype=float)
    beta, alpha = np.polyfit(np.asarray(sizes, dtype=float), y, 1, w=1 / y)
    if beta < 0:
        return float(statistics.median(times)), 0.0
    if alpha < 0:  # through the origin instead
        beta = float(np.dot(sizes, times) / np.dot(sizes, sizes))
        alpha = 0.0
    return float(alpha), float(beta)


def measure_gamma(nbytes: int, repeats: int) -> float:
    """Seconds per byte of ``SUM.combine`` on float32 buffers (median of ``repeats``)."""
    from mpipar.comm.ops import SUM  # noqa: PLC0415

    n = max(1, nbytes // 4)
    a, b = np.ones(n, dtype=np.float32), np.ones(n, dtype=np.float32)
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        SUM.combine(a, b)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) / (n * 4)


def measure_copy(nbytes: int, repeats: int) -> float:
    """Seconds per byte of the Communicator's input copy (a fresh contiguous array, page
    faults included: that is what every collective call pays before its algorithm starts)."""
    from mpipar.comm.communicator import Communicator  # noqa: PLC0415

    x = np.ones(max(1, nbytes // 4), dtype=np.float32)
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        Communicator._work_copy(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) / x.nbytes


def _metadata(MPI: Any) -> dict[str, Any]:
    import mpi4py  # noqa: PLC0415

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"source": "measured by python -m mpipar.bench calibrate (ping-pong through the mpipar "
                      "MPI transport, medians; gamma from op.combine on float32)",
            "host": platform.node(), "cpu": cpu,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "libraries": {"python": platform.python_version(), "numpy": np.__version__,
                          "mpi4py": mpi4py.__version__,
                          "mpi": MPI.Get_library_version().splitlines()[0].strip()}}


def main(args: argparse.Namespace) -> int:
    from mpipar.comm.mpi_env import import_mpi  # noqa: PLC0415
    from mpipar.comm.transport.mpi import MPITransport  # noqa: PLC0415
    from mpipar.sim.network import Link, Profile, SizeClass  # noqa: PLC0415

    MPI = import_mpi()
    t = MPITransport(MPI.COMM_WORLD)
    if t.size < 2:
        print("calibrate needs two ranks: mpiexec -n 2 python -m mpipar.bench calibrate")
        return 2
    sizes = parse_sizes(args.sizes)
    if str(args.split).strip() == "each":
        bounds = sorted(sizes)[:-1]
    else:
        bounds = sorted(parse_size(s) for s in str(args.split).split(",") if s.strip())
    measure = exchange if args.method == "exchange" else pingpong
    measured = measure(t, sizes, args.repeats, args.warmup)
    t.barrier()
    if t.rank != 0:
        return 0
    gamma = measure_gamma(parse_size(args.gamma_bytes), args.repeats)
    copy = measure_copy(parse_size(args.gamma_bytes), args.repeats)
    classes = []
    lo = 0
    for hi in bounds + [None]:
        members = [n for n in sizes if n > lo and (hi is None or n <= hi)]
        if members:
            a, b = fit_line(members, [measured[n] for n in members])
            classes.append(SizeClass(hi, a, b))
        if hi is not None:
            lo = hi
    # a class with no measured size is dropped; the last one must stay unbounded
    classes[-1] = SizeClass(None, classes[-1].alpha, classes[-1].beta)
    if args.eager is not None:
        eager = parse_size(args.eager)
    elif str(args.split).strip() == "each" or not bounds:
        eager = 64 * 1024
    else:
        eager = bounds[0]
    meta = _metadata(MPI)
    meta["method"] = args.method
    meta["samples"] = {str(n): measured[n] for n in sizes}
    name = args.name or meta["host"]
    prof = Profile(name, Link(tuple(classes)), gamma=gamma, copy=copy,
                   eager_limit=eager, metadata=meta)
    out = args.output or f"profile-{meta['host']}.json"
    prof.save(out)
    print(f"# calibrate: {meta['host']}, {meta['libraries']['mpi']}")
    print(f"#{'size(B)':>11} {'one-way(us)':>12} {'model(us)':>10}")
    for n in sizes:
        print(f"{n:12d} {measured[n] * 1e6:12.2f} {prof.link.time(n) * 1e6:10.2f}")
    for c in classes:
        bound = "inf" if c.max_bytes is None else format_size(c.max_bytes)
        bw = 1 / c.beta / 1e9 if c.beta > 0 else float("inf")
        print(f"# class <= {bound:>5}: alpha {c.alpha * 1e6:.2f} us, beta {c.beta:.3e} s/B ({bw:.2f} GB/s)")
    print(f"# gamma {gamma:.3e} s/B ({1 / gamma / 1e9:.2f} GB/s float32 sum); input copy "
          f"{copy:.3e} s/B ({1 / copy / 1e9:.2f} GB/s); saved {out}")
    return 0
