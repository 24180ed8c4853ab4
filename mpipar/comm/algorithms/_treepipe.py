"""The pipelined tree engine behind ``tree`` (binomial) and ``dbtree`` (double binary tree).

A tree, as seen by one rank, is its parent (None at the root), its children (in the fixed
order their contributions are folded in), the order it sends the broadcast to them (by
default the same) and the range [lo, hi) of the buffer it carries.
The range is cut into segments. Reduce: a rank waits for segment s from each child in order,
folds it into its own (``buf op child_1 op child_2 ...``) and sends the result to its parent.
Broadcast: a rank receives segment s from its parent and passes it to each child.

All-reduce runs both on one loop: at iteration i a rank reduces segment i and broadcasts
segment i - lag, so the reduction of later segments flows up while earlier ones flow down.
Several trees (the two halves of a double binary tree) share the loop, step by step. Every
wait is on a fixed message, so the order of arithmetic never depends on arrival order; and
every wait at iteration i depends only on other ranks' work at iterations <= i, so the
schedule cannot deadlock. Children's segments land in ``window`` reused scratch slots each.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from mpipar.comm.algorithms._util import give_scratch, segment_table, take_scratch
from mpipar.comm.transport.base import Transport

WINDOW = 2


class TreeSpec:
    """One tree as seen by this rank: parent, children (in reduction order), and the buffer
    range it carries; ``bcast_order`` is the order the broadcast is sent to the children (default:
    ``children``). Children sequences may be shared between ranks: they are only read."""

    __slots__ = ("parent", "children", "lo", "hi", "depth", "bcast_order")

    def __init__(self, parent: Optional[int], children: Sequence[int], lo: int, hi: int, depth: int,
                 bcast_order: Optional[Sequence[int]] = None) -> None:
        self.parent, self.children, self.lo, self.hi, self.depth = parent, children, lo, hi, depth
        self.bcast_order = children if bcast_order is None else bcast_order


class _State:
    """Progress of one tree on this rank during one call."""

    def __init__(self, t: Transport, spec: TreeSpec, buf: Any, seg: int, tag: int, reduce: bool,
                 window: int) -> None:
        self.spec = spec
        self.segs = segment_table(spec.lo, spec.hi, seg)  # shared by all ranks (cached)
        self.tag = tag
        self.window = window
        self.kids: list[list[Any]] = []  # per child: pending (request, view) per segment
        self.up: list[Any] = [None] * len(self.segs)  # sends to the parent, per segment
        self.down: list[Any] = [None] * len(self.segs)  # receives from the parent
        self.sends: list[Any] = []  # sends to children
        self.reduce = reduce
        self.reduced = 0  # segments reduced and sent up so far
        self.scratch = None
        if reduce and spec.children and self.segs:
            width = max(b - a for a, b in self.segs)
            self.scratch = scratch = take_scratch(t, buf, len(spec.children) * window * width)
            self.slots = [[scratch[(c * window + w) * width:(c * window + w + 1) * width]
                           for w in range(window)] for c in range(len(spec.children))]
            for c, child in enumerate(spec.children):
                self.kids.append([None] * len(self.segs))
                for s in range(min(window, len(self.segs))):
                    self._post_kid(t, c, child, s)

    def _post_kid(self, t: Transport, c: int, child: int, s: int) -> None:
        a, b = self.segs[s]
        view = self.slots[c][s % self.window][:b - a]
        self.kids[c][s] = (t.irecv(view, child, self.tag), view)

    def reduce_step(self, t: Transport, buf: Any, op: Any, s: int) -> None:
        a, b = self.segs[s]
        mine = buf[a:b]
        for c, child in enumerate(self.spec.children):
            req, view = self.kids[c][s]
            req.wait()
            self.kids[c][s] = None
            t.reduce_local(op, mine, view)
            if s + self.window < len(self.segs):
                self._post_kid(t, c, child, s + self.window)
        if self.spec.parent is not None:
            self.up[s] = t.isend(mine, self.spec.parent, self.tag)
        self.reduced = s + 1

    def _post_down(self, t: Transport, buf: Any, s: int) -> None:
        if self.up[s] is not None:  # buf[a:b] may still be going up: finish that first
            self.up[s].wait()
            self.up[s] = None
        a, b = self.segs[s]
        self.down[s] = t.irecv(buf[a:b], self.spec.parent, self.tag + 1)

    def bcast_step(self, t: Transport, buf: Any, s: int) -> None:
        a, b = self.segs[s]
        if self.spec.parent is not None:
            if self.down[s] is None:
                self._post_down(t, buf, s)
            nxt = s + 1  # keep one receive ahead (once that segment has gone up)
            if nxt < len(self.segs) and self.down[nxt] is None and (not self.reduce or nxt < self.reduced):
                self._post_down(t, buf, nxt)
            self.down[s].wait()
            self.down[s] = None
        for child in self.spec.bcast_order:
            self.sends.append(t.isend(buf[a:b], child, self.tag + 1))

    def finish(self, t: Transport) -> None:
        for req in self.up:
            if req is not None:
                req.wait()
        for req in self.sends:
            req.wait()
        if self.scratch is not None:  # every child's segment has been waited for and folded
            give_scratch(t, self.scratch)
            self.scratch = None


def run(t: Transport, buf: Any, op: Any, specs: list[TreeSpec], seg: int, tag: int,
        reduce: bool = True, bcast: bool = True, window: int = WINDOW) -> None:
    """Reduce to each tree's root and/or broadcast from it, pipelined over segments of ``seg``
    elements. Tree k uses tags ``tag + 2k`` (up) and ``tag + 2k + 1`` (down)."""
    states = [_State(t, spec, buf, seg, tag + 2 * k, reduce, window) for k, spec in enumerate(specs)]
    lag = 2 * max(spec.depth for spec in specs) if (reduce and bcast) else 0
    nseg = max(len(st.segs) for st in states)
    # Within an iteration, steps that never block go first: leaves send up and roots send
    # down before this rank waits on anything, so two trees' reductions run concurrently.
    up_order = sorted(states, key=lambda st: len(st.spec.children))
    down_order = sorted(states, key=lambda st: st.spec.parent is not None)
    for i in range(nseg + lag if bcast else nseg):
        if reduce:
            for st in up_order:
                if i < len(st.segs):
                    st.reduce_step(t, buf, op, i)
        j = i - lag
        if bcast and j >= 0:
            for st in down_order:
                if j < len(st.segs):
                    st.bcast_step(t, buf, j)
    for st in states:
        st.finish(t)
