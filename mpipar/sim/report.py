"""Tables of collective timings in the nccl-tests format, shared by ``sim collectives`` (predicted)
and ``bench collectives`` (measured), so the two print identical columns; and the message
sizes both read and print (``4K:64M``). Here, in ``sim``, because ``sim`` is the lower of the
two layers that use them (``bench`` imports ``sim``, never the other way round).

Columns, as nccl-tests' PERFORMANCE.md defines them:

* ``size(B)``: bytes of the whole collective buffer (allgather: the output; reduce_scatter:
  the input), ``count`` its elements, ``type`` the dtype;
* ``time(us)``: one collective;
* ``algbw(GB/s)`` = size / time;
* ``busbw(GB/s)`` = algbw * factor, the factor making busbw comparable with the hardware's
  peak link bandwidth whatever the collective and the rank count: allreduce 2(p-1)/p,
  reduce_scatter and allgather (p-1)/p, broadcast and reduce 1, alltoall (p-1)/p.

GB are 1e9 bytes, as in nccl-tests.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30}


def busbw_factor(collective: str, p: int) -> float:
    """nccl-tests' bus-bandwidth factor for ``collective`` over ``p`` ranks."""
    if collective == "allreduce":
        return 2.0 * (p - 1) / p
    if collective in ("reduce_scatter", "allgather", "alltoall"):
        return (p - 1) / p
    if collective in ("broadcast", "reduce"):
        return 1.0
    raise ValueError(f"no bus-bandwidth factor for {collective!r}")


def parse_size(text: str) -> int:
    """'4K' -> 4096, '64M' -> 67108864, '123' -> 123 (binary units, as nccl-tests)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise ValueError(f"cannot read size {text!r} (examples: 1024, 4K, 64M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_sizes(text: str) -> list[int]:
    """'4K:64M' -> powers of two from 4K to 64M; '4K,1M,8M' -> those; '1M' -> [1M].
    The ends of a range are kept even when they are not powers of two."""
    if ":" in text:
        lo_s, hi_s = text.split(":", 1)
        lo, hi = parse_size(lo_s), parse_size(hi_s)
        if lo <= 0 or hi < lo:
            raise ValueError(f"size range {text!r} must go up from a positive size")
        out, s = [lo], 1 << lo.bit_length()  # the next power of two above lo
        if lo & (lo - 1) == 0:
            s = lo * 2
        while s < hi:
            out.append(s)
            s *= 2
        if hi != lo:
            out.append(hi)
        return out
    return [parse_size(s) for s in text.split(",") if s.strip()]


def format_size(nbytes: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


def row(collective: str, p: int, nbytes: int, count: int, dtype: str, seconds: float, **extra: Any) -> dict[str, Any]:
    """One table row with algbw and busbw derived from ``seconds``."""
    algbw = nbytes / seconds / 1e9 if seconds > 0 else float("inf")
    return {"size": nbytes, "count": count, "type": str(dtype), "time_us": seconds * 1e6,
            "algbw": algbw, "busbw": algbw * busbw_factor(collective, p), **extra}


HEADER = ("size(B)", "count", "type", "time(us)", "algbw(GB/s)", "busbw(GB/s)")
WIDTHS = (12, 12, 8, 12, 12, 12)


def format_table(rows: Iterable[dict[str, Any]], title: str | None = None,
                 extra_columns: Sequence[tuple[str, str, int]] = ()) -> str:
    """nccl-tests-style fixed-width table. ``extra_columns``: (header, key, width) appended,
    e.g. ``("algorithm", "algorithm", 10)`` or a baseline's time."""
    lines = []
    if title:
        lines.append(f"# {title}")
    head = [h.rjust(w) for h, w in zip(HEADER, WIDTHS)] + [h.rjust(w) for h, _, w in extra_columns]
    lines.append("#" + " ".join(head)[1:])
    for r in rows:
        cells = [str(r["size"]).rjust(WIDTHS[0]), str(r["count"]).rjust(WIDTHS[1]),
                 str(r["type"]).rjust(WIDTHS[2]), f"{r['time_us']:.2f}".rjust(WIDTHS[3]),
                 f"{r['algbw']:.2f}".rjust(WIDTHS[4]), f"{r['busbw']:.2f}".rjust(WIDTHS[5])]
        for _, key, w in extra_columns:
            v = r.get(key, "")
            cells.append((f"{v:.2f}" if isinstance(v, float) else str(v)).rjust(w))
        lines.append(" ".join(cells))
    return "\n".join(lines)
