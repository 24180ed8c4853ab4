"""Ring all-reduce: reduce-scatter then all-gather around a ring, chunked so it pipelines.

The vector is cut into p blocks. In the reduce-scatter, at hop k (k = 0 .. p-2) rank r sends
block (r-k-1) mod p to its right neighbour and receives block (r-k-2) mod p from its left,
reducing it into its own copy; after p-1 hops rank r holds block r fully reduced (the contract
of ``reduce_scatter``). The all-gather then passes the finished blocks on around the same ring
for p-1 more hops, each copied, never reduced again::

      p = 4, reduce-scatter hop 0            all-gather hop 0
      r0 --b3--> r1 --b0--> r2 --b1--> r3     r0 --b0--> r1 --b1--> r2 --b2--> r3
      ^                                |     ^                                |
      +---------------b2---------------+     +---------------b3---------------+

Every block is reduced by exactly one rank in a fixed order (its p contributions folded in
ring order) and then copied, so all ranks hold the same bits, run after run.

Each block is cut into chunks of at most ``chunk_bytes``; a chunk is forwarded as soon as it
has been reduced (or received, in the all-gather), and the receive of the next chunk is posted
before the current one is reduced, so reduction overlaps transfer and a large block does not
wait for its whole self at every hop. With one chunk per block the hops use ``sendrecv`` (one
MPI call each) instead. By default (``chunk_bytes=None``) chunks are 1 MiB for p > 2 and
blocks are not cut at p = 2, where each phase is a single hop with nothing to pipeline.

Cost (p ranks, n bytes; alpha latency, beta per byte moved, gamma per byte reduced)::

    allreduce       2(p-1) alpha + 2((p-1)/p) n beta + ((p-1)/p) n gamma
    reduce_scatter   (p-1) alpha +  ((p-1)/p) n beta + ((p-1)/p) n gamma
    allgather        (p-1) alpha +  ((p-1)/p) n beta
    broadcast       (p-1+c-1) alpha + ((p-1+c-1)/c) n beta      (chain of c chunks)

Bandwidth-optimal for all-reduce (Patarasuk and Yuan, "Bandwidth optimal all-reduce
algorithms for clusters of workstations", JPDC 2009); latency grows linearly in p.

Channels (``channels=k``, NCCL's rings): the buffer is split over k rings that run at once,
each block r cut into k sub-blocks, ring c carrying sub-block c of every block. Ring c visits
the nodes in order and, inside each node, the local ranks rotated by c (c, c+1, ... mod m,
for m ``ranks_per_node``, the option or the transport's; one node otherwise), so ring c
leaves every node from local rank c-1 and enters the next at local rank c: on a node with a
NIC per rank (a DGX's rails) the k rings' inter-node hops use k different NICs, where one
ring drives one NIC per node. Hops run in lockstep over the channels (every ring's hop h is
posted before any is waited for); each rank's result is the same as with one ring (every
sub-block folded in its ring's order), so MPI and the simulator check it alike::

      2 nodes x 4, ring c = 1:  r1 r2 r3 r0 | r5 r6 r7 r4 | (back to r1)
                                       r0 ----> r5   (leaves on NIC 0, enters on NIC 1)
"""

from __future__ import annotations

import functools
from collections import deque
from itertools import chain
from typing import Any, Callable, Iterator, Sequence

from mpipar.comm.algorithms import Algorithm
from mpipar.comm.algorithms._util import (array_module, give_scratch, offsets, seg_elems, segment_table,
                                          segments, split_offsets, take_scratch)
from mpipar.comm.transport.base import Transport, sendrecv

TAG = 0x52  # 'R'
CHUNK_BYTES = 1 << 20  # default chunk for p > 2; p = 2 has one hop per phase: no chunks
WINDOW = 2  # receives in flight per ring (scratch slots)


def _sendrecv_of(t: Transport) -> Callable[..., Any]:
    """The transport's own ``sendrecv`` bound once (the hop loop calls it 2(p-1) times), or the
    generic irecv/isend/wait form."""
    own = getattr(t, "sendrecv", None)
    if own is not None:
        return own
    return lambda sbuf, dest, rbuf, source, tag: sendrecv(t, sbuf, dest, rbuf, source, tag)


