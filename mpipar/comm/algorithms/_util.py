"""Small helpers shared by the from-scratch algorithms: block sizes, offsets, segments.

Nothing here talks to other ranks; everything is a pure function of its arguments, so the
same code runs under MPI and inside the simulator (thousands of virtual ranks in one process).
"""

from __future__ import annotations

import functools
import inspect
from itertools import accumulate
from typing import Any, Callable

import numpy as np

from mpipar.backend import array_module
from mpipar.comm.transport.base import Transport

__all__ = ["array_module", "split_counts", "offsets", "split_offsets", "segments",
           "segment_table", "seg_elems", "accepted", "take_scratch", "give_scratch"]


def split_counts(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` nearly equal blocks of ``n`` (larger first, as numpy.array_split)."""
    q, r = divmod(n, parts)
    return [q + 1 if i < r else q for i in range(parts)]


def offsets(counts: list[int]) -> list[int]:
    """Start of each block, plus the total at the end (``len(counts) + 1`` entries)."""
    return list(accumulate(counts, initial=0))


@functools.lru_cache(maxsize=256)
def split_offsets(n: int, parts: int) -> tuple[int, ...]:
    """``offsets(split_counts(n, parts))`` as a tuple, built once per (n, parts) and shared.

    Every rank of a collective needs the same table; the simulator runs thousands of ranks in
    one process, where rebuilding it per rank would cost O(p^2). Block i starts at
    ``i * q + min(i, r)`` (q, r = divmod(n, parts)).
    """
    q, r = divmod(n, parts)
    return tuple(i * q + (i if i < r else r) for i in range(parts + 1))


def seg_elems(nbytes: int, itemsize: int) -> int:
    """Elements per segment for a segment size in bytes (at least one element)."""
    return max(1, int(nbytes) // itemsize)


def segments(lo: int, hi: int, seg: int) -> list[tuple[int, int]]:
    """[lo, hi) cut into pieces of at most ``seg`` elements, as evenly as possible (an empty
    range gives no pieces). Sender and receiver compute the same cuts from the same range."""
    n = hi - lo
    if n <= 0:
        return []
    k = -(-n // seg)
    q, r = divmod(n, k)
    out, a = [], lo
    for i in range(k):
        b = a + q + (1 if i < r else 0)
        out.append((a, b))
        a = b
    return out


@functools.lru_cache(maxsize=256)
def segment_table(lo: int, hi: int, seg: int) -> tuple[tuple[int, int], ...]:
    """``segments(lo, hi, seg)`` as a tuple, built once per range and shared (read-only): every
    rank of a tree cuts the same range, thousands of times over in the simulator."""
    return tuple(segments(lo, hi, seg))


def take_scratch(t: Transport, like: Any, n: int) -> Any:
    """``n`` elements of ``like``'s dtype and array module for one call's own use (received
    blocks waiting to be reduced): from the transport's ``scratch_pool`` when it has one and
    the array is on the host, so that its pages were touched by an earlier call (see
    transport/pool.py), else newly allocated (CuPy has its own pool; the simulator keeps no
    memory between calls). Never return it to the caller: hand it to ``give_scratch``
    once no request uses it."""
    pool = getattr(t, "scratch_pool", None)
    if pool is None or not isinstance(like, np.ndarray):
        return array_module(like).empty(n, dtype=like.dtype)
    return pool.take(n * like.itemsize).view(like.dtype)


def give_scratch(t: Transport, buf: Any) -> None:
    """Return ``take_scratch``'s buffer to the transport's pool (nothing without one)."""
    pool = getattr(t, "scratch_pool", None)
    if pool is not None and isinstance(buf, np.ndarray):
        pool.give(buf)


@functools.lru_cache(maxsize=None)
def _keywords(fn: Callable) -> frozenset[str] | None:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(params)


def accepted(fn: Callable, options: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``options`` that ``fn`` declares (all of them if it takes **kwargs)."""
    if not options:
        return {}
    names = _keywords(fn)
    return dict(options) if names is None else {k: v for k, v in options.items() if k in names}
