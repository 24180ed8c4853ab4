"""A simulated network: N virtual ranks in one process run the very algorithm code MPI runs.

    engine = Engine(Network(profile, size=64), size=64, data=True)
    result = engine.run(ring_allreduce, args=lambda r: (buf[r], SUM))
    result.time        # predicted seconds (the slowest rank), result.finish per rank

Each virtual rank runs in a greenlet (a coroutine with its own stack, switched explicitly) and
owns a virtual clock. Nothing here is concurrent: a rank runs until it waits on a message that
has not been sent yet, then switches straight to the next runnable rank.

Timing (Hockney's alpha-beta model, with size classes and two levels):
* a message of n bytes from a to b arrives at ``start + alpha + n * beta``, with (alpha, beta)
  from the network by size class and by level (inside a node or between nodes);
* eager messages (``n <= eager_limit``) start when posted and the send completes at once;
  rendezvous messages start when both the send and the receive are posted (``max`` of the
  two clocks) and the send completes when the data has arrived;
* with port serialisation (default: the single-port, full-duplex model of the textbook
  formulas) each rank sends one message at a time and receives one at a time per level, each
  occupying the port for ``alpha + n * beta``: a send starts when the out-port is free, and a
  message arrives no earlier than ``in-port free + alpha + n * beta``. So p-1 ranks sending to
  one root cost (p-1)(alpha + n beta), as in Thakur et al.'s linear gather. The out-port is
  exact (a rank posts its sends in its own clock order). The simulator runs ranks out of
  virtual-time order, so the in-port is booked into the earliest free gap at or after the
  message's start (among its last 16 to 32 busy intervals; older gaps are given up) rather than
  first come, first served; messages competing for the same gap are still served in the
  order the simulator meets them (an approximation where many converge on one rank).
  ``nic_serialization=False`` turns both ports off: a message costs alpha + n beta from its
  start whatever else is in flight;
* ``reduce_local`` costs ``gamma * nbytes`` (or the profile's reduction size classes) on the
  calling rank; a receive moves the clock to ``max(clock, arrival)``. Posting a non-blocking
  send or receive costs the profile's ``post_overhead`` (LogP's o: the request's bookkeeping
  on this rank's CPU, 0 by default); a ``sendrecv`` posts nothing (its cost is in alpha).
* a profile may price one-way messages apart (its ``oneway`` link, flat networks only): a
  send made while its rank has no receive outstanding (posted and not yet arrived) costs the
  one-way time; a send made while receiving (every ``sendrecv``, a ring's isend beside its
  irecv) costs the ordinary link's, measured as an exchange. On one host the two directions
  of an exchange share the CPUs and memory bus, which a lone message has to itself.
* a profile may say that transfers need the receiver's CPU (``transfers_need_cpu``: MPI's
  shared-memory transport with no asynchronous progress, where the receiving process copies
  the data out while it is inside MPI): a rendezvous transfer into a rank then makes no
  progress while that rank runs ``reduce_local``, nor before the previous rendezvous
  transfer into it has landed. Settled when the receiver waits, from the rank's own recent
  reductions (eager messages are not delayed). The send's completion moves with it unless
  the sender has already waited: ranks run out of time order here, and holding a sender
  until its receiver waits could deadlock exchanges that MPI's progress engine completes.
  Matching and copying cost no virtual time.

Data: with ``data=True`` buffers are real arrays and bytes are copied, so a test can check
the simulated collective's result against NumPy. With ``data=False`` nothing is copied or
combined, so buffers can be ``placeholder(count, dtype)``: zero-stride views of one element
that slice like arrays of ``count`` elements and cost no memory.

A deadlock (every unfinished rank waiting, nothing that could wake one) raises
``DeadlockError`` naming the waiting ranks and what each waits for, instead of hanging.
"""

from __future__ import annotations

import time as _time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from greenlet import GreenletExit, getcurrent, greenlet

from mpipar.comm.ops import ReduceOp
from mpipar.comm.transport.pool import BufferPool


# Busy intervals remembered per receive port. Messages are booked into the earliest gap at or
# after their start, so the booking does not depend on the order in which the simulator
# happens to process senders (it runs ranks out of virtual-time order). When a port holds
# more than twice this many intervals, the oldest are merged into one (the gaps between them
# are given up), leaving this many: the list stays short, the merge is paid once every
# _IN_PORT_MEMORY messages rather than on each, and a message never slips into time that is
# already taken.
_IN_PORT_MEMORY = 16
_IN_PORT_LIMIT = 2 * _IN_PORT_MEMORY


def _forget(busy: list) -> None:
    """Merge the oldest intervals of an over-full port into one, keeping _IN_PORT_MEMORY."""
    k = len(busy) - _IN_PORT_MEMORY + 1
    busy[0:k] = [(busy[0][0], busy[k - 1][1])]


def _book(busy: list, start: float, cost: float) -> float:
    """Book ``cost`` seconds on a receive port at the earliest gap from ``start``; returns the
    end (the message's arrival). ``busy``: sorted, disjoint (begin, end) intervals."""
    t = start
    i = 0
    n = len(busy)
    while i < n:
        b, e = busy[i]
        if e <= t:
            i += 1
            continue
        if b >= t + cost:
            break
        t = e
        i += 1
    busy.insert(i, (t, t + cost))
    if len(busy) > _IN_PORT_LIMIT:
        _forget(busy)
    return t + cost


class DeadlockError(RuntimeError):
    """Every unfinished virtual rank is blocked and no message in flight can wake one."""