def _below(p: int, b: int) -> Iterator[int]:
    """The p-1 other blocks, going down from b-1 around the ring: b-1, b-2 ... 0, p-1 ... b+1."""
    return chain(range(b - 1, -1, -1), range(p - 1, b, -1))


def _recv_chunks(p: int, r: int, off: Sequence[int], rs: bool, ag: bool,
                 seg: int) -> Iterator[tuple[int, int, bool, bool]]:
    """Every chunk this rank receives, in hop order: (lo, hi, reduce?, forward?). Generated as
    the pipeline goes, so a rank holds O(window) of them, not 2(p-1) hops' worth."""
    hops = (p - 1) * (int(rs) + int(ag))
    h = 0
    for red, first in ((True, (r - 1) % p), (False, r)):
        if not (rs if red else ag):
            continue
        # reduce-scatter hop k receives block r-k-2, all-gather hop k block r-k-1
        for rb in _below(p, first):
            h += 1
            fwd = h < hops
            for a, b in segments(off[rb], off[rb + 1], seg):
                yield a, b, red, fwd


def _ring(t: Transport, buf: Any, op: Any, off: Sequence[int], widest: int, rs: bool, ag: bool,
          chunk_bytes: int | None, window: int = WINDOW) -> None:
    """Reduce-scatter (``rs``) and/or all-gather (``ag``) of ``buf`` in place over the blocks
    starting at ``off`` (p + 1 offsets; ``widest`` the largest block): after ``rs`` rank r's
    block r is reduced; after ``ag`` every block is.

    Hops, in the order both neighbours agree on: reduce-scatter hop k sends block r-k-1 and
    receives (and reduces) block r-k-2; all-gather hop k sends block r-k and receives r-k-1
    (mod p). The block received at one hop is the one sent at the next, across the two phases
    too, so each hop's blocks are found in O(1) with no per-rank hop table."""
    p, r = t.size, t.rank
    right, left = (r + 1) % p, (r - 1) % p
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES if p > 2 else 1 << 62
    seg = seg_elems(chunk_bytes, buf.itemsize)
    first = (r - 1) % p if rs else r  # the block sent at the first hop

    if widest <= seg:  # one chunk per block: one sendrecv per hop, no pipelining needed
        # The hot loop of the simulator at thousands of ranks (2(p-1) hops per rank, run p
        # times over in one process): everything it touches is a local.
        sr = _sendrecv_of(t)
        tag = TAG
        s = buf[off[first]:off[first + 1]]
        if rs:
            reduce_local = t.reduce_local
            scratch = take_scratch(t, buf, widest)
            tmp, tn = scratch, widest  # scratch[:tn], re-cut only when the block size changes
            for rb in _below(p, first):  # receive r-2, r-3 ... r (mod p)
                lo = off[rb]
                hi = off[rb + 1]
                dst = buf[lo:hi]
                if hi - lo != tn:
                    tn = hi - lo
                    tmp = scratch[:tn]
                sr(s, right, tmp, left, tag)
                reduce_local(op, dst, tmp)
                s = dst  # the block just reduced goes on at the next hop
            give_scratch(t, scratch)
        if ag:  # s is block r now
            for rb in _below(p, r):  # receive r-1, r-2 ... r+1 (mod p)
                dst = buf[off[rb]:off[rb + 1]]
                sr(s, right, dst, left, tag)
                s = dst
        return

    # Chunked pipeline over the chunks this rank receives, in hop order (generated lazily).
    items = _recv_chunks(p, r, off, rs, ag, seg)
    pending: dict[int, Any] = {}  # chunk start -> send still reading buf[a:b]
    isend, irecv = t.isend, t.irecv
    for a, b in segments(off[first], off[first + 1], seg):
        pending[a] = isend(buf[a:b], right, TAG)
    scratch = take_scratch(t, buf, window * seg) if rs else None
    posted: deque = deque()  # (lo, hi, reduce?, forward?, request, scratch view), in order

    def post(i: int, item: tuple[int, int, bool, bool]) -> None:
        a, b, red, fwd = item
        if red:
            slot = (i % window) * seg
            view = scratch[slot:slot + b - a]
            posted.append((a, b, red, fwd, irecv(view, left, TAG), view))
        else:
            old = pending.pop(a, None)  # that region may still be on its way out: let it go
            if old is not None:
                old.wait()
            posted.append((a, b, red, fwd, irecv(buf[a:b], left, TAG), None))

    i = 0
    for item in items:
        post(i, item)
        i += 1
        if i == window:
            break
    i = 0
    while posted:
        a, b, red, fwd, req, got = posted.popleft()
        req.wait()
        if red:
            t.reduce_local(op, buf[a:b], got)
        nxt = next(items, None)
        if nxt is not None:
            post(i + window, nxt)  # slot i % window is free again
        if fwd:
            pending[a] = isend(buf[a:b], right, TAG)
        i += 1
    for req in pending.values():
        req.wait()
    if scratch is not None:  # every receive into it has been waited for
        give_scratch(t, scratch)


