"""MPI's own collectives as an mpipar algorithm named ``native``: the baseline.

These run whatever the MPI library chose (MPICH's or Open MPI's tuned collectives), on the
same flat work buffers the from-scratch algorithms get. GPU buffers go to MPI directly only
when the library is CUDA-aware and takes device memory in the form of the call MPI will run
(a non-blocking collective only where ``MPIPAR_CUDA_NONBLOCKING=1`` declares it: see
``mpi_env.cuda_nonblocking_collectives``); otherwise they are staged through the transport's
pooled pinned host buffers, one device -> pinned copy each way. Device memory handed to MPI
directly is synchronised first (MPI cannot see queued CUDA work).

float16 has no MPI reduction in most libraries (Open MPI 4.1 has none) and bfloat16 (ml_dtypes')
none in any, so 16-bit reductions run in float32 and are rounded back once: never less
accurate than pairwise 16-bit sums.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpipar import backend
from mpipar.comm import mpi_env
from mpipar.comm.algorithms import Algorithm
from mpipar.comm.mpi_env import collective
from mpipar.comm.ops import ReduceOp
from mpipar.comm.transport.mpi import MPITransport


def _mpi_op(t: MPITransport, op: ReduceOp) -> Any:
    MPI = t.MPI
    return {"sum": MPI.SUM, "avg": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op.name]


class _Host:
    """The buffer one native call hands MPI: the work buffer itself, or its copy in pooled
    pinned host memory (``t.pool``) when it is on the GPU and MPI may not take device memory
    for this call (``staged``). float16 reductions run on a float32 copy (``upcast``).

    Order matters on a GPU (issue 15 item 2): the up-cast kernel is queued FIRST and the
    stream synchronised AFTER it, so MPI (or the staging copy) never reads a buffer a kernel
    has not written yet. A staged buffer is copied device -> pinned once, straight into a
    view of the pool's buffer (``backend.to_host(..., out=)``); results come back from
    pinned memory, and every pinned buffer returns to the pool when ``back`` is done."""

    def __init__(self, t: MPITransport, buf: Any, upcast_half: bool = False) -> None:
        self.t, self.buf = t, buf
        self.device = backend.is_device_array(buf)
        # device memory to MPI only where the library takes it for the form MPI will run:
        # CUDA-aware, and for a non-blocking collective only where declared (mpi_env)
        self.staged = self.device and not (t.cuda_aware and (
            not mpi_env.nonblocking_collectives() or t.cuda_nonblocking))
        half = backend.is_half(buf.dtype)
        self.upcast = upcast_half and half
        self._pinned: list[Any] = []
        # float16 has no MPI datatype in many libraries: reductions run in float32, and
        # data movement sends the same 16 bits as uint16.
        self.as_bits = half and not self.upcast
        data = buf.astype(np.float32) if self.upcast else buf   # on the device when buf is
        data = data.view(np.uint16) if self.as_bits else data
        if self.staged:
            data = backend.to_host(data, out=self._take(data.size, data.dtype))
        elif self.device:
            backend.synchronize(data)    # the producing kernels (and the cast) have run
        self.data = data

    def _take(self, count: int, dtype: Any) -> Any:
        """``count`` elements of ``dtype`` in a pinned buffer of the transport's pool."""
        dt = np.dtype(dtype)
        raw = self.t.pool.take(count * dt.itemsize)
        self._pinned.append(raw)
        return raw.view(dt)

    def new(self, count: int) -> Any:
        """A result buffer of ``count`` elements, in the same space as ``data``."""
        if self.staged:
            return self._take(count, self.data.dtype)
        xp = backend.array_module(self.data)
        return xp.empty(count, dtype=self.data.dtype)

    def back(self, data: Any) -> Any:
        """``data`` returned to the caller's array module and dtype."""
        if self.as_bits:
            data = data.view(self.buf.dtype)
        if self.staged:
            host = data
            data = backend.array_module(self.buf).empty(host.shape, dtype=host.dtype)
            if host.size:
                data.set(host)
                backend.synchronize(data)   # the copy has read host: the pool may reuse it
            for raw in self._pinned:
                self.t.pool.give(raw)
            self._pinned = []
        if not self.upcast:
            return data
        # a sum beyond the 16-bit type's range rounds to inf, as a 16-bit reduction gives it;
        # under fp16 the loss scaler expects that (it skips the step), so no warning per rank
        with np.errstate(over="ignore"):
            return data.astype(self.buf.dtype)


def allreduce(t: MPITransport, buf: Any, op: ReduceOp) -> Any:
    if t.native is not None:  # a transport with its own (the simulator's)
        return t.native.allreduce(buf, op)
    h = _Host(t, buf, upcast_half=True)
    collective(t.comm, "Allreduce", t.MPI.IN_PLACE, h.data, op=_mpi_op(t, op))
    return h.back(h.data)


def reduce(t: MPITransport, buf: Any, op: ReduceOp, root: int) -> Any:
    if t.native is not None:  # a transport with its own (the simulator's)
        return t.native.reduce(buf, op, root)
    h = _Host(t, buf, upcast_half=True)
    if t.rank == root:
        collective(t.comm, "Reduce", t.MPI.IN_PLACE, h.data, op=_mpi_op(t, op), root=root)
    else:
        collective(t.comm, "Reduce", h.data, None, op=_mpi_op(t, op), root=root)
    return h.back(h.data)


def broadcast(t: MPITransport, buf: Any, root: int) -> Any:
    if t.native is not None:  # a transport with its own (the simulator's)
        return t.native.broadcast(buf, root)
    h = _Host(t, buf)
    collective(t.comm, "Bcast", h.data, root=root)
    return h.back(h.data)


def reduce_scatter(t: MPITransport, buf: Any, op: ReduceOp, counts: list[int]) -> Any:
    if t.native is not None:  # a transport with its own (the simulator's)
        return t.native.reduce_scatter(buf, op, counts)
    h = _Host(t, buf, upcast_half=True)
    out = h.new(counts[t.rank])
    collective(t.comm, "Reduce_scatter", h.data, out, recvcounts=list(counts), op=_mpi_op(t, op))
    return h.back(out)


def allgather(t: MPITransport, block: Any, counts: list[int]) -> Any:
    if t.native is not None:  # a transport with its own (the simulator's)
        return t.native.allgather(block, counts)
    h = _Host(t, block)
    out = h.new(sum(counts))
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
    collective(t.comm, "Allgatherv", h.data, [out, (list(counts), displs)])
    return h.back(out)


def alltoall(t: MPITransport, buf: Any) -> Any:
    if t.native is not None:  # a transport with its own (the simulator's)
        return t.native.alltoall(buf)
    h = _Host(t, buf)
    out = h.new(buf.size)
    collective(t.comm, "Alltoall", h.data, out)
    return h.back(out)


ALGORITHM = Algorithm("native", allreduce=allreduce, reduce=reduce, broadcast=broadcast,
                      reduce_scatter=reduce_scatter, allgather=allgather, alltoall=alltoall)
