"""Recursive halving and doubling (Rabenseifner's all-reduce), with recursive doubling of the
whole vector for small messages.

Large messages: a reduce-scatter by recursive halving (at step k, partners 2^(log p - k) apart
swap halves of what they still hold and each reduces the half it keeps), then an all-gather by
recursive doubling (partners 1, 2, 4 ... apart swap everything they hold)::

      p = 4   halving (reduce)              doubling (gather)
      step 1: 0<->2  1<->3  (halves)        step 1: 0<->1  2<->3  (quarters)
      step 2: 0<->1  2<->3  (quarters)      step 2: 0<->2  1<->3  (halves)

Each block is reduced by exactly one rank and then copied, so all ranks agree bit for bit.
Small messages (below ``small_bytes``): recursive doubling of the whole vector, log p steps,
the latency-optimal form; every pair combines ``lower-rank side (op) higher-rank side``, so
both partners compute the same bits whatever the op's treatment of ties (-0.0 vs 0.0).

World sizes that are not a power of two (p = 2^k + rem): the first 2*rem ranks pair up; the
even one of each pair sends its vector to the odd one and sits out, the 2^k remaining ranks
run the power-of-two algorithm, and the odd ones hand the result back at the end (Thakur,
Rabenseifner and Gropp, "Optimization of collective communication operations in MPICH",
IJHPCA 19(1), 2005, section 4).

Cost (p = 2^k ranks, n bytes; alpha latency, beta per byte moved, gamma per byte reduced)::

    allreduce, halving-doubling   2 log p alpha + 2((p-1)/p) n beta + ((p-1)/p) n gamma
    allreduce, doubling (small)     log p alpha +     log p  n beta +     log p  n gamma
    reduce_scatter                  log p alpha +  ((p-1)/p) n beta + ((p-1)/p) n gamma
    allgather                       log p alpha +  ((p-1)/p) n beta

plus, for non-powers of two, 2 alpha + 2 n beta + n gamma (fold and unfold; the all-gather
fold moves only the folded rank's block).
"""

from __future__ import annotations

from typing import Any

from mpipar.comm.algorithms import Algorithm
from mpipar.comm.algorithms._util import array_module, give_scratch, offsets, split_offsets, take_scratch
from mpipar.comm.transport.base import Transport, sendrecv

TAG = 0x48  # 'H'
SMALL_BYTES = 32 * 1024


class _Layout:
    """Power-of-two core of a world of ``p``: ``pof2`` ranks; ``nr`` this rank's place in it
    (None: folded away); ``real(i)`` the rank playing place i."""

    __slots__ = ("p", "r", "pof2", "rem", "nr")

    def __init__(self, p: int, r: int) -> None:
        self.p, self.r = p, r
        self.pof2 = 1 << (p.bit_length() - 1)
        self.rem = p - self.pof2
        if r < 2 * self.rem:
            self.nr = r // 2 if r % 2 else None
        else:
            self.nr = r - self.rem

    def real(self, i: int) -> int:
        return 2 * i + 1 if i < self.rem else i + self.rem


def _exchange(t: Transport, send: Any, peer: int, recv: Any) -> None:
    if send.size or recv.size:
        sendrecv(t, send, peer, recv, peer, TAG)


def _halving(t: Transport, L: _Layout, buf: Any, op: Any, soff: Any, scratch: Any) -> None:
    """Recursive halving over the pof2 super-blocks ``soff``: place nr ends with block nr."""
    blo, bhi, mask = 0, L.pof2, L.pof2 >> 1
    while mask:
        mid = blo + mask
        peer = L.real(L.nr ^ mask)
        if L.nr & mask:
            keep, give, blo = (soff[mid], soff[bhi]), (soff[blo], soff[mid]), mid
        else:
            keep, give, bhi = (soff[blo], soff[mid]), (soff[mid], soff[bhi]), mid
        tmp = scratch[:keep[1] - keep[0]]
        _exchange(t, buf[give[0]:give[1]], peer, tmp)
        if tmp.size:
            t.reduce_local(op, buf[keep[0]:keep[1]], tmp)
        mask >>= 1


def _doubling_gather(t: Transport, L: _Layout, buf: Any, soff: Any) -> None:
    """Recursive doubling all-gather over the pof2 super-blocks: place nr starts with block nr."""
    mask = 1
    while mask < L.pof2:
        lo = L.nr & ~(mask - 1)
        plo = lo ^ mask
        _exchange(t, buf[soff[lo]:soff[lo + mask]], L.real(L.nr ^ mask), buf[soff[plo]:soff[plo + mask]])
        mask <<= 1


