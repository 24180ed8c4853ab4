"""Process-level helpers: who am I, print on rank 0, a progress display, a stop requested
by a signal, and die loudly instead of hanging.

An uncaught exception on one MPI rank would otherwise leave the other ranks blocked in a
collective forever. ``install_abort_handler`` makes it print the rank and the cause and then
call ``MPI_Abort`` on COMM_WORLD, which the launcher turns into a non-zero exit of the whole job.

A scheduler that wants a job gone sends a signal first (Slurm: SIGTERM at the time limit or on
``scancel``, the ``--signal`` of ``sbatch``, e.g. SIGUSR1, some time before; a terminal: SIGINT).
``StopRequest`` turns the first of them into a flag that the training loop reads at a step
boundary, so the run can save and exit cleanly; a second one, later than a repeat of the same
delivery could be, exits at once. Handlers are installed by command lines only (``install``),
never when a library module is imported.

A rank killed outright (SIGKILL, the out-of-memory killer) runs no handler, and MPICH's Hydra
then kills every other rank and names the PID of another one. ``supervise`` forks each rank
before MPI starts: the child is the rank, the parent only waits for it, and says which rank
died and how.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import stat
import sys
import termios
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

_RANK_ENV = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID", "MV2_COMM_WORLD_RANK")
_SIZE_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS", "MV2_COMM_WORLD_SIZE")


def _mpi_if_initialized() -> Any:
    mod = sys.modules.get("mpi4py.MPI")
    if mod is not None and mod.Is_initialized() and not mod.Is_finalized():
        return mod
    return None


def world_rank() -> int:
    """Rank in COMM_WORLD, without initialising MPI (launcher env vars as fallback)."""
    mpi = _mpi_if_initialized()
    if mpi is not None:
        return mpi.COMM_WORLD.Get_rank()
    for name in _RANK_ENV:
        if name in os.environ:
            return int(os.environ[name])
    return 0


def world_size() -> int:
    mpi = _mpi_if_initialized()
    if mpi is not None:
        return mpi.COMM_WORLD.Get_size()
    for name in _SIZE_ENV:
        if name in os.environ:
            return int(os.environ[name])
    return 1


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on world rank 0 only, flushed (the one print helper of library code)."""
    if world_rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


class Progress:
    """Training progress on rank 0: a tqdm bar on a terminal (when tqdm is installed), else a
    fixed-format line about every twentieth step; nothing on other ranks or when disabled.

    "A terminal" is rank 0's own stdout: under ``mpiexec`` that is a pipe to the launcher
    (MPICH's Hydra, Open MPI's ORTE), so a multi-rank run prints the plain lines, which also
    read well in a batch system's log. A terminal that reports no size (a new
    pseudo-terminal: 0 x 0) gets an 80 x 24 bar: tqdm draws nothing on a terminal of 0 rows."""

    def __init__(self, start: int, total: int, enabled: bool = True) -> None:
        self.bar = None
        self.enabled = enabled and world_rank() == 0
        self.every = max(1, (total - start) // 20)
        if self.enabled and sys.stdout.isatty():
            with contextlib.suppress(ImportError):
                from tqdm import tqdm  # noqa: PLC0415  (optional dependency)

                try:
                    sized = min(os.get_terminal_size(sys.stdout.fileno())) > 0
                except (OSError, ValueError):
                    sized = False
                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=sized,
                                ncols=None if sized else 80, nrows=None if sized else 24,
                                file=sys.stdout)

    def update(self, step: int, total: int, loss: float, lr: float, tps: float, dt: float) -> None:
        """After step ``step`` (0-based) of ``total``."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} | {tps:,.0f} tok/s", refresh=False)
            self.bar.update(1)
        elif (step + 1) % self.every == 0 or step + 1 == total:
            print0(f"step {step + 1:>6}/{total} | loss {loss:.4f} | lr {lr:.2e} | "
                   f"{tps:>9,.0f} tok/s | {dt * 1e3:7.1f} ms/step")

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print0(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def unread_bytes(fd: int) -> int:
    """Bytes written to ``fd`` that its reader has not taken yet (0 unless it is a pipe)."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return 0
        buf = bytearray(4)
        fcntl.ioctl(fd, termios.FIONREAD, buf)
        return int.from_bytes(buf, sys.byteorder)
    except OSError:
        return 0


