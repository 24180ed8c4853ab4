"""Process-level helpers: who am I, print on rank 0, a progress display, and die loudly
instead of hanging.

An uncaught exception on one MPI rank would otherwise leave the other ranks blocked in a
collective forever. ``install_abort_handler`` makes it print the rank and the cause and then
call ``MPI_Abort`` on COMM_WORLD, which the launcher turns into a non-zero exit of the whole job.

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
import time
import traceback
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
    """The supervisor's line for a rank that ended with wait status ``status``; None if it
    exited with 0."""
    host = socket.gethostname()
    if os.WIFSIGNALED(status):
        return (f"[mpipar] rank {rank} (pid {pid} on host {host}) was killed by "
                f"{signal.Signals(os.WTERMSIG(status)).name}")
    code = os.waitstatus_to_exitcode(status)
    return None if code == 0 else f"[mpipar] rank {rank} (pid {pid} on host {host}) exited with status {code}"


def supervise() -> None:
    """Under Hydra (unless ``MPIPAR_SUPERVISE=0``), fork before MPI starts: the child returns
    and runs the rank; this process never returns.

    The parent waits for the child, forwards SIGTERM, SIGINT, SIGUSR1, SIGUSR2 and SIGHUP to
    it (a signal sent to the whole process group, as Ctrl-C is, reaches the child twice
    within a moment: the training side takes repeats within 1 s as one), and when the child
    dies of a signal or exits non-zero prints one line naming its rank, pid and host, then
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