class RankError(RuntimeError):
    """An exception raised inside one virtual rank (the original is the ``__cause__``)."""


def placeholder(count: int, dtype: Any = np.float32) -> np.ndarray:
    """An array of ``count`` elements backed by one element (stride 0): a size-only buffer
    for ``data=False`` runs. Slicing and ``nbytes`` behave; reading gives meaningless values."""
    one = np.zeros(1, dtype=dtype)
    return np.lib.stride_tricks.as_strided(one, shape=(count,), strides=(0,), writeable=True)


class _Done:
    """The completed request of an eager send (shared: it holds nothing)."""

    __slots__ = ()

    def wait(self) -> None:
        return None

    def test(self) -> bool:
        return True


_DONE = _Done()


class SimRequest:
    """A pending receive, or a rendezvous send. ``t`` is the post time until the transfer is
    scheduled, then the completion time."""

    __slots__ = ("engine", "grank", "done", "t", "buf", "waiting", "peer", "tag", "is_send", "lone",
                 "start", "sender")

    def __init__(self, engine: "Engine", grank: int, t: float, buf: Any, peer: int, tag: int,
                 is_send: bool) -> None:
        self.engine = engine
        self.grank = grank
        self.done = False
        self.t = t
        self.buf = buf
        self.waiting: Any = None  # the virtual thread (greenlet) blocked on it
        self.peer = peer
        self.tag = tag
        self.is_send = is_send
        self.lone = False  # a send posted while its rank received nothing (one-way price)
        # a rendezvous receive under transfers_need_cpu: when its transfer began on the port,
        # and the send that completes with it (both settled at the receiver's wait)
        self.start: float | None = None
        self.sender: SimRequest | None = None

    def wait(self) -> Any:
        if not self.done:
            e = self.engine
            self.waiting = e.threads[e.cur]
            e._block(self.grank, self)
        if self.start is not None:
            self._settle()
        clock = self.engine.clock
        if self.t > clock[self.grank]:
            clock[self.grank] = self.t
        return None if self.is_send else self.buf

    def _settle(self) -> None:
        """A rendezvous receive under ``transfers_need_cpu``: the copy made no progress while
        this rank computed, nor before the transfer that came in ahead of it had landed."""
        e = self.engine
        self.t = e._stalled(self.grank, self.start, self.t)
        self.start = None
        if self.t > e.last_in[self.grank]:
            e.last_in[self.grank] = self.t
        if self.sender is not None and self.sender.t < self.t:
            self.sender.t = self.t  # seen by the sender if it has not waited yet

    def test(self) -> bool:
        if not self.done:  # let the others run, so that a polling loop makes progress
            self.engine._yield(self.grank, self)
        if self.done:  # completing here means it has arrived: the clock says so too
            self.wait()
        return self.done

    def describe(self) -> str:
        what = "send to" if self.is_send else "receive from"
        return f"{what} global rank {self.peer} (tag {self.tag})"


# A send whose receive is not posted yet is a tuple (t, buf, nbytes, rndv): eager sends have
# their arrival time ``t`` fixed already and ``rndv`` None; rendezvous sends have their post
# time ``t`` and their request ``rndv``, completed when the transfer is scheduled at match.
# (A tuple, not an object: one is made per unmatched message, millions per large run.)


@dataclass
class SimResult:
    time: float                 # predicted seconds: the latest finish over ranks
    finish: list[float]         # each rank's clock when its function returned
    results: list[Any]          # each rank's return value
    messages: int               # point-to-point messages simulated
    wall: float                 # seconds the simulation took on this machine
    cpu: float = 0.0            # CPU seconds of this process (what a quiet core would take)