def wait_until_output_read(timeout: float = 2.0, fds: tuple[int, ...] = (1, 2)) -> bool:
    """Flush stdout and stderr, then wait at most ``timeout`` s until the reader of ``fds``
    has taken everything written to them. True if it has.

    On ``MPI_Abort`` MPICH's launcher tears the job down without draining the ranks' output
    pipes: a message written just before the abort was lost in about one job of 40 (measured:
    in 22 of 60 aborts the 79-299 bytes of the message were still in the pipe when the rank
    reached ``Abort``; the proxy read them within 2 ms). A rank's stdout and stderr are pipes
    to the launcher's proxy, and FIONREAD says how much of a pipe is still unread.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + timeout
    while any(unread_bytes(fd) for fd in fds):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)
    return True


def abort_world(message: str, errorcode: int = 1) -> None:
    """Print ``message`` to stderr naming this rank, then end the whole MPI job."""
    rank, size = world_rank(), world_size()
    sys.stderr.write(f"[mpipar] rank {rank}/{size} aborting the job: {message}\n")
    wait_until_output_read()
    mpi = _mpi_if_initialized()
    if mpi is not None and size > 1:
        mpi.COMM_WORLD.Abort(errorcode)
    os._exit(errorcode)


def _excepthook(exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
    rank, size = world_rank(), world_size()
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    sys.stderr.write(f"[mpipar] rank {rank}/{size}: uncaught exception\n{text}")
    abort_world(f"{exc_type.__name__}: {exc}")


def install_abort_handler() -> None:
    """Make an uncaught exception on any rank abort every rank, naming the rank and cause.

    Only worth it in a multi-rank job; a single process keeps Python's default behaviour.
    """
    if world_size() > 1:
        sys.excepthook = _excepthook


# ---------------------------------------------------------------------------- signals
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""What asks a run to stop: Slurm's time limit and ``scancel`` (TERM), ``sbatch --signal=USR1@T``
(USR1, T seconds before the limit), a terminal's Ctrl-C (INT)."""

REPEAT_S = 1.0
"""A stop signal within this many seconds of the first is the same request delivered twice:
Ctrl-C reaches the whole process group and the launcher forwards it too; MPICH's hydra and a
supervisor process forward TERM, INT and USR1 to every rank."""


