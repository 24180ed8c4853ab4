"""The hang watchdog: every wait of mpipar has a deadline, and a rank that gives up says what
it waited for, on which group, and which ranks had not got there.

Without it a stalled rank (stopped, swapped out, stuck in a loop) or a mismatched collective
leaves every other rank blocked in MPI forever, saying nothing. With it:

* **A deadline on every wait.** Every wait of mpipar (a point-to-point request of the
  from-scratch algorithms and of the pipeline executor, a native collective in its
  non-blocking form, the background thread's) polls through ``wait`` below, which raises
  ``CollectiveTimeoutError`` once one wait has lasted longer than the collective timeout:
  ``set_timeout(seconds)``, else ``MPIPAR_COLLECTIVE_TIMEOUT``, else ``DEFAULT_TIMEOUT``
  (300 s: far above any one wait of a healthy run, a 16 MiB all-reduce here takes 0.05 s and
  a pipeline bubble milliseconds, yet a hung job on a cluster ends within minutes instead of
  burning its whole allocation); 0 disables it. The deadline is per wait, not per collective:
  a long collective that keeps moving never times out. Uncaught, the error aborts the job
  through ``runtime``'s abort path, which names the rank and the cause.
* **Back-off instead of spinning.** ``wait`` spins for ``SPIN_S`` (small messages keep their
  latency), then sleeps ``min(SLEEP_CAP_S, elapsed * SLEEP_FRACTION)`` between polls, so a
  long wait costs at most about 1% more than its message took and a stalled job's waiting
  ranks sit at a few % of a core. MPICH progresses only inside ``Test``; the spin covers a
  large message's transfer (measured in docs/training.md, "Hangs and failures").
* **A progress board readable without the stalled peer's help.** A SIGSTOPped rank answers
  nothing, so each rank writes its progress by plain stores into its own part of an MPI RMA
  window (``Board``, ``MPI_Win_allocate`` on the world, made by ``make_communicator``): per
  group it belongs to, how many collectives it has entered, the last one and since when
  (entered, or left), and a heartbeat while it waits. The rank that times out reads its
  peers' parts with passive-target ``MPI_Rget`` polled for at most ``READ_TIMEOUT_S``: on one
  node MPICH completes that from shared memory while the target is stopped (tested); across
  nodes it completes where the network does RMA without the target, and a peer that does
  not answer in time is reported as "no answer".

A group is named on the board by a number every member derives alone (``group_id``): the
group's world ranks and how many groups of exactly those ranks this rank made before, which
is the same on every member because making a communicator is collective over its members.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import socket
import threading
import time
import weakref
from typing import Any, Callable, Sequence

import numpy as np

ENV = "MPIPAR_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT = 300.0

# The poll loop (measured on this machine: docs/training.md, "Hangs and failures").
SPIN_S = 2e-3            # poll without sleeping this long: a 16 MiB exchange completes inside it
SLEEP_FRACTION = 0.01    # then sleep this fraction of the time waited so far ...
SLEEP_CAP_S = 0.01       # ... at most this long
READ_TIMEOUT_S = 1.0     # how long a timed-out rank waits for one peer's board
STALE_S = 2.0            # a waiting rank beats every SLEEP_CAP_S: older than this, it does not run
MAX_ELSEWHERE = 8        # ranks outside the group listed in a report (those without sign of life)

OPERATIONS = ("allreduce", "reduce", "broadcast", "reduce_scatter", "allgather", "alltoall",
              "barrier")
OP_CODES = {name: i + 1 for i, name in enumerate(OPERATIONS)}   # 0: nothing yet

_timeout: float | None = None


class CollectiveTimeoutError(RuntimeError):
    """A collective or point-to-point wait lasted longer than the collective timeout."""


def set_timeout(seconds: float | None) -> None:
    """The longest one wait may last, in seconds, for this process (0: no limit; None: back
    to ``MPIPAR_COLLECTIVE_TIMEOUT`` or the default, read again at the next wait)."""
    global _timeout
    if seconds is not None and not (seconds >= 0 and seconds != float("inf")):
        raise ValueError(f"the collective timeout must be a finite number of seconds >= 0, got {seconds}")
    _timeout = None if seconds is None else float(seconds)


def get_timeout() -> float:
    """The collective timeout in force (0: none); ``MPIPAR_COLLECTIVE_TIMEOUT`` is read once."""
    global _timeout
    if _timeout is None:
        text = os.environ.get(ENV)
        if text is None:
            _timeout = DEFAULT_TIMEOUT
        else:
            try:
                value = float(text)
            except ValueError:
                value = -1.0
            if not (value >= 0 and value != float("inf")):
                raise ValueError(f"{ENV} must be a finite number of seconds >= 0, got {text!r}")
            _timeout = value
    return _timeout


# ---------------------------------------------------------------------------- the board
HEADER = 4               # per rank: pid, heartbeat (ns), spare, spare
SLOT = 4                 # per group: group id, collectives entered, operation, since (ns; < 0: left)
SLOTS = 256              # groups one rank can be in at once (more are not on the board)


def group_id(members: Sequence[int], made_before: int) -> int:
    """The board's name of a group: a nonzero int64 from its world ranks and how many groups
    of exactly these ranks this rank made before (the same on every member)."""
    digest = hashlib.blake2b(f"{list(members)}/{made_before}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1


class Board:
    """Every rank's progress, in an MPI RMA window over the world (collective to make).

    This rank writes its own part with plain stores (a few hundred ns each); ``read`` fetches
    a peer's part with a passive-target ``Rget`` under a ``Lock_all`` epoch opened once, so
    reading never waits for a lock the peer would have to grant.
    """

    def __init__(self, MPI: Any, world: Any, lock: Any) -> None:
        self.MPI, self.lock = MPI, lock
        self.rank, self.size = world.Get_rank(), world.Get_size()
        self.words = HEADER + SLOT * SLOTS
        self.win = MPI.Win.Allocate(8 * self.words, 8, comm=world)
        self.mem = self.win.tomemory().cast("B").cast("q")
        for i in range(self.words):
            self.mem[i] = 0
        self.mem[0] = os.getpid()
        self.mem[1] = time.time_ns()
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.host = socket.gethostname()
        self._free = list(range(SLOTS - 1, -1, -1))

    def claim(self, gid: int) -> int | None:
        """A slot of this rank's part for group ``gid`` (None: all taken; not on the board)."""
        if not self._free:
            return None
        slot = self._free.pop()
        base = HEADER + SLOT * slot
        self.mem[base + 1] = self.mem[base + 2] = self.mem[base + 3] = 0
        self.mem[base] = gid
        return base

    def release(self, base: int) -> None:
        self.mem[base] = 0
        self._free.append((base - HEADER) // SLOT)

    def beat(self) -> None:
        self.mem[1] = time.time_ns()

    def read(self, ranks: Sequence[int]) -> dict[int, list[int] | None]:
        """The board parts of ``ranks``: one ``Rget`` each, all awaited together for at most
        READ_TIMEOUT_S; a part that did not come is None ("no answer")."""
        out = {r: np.zeros(self.words, dtype=np.int64) for r in ranks if r != self.rank}
        with self.lock:
            reqs = {r: self.win.Rget(buf, r) for r, buf in out.items()}
        got: dict[int, list[int] | None] = {r: None for r in ranks}
        if self.rank in got:
            got[self.rank] = list(self.mem)
        deadline = time.monotonic() + READ_TIMEOUT_S
        while reqs:
            with self.lock:
                done = [r for r, req in reqs.items() if req.Test()]
            for r in done:
                got[r] = out[r].tolist()
                del reqs[r]
            if not reqs or time.monotonic() > deadline:
                break   # requests left pending: the job is about to end anyway
            time.sleep(1e-3)
        return got

    def close(self) -> None:
        """Collective: end the epoch and free the window (at exit, before MPI_Finalize)."""
        self.win.Unlock_all()
        self.win.Free()


_board: Board | None = None
_live: "weakref.WeakSet[GroupWatch]" = weakref.WeakSet()   # this rank's watched groups
_made: dict[tuple[int, ...], int] = {}   # groups of these world ranks made so far on this rank


def open_board(MPI: Any, world: Any, lock: Any) -> Board:
    """The process's board, made on first call (collective over ``world``, COMM_WORLD)."""
    global _board
    if _board is None:
        _board = Board(MPI, world, lock)
        atexit.register(_close_board)   # runs before mpi4py's MPI_Finalize (registered earlier)
    return _board


def _close_board() -> None:
    global _board
    board, _board = _board, None
    if board is not None:
        board.close()


def board() -> Board | None:
    return _board


def summary() -> str:
    """For a run's header, on world rank 0 (empty elsewhere): the collective timeout and each
    rank's process id from the board ("collective timeout 300 s | pids 0:4242 1:4243"), the
    process a tool or a user signals to reach that rank."""
    if _board is None or _board.rank != 0:
        return ""
    limit = get_timeout()
    rows = _board.read(range(_board.size))   # every rank wrote its pid before its first collective
    pids = " ".join(f"{r}:{row[0] if row else '?'}" for r, row in rows.items())
    return f"collective timeout {f'{limit:g} s' if limit else 'off'} | pids {pids}"


# ---------------------------------------------------------------------------- one group's record
class _Context(threading.local):
    op: tuple | None = None    # (watch, seq, name, nbytes, dtype, algorithm) of this thread's collective


_context = _Context()


class GroupWatch:
    """One group's record on the board, shared by its Communicator's transports.

    ``enter`` / ``leave`` bracket each collective: this rank's count, operation and time go
    to the board, and the operation becomes this thread's context, which a wait that times
    out inside it names.
    """

    def __init__(self, members: Sequence[int]) -> None:
        self.members = tuple(int(m) for m in members)
        made = _made.get(self.members, 0)
        _made[self.members] = made + 1
        self.gid = group_id(self.members, made)
        self.board = _board
        self.base = self.board.claim(self.gid) if self.board is not None else None
        self.seq = 0
        _live.add(self)

    def __repr__(self) -> str:
        return f"group {describe_members(self.members)}"

    def enter(self, seq: int, name: str, nbytes: int, dtype: Any, algorithm: str) -> None:
        self.seq = seq
        _context.op = (self, seq, name, nbytes, dtype, algorithm)
        base = self.base
        if base is not None:
            mem = self.board.mem
            mem[base + 1] = seq
            mem[base + 2] = OP_CODES[name]
            mem[1] = mem[base + 3] = time.time_ns()   # the heartbeat too

    def leave(self) -> None:
        """The collective completed."""
        _context.op = None
        base = self.base
        if base is not None:
            mem = self.board.mem
            now = time.time_ns()
            mem[1], mem[base + 3] = now, -now

    def abandon(self) -> None:
        """The collective raised: this thread leaves it, the board keeps it unfinished."""
        _context.op = None

    def release(self) -> None:
        """The group is freed: its slot goes back to the board."""
        if self.base is not None:
            self.board.release(self.base)
            self.base = None
        _live.discard(self)


class _Unwatched:
    """The record of a group nobody watches (the simulator's: its waits cannot hang)."""

    def enter(self, seq: int, name: str, nbytes: int, dtype: Any, algorithm: str) -> None:
        pass

    def leave(self) -> None:
        pass

    def abandon(self) -> None:
        pass

    def release(self) -> None:
        pass


UNWATCHED = _Unwatched()


def describe_members(members: Sequence[int]) -> str:
    """World ranks as a short list: [0..3] when consecutive, else [0, 2, 4]."""
    m = list(members)
    if len(m) > 2 and m == list(range(m[0], m[0] + len(m))):
        return f"[{m[0]}..{m[-1]}]"
    return "[" + ", ".join(map(str, m)) + "]"


# ---------------------------------------------------------------------------- waiting
def wait(test: Callable[[], bool], what: Any = None, yield_gil: bool = False) -> None:
    """Poll ``test()`` until it is true: spin ``SPIN_S`` (``yield_gil``: letting the other
    thread run between polls), then back off; raise ``CollectiveTimeoutError`` when the wait
    has lasted longer than the collective timeout. ``what`` says what is awaited: a
    point-to-point wait ``(kind, peer, tag, nbytes, watch)`` or a string."""
    limit = get_timeout()
    start = time.perf_counter()
    while True:
        if test():
            return
        elapsed = time.perf_counter() - start
        if elapsed < SPIN_S:
            if yield_gil:
                time.sleep(0)
            continue
        if limit and elapsed > limit:
            raise CollectiveTimeoutError(report(what, elapsed, limit))
        if _board is not None:
            _board.beat()
        time.sleep(min(SLEEP_CAP_S, elapsed * SLEEP_FRACTION))


def _ago(ns: int, now: int) -> str:
    return f"{max(0.0, (now - ns) / 1e9):.1f} s"


def _peer_line(rank: int, row: list[int] | None, gid: int, seq: int, name: str | None,
               known: dict[int, tuple[int, ...]], now: int, stale_s: float) -> tuple[str, bool]:
    """What rank ``rank``'s board says about group ``gid``, and whether it had NOT reached
    collective ``seq`` (``name``) of it (for a point-to-point wait ``name`` is None)."""
    if row is None:
        return f"rank {rank}: no answer", True
    slots = [row[HEADER + SLOT * i: HEADER + SLOT * (i + 1)] for i in range(SLOTS)]
    mine = next((s for s in slots if gid and s[0] == gid), None)
    beat = row[1]
    alive = f"; no sign of life for {_ago(beat, now)} (stopped, or busy outside mpipar)" \
        if beat and now - beat > stale_s * 1e9 else ""
    latest = max((s for s in slots if s[0] and s[1]), key=lambda s: abs(s[3]), default=None)
    if latest is None:
        doing = "no collective yet"
    else:
        where = describe_members(known[latest[0]]) if latest[0] in known else "another group"
        op = OPERATIONS[latest[2] - 1] if 0 < latest[2] <= len(OPERATIONS) else "?"
        doing = (f"in {op} #{latest[1]} on {where} for {_ago(latest[3], now)}" if latest[3] > 0
                 else f"last in {op} #{latest[1]} on {where}, left it {_ago(-latest[3], now)} ago")
    if name is None:   # a point-to-point wait, or a rank outside the group: what it does
        return f"rank {rank}: {doing}{alive}", True
    if mine is None:
        return f"rank {rank}: not on the board for this group; {doing}{alive}", True
    count = mine[1]
    op = OPERATIONS[mine[2] - 1] if 0 < mine[2] <= len(OPERATIONS) else "?"
    if count < seq:
        return f"rank {rank}: has not reached it; {doing}{alive}", True
    if count == seq and op != name:
        return f"rank {rank}: called {op} #{count} instead; {doing}{alive}", True
    if count == seq and mine[3] > 0 and alive:
        return f"rank {rank}: in it, not progressing{alive}", True
    if count > seq:
        return f"rank {rank}: past it, at #{count}; {doing}{alive}", False
    return f"rank {rank}: {doing}{alive}", False


def report(what: Any, elapsed: float, limit: float) -> str:
    """The message of a timed-out wait: the operation, its group, its sequence number, the
    ranks that had not reached it, and each member's record on the board."""
    me = _board.rank if _board is not None else None
    ctx = _context.op
    p2p = what if isinstance(what, tuple) else None
    if ctx is not None:
        watch, seq, name, nbytes, dtype, algorithm = ctx
        dt = f" {dtype}" if dtype is not None else ""
        head = f"{name} #{seq} ({nbytes:,} B{dt}, {algorithm}) on {watch!r}"
        if p2p is not None:
            head += f", in its {p2p[0]} {'to' if p2p[0] == 'send' else 'from'} group rank {p2p[1]} (tag {p2p[2]})"
    elif p2p is not None:
        kind, peer, tag, nbytes, watch = p2p
        name, seq = None, getattr(watch, "seq", 0)
        members = getattr(watch, "members", None)
        world = f" (world rank {members[peer]})" if members else ""
        head = (f"{kind} of {nbytes:,} B {'to' if kind == 'send' else 'from'} rank {peer}{world}, "
                f"tag {tag}, on {watch!r} (after collective #{seq} of the group)")
    else:
        watch, name, seq = None, None, 0
        head = str(what or "an MPI wait")
    text = (f"{head} timed out on world rank {me if me is not None else '?'} after {elapsed:.1f} s "
            f"(the collective timeout is {limit:g} s)")
    members = getattr(watch, "members", None)
    gid = getattr(watch, "gid", None)
    if _board is None or members is None:
        return text + "; no progress board to say where the other ranks are"
    known = {w.gid: w.members for w in _watches()}
    now = time.time_ns()
    stale_s = min(STALE_S, limit / 2)
    ranks = members if ctx is not None or p2p is None else (members[p2p[1]],)
    rows = _board.read(range(_board.size))
    lines, behind = [], []
    for r in ranks:
        if r == me:
            lines.append(f"  rank {r}: this rank")
            continue
        line, late = _peer_line(r, rows[r], gid, seq, name, known, now, stale_s)
        lines.append("  " + line)
        if late:
            behind.append(r)
    # the cause may lie outside the group: ranks elsewhere that do not run (or answer)
    elsewhere = [r for r in range(_board.size) if r not in ranks and r != me and
                 (rows[r] is None or now - rows[r][1] > stale_s * 1e9)]
    for r in elsewhere[:MAX_ELSEWHERE]:
        lines.append("  elsewhere, " + _peer_line(r, rows[r], 0, 0, None, known, now, stale_s)[0])
    if len(elsewhere) > MAX_ELSEWHERE:
        lines.append(f"  and {len(elsewhere) - MAX_ELSEWHERE} more ranks elsewhere without sign of life")
    who = ", ".join(map(str, behind)) if behind else "none (all are in it)"
    label = "ranks that had not reached it" if name is not None else "waiting for rank"
    return text + f"; {label}: {who}\n" + "\n".join(lines)


def _watches() -> list[GroupWatch]:
    return list(_live)
