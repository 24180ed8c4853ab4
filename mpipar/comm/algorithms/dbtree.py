"""Double binary tree: two complementary binary trees, each reducing and broadcasting half of
the vector, so every rank sends and receives about n bytes in all, yet depth stays log p.

Tree A is an in-order binary tree on positions 0..p-1: position v > 0 with lowest set bit b
has children v - b/2 and the highest v + b/2, v + b/4 ... that exists; position 0 is the root
with one child (the highest power of two below p). Its leaves are the odd positions. Tree B is
tree A on relabelled ranks: mirrored (rank = p-1-v) when p is even, shifted (rank = v+1 mod p)
when p is odd. Either way most leaves of A are interior in B and vice versa, so no rank has to
forward both halves down two full-width edges::

      p = 8     tree A (first half)            tree B (second half, mirrored)
                0                               7
                |                               |
                4                               3
              /   \\                           /   \\
             2     6                         5     1
            / \\   / \\                       / \\   / \\
           1   3 5   7                     6   4 2   0

Within each tree a rank folds its children in a fixed order and the root's result is broadcast,
so all ranks agree bit for bit; both trees run on one segmented, pipelined loop (_treepipe.py).

Cost (p ranks, n bytes, s segments per half): about 2(log p + s) alpha + 2n beta + n gamma
(the root of each tree reduces only its half); the full-bandwidth form of a tree all-reduce.

Sanders, Speck and Traeff, "Two-tree algorithms for full bandwidth broadcast, reduction and
scan", Parallel Computing 35(12), 2009; used by NCCL 2.4 ("Massively scale your deep learning
training with NCCL 2.4", NVIDIA developer blog, Jeaugey 2019).
"""

from __future__ import annotations

import functools
from typing import Any

from mpipar.comm.algorithms import Algorithm
from mpipar.comm.algorithms import _treepipe
from mpipar.comm.algorithms._util import seg_elems
from mpipar.comm.transport.base import Transport

TAG = 0x44  # 'D'
SEGMENT_BYTES = 1 << 20


def _children_a(p: int, v: int) -> list[int]:
    """Children of position v in tree A (positions 0..p-1), left one first."""
    if v == 0:
        return [1 << ((p - 1).bit_length() - 1)] if p > 1 else []
    b = v & -v
    h = b // 2
    if not h:
        return []  # odd positions are leaves
    kids = [v - h]
    while h and v + h >= p:  # the right subtree is cut by the end: its root is lower
        h //= 2
    if h:
        kids.append(v + h)
    return kids


@functools.lru_cache(maxsize=32)
def _tables(p: int) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """Both trees for a world of p, built once per p and shared by every rank (the simulator
    runs all p ranks in one process): ((parent, children) of tree A, the same of tree B), each
    a tuple indexed by real rank (parent None at the root; children tuples, read-only)."""
    kids_a = tuple(tuple(_children_a(p, v)) for v in range(p))
    parent_a: list[int | None] = [None] * p
    for v, kids in enumerate(kids_a):
        for k in kids:
            parent_a[k] = v
    if p % 2 == 0:  # tree B: tree A mirrored (rank = p-1-v) ...
        def relabel(v: int) -> int:
            return p - 1 - v
    else:  # ... or shifted (rank = v+1 mod p)
        def relabel(v: int) -> int:
            return (v + 1) % p
    parent_b: list[int | None] = [None] * p
    kids_b: list[Any] = [()] * p
    for v in range(p):
        par = parent_a[v]
        w = relabel(v)
        parent_b[w] = None if par is None else relabel(par)
        kids_b[w] = tuple(relabel(k) for k in kids_a[v])
    return (tuple(parent_a), kids_a), (tuple(parent_b), tuple(kids_b))


def trees(p: int) -> list[list[tuple[int | None, list[int]]]]:
    """For every rank, (parent, children) in tree A and in tree B; real ranks throughout."""
    return [[(par[v], list(kids[v])) for v in range(p)] for par, kids in _tables(p)]


def _specs(t: Transport, n: int) -> list[_treepipe.TreeSpec]:
    (par_a, kids_a), (par_b, kids_b) = _tables(t.size)
    r = t.rank
    half = (n + 1) // 2
    depth = (t.size - 1).bit_length() + 1
    return [_treepipe.TreeSpec(par_a[r], kids_a[r], 0, half, depth),
            _treepipe.TreeSpec(par_b[r], kids_b[r], half, n, depth)]


def allreduce(t: Transport, buf: Any, op: Any, segment_bytes: int = SEGMENT_BYTES) -> Any:
    if t.size == 1 or buf.size == 0:
        return buf
    _treepipe.run(t, buf, op, _specs(t, buf.size), seg_elems(segment_bytes, buf.itemsize), TAG)
    return buf


ALGORITHM = Algorithm("dbtree", allreduce=allreduce)
