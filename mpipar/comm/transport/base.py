"""The point-to-point interface every collective algorithm is written against.

An algorithm sees only ``rank``, ``size``, ``isend``, ``irecv``, ``Request.wait`` and
``reduce_local``; it never learns whether bytes cross MPI, a staged GPU copy or a simulated
network, which is what lets one implementation be tested, benchmarked and simulated.

Buffers are 1-D contiguous xp arrays (slices of one are fine). Messages between the same pair
of ranks with the same tag arrive in the order they were sent (MPI's non-overtaking rule).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

from mpipar.comm.ops import ReduceOp


@runtime_checkable
class Request(Protocol):
    def wait(self) -> Any:
        """Block until the operation completes; returns the receive buffer (or None)."""

    def test(self) -> bool:
        """True once complete (and then wait() returns at once)."""


class CompletedRequest:
    """A request that is already done (zero-length messages, self-sends)."""

    def __init__(self, result: Any = None) -> None:
        self.result = result

    def wait(self) -> Any:
        return self.result

    def test(self) -> bool:
        return True


class Transport(Protocol):
    rank: int
    size: int

    def isend(self, buf: Any, dest: int, tag: int = 0) -> Request: ...

    def irecv(self, buf: Any, source: int, tag: int = 0) -> Request: ...

    def reduce_local(self, op: ReduceOp, dst: Any, src: Any) -> None:
        """dst <- dst (op) src; the simulator charges its per-byte reduction cost here."""

    def split(self, color: int, key: int) -> "Transport | None": ...


def waitall(requests: Sequence[Request]) -> None:
    for req in requests:
        req.wait()


def send(t: Transport, buf: Any, dest: int, tag: int = 0) -> None:
    t.isend(buf, dest, tag).wait()


def recv(t: Transport, buf: Any, source: int, tag: int = 0) -> Any:
    return t.irecv(buf, source, tag).wait()


def sendrecv(t: Transport, sendbuf: Any, dest: int, recvbuf: Any, source: int, tag: int = 0) -> Any:
    """Pairwise exchange, deadlock-free: the transport's own ``sendrecv`` when it has one
    (one MPI call), else post the receive, then the send, then wait for both."""
    own = getattr(t, "sendrecv", None)
    if own is not None:
        return own(sendbuf, dest, recvbuf, source, tag)
    r = t.irecv(recvbuf, source, tag)
    s = t.isend(sendbuf, dest, tag)
    s.wait()
    return r.wait()