CHANNEL_TAG = 0x100  # ring c's messages: CHANNEL_TAG + c


@functools.lru_cache(maxsize=64)
def channel_orders(p: int, ranks_per_node: int, k: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Per ring c: (its rank order, each rank's position in it). Nodes of ``ranks_per_node``
    consecutive ranks in order, the local ranks of each rotated by c (a last, smaller node
    rotated within itself). Shared by all ranks (cached)."""
    m = max(1, min(ranks_per_node, p))
    out = []
    for c in range(k):
        order: list[int] = []
        for lo in range(0, p, m):
            w = min(m, p - lo)
            order.extend(lo + (c + i) % w for i in range(w))
        pos = [0] * p
        for q, rank in enumerate(order):
            pos[rank] = q
        out.append((tuple(order), tuple(pos)))
    return tuple(out)


def _channels(t: Transport, buf: Any, op: Any, off: Sequence[int], rs: bool, ag: bool, k: int,
              ranks_per_node: int | None) -> None:
    """The k-ring form of ``_ring`` (see the module's docstring): sub-block c of block b is
    ring c's block b; position q of a ring sends at reduce-scatter hop h the block of position
    q-h-1 and receives q-h-2's (all-gather: q-h and q-h-1), so after the reduce-scatter every
    rank holds its own block's sub-blocks reduced, as with one ring."""
    p, r = t.size, t.rank
    rpn = ranks_per_node or getattr(t, "ranks_per_node", None) or p
    rings = channel_orders(p, int(rpn), k)
    subs = [split_offsets(off[b + 1] - off[b], k) for b in range(p)] if p <= 64 else None

    def sub(c: int, b: int) -> tuple[int, int]:
        so = subs[b] if subs is not None else split_offsets(off[b + 1] - off[b], k)
        return off[b] + so[c], off[b] + so[c + 1]

    widest = max(off[b + 1] - off[b] for b in range(p)) // k + 1
    scratch = take_scratch(t, buf, k * widest) if rs else None
    isend, irecv = t.isend, t.irecv
    hops = [(True, h) for h in range(p - 1) if rs] + [(False, h) for h in range(p - 1) if ag]
    sends: list[list[Any]] = [[] for _ in range(k)]  # per ring, not yet waited for

    def post(c: int, i: int) -> tuple[Any, int, int, Any]:
        """Post ring c's hop i: its receive (returned) and its send."""
        reducing, h = hops[i]
        order, pos = rings[c]
        q = pos[r]
        first = 1 if reducing else 0  # reduce-scatter hop h sends position q-h-1
        slo, shi = sub(c, order[(q - h - first) % p])
        rlo, rhi = sub(c, order[(q - h - first - 1) % p])
        tag = CHANNEL_TAG + c
        got = scratch[c * widest:c * widest + rhi - rlo] if reducing else None
        req = irecv(got if reducing else buf[rlo:rhi], order[(q - 1) % p], tag)
        sends[c].append(isend(buf[slo:shi], order[(q + 1) % p], tag))
        return req, rlo, rhi, got

    # Each ring goes on to its next hop as soon as its own block is in (and reduced), so one
    # ring's reduction overlaps the others' transfers.
    pending = [post(c, 0) for c in range(k)] if hops else []
    for i in range(len(hops)):
        for c in range(k):
            req, rlo, rhi, got = pending[c]
            req.wait()
            if got is not None:
                t.reduce_local(op, buf[rlo:rhi], got)
            if i + 1 < len(hops):
                if hops[i + 1][0] != hops[i][0]:  # into the all-gather: this ring's sends done,
                    for s_ in sends[c]:           # as its receives now land in buf
                        s_.wait()
                    sends[c].clear()
                pending[c] = post(c, i + 1)
    for ring_sends in sends:
        for req in ring_sends:
            req.wait()
    if scratch is not None:
        give_scratch(t, scratch)


def _run(t: Transport, buf: Any, op: Any, off: Sequence[int], widest: int, rs: bool, ag: bool,
         chunk_bytes: int | None, channels: int, ranks_per_node: int | None) -> None:
    if channels < 1:
        raise ValueError(f"ring: channels must be at least 1, got {channels}")
    if channels == 1:
        _ring(t, buf, op, off, widest, rs, ag, chunk_bytes)
    else:
        _channels(t, buf, op, off, rs, ag, channels, ranks_per_node)


def allreduce(t: Transport, buf: Any, op: Any, chunk_bytes: int | None = None, channels: int = 1,
              ranks_per_node: int | None = None) -> Any:
    if t.size == 1 or buf.size == 0:
        return buf
    off = split_offsets(buf.size, t.size)  # shared by all ranks (cached); block 0 is widest
    _run(t, buf, op, off, off[1], True, True, chunk_bytes, channels, ranks_per_node)
    return buf


def reduce_scatter(t: Transport, buf: Any, op: Any, counts: list[int], chunk_bytes: int | None = None,
                   channels: int = 1, ranks_per_node: int | None = None) -> Any:
    off = offsets(counts)
    if t.size > 1 and buf.size > 0:
        _run(t, buf, op, off, max(counts), True, False, chunk_bytes, channels, ranks_per_node)
    return buf[off[t.rank]:off[t.rank + 1]]


def allgather(t: Transport, block: Any, counts: list[int], chunk_bytes: int | None = None,
              channels: int = 1, ranks_per_node: int | None = None) -> Any:
    off = offsets(counts)
    full = array_module(block).empty(off[-1], dtype=block.dtype)
    full[off[t.rank]:off[t.rank + 1]] = block
    if t.size > 1 and off[-1] > 0:
        _run(t, full, None, off, max(counts), False, True, chunk_bytes, channels, ranks_per_node)
    return full


def broadcast(t: Transport, buf: Any, root: int, chunk_bytes: int | None = None) -> Any:
    """Pipelined chain root -> root+1 -> ... -> root-1: each chunk is passed on as it lands."""
    p = t.size
    if p == 1 or buf.size == 0:
        return buf
    vr = (t.rank - root) % p
    nxt, prv = (t.rank + 1) % p, (t.rank - 1) % p
    chunks = segment_table(0, buf.size, seg_elems(chunk_bytes or CHUNK_BYTES, buf.itemsize))
    sends = []
    if vr == 0:
        sends = [t.isend(buf[a:b], nxt, TAG) for a, b in chunks]
    else:
        recvs = [t.irecv(buf[a:b], prv, TAG) for a, b in chunks]
        for (a, b), req in zip(chunks, recvs):
            req.wait()
            if vr < p - 1:
                sends.append(t.isend(buf[a:b], nxt, TAG))
    for req in sends:
        req.wait()
    return buf


ALGORITHM = Algorithm("ring", allreduce=allreduce, reduce_scatter=reduce_scatter,
                      allgather=allgather, broadcast=broadcast)
