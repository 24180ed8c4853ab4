"""Binomial tree: reduce to a root, then broadcast from it; segmented so large messages pipeline.

Ranks are numbered relative to the root (v = (rank - root) mod p). Rank v's parent is v with
its lowest set bit cleared; its children are v + 1, v + 2, v + 4 ... below that bit::

      p = 8, root 0           reduce: arrows point up; broadcast: the same edges, down
              0
         /    |    \\
        1     2     4
              |    / \\
              3   5   6
                      |
                      7

A parent folds its children in a fixed order (``own op child(v+1) op child(v+2) ...``), so the
root's result is the same every run, and the broadcast copies it: all ranks agree bit for bit.
The broadcast goes to the children in the opposite order, largest subtree first, so with one
message at a time per port every leaf is log p messages from the root.
The buffer is cut into segments of ``segment_bytes``; a rank forwards segment s while later
segments are still on their way, and the all-reduce starts broadcasting early segments while
later ones are still being reduced (see _treepipe.py).

Cost (p ranks, n bytes, s segments; alpha latency, beta per byte, gamma per reduced byte)::

    reduce / broadcast   (log p + s - 1) alpha + (log p + s - 1)(n/s) beta  [+ same gamma]
                         (one segment: log p messages on every path, both phases)
    allreduce            twice that (the two phases overlap when s is large)

An unsegmented binomial tree moves n log p bytes on the critical path: good for latency
(log p steps), poor for bandwidth. Binomial trees in MPI collectives: Thakur, Rabenseifner and
Gropp, "Optimization of collective communication operations in MPICH", IJHPCA 2005.
"""

from __future__ import annotations

from typing import Any

from mpipar.comm.algorithms import Algorithm
from mpipar.comm.algorithms import _treepipe
from mpipar.comm.algorithms._util import seg_elems
from mpipar.comm.transport.base import Transport

TAG = 0x54  # 'T'
SEGMENT_BYTES = 1 << 20


def binomial(p: int, rank: int, root: int, lo: int, hi: int, largest_first: bool = False) -> _treepipe.TreeSpec:
    """This rank's place in the binomial tree rooted at ``root`` carrying buf[lo:hi]. Children
    are folded in the order v+1, v+2, v+4 ... (smallest subtree first); the broadcast goes to
    the largest subtree first (the child heading 2^j ranks then has j sends' head start over
    the next one, so every path is log p messages long). ``largest_first`` lists ``children``
    in the broadcast order too (for ``broadcast``, which folds nothing)."""
    v = (rank - root) % p
    low = v & -v if v else 1 << p.bit_length()
    parent = None if v == 0 else (v - low + root) % p
    kids = []
    k = 1
    while k < low and v + k < p:
        kids.append((v + k + root) % p)
        k <<= 1
    down = kids[::-1]
    return _treepipe.TreeSpec(parent, down if largest_first else kids, lo, hi, (p - 1).bit_length(),
                              bcast_order=down)


def allreduce(t: Transport, buf: Any, op: Any, segment_bytes: int = SEGMENT_BYTES) -> Any:
    if t.size == 1 or buf.size == 0:
        return buf
    spec = binomial(t.size, t.rank, 0, 0, buf.size)
    _treepipe.run(t, buf, op, [spec], seg_elems(segment_bytes, buf.itemsize), TAG)
    return buf


def reduce(t: Transport, buf: Any, op: Any, root: int, segment_bytes: int = SEGMENT_BYTES) -> Any:
    if t.size == 1 or buf.size == 0:
        return buf
    spec = binomial(t.size, t.rank, root, 0, buf.size)
    _treepipe.run(t, buf, op, [spec], seg_elems(segment_bytes, buf.itemsize), TAG, bcast=False)
    return buf


def broadcast(t: Transport, buf: Any, root: int, segment_bytes: int = SEGMENT_BYTES) -> Any:
    if t.size == 1 or buf.size == 0:
        return buf
    spec = binomial(t.size, t.rank, root, 0, buf.size, largest_first=True)
    _treepipe.run(t, buf, None, [spec], seg_elems(segment_bytes, buf.itemsize), TAG, reduce=False)
    return buf


ALGORITHM = Algorithm("tree", allreduce=allreduce, reduce=reduce, broadcast=broadcast)