class Engine:
    """The discrete-event core shared by every SimTransport of one run (sub-groups too).

    Virtual threads: each rank's main function (thread id ``rank``) and, once the rank asks
    for one, its communication stream (thread id ``size + rank``). ``clock[rank]`` always
    holds the clock of the rank's thread that ran last: when the other resumes, the two are
    swapped (``_resume``), so every SimTransport of the rank, in any group, times its work on
    the running thread's clock at no cost to the hot path. Messages are addressed and ports
    are booked by rank, so the two threads of a rank share its ports.
    """

    def __init__(self, network: Any, size: int, data: bool = True) -> None:
        self.net = network
        self.size = size
        self.data = data
        self.clock = [0.0] * size
        self.sends: dict[tuple, deque] = {}     # (ctx, src, dst, tag) -> unmatched sends
        self.recvs: dict[tuple, deque] = {}     # (ctx, src, dst, tag) -> unmatched receives
        self.runnable: deque = deque()
        self.greenlets: list[Any] = []          # the main threads, by rank
        self.threads: list[Any] = []            # every virtual thread, by thread id
        self.cur = 0                            # the running thread's id
        self.streams: dict[int, _Stream] = {}   # rank -> its communication stream
        self.owner: list[int] = []              # rank -> thread whose clock is in clock[rank]
        self.saved: list[float] = []            # thread id -> its clock while swapped out
        self.blocked: dict[int, Any] = {}       # thread id -> what it waits for
        self.gathers: dict[tuple, list] = {}    # (ctx, seq) -> [values, waiting threads, result]
        self.next_ctx = 1
        self.messages = 0                       # sent through the general path
        self.fast_counts: list[Callable[[], int]] = []  # each fast sendrecv's own count
        self.main: Any = None
        self.error: tuple[str, BaseException] | None = None
        node = getattr(network, "node", None)
        if node is None:
            rpn = getattr(network, "ranks_per_node", 1)
            node = [r // rpn for r in range(size)]
        self.node = node
        port = getattr(network, "port", None)
        self.port = port if port is not None else (list(range(size)), list(range(size)))
        nports = getattr(network, "ports", (size, size))
        self.nic_out: tuple[list[list], ...] = tuple([[] for _ in range(n)] for n in nports)
        self.nic_in: tuple[list[list], ...] = tuple([[] for _ in range(n)] for n in nports)
        self.serialize = bool(getattr(network, "nic_serialization", True))
        self.eager_limit = network.eager_limit
        self.gamma = network.gamma
        self.post = getattr(network, "post_overhead", 0.0)
        # One-way pricing (a profile with a ``oneway`` link): each rank's receives that may
        # still be outstanding, to tell a lone send from one made while receiving.
        self.oneway = getattr(network, "oneway", None) is not None
        self.open_recvs: list[list] = [[] for _ in range(size)] if self.oneway else []
        # Transfers that need the receiver's CPU (transfers_need_cpu): each rank's recent
        # reductions, and when its last waited-for rendezvous transfer landed.
        self.cpu = bool(getattr(network, "transfers_need_cpu", False))
        self.computing: list[list] = [[] for _ in range(size)] if self.cpu else []
        self.last_in = [0.0] * size if self.cpu else []
        self.last_cost = 0.0  # occupancy + latency of the message _arrival priced last
        self._cost = network.cost
        self._cost_cache = network._cache  # (level -> {nbytes: (occupancy, latency)}), filled by cost()

    # -- timing ----------------------------------------------------------------------------
    def _arrival(self, src: int, dst: int, nbytes: int, start: float, lone: bool = False,
                 level: int | None = None) -> float:
        """When ``nbytes`` leaving ``src`` no earlier than ``start`` are all at ``dst``;
        ``lone``: priced as a one-way message (the network's level 2); ``level``: given by a
        transport that knows it (else from the two ranks' nodes). The message holds a free
        gap of the sender's out-port and then of the receiver's in-port for its occupancy
        (alpha + n beta), and lands its latency after that: back-to-back messages pay the
        latency once."""
        self.messages += 1
        if src == dst:
            return start
        if level is None:
            level = 0 if self.node[src] == self.node[dst] else 1
        price = 2 if lone else level
        c = self._cost_cache[price].get(nbytes)
        if c is None:
            c = self._cost(price, nbytes)
        occ, lat = c
        self.last_cost = occ + lat
        if not self.serialize:
            return start + occ + lat
        port = self.port[level]
        out = self.nic_out[level][port[src]]
        if not out or start >= out[-1][1]:
            out.append((start, start + occ))
            if len(out) > _IN_PORT_LIMIT:
                _forget(out)
        else:
            start = _book(out, start, occ) - occ
        busy = self.nic_in[level][port[dst]]
        if not busy or start >= busy[-1][1]:  # the usual case: after everything booked
            busy.append((start, start + occ))
            if len(busy) > _IN_PORT_LIMIT:
                _forget(busy)
            return start + occ + lat
        return _book(busy, start, occ) + lat

    def _stalled(self, grank: int, start: float, arrival: float) -> float:
        """When a transfer into ``grank`` that began on the port at ``start`` and would have
        landed at ``arrival`` really lands, if it only progresses while that rank is not
        computing and after the rank's previous transfer has landed (one CPU copies them all,
        one after another). Reductions are kept as (begin, end) in clock order."""
        remaining = arrival - start
        pos = start if start > self.last_in[grank] else self.last_in[grank]
        for s0, s1 in self.computing[grank]:
            if s1 <= pos:
                continue
            if s0 >= pos + remaining:
                break
            if s0 > pos:
                remaining -= s0 - pos
            pos = s1
        return pos + remaining

    # -- virtual threads -------------------------------------------------------------------
    def current_rank(self) -> int:
        """The global rank whose thread (main or stream) is running."""
        return self.cur % self.size if self.size else 0

    def advance(self, seconds: float) -> None:
        """Advance the running virtual thread's clock by ``seconds`` (a kernel's time, say:
        the compute model calls this for every one)."""
        self.clock[self.cur % self.size] += seconds

    def now(self) -> float:
        """The running virtual thread's clock."""
        return self.clock[self.cur % self.size]

    def _resume(self, tid: int) -> None:
        """Thread ``tid`` runs again: make ``clock[rank]`` its clock."""
        self.cur = tid
        if self.streams:
            r = tid % self.size
            o = self.owner[r]
            if o != tid:
                self.saved[o] = self.clock[r]
                self.clock[r] = self.saved[tid]
                self.owner[r] = tid

    def stream(self, rank: int) -> "_Stream":
        """Rank ``rank``'s communication stream, made on first use."""
        st = self.streams.get(rank)
        if st is None:
            if not self.owner:
                self.owner = list(range(self.size))
                self.saved = [0.0] * (2 * self.size)
                self.threads.extend([None] * self.size)
            tid = self.size + rank
            st = self.streams[rank] = _Stream(self, rank, tid)
            self.threads[tid] = st.greenlet
        return st

    # -- scheduling ------------------------------------------------------------------------
    def _block(self, grank: int, what: Any) -> None:
        """Switch away from the running thread (of rank ``grank``) until something wakes it."""
        tid = self.cur
        self.blocked[tid] = what
        rq = self.runnable
        if rq and rq[0]:  # a started thread: switch straight to it (one switch, not two)
            rq.popleft().switch()
        else:
            # Nothing can run (the scheduler reports the deadlock), or the next thread has not
            # started: start it from the scheduler, since a greenlet started from here would
            # inherit this thread's recursion depth and thousands of them would overflow it.
            self.main.switch()
        del self.blocked[tid]
        self._resume(tid)

    def _yield(self, grank: int, req: Any) -> None:
        """Let every other runnable thread run once (a polling ``test()``)."""
        tid = self.cur
        if not self.runnable:  # nobody else can run: this request can never complete
            raise DeadlockError(f"deadlock: virtual rank {grank} polls with test() for "
                                f"{req.describe()}, and no other rank can run to complete it")
        self.runnable.append(self.threads[tid])
        self.main.switch()
        self._resume(tid)

    def _gather(self, t: "SimTransport", value: Any, finish: Callable[[dict], Any]) -> Any:
        """Collective rendezvous of ``t``'s group: every rank deposits ``value``; the last to
        arrive computes ``finish(values)`` once and wakes the others; all get that result."""
        key = (t.ctx, t._gathers)
        t._gathers += 1
        st = self.gathers.get(key)
        if st is None:
            st = self.gathers[key] = [{}, [], None]
        st[0][t.rank] = value
        if len(st[0]) == t.size:
            del self.gathers[key]
            st[2] = finish(st[0])
            self.runnable.extend(st[1])
        else:
            st[1].append(self.threads[self.cur])
            self._block(t.grank, f"collective (split/barrier/native) of group ctx {t.ctx}")
        return st[2]

    def _thread_name(self, tid: int) -> str:
        return f"rank {tid}" if tid < self.size else f"rank {tid - self.size} (stream)"

    def run(self, fn: Callable[..., Any], args: Callable[[int], tuple] | Sequence[tuple] = (),
            kwargs: dict[str, Any] | None = None,
            transport: Callable[["Engine", int], "SimTransport"] | None = None) -> SimResult:
        """Run ``fn(transport, *args(rank), **kwargs)`` on every virtual rank; returns once
        every main function has returned and every stream is idle. ``transport``: makes
        rank r's world transport (default: ``SimTransport`` over all ranks)."""
        kwargs = kwargs or {}
        t0, c0 = _time.perf_counter(), _time.process_time()
        self.main = getcurrent()
        ranks = list(range(self.size))
        results: list[Any] = [None] * self.size
        finish = [0.0] * self.size
        get_args = args if callable(args) else (lambda r: args[r] if args else ())
        make = transport or (lambda e, r: SimTransport(e, 0, r, ranks))

        def body(r: int) -> None:
            self._resume(r)
            t = make(self, r)
            try:
                results[r] = fn(t, *get_args(r), **kwargs)
            except BaseException as exc:  # noqa: BLE001  (reported by the scheduler below)
                if isinstance(exc, GreenletExit):
                    raise
                self.error = (f"virtual rank {r} of {self.size}", exc)
                return
            finish[r] = self.clock[r]

        self.greenlets = [greenlet(lambda r=r: body(r), parent=self.main) for r in ranks]
        self.threads = list(self.greenlets)
        self.streams, self.owner, self.saved = {}, [], []
        self.runnable.extend(self.greenlets)
        try:
            while self.runnable:
                self.runnable.popleft().switch()
                if self.error is not None:
                    who, exc = self.error
                    raise RankError(f"{who} raised {type(exc).__name__}: {exc}") from exc
            stuck = [r for r in ranks if not self.greenlets[r].dead]
            busy = [r for r, st in sorted(self.streams.items()) if not st.idle]
            if stuck or busy:
                lines = [f"  {self._thread_name(tid)}: waits for "
                         + (w.describe() if hasattr(w, "describe") else str(w))
                         for tid, w in sorted(self.blocked.items())[:16]]
                n = len(self.blocked)
                more = f"\n  ... and {n - 16} more" if n > 16 else ""
                streams = f"; streams of ranks {_ranges(busy)} busy" if busy else ""
                raise DeadlockError(f"deadlock: {len(stuck)} of {self.size} virtual ranks are blocked "
                                    f"and no message in flight can wake them: ranks "
                                    f"{_ranges(stuck) or 'none'}{streams}\n" + "\n".join(lines) + more)
        finally:
            self.runnable.clear()
            self.greenlets = []  # blocked greenlets are unwound (GreenletExit) when collected
            self.threads = []
        for r, st in self.streams.items():  # a rank is done once its stream is too
            if st.end > finish[r]:
                finish[r] = st.end
        self.streams = {}
        messages = self.messages + sum(count() for count in self.fast_counts)
        return SimResult(max(finish) if finish else 0.0, finish, results, messages,
                         _time.perf_counter() - t0, _time.process_time() - c0)


class _StreamRequest:
    """A call queued on a stream: ``wait()`` gives its result and moves the waiter's clock to
    its finish."""

    __slots__ = ("engine", "rank", "fn", "done", "t", "result", "waiting")

    def __init__(self, engine: Engine, rank: int, fn: Any) -> None:
        self.engine = engine
        self.rank = rank
        self.fn = fn
        self.done = False
        self.t = 0.0
        self.result: Any = None
        self.waiting: Any = None

    def wait(self) -> Any:
        e = self.engine
        if not self.done:
            self.waiting = e.threads[e.cur]
            e._block(self.rank, self)
        r = e.cur % e.size
        if self.t > e.clock[r]:
            e.clock[r] = self.t
        return self.result

    def test(self) -> bool:
        if not self.done:
            self.engine._yield(self.rank, self)
        if self.done:
            self.wait()
        return self.done

    def describe(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or type(self.fn).__name__
        return f"its stream's call {name}"


class _Stream:
    """A rank's communication stream (``Background``): a second virtual thread that runs the
    submitted calls one after another, each from max(the submitter's clock at submission, the
    previous call's finish), on its own clock."""

    def __init__(self, engine: Engine, rank: int, tid: int) -> None:
        self.engine = engine
        self.rank = rank
        self.tid = tid
        self.queue: deque = deque()
        self.idle = True
        self.end = 0.0  # when its last call finished
        self.greenlet = greenlet(self._loop, parent=engine.main)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> _StreamRequest:
        e = self.engine
        req = _StreamRequest(e, self.rank, fn)
        self.queue.append((e.clock[e.cur % e.size], fn, args, kwargs, req))
        if self.idle:
            self.idle = False
            e.runnable.append(self.greenlet)
        return req

    def _loop(self) -> None:
        e = self.engine
        r = self.rank
        e._resume(self.tid)
        while True:
            while self.queue:
                t_submit, fn, args, kwargs, req = self.queue.popleft()
                if t_submit > e.clock[r]:
                    e.clock[r] = t_submit
                try:
                    req.result = fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001  (reported by the scheduler)
                    if isinstance(exc, GreenletExit):
                        raise
                    e.error = (f"the stream of virtual rank {r} of {e.size}", exc)
                    e.main.switch()
                    return
                req.t = self.end = e.clock[r]
                req.done = True
                if req.waiting is not None:
                    e.runnable.append(req.waiting)
            self.idle = True
            e.main.switch()  # woken by the next submit
            e._resume(self.tid)


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ", ".join(out)


class Periodic:
    """The ranks of a periodic world: group rank i is engine rank i % period (a reduced
    simulation of a shift-invariant algorithm, see ``mpipar.sim.run``)."""

    __slots__ = ("size", "period")

    def __init__(self, size: int, period: int) -> None:
        self.size, self.period = size, period

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> int:
        return i % self.period


class SimTransport:
    """One virtual rank's view of one group: the Transport interface over the Engine."""

    # No memory is kept between calls (scratch is allocated anew: buffers are often
    # zero-stride placeholders), and nodes come from the network's ranks_per_node alone.
    scratch_pool: BufferPool | None = None
    shared_node: Callable[[], int] | None = None
    watch: Any = None   # virtual ranks cannot hang: no watchdog

    def __init__(self, engine: Engine, ctx: int, rank: int, ranks: Sequence[int],
                 nodes: Sequence[int] | None = None) -> None:
        self.engine = engine
        self.ctx = ctx
        self.rank = rank
        self.size = len(ranks)
        self.ranks = ranks            # group rank -> global rank
        self.grank = ranks[rank]
        # group rank -> node: the level of a message is decided from these (a reduced,
        # periodic world passes the nodes of its logical ranks)
        self.nodes = nodes if nodes is not None else (
            engine.node if ctx == 0 else [engine.node[g] for g in ranks])
        self.cache: dict[Any, Any] = {}
        self._gathers = 0
        # The node layout, for topology-aware algorithms (hier): only the world group of a
        # two-level network of consecutive nodes has one (a sub-group's ranks need not be).
        rpn = getattr(engine.net, "ranks_per_node", 1)
        consecutive = getattr(engine.net, "consecutive", True)
        self.ranks_per_node = rpn if ctx == 0 and rpn > 1 and consecutive else None
        self.native = _SimNative(self)
        self._call_overhead = engine.net.profile.call_overhead
        # The hot path, as closures over this rank's constants (see _fast_sendrecv).
        self.sendrecv = _fast_sendrecv(self)
        self.reduce_local = _fast_reduce_local(self)

    def __repr__(self) -> str:
        return f"SimTransport(rank={self.rank}, size={self.size}, global={self.grank}, ctx={self.ctx})"

    @property
    def now(self) -> float:
        """This rank's virtual clock (seconds)."""
        return self.engine.clock[self.grank]

    def isend(self, buf: Any, dest: int, tag: int = 0) -> Any:
        """Post a send. With the profile's ``post_overhead`` o, posting takes o of this
        rank's time first (a sendrecv's bookkeeping is in alpha: it posts nothing)."""
        if self.engine.post:
            self.engine.clock[self.grank] += self.engine.post
        return self._isend(buf, dest, tag)

    def irecv(self, buf: Any, source: int, tag: int = 0) -> SimRequest:
        """Post a receive (``post_overhead`` as for isend)."""
        if self.engine.post:
            self.engine.clock[self.grank] += self.engine.post
        return self._irecv(buf, source, tag)

    def _receiving(self) -> bool:
        """Whether this rank has a receive outstanding at its clock (one-way pricing only):
        posted and not yet matched, or matched with an arrival still ahead."""
        e = self.engine
        now = e.clock[self.grank]
        open_ = e.open_recvs[self.grank]
        open_[:] = [r for r in open_ if not r.done or r.t > now]
        return bool(open_)

    def _isend(self, buf: Any, dest: int, tag: int = 0, lone: bool | None = None) -> Any:
        """``lone``: price as a one-way message; None: decide from whether this rank is
        receiving (with a profile that prices one-way messages apart, else never)."""
        e = self.engine
        src = self.grank
        dst = self.ranks[dest]
        now = e.clock[src]
        nbytes = buf.nbytes
        if lone is None:
            lone = e.oneway and not self._receiving()
        key = (self.ctx, src, dst, tag)
        nodes = self.nodes
        level = 0 if nodes[dest] == nodes[self.rank] else 1
        q = e.recvs.get(key)
        if q:  # the receive is posted: transfer now
            r = q.popleft()
            if nbytes > r.buf.nbytes:
                raise ValueError(f"message truncated: rank {src} sends {nbytes} bytes to rank {dst}, "
                                 f"which posted a {r.buf.nbytes}-byte receive (tag {tag})")
            if e.data and nbytes:
                _copy(r.buf, buf)
            if nbytes <= e.eager_limit:
                r.t = e._arrival(src, dst, nbytes, now, lone, level)
                r.done = True
                if r.waiting is not None:
                    e.runnable.append(r.waiting)
                return _DONE
            start = r.t if r.t > now else now
            r.t = arrival = e._arrival(src, dst, nbytes, start, lone, level)
            r.done = True
            if r.waiting is not None:
                e.runnable.append(r.waiting)
            s = SimRequest(e, src, arrival, None, dst, tag, True)
            s.done = True
            if e.cpu:  # settled at the receiver's wait
                r.start, r.sender = arrival - e.last_cost, s
            return s
        if nbytes <= e.eager_limit:  # buffered: the arrival time is fixed now
            snap = buf.copy() if e.data and nbytes else buf
            pend = (e._arrival(src, dst, nbytes, now, lone, level), snap, nbytes, None)
            ret: Any = _DONE
        else:
            ret = SimRequest(e, src, now, None, dst, tag, True)
            ret.lone = lone
            pend = (now, buf, nbytes, ret)
        q = e.sends.get(key)
        if q is None:
            q = e.sends[key] = deque()
        q.append(pend)
        return ret

    def _irecv(self, buf: Any, source: int, tag: int = 0) -> SimRequest:
        e = self.engine
        dst = self.grank
        src = self.ranks[source]
        key = (self.ctx, src, dst, tag)
        q = e.sends.get(key)
        now = e.clock[dst]
        r = SimRequest(e, dst, now, buf, src, tag, False)
        if e.oneway:
            e.open_recvs[dst].append(r)
        if q:
            p_t, p_buf, p_nbytes, s = q.popleft()
            if p_nbytes > buf.nbytes:
                raise ValueError(f"message truncated: rank {src} sends {p_nbytes} bytes to rank {dst}, "
                                 f"which posted a {buf.nbytes}-byte receive (tag {tag})")
            if e.data and p_nbytes:
                _copy(buf, p_buf)
            if s is None:
                r.t = p_t
            else:
                start = p_t if p_t > now else now
                nodes = self.nodes
                level = 0 if nodes[source] == nodes[self.rank] else 1
                r.t = s.t = e._arrival(src, dst, p_nbytes, start, s.lone, level)
                s.done = True
                if e.cpu:  # settled at this rank's wait
                    r.start, r.sender = r.t - e.last_cost, s
                if s.waiting is not None:
                    e.runnable.append(s.waiting)
            r.done = True
            return r
        q = e.recvs.get(key)
        if q is None:
            q = e.recvs[key] = deque()
        q.append(r)
        return r

    def _sendrecv_general(self, sendbuf: Any, dest: int, recvbuf: Any, source: int,
                          tag: int = 0) -> Any:
        r = self._irecv(recvbuf, source, tag)
        s = self._isend(sendbuf, dest, tag, lone=False)  # sending and receiving at once
        if s is not _DONE:
            s.wait()
        return r.wait()

    def split(self, color: int | None, key: int = 0) -> "SimTransport | None":
        """Collective over this group, as MPI_Comm_split (costs no virtual time)."""
        e = self.engine

        def groups(values: dict[int, tuple]) -> dict[int, tuple]:
            by_color: dict[Any, list] = {}
            for r, (c, k) in values.items():
                if c is not None:
                    by_color.setdefault(c, []).append((k, r))
            out: dict[int, tuple] = {}
            for c in sorted(by_color, key=repr):
                members = sorted(by_color[c])
                ctx = e.next_ctx
                e.next_ctx += 1
                granks = [self.ranks[r] for _, r in members]
                for i, (_, r) in enumerate(members):
                    out[r] = (ctx, i, granks)
            return out

        mine = e._gather(self, (color, key), groups).get(self.rank)
        if mine is None:
            return None
        return SimTransport(e, mine[0], mine[1], mine[2])

    def dup(self) -> "SimTransport":
        sub = self.split(0, self.rank)
        assert sub is not None
        return sub

    def free(self) -> None:
        """Nothing to release: a group is a context number."""

    def begin_collective(self, algorithm: str) -> None:
        """A collective starts: the profile's per-call overhead of ``algorithm`` (argument
        checks and set-up, ``call_overhead_s``) passes on this rank's clock."""
        seconds = self._call_overhead.get(algorithm, 0.0)
        if seconds:
            self.engine.advance(seconds)

    def clock(self) -> float:
        """This rank's virtual clock (``now``)."""
        return self.engine.clock[self.grank]

    def background(self) -> "_Stream":
        """This rank's communication stream (one per rank, shared by all its groups): calls
        run in submission order on a second virtual thread, overlapping the main thread."""
        return self.engine.stream(self.grank)

    def barrier(self) -> None:
        """Every rank leaves at the latest arrival time (no network cost charged)."""
        e = self.engine
        latest = e._gather(self, e.clock[self.grank], lambda v: max(v.values()))
        if latest > e.clock[self.grank]:
            e.clock[self.grank] = latest




class _SimNative:
    """``algorithm="native"`` on the simulator (``Transport.native``): the cluster's own
    collective as one rendezvous of the group, not thousands of messages. Every member waits
    for the last to arrive; all finish at that arrival plus the network's ``native_time``
    (the profile's measured busbw tables, see ``network.NativeTables``: measured end to end,
    so they include the library's per-call cost). With ``data=True`` the result is computed with NumPy in
    rank order, so tests can check it."""

    def __init__(self, t: "SimTransport") -> None:
        self.t = t
        self._shape: tuple[int, int] | None = None

    def _run(self, collective: str, nbytes: int, value: Any, combine: Callable[[dict], Any]) -> Any:
        t = self.t
        e = t.engine
        if self._shape is None:
            self._shape = e.net.shape([t.ranks[i] for i in range(t.size)])
        per_node, nodes = self._shape
        seconds = e.net.native_time(collective, nbytes, t.size, per_node, nodes)

        def finish(values: dict) -> tuple[float, Any]:
            latest = max(v[0] for v in values.values())
            return latest + seconds, (combine({r: v[1] for r, v in values.items()}) if e.data else None)

        end, out = e._gather(t, (e.clock[t.grank], value), finish)
        if end > e.clock[t.grank]:
            e.clock[t.grank] = end
        return out

    def _reduced(self, values: dict, op: ReduceOp) -> Any:
        acc = np.array(values[0], copy=True)
        for r in range(1, len(values)):
            op.combine(acc, values[r])
        return acc

    def allreduce(self, buf: Any, op: ReduceOp) -> Any:
        out = self._run("allreduce", buf.nbytes, buf, lambda v: self._reduced(v, op))
        if out is not None:
            buf[...] = out
        return buf

    def reduce(self, buf: Any, op: ReduceOp, root: int) -> Any:
        out = self._run("reduce", buf.nbytes, buf, lambda v: self._reduced(v, op))
        if out is not None and self.t.rank == root:
            buf[...] = out
        return buf

    def broadcast(self, buf: Any, root: int) -> Any:
        out = self._run("broadcast", buf.nbytes, buf, lambda v: np.array(v[root], copy=True))
        if out is not None:
            buf[...] = out
        return buf

    def reduce_scatter(self, buf: Any, op: ReduceOp, counts: list[int]) -> Any:
        out = self._run("reduce_scatter", buf.nbytes, buf, lambda v: self._reduced(v, op))
        lo = sum(counts[:self.t.rank])
        mine = buf[lo:lo + counts[self.t.rank]]
        if out is None:
            return mine
        return np.array(out[lo:lo + counts[self.t.rank]], copy=True)

    def allgather(self, block: Any, counts: list[int]) -> Any:
        total = sum(counts)
        out = self._run("allgather", total * block.itemsize, block,
                        lambda v: np.concatenate([np.asarray(v[r]).reshape(-1) for r in range(len(v))]))
        if out is None:
            return placeholder(total, block.dtype)
        return np.array(out, copy=True)

    def alltoall(self, buf: Any) -> Any:
        p = self.t.size

        def transpose(v: dict) -> Any:
            return np.stack([np.asarray(v[j]).reshape(p, -1) for j in range(p)])  # [from, to, :]

        out = self._run("alltoall", buf.nbytes, buf, transpose)
        if out is not None:
            buf[...] = out[:, self.t.rank, :].reshape(buf.shape)
        return buf


def _copy(dst: Any, src: Any) -> None:
    """Receive ``src``'s bytes into the front of ``dst`` (both contiguous)."""
    if dst.dtype == src.dtype and dst.shape == src.shape:
        dst[...] = src
        return
    if not dst.flags.c_contiguous:
        raise ValueError("receive buffers must be contiguous")
    dst.reshape(-1).view(np.uint8)[:src.nbytes] = np.ascontiguousarray(src).reshape(-1).view(np.uint8)


def _fast_reduce_local(t: SimTransport) -> Callable[[ReduceOp, Any, Any], None]:
    """``t.reduce_local(op, dst, src)``: combine ``src`` into ``dst`` (when the run carries
    data) and charge the network's reduction time for ``dst.nbytes`` (``gamma`` per byte, or
    the profile's reduction size classes) to the rank's clock."""
    e = t.engine
    clock, me, gamma, data = e.clock, t.grank, e.gamma, e.data
    computing = e.computing[me] if e.cpu else None

    def stall_while(begin: float) -> None:  # remember a reduction (transfers_need_cpu)
        computing.append((begin, clock[me]))
        if len(computing) > 64:  # a transfer spans a few reductions at most
            del computing[:32]
    if getattr(e.net, "reduce_link", None) is not None:
        reduce_cost = e.net.reduce_cost

        def reduce_by_class(op: ReduceOp, dst: Any, src: Any) -> None:
            nbytes = dst.nbytes
            if nbytes:
                c0 = clock[me]
                clock[me] += reduce_cost(nbytes)
                if computing is not None:
                    stall_while(c0)
            if data:
                op.combine(dst, src)

        return reduce_by_class

    def reduce_local(op: ReduceOp, dst: Any, src: Any) -> None:
        c0 = clock[me]
        clock[me] += gamma * dst.nbytes
        if computing is not None:
            stall_while(c0)
        if data:
            op.combine(dst, src)

    return reduce_local


def _fast_sendrecv(t: SimTransport) -> Callable[..., Any]:
    """``t.sendrecv(sendbuf, dest, recvbuf, source, tag)``: irecv + isend + wait both.

    Ring-like algorithms send nearly all their messages through here, and at thousands of
    ranks the simulator's speed is this function's speed: 4096 ranks of a ring all-reduce are
    33.5 million calls. So the common case (no data carried, both messages eager) is written
    out once, as a closure whose constants (this rank, its group, the engine's tables) are
    cell variables rather than attribute look-ups, and which remembers the message queues and
    ports of the last peer it received from and the last it sent to (a ring hop talks to the
    same two neighbours every time); anything else takes the three-call path. Same semantics
    and the same virtual times either way (tests/sim check both)."""
    e = t.engine
    me, ctx, ranks, nodes, my_node = t.grank, t.ctx, t.ranks, t.nodes, t.nodes[t.rank]
    general = t._sendrecv_general
    fast_limit = -1 if e.data else e.eager_limit  # no fast path when bytes are carried
    clock, sends, recvs = e.clock, e.sends, e.recvs
    port_of = e.port
    cost = e._cost
    serialize = e.serialize
    nic_out, nic_in = e.nic_out, e.nic_in
    block, runnable = e._block, e.runnable
    # the last channel in: (source, tag) -> its queue of unmatched sends and of receives
    in_src = in_tag = -1
    in_sends = in_recvs = deque()
    # the last channel out: (dest, tag) -> global rank, level, ports, queues
    out_dest = out_tag = -1
    out_dst = out_level = 0
    out_port: list = []
    out_busy: list = []
    out_sends = out_recvs = deque()
    # the last message cost: (level, nbytes) -> occupancy alpha + nbytes * beta, latency
    cost_level = cost_n = -1
    cost_s = cost_l = 0.0
    sent = 0  # messages sent here (the engine sums these at the end of the run)
    e.fast_counts.append(lambda: sent)

    def sendrecv(sendbuf: Any, dest: int, recvbuf: Any, source: int, tag: int = 0) -> Any:
        nonlocal in_src, in_tag, in_sends, in_recvs, out_dest, out_tag, out_dst, out_level
        nonlocal out_port, out_busy, out_sends, out_recvs, cost_level, cost_n, cost_s, cost_l
        nonlocal sent
        nbytes = sendbuf.nbytes
        rbytes = recvbuf.nbytes
        if nbytes > fast_limit or rbytes > fast_limit:
            return general(sendbuf, dest, recvbuf, source, tag)
        # -- post the receive: take the matching send if it is already queued ------------------
        now = clock[me]
        if source != in_src or tag != in_tag:
            in_src, in_tag = source, tag
            key = (ctx, ranks[source], me, tag)
            in_sends = sends.setdefault(key, deque())
            in_recvs = recvs.setdefault(key, deque())
        req = None
        if in_sends:
            arrival, _, p_nbytes, _ = in_sends.popleft()
            if p_nbytes > rbytes:
                raise ValueError(f"message truncated: rank {ranks[source]} sends {p_nbytes} bytes "
                                 f"to rank {me}, which posted a {rbytes}-byte receive (tag {tag})")
        else:
            arrival = -1.0
            req = SimRequest(e, me, now, recvbuf, ranks[source], tag, False)
            in_recvs.append(req)
        # -- send: eager, so its arrival is fixed now (Engine._arrival, written out) ------------
        if dest != out_dest or tag != out_tag:
            out_dest, out_tag = dest, tag
            out_dst = ranks[dest]
            out_level = 0 if nodes[dest] == my_node else 1
            pt = port_of[out_level]
            out_port = nic_out[out_level][pt[me]]
            out_busy = nic_in[out_level][pt[out_dst]]
            key = (ctx, me, out_dst, tag)
            out_sends = sends.setdefault(key, deque())
            out_recvs = recvs.setdefault(key, deque())
        sent += 1
        if nbytes != cost_n or out_level != cost_level:
            cost_level, cost_n = out_level, nbytes
            cost_s, cost_l = cost(out_level, nbytes)
        if out_dst == me:
            t_arr = now
        elif serialize:
            busy = out_port
            if not busy or now >= busy[-1][1]:
                start = now
                busy.append((start, start + cost_s))
                if len(busy) > _IN_PORT_LIMIT:
                    _forget(busy)
            else:
                start = _book(busy, now, cost_s) - cost_s
            busy = out_busy
            if not busy or start >= busy[-1][1]:
                t_arr = start + cost_s
                busy.append((start, t_arr))
                if len(busy) > _IN_PORT_LIMIT:
                    _forget(busy)
                t_arr += cost_l
            else:
                t_arr = _book(busy, start, cost_s) + cost_l
        else:
            t_arr = now + cost_s + cost_l
        if out_recvs:
            r = out_recvs.popleft()
            if nbytes > r.buf.nbytes:
                raise ValueError(f"message truncated: rank {me} sends {nbytes} bytes to rank {out_dst}, "
                                 f"which posted a {r.buf.nbytes}-byte receive (tag {tag})")
            r.t = t_arr
            r.done = True
            if r.waiting is not None:
                runnable.append(r.waiting)
        else:
            out_sends.append((t_arr, None, nbytes, None))  # no data: nothing to keep
        # -- wait for the receive ---------------------------------------------------------------
        if req is not None:
            if not req.done:
                req.waiting = e.threads[e.cur]
                block(me, req)
            arrival = req.t
        if arrival > clock[me]:
            clock[me] = arrival
        return recvbuf

    return sendrecv
