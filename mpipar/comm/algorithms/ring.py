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
"""

from __future__ import annotations

from typing import Any

from mpipar.comm.algorithms import Algorithm
from mpipar.comm.algorithms._util import array_module, offsets, seg_elems, segments, split_counts
from mpipar.comm.transport.base import sendrecv

TAG = 0x52  # 'R'
CHUNK_BYTES = 1 << 20  # default chunk for p > 2; p = 2 has one hop per phase: no chunks
WINDOW = 2  # receives in flight per ring (scratch slots)


def _ring(t: Any, buf: Any, op: Any, counts: list[int], rs: bool, ag: bool,
          chunk_bytes: int | None, window: int = WINDOW) -> None:
    """Reduce-scatter (``rs``) and/or all-gather (``ag``) of ``buf`` in place over blocks of
    ``counts``: after ``rs`` rank r's block r is reduced; after ``ag`` every block is."""
    p, r = t.size, t.rank
    right, left = (r + 1) % p, (r - 1) % p
    off = offsets(counts)
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES if p > 2 else 1 << 62
    seg = seg_elems(chunk_bytes, buf.itemsize)
    # hop list: (block sent, block received, reduce?) in the order both neighbours agree on
    hops = []
    if rs:
        hops += [((r - k - 1) % p, (r - k - 2) % p, True) for k in range(p - 1)]
    if ag:
        hops += [((r - k) % p, (r - k - 1) % p, False) for k in range(p - 1)]
    xp = array_module(buf)

    if max(counts) <= seg:  # one chunk per block: one sendrecv per hop, no pipelining needed
        scratch = xp.empty(max(counts), dtype=buf.dtype) if rs else None
        for sb, rb, red in hops:
            s = buf[off[sb]:off[sb + 1]]
            if red:
                dst = buf[off[rb]:off[rb + 1]]
                tmp = scratch[:dst.size]
                sendrecv(t, s, right, tmp, left, TAG)
                t.reduce_local(op, dst, tmp)
            else:
                sendrecv(t, s, right, buf[off[rb]:off[rb + 1]], left, TAG)
        return

    # Chunked pipeline. items: every chunk this rank receives, in hop order.
    items = []  # (lo, hi, reduce?, forward?)
    last = len(hops) - 1
    for h, (_, rb, red) in enumerate(hops):
        for a, b in segments(off[rb], off[rb + 1], seg):
            items.append((a, b, red, h < last))
    pending: dict[int, Any] = {}  # chunk start -> send still reading buf[a:b]
    for a, b in segments(off[hops[0][0]], off[hops[0][0] + 1], seg):
        pending[a] = t.isend(buf[a:b], right, TAG)
    scratch = xp.empty(window * seg, dtype=buf.dtype) if rs else None
    reqs: list[Any] = [None] * len(items)

    def post(i: int) -> None:
        a, b, red, _ = items[i]
        if red:
            slot = (i % window) * seg
            view = scratch[slot:slot + b - a]
            reqs[i] = (t.irecv(view, left, TAG), view)
        else:
            old = pending.pop(a, None)  # that region may still be on its way out: let it go
            if old is not None:
                old.wait()
            reqs[i] = (t.irecv(buf[a:b], left, TAG), None)

    for i in range(min(window, len(items))):
        post(i)
    for i, (a, b, red, fwd) in enumerate(items):
        req, got = reqs[i]
        req.wait()
        reqs[i] = None
        if red:
            t.reduce_local(op, buf[a:b], got)
        if i + window < len(items):
            post(i + window)  # slot i % window is free again
        if fwd:
            pending[a] = t.isend(buf[a:b], right, TAG)
    for req in pending.values():
        req.wait()


def allreduce(t: Any, buf: Any, op: Any, chunk_bytes: int | None = None) -> Any:
    if t.size == 1 or buf.size == 0:
        return buf
    _ring(t, buf, op, split_counts(buf.size, t.size), True, True, chunk_bytes)
    return buf


def reduce_scatter(t: Any, buf: Any, op: Any, counts: list[int], chunk_bytes: int | None = None) -> Any:
    off = offsets(counts)
    if t.size > 1 and buf.size > 0:
        _ring(t, buf, op, list(counts), True, False, chunk_bytes)
    return buf[off[t.rank]:off[t.rank + 1]]


def allgather(t: Any, block: Any, counts: list[int], chunk_bytes: int | None = None) -> Any:
    off = offsets(counts)
    full = array_module(block).empty(off[-1], dtype=block.dtype)
    full[off[t.rank]:off[t.rank + 1]] = block
    if t.size > 1 and off[-1] > 0:
        _ring(t, full, None, list(counts), False, True, chunk_bytes)
    return full


def broadcast(t: Any, buf: Any, root: int, chunk_bytes: int | None = None) -> Any:
    """Pipelined chain root -> root+1 -> ... -> root-1: each chunk is passed on as it lands."""
    p = t.size
    if p == 1 or buf.size == 0:
        return buf
    vr = (t.rank - root) % p
    nxt, prv = (t.rank + 1) % p, (t.rank - 1) % p
    chunks = segments(0, buf.size, seg_elems(chunk_bytes or CHUNK_BYTES, buf.itemsize))
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
