"""The point-to-point interface every collective algorithm is written against.

An algorithm sees only the ``Transport`` below (``rank``, ``size``, ``isend``, ``irecv``,
``Request.wait``, ``reduce_local``, ``split`` and a few optional members); it never learns
whether bytes cross MPI, a staged GPU copy or a simulated network, which is what lets one
implementation be tested, benchmarked and simulated. ``MPITransport`` (``mpi.py``) and
``SimTransport`` (``sim.py``) implement all of it; tests/comm/test_transport_contract.py
checks that the algorithms use nothing else and that both implement every member.

Buffers are 1-D contiguous xp arrays (slices of one are fine). Messages between the same pair
of ranks with the same tag arrive in the order they were sent (MPI's non-overtaking rule).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from mpipar.comm.ops import ReduceOp
from mpipar.comm.transport.pool import BufferPool


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


class Background(Protocol):
    """Where a rank's non-blocking collectives run, one after another in submission order
    (``Transport.background``): MPI's is the process's communication thread
    (``comm/background.py``), the simulator's a second virtual thread of the rank."""

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Request:
        """Queue ``fn(*args, **kwargs)``; the request's ``wait()`` returns its result."""


class SendRecv(Protocol):
    """A transport's own pairwise exchange (``Transport.sendrecv``)."""

    def __call__(self, sendbuf: Any, dest: int, recvbuf: Any, source: int, tag: int = 0) -> Any: ...


@runtime_checkable
class Transport(Protocol):
    """Point-to-point messages among the ranks of one group, as the algorithms and the
    Communicator use them.

    Optional members are typed ``... | None``: a transport without that capability sets them
    to None. Algorithms read them with ``getattr(t, name, None)``, so an object that lacks
    them altogether (a test's stand-in) behaves as one that sets them to None.
    """

    rank: int
    """This rank's index in the group, ``0 <= rank < size``."""
    size: int
    """Ranks in the group."""
    cache: dict[Any, Any]
    """State that algorithms keep per transport across calls (hier: its node sub-groups)."""
    scratch_pool: BufferPool | None
    """Optional: reusable host buffers for an algorithm's scratch (``_util.take_scratch``),
    so that a call's received blocks land in pages an earlier call touched; None: scratch is
    allocated anew each call (the simulator keeps no memory between calls)."""
    ranks_per_node: int | None
    """Optional: ranks per node when the transport knows its group's topology (consecutive
    ranks; the simulator's world group on a two-level network); None: unknown."""

    begin_collective: Callable[[str], None] | None
    """Optional: called by the Communicator as each collective starts, with the algorithm's
    name (the simulator charges the profile's per-call overhead, ``call_overhead_s``, which a
    real call pays in argument checks and set-up); None: nothing to do."""
    watch: Any
    """Optional: the hang watchdog's record of this group (``comm/watchdog.py`` GroupWatch:
    its world ranks and its part of the progress board), shared with the transports of the
    same Communicator; None: not watched (the simulator, whose waits cannot hang)."""
    native: Any
    """Optional: the transport's own collectives, replacing MPI's where ``algorithm="native"``
    cannot call MPI (the simulator's, priced by measured busbw tables: ``allreduce(buf, op)``,
    ``reduce``, ``broadcast``, ``reduce_scatter``, ``allgather``, ``alltoall`` with the
    signatures of an algorithm's functions less the transport); None: native is MPI's."""

    @property
    def sendrecv(self) -> SendRecv | None:
        """Optional fast path: send ``sendbuf`` to ``dest`` and receive ``recvbuf`` from
        ``source`` in one call (one MPI_Sendrecv; the simulator's hot loop). None: callers
        post the receive, then the send, and wait for both (``sendrecv`` below)."""

    @property
    def shared_node(self) -> Callable[[], int] | None:
        """Optional, collective over the group: the node this rank is on, named after the
        group rank of its lowest member, among ranks that share memory (MPI's
        ``COMM_TYPE_SHARED`` split; hier's nodes when no ``ranks_per_node`` is given). None:
        the transport cannot tell (hier then takes all ranks as one node)."""

    def isend(self, buf: Any, dest: int, tag: int = 0) -> Request:
        """Start sending ``buf``; keep it unchanged until the request completes."""

    def irecv(self, buf: Any, source: int, tag: int = 0) -> Request:
        """Start receiving into ``buf``; the request's ``wait()`` returns ``buf``."""

    def reduce_local(self, op: ReduceOp, dst: Any, src: Any) -> None:
        """dst <- dst (op) src; the simulator charges its per-byte reduction cost here."""

    def split(self, color: int | None, key: int = 0) -> Transport | None:
        """Collective, as MPI_Comm_split: the ranks that passed the same ``color``, ordered by
        ``key``; ``color=None``: this rank joins none and gets None."""

    def dup(self) -> Transport:
        """Collective: the same group on a private channel (messages never match this one's)."""

    def barrier(self) -> None:
        """Collective: return once every rank of the group has entered."""

    def free(self) -> None:
        """Collective: release what the group holds (MPI: its communicator, if this transport
        made it by split or dup); the transport is unusable afterwards."""

    def clock(self) -> float:
        """Seconds on this rank's clock: wall time (``time.perf_counter``) under MPI, the
        virtual clock of the running thread in the simulator. Layers above time their work
        with it, so the same code reports real and simulated times."""

    def background(self) -> Background:
        """This rank's queue of non-blocking collectives (shared by every group of the rank,
        so that they run in one order on every rank)."""


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
