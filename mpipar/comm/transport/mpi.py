"""Point-to-point over MPI: the one place where collective algorithms' bytes meet mpi4py.

* Host (NumPy) buffers go to MPI directly, as bytes.
* CuPy buffers go to MPI directly only when the library is CUDA-aware (checked once at
  start-up); otherwise they are staged through pinned host buffers that are reused, copied
  device -> pinned buffer directly (one copy, no pageable intermediate). A non-CUDA-aware
  MPI handed a device pointer reads it as a host address and crashes. Non-blocking
  point-to-point on device memory is what CUDA-aware libraries support (Open MPI v4
  included), so the transport's Isend/Irecv take device buffers whenever ``cuda_aware``.
* Before MPI touches device memory, or a host copy of it, the CUDA stream is synchronised:
  MPI does not know about CUDA streams, so queued kernels might still be writing the buffer.
* A message longer than ``MAX_MESSAGE_BYTES`` is sent as several pieces with the same tag
  (MPI delivers same-tag messages between a pair in order), so counts beyond 2**31 work.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from mpipar import backend
from mpipar.comm import mpi_env, watchdog
from mpipar.comm.background import BackgroundWorker, worker
from mpipar.comm.mpi_env import MPI_LOCK, import_mpi, is_cuda_aware
from mpipar.comm.ops import ReduceOp
from mpipar.comm.transport.pool import BufferPool
from mpipar.comm.transport.staging import PinnedPool

# Largest piece handed to one MPI call, in bytes. MPI counts are C ints; tests patch this small.
MAX_MESSAGE_BYTES = 2**31 - 1

# Most bytes of algorithm scratch a transport keeps between calls (MPIPAR_SCRATCH_BYTES
# overrides): a 16 MiB all-reduce needs 8-16 MiB of it; larger needs are met and let go.
SCRATCH_BYTES = 256 * 2**20


def _scratch_limit() -> int:
    value = os.environ.get("MPIPAR_SCRATCH_BYTES")
    try:
        return SCRATCH_BYTES if value is None else max(0, int(value))
    except ValueError:
        raise ValueError(f"MPIPAR_SCRATCH_BYTES must be a number of bytes, got {value!r}") from None


def _pieces(nbytes: int, itemsize: int) -> list[tuple[int, int]]:
    """[lo, hi) byte ranges no longer than MAX_MESSAGE_BYTES, cut on element boundaries."""
    step = max(itemsize, (MAX_MESSAGE_BYTES // itemsize) * itemsize)
    if nbytes == 0:
        return [(0, 0)]
    return [(lo, min(lo + step, nbytes)) for lo in range(0, nbytes, step)]


class MPIRequest:
    """One logical send or receive: possibly several MPI requests, plus an unstaging step."""

    __slots__ = ("_reqs", "_keep", "_on_complete", "result", "_done", "_what")

    def __init__(self, reqs: list, keep: Any, on_complete: Callable[[], None] | None, result: Any,
                 what: tuple) -> None:
        self._reqs = reqs
        self._keep = keep  # buffers MPI is reading or writing must outlive the request
        self._on_complete = on_complete
        self.result = result
        self._done = False
        self._what = what  # (kind, peer, tag, nbytes, watch): what a timed-out wait names

    def _finish(self) -> None:
        self._done = True
        if self._on_complete is not None:
            self._on_complete()
        self._keep = None

    def wait(self) -> Any:
        if not self._done:
            mpi_env.wait_all(self._reqs, self._what)
            self._finish()
        return self.result

    def test(self) -> bool:
        if not self._done:
            MPI = import_mpi()
            with MPI_LOCK:
                done = MPI.Request.Testall(self._reqs)
            if done:
                self._finish()
        return self._done


class MPITransport:
    """Point-to-point messages between the ranks of one MPI communicator (a ``Transport``)."""

    # MPI does not say how ranks are laid out on nodes; shared_node() asks the library instead
    ranks_per_node: int | None = None
    native: Any = None  # MPI's own collectives are native.py's: no replacement here
    begin_collective = None  # a real call pays its own overhead

    def __init__(self, mpi_comm: Any, cuda_aware: bool | None = None, owned: bool = False,
                 watch: watchdog.GroupWatch | None = None,
                 cuda_nonblocking: bool | None = None) -> None:
        self.MPI = import_mpi()
        self.comm = mpi_comm
        self.owned = owned  # made by split/dup: free() releases it
        self.rank: int = mpi_comm.Get_rank()
        self.size: int = mpi_comm.Get_size()
        # the group's record for the hang watchdog (a dup shares its parent's)
        self.watch: watchdog.GroupWatch = watch if watch is not None else watchdog.GroupWatch(
            self._world_ranks())
        self.cuda_aware = is_cuda_aware() if cuda_aware is None else cuda_aware
        # device memory in MPI's non-blocking collectives too (native.py; declared only)
        self.cuda_nonblocking = (mpi_env.cuda_nonblocking_collectives() if cuda_nonblocking is None
                                 else cuda_nonblocking)
        self.pool = PinnedPool()
        # the algorithms' host scratch (see Transport.scratch_pool)
        self.scratch_pool: BufferPool | None = BufferPool(max_bytes=_scratch_limit())
        self.cache: dict[Any, Any] = {}  # per-transport state of algorithms (sub-groups, tables)

    # -- helpers -------------------------------------------------------------------------
    def _world_ranks(self) -> list[int]:
        """The world rank of each rank of this group (local: no message)."""
        MPI = self.MPI
        mine, world = self.comm.Get_group(), MPI.COMM_WORLD.Get_group()
        ranks = mine.Translate_ranks(list(range(self.size)), world)
        mine.Free()
        world.Free()
        return list(ranks)

    def _needs_staging(self, buf: Any) -> bool:
        return backend.is_device_array(buf) and not self.cuda_aware

    def _as_bytes(self, buf: Any) -> Any:
        if not buf.flags.c_contiguous:
            raise ValueError("transport buffers must be contiguous")
        return buf.reshape(-1).view(backend.array_module(buf).uint8)

    # -- point to point ------------------------------------------------------------------
    def isend(self, buf: Any, dest: int, tag: int = 0) -> MPIRequest:
        MPI = self.MPI
        if self._needs_staging(buf):
            # one copy, device -> pooled pinned buffer, on the current stream (after the
            # kernels that wrote buf there) and synchronous: MPI may read host when it returns
            host = self.pool.take(buf.nbytes)
            if buf.nbytes:
                backend.to_host(self._as_bytes(buf), out=host)
            data, release = host, (lambda: self.pool.give(host))
        else:
            if backend.is_device_array(buf):
                backend.synchronize(buf)
            data, release = self._as_bytes(buf), None
        with MPI_LOCK:
            reqs = [self.comm.Isend([data[lo:hi], MPI.BYTE], dest, tag)
                    for lo, hi in _pieces(data.nbytes, buf.itemsize)]
        return MPIRequest(reqs, data, release, None, ("send", dest, tag, buf.nbytes, self.watch))

    def irecv(self, buf: Any, source: int, tag: int = 0) -> MPIRequest:
        MPI = self.MPI
        if self._needs_staging(buf):
            host = self.pool.take(buf.nbytes)
            target = self._as_bytes(buf)

            def unstage() -> None:
                if buf.nbytes:
                    target.set(host)
                    backend.synchronize(buf)  # the copy must finish before the pool reuses host
                self.pool.give(host)

            data, on_complete = host, unstage
        else:
            if backend.is_device_array(buf):
                backend.synchronize(buf)
            data, on_complete = self._as_bytes(buf), None
        with MPI_LOCK:
            reqs = [self.comm.Irecv([data[lo:hi], MPI.BYTE], source, tag)
                    for lo, hi in _pieces(data.nbytes, buf.itemsize)]
        return MPIRequest(reqs, data, on_complete, buf, ("recv", source, tag, buf.nbytes, self.watch))

    def sendrecv(self, sendbuf: Any, dest: int, recvbuf: Any, source: int, tag: int = 0) -> Any:
        """Exchange in one MPI call where possible: for small messages the per-call Python
        overhead is most of the cost, and MPI_Isendrecv and its wait are two calls instead of
        four (non-blocking, so that the wait has the collective timeout)."""
        if (mpi_env.concurrent_mode() or backend.is_device_array(sendbuf)
                or backend.is_device_array(recvbuf) or max(sendbuf.nbytes, recvbuf.nbytes) > MAX_MESSAGE_BYTES):
            r = self.irecv(recvbuf, source, tag)
            self.isend(sendbuf, dest, tag).wait()
            return r.wait()
        MPI = self.MPI
        req = self.comm.Isendrecv([self._as_bytes(sendbuf), MPI.BYTE], dest, tag,
                                  [self._as_bytes(recvbuf), MPI.BYTE], source, tag)
        mpi_env.wait_all([req], ("sendrecv", source, tag, recvbuf.nbytes, self.watch))
        return recvbuf

    def reduce_local(self, op: ReduceOp, dst: Any, src: Any) -> None:
        op.combine(dst, src)

    def barrier(self) -> None:
        mpi_env.collective(self.comm, "Barrier")

    def clock(self) -> float:
        return time.perf_counter()

    def background(self) -> BackgroundWorker:
        return worker()

    def split(self, color: int | None, key: int = 0) -> "MPITransport | None":
        MPI = self.MPI
        sub = self.comm.Split(MPI.UNDEFINED if color is None else color, key)
        if sub == MPI.COMM_NULL:
            return None
        return MPITransport(sub, cuda_aware=self.cuda_aware, owned=True,
                            cuda_nonblocking=self.cuda_nonblocking)

    def dup(self) -> "MPITransport":
        return MPITransport(self.comm.Dup(), cuda_aware=self.cuda_aware, owned=True, watch=self.watch,
                            cuda_nonblocking=self.cuda_nonblocking)

    def free(self) -> None:
        """Collective: free the MPI communicator if this transport made it (a split or a
        dup; MPI has a few thousand per process). The transport is unusable afterwards."""
        if self.owned and self.comm != self.MPI.COMM_NULL:
            mpi_env.collective(self.comm, "Barrier")   # nothing of ours still in flight
            self.comm.Free()
        self.watch.release()

    def shared_node(self) -> int:
        """Collective: this rank's node among the ranks that share memory with it (MPI's
        ``COMM_TYPE_SHARED`` split), named after the group rank of its lowest member."""
        shared = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
        node = shared.bcast(self.rank, root=0)
        shared.Free()
        return node
