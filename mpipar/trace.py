"""Timelines as Chrome / Perfetto traces: the one Trace Event Format writer, and the span
recorder the training code reports to.

    write_trace("step.json", ranks)          # open in https://ui.perfetto.dev

**The format** is the Trace Event Format's JSON object form: complete events (``"ph": "X"``,
``ts`` and ``dur`` in microseconds), one process per rank (metadata names it ``rank r (dp
d, tp t, pp p)``) and in it one thread per track: ``main`` (the rank's main thread: compute,
pipeline messages, blocking collectives) and ``comm`` (its communication thread, where the
data-parallel buckets run; in the simulator, the rank's communication stream). A simulated
step (virtual time, ``sim/train.py``) and a real one (wall time, ``python -m mpipar.train
--trace``) are written by the same ``chrome_trace``, so the two open side by side.

**Recording.** The layers report what they do to ``recorder()``: the pipeline executor its
forwards, backwards, sends and receive waits, the Communicator each collective it runs (on
the thread that runs it), the gradient sync its waits for buckets, the trainer its clipping,
optimiser step and evaluation. By default that is ``Recorder()``, whose methods do nothing
(and whose ``now()`` reads no clock), so a run that is not traced pays a method call per
report (measured in docs/training.md, "Traces and plots"). ``install(SpanRecorder())`` turns
recording on for this process: ``add`` then keeps a ``Span`` per report, on track ``main``
when the main thread reports it and ``comm`` otherwise, up to ``limit`` spans (memory is
bounded: later ones are counted in ``dropped``, not kept).

**Clocks.** A recorder's times are ``time.perf_counter()``, the clock ``Transport.clock``
reads under MPI. ``gather_timelines`` (collective over a Communicator, at the end of a traced
window) measures each rank's clock against rank 0's by Cristian's method: rank 0 sends its
time, the rank answers with its own, and of ``rounds`` round trips the one with the least
round-trip time ``rtt`` gives the offset, exact to within ``rtt / 2`` (both clocks advance
at the same rate over the trip). Every rank's spans are shifted by their offset before they
are written, and the trace's ``otherData`` keeps each offset and its bound.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

TRACKS = ("main", "comm")
# the tags of gather_timelines' messages (on the world's user transport, between steps)
_TAG_CLOCK = 30001


@dataclass
class Span:
    """One interval of a rank's timeline (a trace event): ``t0``, ``t1`` in seconds."""

    track: str                    # "main" or "comm"
    name: str
    t0: float
    t1: float
    args: dict = field(default_factory=dict)
    cat: str = ""                 # the event's category ("" : the name's first word)


class RankTimeline(Protocol):
    rank: int
    coords: tuple[int, int, int]  # (dp_rank, tp_rank, pp_rank)
    spans: Sequence[Span]


@dataclass
class Timeline:
    """A rank's spans (satisfies RankTimeline): what ``gather_timelines`` returns."""

    rank: int
    coords: tuple[int, int, int]
    spans: list[Span]


