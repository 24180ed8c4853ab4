"""A step's timeline as a Chrome / Perfetto trace: one process per rank, one thread per track.

    write_trace("step.json", prediction.ranks)     # open in https://ui.perfetto.dev

The format is the Trace Event Format's JSON object form (complete events, ``"ph": "X"``, with
``ts`` and ``dur`` in microseconds; metadata events name each process ``rank r (dp, tp, pp)``
and each thread ``main`` or ``comm``, the rank's communication stream). The same spans come
from a simulated step (virtual time) and from a real one (wall time), so the two open side by
side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

TRACKS = ("main", "comm")


class SpanLike(Protocol):
    track: str
    name: str
    t0: float
    t1: float
    args: dict


class RankTimeline(Protocol):
    rank: int
    coords: tuple[int, int, int]
    spans: Sequence[SpanLike]


def chrome_trace(ranks: Iterable[RankTimeline]) -> dict[str, Any]:
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
            events.append({"ph": "X", "name": s.name, "cat": s.name.split(" ")[0],
                           "pid": r.rank, "tid": TRACKS.index(s.track),
                           "ts": s.t0 * 1e6, "dur": max(s.t1 - s.t0, 0.0) * 1e6,
                           "args": dict(s.args)})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(path: str | Path, ranks: Iterable[RankTimeline]) -> None:
    Path(path).write_text(json.dumps(chrome_trace(ranks)) + "\n")
