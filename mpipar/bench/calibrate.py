"""python -m mpipar.bench calibrate: measure this machine's costs and save a network profile.

``--compute`` measures the compute curve instead (one process, no MPI; see
``calibrate_compute``) and writes the profile's ``"compute"`` section.

Examples::

    mpiexec -n 2 python -m mpipar.bench calibrate                       # -> ./profile-<host>.json
    mpiexec -n 2 python -m mpipar.bench calibrate --output mpipar/comm/profiles/local.json \\
        --name local --check ring,rhd,tree,dbtree,ps,hier
    python -m mpipar.sim collectives --ranks 64 --profile ./profile-<host>.json

What is measured, each the way the algorithms meet it, between ranks 0 and 1 (others wait):

* messages: with ``--method exchange`` (default) both ranks swap n bytes with one
  ``sendrecv`` each, sent from a just-written copy and received into a buffer from the
  transport's scratch pool, as the algorithms send their work copy and receive into theirs:
  the step of every pairwise algorithm; with ``--method pingpong`` half the round trip of one
  message. Through mpipar's own MPI transport, so its Python overhead is included.
* one-way messages: rank 0 sends n fresh bytes to rank 1, which sends n back once they have
  arrived (half the round trip; through isend/irecv, as tree-like algorithms send, less the
  post overhead below): what a message costs when its sender is not receiving at the same
  time. On one host the two directions of an exchange share the CPUs and the memory bus,
  and a lone message can cost much less than an exchange (0.42-0.86 of it measured here); the
  simulator prices each message by which of the two it is;
* reductions: ``op.combine`` (what ``reduce_local`` runs) on n-byte float32 buffers just
  written, on both ranks at once (they share the memory bus, as they do in a collective);
* the Communicator's input copy of an n-byte array into a fresh one, on both ranks at once;
* the same exchange through irecv + isend + waits: what that costs beyond one sendrecv, per
  request and at sizes up to 64 KiB, is the profile's ``post_overhead`` (LogP's o);
* every from-scratch all-reduce through the Communicator at 256 B to 2 KiB: what the profile
  above leaves unexplained there (measured minus simulated) is the algorithm's fixed cost
  per call, ``call_overhead`` (the Communicator's checks, the algorithm's Python set-up).

Each is timed for every size in ``--sizes``, the sizes interleaved within each of ``--repeats``
rounds (a burst of load from elsewhere lands on all sizes alike); a size's time is the MEDIAN
over rounds of the slower rank's. ``--split each`` (default) turns the medians into size
classes that interpolate linearly between neighbouring measured sizes (a reduction that fits
in cache runs several times faster than one that streams from memory, and MPI switches
protocols at several sizes: no single line describes either); ``--split 64K,256K`` fits one
least-squares line ``t = alpha + n * beta`` per class instead (what a cluster's smoother
network wants).

``--check ALGS`` also times those all-reduce algorithms through the Communicator in the same
rounds, then simulates them with the profile just measured and prints predicted beside
measured: calibration and measurement share the machine's state of the moment, which on a
shared machine drifts by tens of percent between runs a minute apart.

``--raw FILE.npz`` also keeps every round's time (the slower rank's) per operation and size,
as plain arrays named ``OP/SIZE`` (``np.load(..., allow_pickle=False)``): the spread behind
each median, to see which operations move together when a run misses.

Place the ranks as you want them measured: on one node this is the shared-memory path; with
``-ppn 1`` on two nodes, the network. On one node the profile also says
``transfers_need_cpu``: there the receiving process copies each message out while it is
inside MPI, so a transfer cannot overlap the receiver's reductions. Measured here at 2 ranks,
4-16 MiB: hier and tree, which pipeline 1 MiB segments up and down, take as long as ps,
which sends the whole vector up in one message, reduces it and sends it back (0.95-1.09 of
it over 26 runs): the segments hide none of the reductions.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import time
from typing import Any, Callable

import numpy as np

from mpipar.bench import calibrate_compute
from mpipar.bench.report import shuffled
from mpipar.comm import make_communicator
from mpipar.comm.algorithms import get_algorithm, host_algorithm_names
from mpipar.comm.algorithms.hier import node_of
from mpipar.comm.communicator import Communicator
from mpipar.comm.mpi_env import import_mpi, thread_level_name
from mpipar.comm.network import Link, Profile, SizeClass
from mpipar.comm.ops import SUM
from mpipar.comm.transport.base import recv, send, sendrecv
from mpipar.sim.compare import format_comparison, predicted_rows
from mpipar.sim.report import format_size, parse_size, parse_sizes
from mpipar.sim.run import simulate_collective


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="8:16M", help="sizes in bytes, a:b = powers of two (default 8:16M)")
    p.add_argument("--split", default="each",
                   help="'each' (default): classes interpolating between the measured sizes, "
                        "which follows a library's protocol switches and the caches; or "
                        "size-class boundaries, comma-separated (e.g. 64K,256K), one fitted line "
                        "each, the first taken as the eager limit")
    p.add_argument("--method", default="exchange", choices=("pingpong", "exchange"),
                   help="exchange (default): both ranks send and receive n bytes at once "
                        "(sendrecv), the step of every pairwise algorithm; pingpong: one-way "
                        "time of a message (half a round trip)")
    p.add_argument("--eager", default=None,
                   help="eager limit in bytes (default: the first --split boundary, or 64K)")
    p.add_argument("--repeats", type=int, default=40, help="timed rounds over all sizes (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--check", default="",
                   help="comma-separated all-reduce algorithms to time in the same rounds and "
                        "compare with their simulation on the new profile")
    p.add_argument("--check-min", default="64K", help="smallest size checked (default 64K)")
    p.add_argument("--check-json", default=None, metavar="FILE",
                   help="save the predicted-vs-measured rows as JSON")
    p.add_argument("--raw", default=None, metavar="FILE.npz",
                   help="also save every round's time (the slower rank's, seconds) per operation "
                        "and size, as plain arrays named OP/SIZE: to see a median's spread")
    p.add_argument("--name", default=None, help="profile name (default: the host name)")
    p.add_argument("--output", default=None,
                   help="where to write the JSON (default ./profile-<host>.json; with --compute, "
                        "the shipped local profile, whose other keys are kept)")
    calibrate_compute.add_arguments(p)


# -- the measured operations (each returns this rank's seconds for one call) ----------------

def _fresh_copy(bufs: dict, n: int) -> np.ndarray:
    """n bytes just written into a new array (untimed): what an algorithm sends is its work
    copy of the input, made moments before, so it is measured from warm caches too."""
    return bufs.setdefault(("x", n), np.ones(n, dtype=np.uint8)).copy()


def _landing(t: Any, n: int) -> np.ndarray:
    """The buffer n bytes are received into: taken from the transport's scratch pool, as
    the algorithms' receive buffers are (give it back after), so that it is as
    warm or as cold in the caches as theirs: memory that an algorithm at this size used
    moments ago, never new pages (whose first touch faults: up to 4x the message here)."""
    return t.scratch_pool.take(n)


def _exchange(t: Any, n: int, bufs: dict, posted: bool = False) -> float:
    """Ranks 0 and 1 swap n bytes, with one sendrecv each; with
    ``posted``, as irecv + isend + two waits instead (how tree-like algorithms and chunked
    rings talk: the difference is the bookkeeping of posting requests)."""
    out, into = _fresh_copy(bufs, n), _landing(t, n)
    peer = 1 - t.rank
    t0 = time.perf_counter()
    if posted:
        r = t.irecv(into, peer, 9)
        t.isend(out, peer, 9).wait()
        r.wait()
    else:
        sendrecv(t, out, peer, into, peer, 8)
    dt = time.perf_counter() - t0
    t.scratch_pool.give(into)
    return dt


def _pingpong(t: Any, n: int, bufs: dict, fresh: bool = False) -> float:
    """Half a round trip of n bytes, 0 -> 1 -> 0, through isend/irecv. With ``fresh``, each
    message is sent from a just-written copy (as algorithms send their work copy): the message of
    a tree or parameter server, with nothing coming the other way while it travels (the
    profile's one-way link); without, one reused buffer both ways (``--method pingpong``)."""
    peer = 1 - t.rank
    if fresh:
        out, into = _fresh_copy(bufs, n), _landing(t, n)
    else:
        out = into = bufs.setdefault(("pp", n), np.zeros(n, dtype=np.uint8))
    t0 = time.perf_counter()
    if t.rank == 0:
        send(t, out, peer, 11)
        recv(t, into, peer, 12)
    else:
        recv(t, into, peer, 11)
        send(t, out, peer, 12)
    dt = (time.perf_counter() - t0) / 2
    if fresh:
        t.scratch_pool.give(into)
    return dt


def _reduce(t: Any, n: int, bufs: dict) -> float:
    a, b = bufs.setdefault(("r", n), (np.ones(max(1, n // 4), np.float32), np.ones(max(1, n // 4), np.float32)))
    dst, src = a.copy(), b.copy()  # just written, as a received block and its target are
    t0 = time.perf_counter()
    SUM.combine(dst, src)
    return time.perf_counter() - t0


def _copy(t: Any, n: int, bufs: dict) -> float:
    x = bufs.setdefault(("c", n), np.ones(max(1, n // 4), dtype=np.float32))
    t0 = time.perf_counter()
    Communicator._work_copy(x)
    return time.perf_counter() - t0


def measure(t: Any, comm: Any, sizes: list[int], method: str, repeats: int, warmup: int,
            timed: dict[str, list[int]],
            rounds: dict[str, np.ndarray] | None = None) -> dict[str, dict[int, float]]:
    """Median (over rounds) of the slower of ranks 0 and 1 (every rank, for the all-reduce
    algorithms in ``timed``, at the sizes given there) per operation and size, in seconds:
    {"message"|"posted"|"oneway"|"reduce"|"copy"|alg: {n: s}}. Given ``rounds``, every
    round's time is also put there, under "OP/SIZE", in the order of the rounds."""
    ops: dict[str, Callable[[Any, int, dict], float]] = {
        "message": _pingpong if method == "pingpong" else _exchange,
        "posted": lambda t, n, bufs: _exchange(t, n, bufs, posted=True),
        "oneway": lambda t, n, bufs: _pingpong(t, n, bufs, fresh=True),
        "reduce": _reduce, "copy": _copy}
    bufs: dict = {}
    local: dict[str, dict[int, list[float]]] = {k: {n: [] for n in sizes} for k in ops}
    for alg, at in timed.items():
        local[alg] = {n: [] for n in at}
    inputs = {n: np.ones(max(1, n // 4), dtype=np.float32) for at in timed.values() for n in at}
    for i in range(warmup + repeats):
        for n in sizes:
            # The measured operations and the all-reduces in one order, new every round and
            # the same on every rank: whatever runs first at a size pays for the larger
            # sizes before it (caches refilled, pages given back to the kernel and faulted
            # in again: 2x an exchange here), so each must be first equally often.
            for name in shuffled(list(ops) + [alg for alg, at in timed.items() if n in at], i * 1_000_003 + n):
                t.barrier()
                if name in ops:  # between ranks 0 and 1; the others only wait
                    dt = ops[name](t, n, bufs) if t.rank <= 1 else 0.0
                else:
                    t0 = time.perf_counter()
                    comm.allreduce(inputs[n], algorithm=name)
                    dt = time.perf_counter() - t0
                if i >= warmup:
                    local[name][n].append(dt)
    out: dict[str, dict[int, float]] = {}
    for name, per_size in local.items():
        out[name] = {}
        for n, v in per_size.items():
            slowest = comm.allreduce(np.asarray(v, dtype=np.float64), op="max")
            out[name][n] = float(np.median(slowest))
            if rounds is not None:
                rounds[f"{name}/{n}"] = slowest
    return out


def _from_scratch() -> list[str]:
    """The all-reduce algorithms the simulator can run (every registered one but native)."""
    return [a for a in host_algorithm_names() if a != "native" and get_algorithm(a).supports("allreduce")]


# -- turning medians into size classes -----------------------------------------------------

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


def interpolating_classes(samples: dict[int, float]) -> list[Any]:
    """Size classes through the measured points: up to the smallest size its time; between
    two measured sizes the straight line joining them; beyond the largest, proportional to
    size (the time per byte of the largest measurement)."""
    pts = sorted(samples.items())
    classes = [SizeClass(pts[0][0], pts[0][1], 0.0)]
    for (n0, t0), (n1, t1) in zip(pts, pts[1:]):
        beta = (t1 - t0) / (n1 - n0)
        classes.append(SizeClass(n1, t0 - n0 * beta, beta))
    n_last, t_last = pts[-1]
    classes.append(SizeClass(None, 0.0, t_last / n_last))
    return classes


def fitted_classes(samples: dict[int, float], bounds: list[int]) -> list[Any]:
    """One least-squares line per class between ``bounds``; classes with no sample dropped."""
    sizes = sorted(samples)
    classes = []
    lo = 0
    for hi in bounds + [None]:
        members = [n for n in sizes if n > lo and (hi is None or n <= hi)]
        if members:
            a, b = fit_line(members, [samples[n] for n in members])
            classes.append(SizeClass(hi, a, b))
        if hi is not None:
            lo = hi
    classes[-1] = SizeClass(None, classes[-1].alpha, classes[-1].beta)  # the last is unbounded
    return classes


def _metadata(MPI: Any, method: str) -> dict[str, Any]:
    import mpi4py  # noqa: PLC0415

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    how = "sendrecv exchanges" if method == "exchange" else "ping-pongs"
    return {"source": f"measured by python -m mpipar.bench calibrate ({how} through the mpipar "
                      "MPI transport, op.combine and the input copy on both ranks at once; medians)",
            "host": platform.node(), "cpu": cpu, "method": method,
            "thread_level": thread_level_name(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "libraries": {"python": platform.python_version(), "numpy": np.__version__,
                          "mpi4py": mpi4py.__version__,
                          "mpi": MPI.Get_library_version().splitlines()[0].strip()}}


def split_bounds(split: str) -> list[int] | None:
    """``--split``: None for 'each', else the sorted class boundaries in bytes."""
    split = split.strip()
    if split == "each":
        return None
    return sorted(parse_size(s) for s in split.split(",") if s.strip())


def build_profile(name: str, measured: dict[str, dict[int, float]], split: str, eager: int,
                  meta: dict[str, Any]) -> Profile:
    bounds = split_bounds(split)
    if bounds is None:
        make = interpolating_classes
    else:
        def make(samples: dict[int, float]) -> list[Any]:
            return fitted_classes(samples, bounds)
    largest = max(measured["reduce"])
    # o: what posting two requests (irecv + isend, and their waits) costs beyond one
    # sendrecv, per request, from the sizes where the copy is small beside it
    small = [n for n in measured["posted"] if n <= 64 * 1024] or [min(measured["posted"])]
    post = max(0.0, statistics.median((measured["posted"][n] - measured["message"][n]) / 2 for n in small))
    kinds = [k for k in ("message", "posted", "oneway", "reduce", "copy") if k in measured]
    meta = dict(meta, samples={k: {str(n): v for n, v in measured[k].items()} for k in kinds})
    oneway = None
    if "oneway" in measured and meta.get("method", "exchange") == "exchange":
        # the simulator charges the sender's post overhead on top: take it out here (never
        # below half the measurement, where the overhead is most of a tiny message)
        oneway = Link(tuple(make({n: max(v - post, 0.5 * v) for n, v in measured["oneway"].items()})))
    return Profile(name, Link(tuple(make(measured["message"]))),
                   gamma=measured["reduce"][largest] / largest, copy=measured["copy"][largest] / largest,
                   reduce_link=Link(tuple(make(measured["reduce"]))),
                   copy_link=Link(tuple(make(measured["copy"]))),
                   oneway_link=oneway, post_overhead=post, eager_limit=eager, metadata=meta)


# Sizes at which each algorithm's fixed cost per call is measured: small enough that the
# messages are a few alpha, past the first sizes of a round (which pay for the round's
# larger operations before them) and below MPICH's 4-8 KiB protocol switch.
OVERHEAD_SIZES = (256, 512, 1024, 2048)


def call_overheads(measured: dict[str, dict[int, float]], p: int, profile: Any) -> dict[str, float]:
    """Per algorithm: the median over OVERHEAD_SIZES of measured minus simulated time (on
    ``profile``, which has no call overhead yet), at least 0. What the profile's messages,
    reductions and copy leave unexplained in a small all-reduce is the Communicator's and the
    algorithm's own Python: argument checks, choosing, building trees and sub-groups."""
    out = {}
    for alg, per_size in measured.items():
        gaps = [t - simulate_collective("allreduce", alg, p, n // 4, "float32", profile=profile, data=False).time
                for n, t in per_size.items() if n in OVERHEAD_SIZES]
        if gaps:
            out[alg] = max(0.0, float(statistics.median(gaps)))
    return out


def _compute_section(path: str) -> dict[str, Any] | None:
    """The "compute" section of the profile JSON at ``path`` (``--compute``'s), if any."""
    try:
        with open(path) as f:
            return json.load(f).get("compute")
    except (OSError, ValueError):
        return None


def same_node(t: Any) -> bool:
    """Whether ranks 0 and 1 share memory (MPI's ``COMM_TYPE_SHARED``, as hier finds its
    nodes): then MPI moves messages by copies the receiving process makes while inside MPI,
    and the profile says ``transfers_need_cpu``. Collective over the transport's communicator."""
    nodes = t.comm.allgather(node_of(t))
    return nodes[0] == nodes[1]


def main(args: argparse.Namespace, comm: Any = None) -> int:
    if getattr(args, "compute", False):
        return calibrate_compute.main(args)
    MPI = import_mpi()
    comm = comm or make_communicator()
    t = comm.transport
    if t.size < 2:
        print("calibrate needs two ranks: mpiexec -n 2 python -m mpipar.bench calibrate")
        return 2
    sizes = parse_sizes(args.sizes)
    split = str(args.split).strip()
    check = [a.strip() for a in args.check.split(",") if a.strip()]
    check_sizes = [n for n in sizes if n >= parse_size(args.check_min)]
    overhead_sizes = [n for n in sizes if n in OVERHEAD_SIZES]
    timed = {alg: list(overhead_sizes) for alg in _from_scratch()}
    for alg in check:
        timed[alg] = sorted(set(timed.get(alg, [])) | set(check_sizes))
    rounds: dict[str, np.ndarray] = {}
    measured = measure(t, comm, sizes, args.method, args.repeats, args.warmup, timed, rounds)
    shared = same_node(t)  # collective: before rank 0 goes on alone
    if t.rank != 0:
        return 0
    if args.raw:
        np.savez(args.raw, **rounds)
    bounds = split_bounds(split)
    if args.eager is not None:
        eager = parse_size(args.eager)
    elif bounds is None:
        eager = 64 * 1024
    else:
        eager = bounds[0]
    meta = _metadata(MPI, args.method)
    prof = build_profile(args.name or meta["host"], measured, split, eager, meta)
    prof.transfers_need_cpu = shared
    prof.call_overhead = call_overheads({alg: measured[alg] for alg in timed}, t.size, prof)
    out = args.output or f"profile-{meta['host']}.json"
    kept = _compute_section(out)
    prof.save(out)
    if kept is not None:              # a compute section measured before stays with the profile
        calibrate_compute.write_section(out, kept)
    what = "exchange" if args.method == "exchange" else "pingpong"
    print(f"# calibrate: {meta['host']}, {meta['libraries']['mpi']}, thread level {meta['thread_level']}, "
          f"medians of {args.repeats} rounds")
    print(f"#{'size(B)':>11} {what + '(us)':>13} {'posted(us)':>11} {'one-way(us)':>12} {'reduce(us)':>11} "
          f"{'copy(us)':>9}")
    for n in sizes:
        print(f"{n:12d} {measured['message'][n] * 1e6:13.2f} {measured['posted'][n] * 1e6:11.2f} "
              f"{measured['oneway'][n] * 1e6:12.2f} {measured['reduce'][n] * 1e6:11.2f} "
              f"{measured['copy'][n] * 1e6:9.2f}")
    print(f"# post overhead (irecv/isend beyond sendrecv, per request) {prof.post_overhead * 1e6:.2f} us")
    print("# call overhead per all-reduce (measured minus simulated, median over "
          f"{'/'.join(format_size(n) for n in OVERHEAD_SIZES)}): "
          + ", ".join(f"{a} {v * 1e6:.1f} us" for a, v in prof.call_overhead.items()))
    print(f"# saved {out}")
    if check:
        rows = predicted_rows({alg: {n: v for n, v in measured[alg].items() if n in check_sizes}
                               for alg in check}, t.size, prof)
        print(f"# all-reduce through the Communicator, measured in the same rounds, beside its "
              f"simulation on this profile ({t.size} ranks, float32)")
        print(format_comparison(rows))
        if args.check_json:
            with open(args.check_json, "w") as f:
                json.dump({"profile": prof.to_json(), "rows": rows}, f, indent=1)
            print(f"# saved {args.check_json}")
    return 0