# ---------------------------------------------------------------------------- the writer
def chrome_trace(ranks: Iterable[RankTimeline], other: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Trace Event Format object of ``ranks``: span times (seconds) become microseconds
    on one axis (whatever the spans' common origin is); ``other`` goes to ``otherData``."""
    events: list[dict[str, Any]] = []
    for r in ranks:
        dp, tp, pp = r.coords
        events.append({"ph": "M", "name": "process_name", "pid": r.rank, "tid": 0,
                       "args": {"name": f"rank {r.rank} (dp {dp}, tp {tp}, pp {pp})"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": r.rank, "tid": 0,
                       "args": {"sort_index": r.rank}})
        for tid, track in enumerate(TRACKS):
            events.append({"ph": "M", "name": "thread_name", "pid": r.rank, "tid": tid,
                           "args": {"name": track}})
        for s in r.spans:
            # both ends rounded to the nanosecond, the duration their difference: a span
            # that starts where another ends (clip, then optimizer) meets it exactly, where
            # rounding ts and dur apart could make them overlap by a nanosecond
            ts, end = round(s.t0 * 1e6, 3), round(s.t1 * 1e6, 3)
            events.append({"ph": "X", "name": s.name, "cat": s.cat or s.name.split(" ")[0],
                           "pid": r.rank, "tid": TRACKS.index(s.track),
                           "ts": ts, "dur": round(max(end - ts, 0.0), 3),
                           "args": dict(s.args)})
    out: dict[str, Any] = {"traceEvents": events, "displayTimeUnit": "ms"}
    if other:
        out["otherData"] = other
    return out


def write_trace(path: str | Path, ranks: Iterable[RankTimeline], other: dict[str, Any] | None = None) -> None:
    """Write ``chrome_trace(ranks, other)`` to ``path`` as JSON."""
    Path(path).write_text(json.dumps(chrome_trace(ranks, other)) + "\n")


# ---------------------------------------------------------------------------- recording
def span_name(kind: str, args: dict[str, Any]) -> str:
    """The event name of a report: ``forward mb2 s1`` (micro-batch 2, pipeline stage 1),
    ``dp allreduce`` (the group's name first), ``step 5``."""
    name = f"{args['group']} {kind}" if args.get("group") else kind
    if "step" in args:
        name += f" {args['step']}"
    if "mb" in args:
        name += f" mb{args['mb']}"
    if "stage" in args:
        name += f" s{args['stage']}"
    return name


class Recorder:
    """Records nothing: the recorder in place while no trace is being taken. Subclasses
    keep what they are given; the layers call ``now`` and ``add`` alike on either."""

    def now(self) -> float:
        """The recording clock (0.0 here: no clock is read when nothing is recorded)."""
        return 0.0

    def add(self, kind: str, t0: float, t1: float, cat: str = "", **args: Any) -> None:
        """An interval ``[t0, t1]`` of the calling thread: ``kind`` (``forward``,
        ``allreduce``, ...; the name is ``span_name(kind, args)``), its category and its
        arguments (micro-batch, stage, peer, bytes, algorithm, group size ...)."""


class SpanRecorder(Recorder):
    """Keeps every report as a Span of this process, at most ``limit`` of them."""

    def __init__(self, limit: int = 200_000) -> None:
        self.spans: list[Span] = []
        self.limit = int(limit)
        self.dropped = 0
        self._main = threading.main_thread()

    def now(self) -> float:
        return time.perf_counter()

    def add(self, kind: str, t0: float, t1: float, cat: str = "", **args: Any) -> None:
        if len(self.spans) >= self.limit:
            self.dropped += 1
            return
        track = "main" if threading.current_thread() is self._main else "comm"
        self.spans.append(Span(track, span_name(kind, args), t0, t1, args, cat))


_NOTHING = Recorder()
_current: Recorder = _NOTHING


def recorder() -> Recorder:
    """The recorder the layers report to now (``Recorder()``, recording nothing, unless a
    trace is being taken)."""
    return _current


def install(rec: Recorder | None) -> Recorder:
    """Make ``rec`` (None: nothing) the process's recorder; returns the one it replaces."""
    global _current
    before, _current = _current, (rec if rec is not None else _NOTHING)
    return before


# ---------------------------------------------------------------------------- many ranks
def measure_clock_offsets(comm: Any, rounds: int = 16) -> tuple[float, float]:
    """Collective over ``comm`` (a Communicator): this rank's clock minus rank 0's, and the
    round-trip time of the best of ``rounds`` exchanges (the offset is within rtt / 2).
    Rank 0 gets (0.0, 0.0)."""
    best = (0.0, 0.0)
    if comm.size == 1:
        return best
    out = np.zeros(1)
    if comm.rank == 0:
        result = np.zeros(2)
        for r in range(1, comm.size):
            least = (np.inf, 0.0)
            for _ in range(rounds):
                a = time.perf_counter()
                comm.send(np.array([a]), r, _TAG_CLOCK)
                comm.recv(r, _TAG_CLOCK, out=out)
                b = time.perf_counter()
                least = min(least, (b - a, float(out[0]) - (a + b) / 2))
            result[:] = least[1], least[0]
            comm.send(result, r, _TAG_CLOCK)
        return best
    for _ in range(rounds):
        comm.recv(0, _TAG_CLOCK, out=out)
        comm.send(np.array([time.perf_counter()]), 0, _TAG_CLOCK)
    result = comm.recv(0, _TAG_CLOCK, shape=(2,), dtype="float64")
    return float(result[0]), float(result[1])


def gather_timelines(comm: Any, rank: int, coords: tuple[int, int, int], spans: Sequence[Span],
                     dropped: int = 0) -> tuple[list[Timeline], dict[str, Any]] | None:
    """Collective over ``comm``: every rank's spans on rank 0, shifted onto rank 0's clock
    (``measure_clock_offsets``), with the clocks' offsets and bounds; None on other ranks.

    The timelines travel as JSON text over ``comm`` (``Communicator.allgather_json``, no
    pickle), so no file system is shared between ranks and only rank 0 writes."""
    offset, rtt = measure_clock_offsets(comm)
    mine = {"rank": rank, "coords": list(coords), "offset_s": offset, "rtt_s": rtt, "dropped": dropped,
            "spans": [[s.track, s.name, s.t0 - offset, s.t1 - offset, s.args, s.cat] for s in spans]}
    parts = comm.allgather_json(mine)
    if comm.rank != 0:
        return None
    timelines = [Timeline(p["rank"], tuple(p["coords"]), [Span(*s) for s in p["spans"]])
                 for p in sorted(parts, key=lambda p: p["rank"])]
    origin = min((s.t0 for t in timelines for s in t.spans), default=0.0)
    for t in timelines:
        for s in t.spans:
            s.t0 -= origin
            s.t1 -= origin
    clock = {"source": "time.perf_counter, shifted onto rank 0's clock (Cristian's method)",
             "offset_us": {p["rank"]: p["offset_s"] * 1e6 for p in parts},
             "bound_us": {p["rank"]: p["rtt_s"] / 2 * 1e6 for p in parts}}
    return timelines, {"clock": clock, "dropped": {p["rank"]: p["dropped"] for p in parts}}