class StopRequest:
    """A flag set by the first stop signal (``signum``, 0 while none came).

    A repeat within ``repeat_s`` of the first is ignored; a signal after that means "now":
    one line on stderr naming the rank and the signal, then the process exits with status
    128 + signal number, as the signal's default action would report it. ``install`` sets the
    handlers (main thread only) and ``restore`` puts the previous ones back; as a context
    manager it does both. ``clock`` and ``exit`` are for tests.

    The signals are taken by a thread of their own, not by Python's handler: Python runs a
    handler in the main thread between bytecodes, so a main thread blocked inside MPI (a
    receive or a collective waiting for a peer) would never see the second signal. Installed,
    the handler proper does nothing; the C-level handler writes each signal's number to
    ``signal.set_wakeup_fd``'s pipe at once, whatever the main thread is doing, and the thread
    reading that pipe calls ``handle``."""

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS, repeat_s: float = REPEAT_S,
                 clock: Callable[[], float] = time.monotonic,
                 exit: Callable[[int], Any] = os._exit) -> None:
        self.signals, self.repeat_s, self._clock, self._exit = tuple(signals), repeat_s, clock, exit
        self.signum = 0
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}
        self._wakeup: tuple[int, int, int] | None = None      # (read end, write end, previous fd)
        self._watcher: threading.Thread | None = None

    @property
    def name(self) -> str:
        """The first signal's name (``SIGTERM``), or "" while none came."""
        return signal_name(self.signum) if self.signum else ""

    def handle(self, signum: int, frame: Any = None) -> None:
        """What a stop signal does (called by the watcher thread)."""
        now = self._clock()
        if not self.signum:
            self.signum, self._first_at = signum, now
            return
        if now - self._first_at <= self.repeat_s:
            return
        status = 128 + signum
        sys.stderr.write(f"[mpipar] rank {world_rank()}: second stop signal ({signal_name(signum)}"
                         f" after {self.name}): exiting at once with status {status}\n")
        wait_until_output_read(timeout=0.5)
        self._exit(status)

    def install(self) -> StopRequest:
        r, w = os.pipe()
        os.set_blocking(w, False)                  # the C handler must never block
        previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._wakeup = (r, w, previous_fd)
        for s in self.signals:
            self._previous[s] = signal.signal(s, _ignore)
        self._watcher = threading.Thread(target=self._watch, args=(r,), daemon=True,
                                         name="mpipar-stop-signals")
        self._watcher.start()
        return self

    def _watch(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:                           # restore() closed the write end
                return
            for signum in data:
                if signum in self.signals:
                    self.handle(signum)

    def restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
        if self._wakeup is not None:
            r, w, previous_fd = self._wakeup
            signal.set_wakeup_fd(previous_fd)
            os.close(w)
            if self._watcher is not None:
                self._watcher.join(timeout=5)
            os.close(r)
            self._wakeup = self._watcher = None

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def _ignore(signum: int, frame: Any) -> None:
    """The Python-level handler of a stop signal: the watcher thread acts on it."""


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15; the number for one Python does not know."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"

# ---------------------------------------------------------------------------- the supervisor
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
PID_DIR_ENV = "MPIPAR_PID_DIR"   # each rank writes DIR/rank<R>.pid (tests and tools signal ranks)
_PR_SET_PDEATHSIG = 1


def under_hydra() -> bool:
    """Whether MPICH's Hydra launched this process (its proxy sets MPI_LOCALNRANKS beside the
    PMI variables; Open MPI, Slurm's srun and a plain ``python`` do not)."""
    return "MPI_LOCALNRANKS" in os.environ and "PMI_RANK" in os.environ


def _write_pid_file() -> None:
    where = os.environ.get(PID_DIR_ENV)
    if where:
        path = os.path.join(where, f"rank{world_rank()}.pid")
        with open(path + ".tmp", "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(path + ".tmp", path)   # a reader never sees a half-written file


def _die_with_parent(parent: int) -> None:
    """PR_SET_PDEATHSIG: the kernel SIGKILLs this process when its parent dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:   # the parent died before prctl took effect
        os._exit(128 + signal.SIGKILL)


def death_message(rank: int, pid: int, status: int) -> str | None:
    """The supervisor's line for a rank that ended with wait status ``status``: only a death
    by a signal, which no handler of the rank could report; None for any exit, whose cause
    the rank has said itself (rank 0's one error line, the abort handler's)."""
    if not os.WIFSIGNALED(status):
        return None
    return (f"[mpipar] rank {rank} (pid {pid} on host {socket.gethostname()}) was killed by "
            f"{signal.Signals(os.WTERMSIG(status)).name}")


def supervise() -> None:
    """Under Hydra (unless ``MPIPAR_SUPERVISE=0``), fork before MPI starts: the child returns
    and runs the rank; this process never returns.

    The parent waits for the child, forwards SIGTERM, SIGINT, SIGUSR1, SIGUSR2 and SIGHUP to
    it (a signal sent to the whole process group, as Ctrl-C is, reaches the child twice
    within a moment: the training side takes repeats within 1 s as one), and when the child
    dies of a signal prints one line naming its rank, pid, host and the signal, then
    exits with the child's status (128 + the signal's number for a signal). The child dies
    with its parent (PR_SET_PDEATHSIG), so when Hydra kills the parents nothing outlives
    them. Hydra's environment (PMI variables and descriptors) is inherited by the child,
    which is the one MPI sees. Elsewhere, or once mpi4py is imported (MPI may have started:
    this process then already is the rank), this only writes the pid file of
    ``MPIPAR_PID_DIR``.
    """
    if (not under_hydra() or os.environ.get("MPIPAR_SUPERVISE", "1") == "0"
            or "mpi4py.MPI" in sys.modules):   # MPI started: this process already is the rank
        _write_pid_file()
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()   # nothing buffered may be written twice
    parent = os.getpid()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)   # none lost around the fork
    child = os.fork()
    if child == 0:
        _die_with_parent(parent)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _write_pid_file()
        return

    def forward(signo: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signo)

    for signo in FORWARDED:
        signal.signal(signo, forward)
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    _, status = os.waitpid(child, 0)   # retried across the forwarded signals (PEP 475)
    message = death_message(world_rank(), child, status)
    if message is not None:
        sys.stderr.write(message + "\n")
        wait_until_output_read()
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