def _doubling_reduce(t: Transport, L: _Layout, buf: Any, op: Any, other: Any) -> Any:
    """Recursive doubling of the whole vector; returns the array holding the result."""
    mask = 1
    while mask < L.pof2:
        pnr = L.nr ^ mask
        sendrecv(t, buf, L.real(pnr), other, L.real(pnr), TAG)
        if L.nr < pnr:
            t.reduce_local(op, buf, other)  # mine is the lower side: buf = buf op other
        else:
            t.reduce_local(op, other, buf)  # theirs is lower: other = other op buf
            buf, other = other, buf
        mask <<= 1
    return buf


def allreduce(t: Transport, buf: Any, op: Any, small_bytes: int = SMALL_BYTES) -> Any:
    p, r = t.size, t.rank
    if p == 1 or buf.size == 0:
        return buf
    L = _Layout(p, r)
    xp = array_module(buf)
    if r < 2 * L.rem:  # fold: even ranks give their vector to the odd partner
        if L.nr is None:
            t.isend(buf, r + 1, TAG).wait()
            t.irecv(buf, r + 1, TAG).wait()
            return buf
        other = xp.empty_like(buf)
        t.irecv(other, r - 1, TAG).wait()
        t.reduce_local(op, other, buf)  # rank r-1's data first: lower op higher
        buf, other = other, buf
    else:
        other = None
    if buf.nbytes < small_bytes or buf.size < L.pof2:
        buf = _doubling_reduce(t, L, buf, op, other if other is not None else xp.empty_like(buf))
    else:
        soff = split_offsets(buf.size, L.pof2)  # shared by all ranks (cached)
        half = soff[L.pof2 >> 1]
        scratch = other if other is not None else take_scratch(t, buf, max(half, buf.size - half))
        _halving(t, L, buf, op, soff, scratch)
        if other is None:
            give_scratch(t, scratch)
        _doubling_gather(t, L, buf, soff)
    if r < 2 * L.rem:  # unfold: hand the result back
        t.isend(buf, r - 1, TAG).wait()
    return buf


class _SuperOffsets:
    """Offsets of the pof2 super-blocks: place i < rem covers blocks 2i and 2i+1. Computed on
    demand (a rank reads O(log p) of them, so no per-rank O(p) table)."""

    __slots__ = ("off", "rem")

    def __init__(self, off: list[int], rem: int) -> None:
        self.off, self.rem = off, rem

    def __getitem__(self, i: int) -> int:
        return self.off[2 * i] if i <= self.rem else self.off[i + self.rem]


def _super_offsets(L: _Layout, off: list[int]) -> _SuperOffsets:
    return _SuperOffsets(off, L.rem)


def reduce_scatter(t: Transport, buf: Any, op: Any, counts: list[int], small_bytes: int = SMALL_BYTES) -> Any:
    p, r = t.size, t.rank
    off = offsets(counts)
    mine = buf[off[r]:off[r + 1]]
    if p == 1 or buf.size == 0:
        return mine
    L = _Layout(p, r)
    if r < 2 * L.rem:
        if L.nr is None:  # folded: give everything, get my block back
            t.isend(buf, r + 1, TAG).wait()
            t.irecv(mine, r + 1, TAG).wait()
            return mine
        other = array_module(buf).empty_like(buf)
        t.irecv(other, r - 1, TAG).wait()
        t.reduce_local(op, other, buf)
        buf, scratch = other, buf
    else:
        scratch = take_scratch(t, buf, buf.size)
    soff = _super_offsets(L, off)
    _halving(t, L, buf, op, soff, scratch)
    if scratch is not buf:
        give_scratch(t, scratch)
    if r < 2 * L.rem:
        t.isend(buf[off[r - 1]:off[r]], r - 1, TAG).wait()
    return buf[off[r]:off[r + 1]]


def allgather(t: Transport, block: Any, counts: list[int], small_bytes: int = SMALL_BYTES) -> Any:
    p, r = t.size, t.rank
    off = offsets(counts)
    full = array_module(block).empty(off[-1], dtype=block.dtype)
    full[off[r]:off[r + 1]] = block
    if p == 1 or off[-1] == 0:
        return full
    L = _Layout(p, r)
    if r < 2 * L.rem:
        if L.nr is None:
            if block.size:
                t.isend(full[off[r]:off[r + 1]], r + 1, TAG).wait()
            t.irecv(full, r + 1, TAG).wait()
            return full
        if counts[r - 1]:
            t.irecv(full[off[r - 1]:off[r]], r - 1, TAG).wait()
    _doubling_gather(t, L, full, _super_offsets(L, off))
    if r < 2 * L.rem:
        t.isend(full, r - 1, TAG).wait()
    return full


ALGORITHM = Algorithm("rhd", allreduce=allreduce, reduce_scatter=reduce_scatter, allgather=allgather)
