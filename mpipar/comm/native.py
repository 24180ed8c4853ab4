"""MPI's own collectives as an mpipar algorithm named ``native``: the baseline.

These run whatever the MPI library chose (MPICH's or Open MPI's tuned collectives), on the
same flat work buffers the from-scratch algorithms get. GPU buffers go to MPI directly only
when the library is CUDA-aware; otherwise they are staged through host memory here, after the
stream is synchronised (MPI cannot see queued CUDA work).

float16 has no MPI reduction in most libraries (Open MPI 4.1 has none), so float16 reductions
run in float32 and are rounded back once: never less accurate than pairwise float16 sums.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpipar import backend
from mpipar.comm.algorithms import Algorithm
from mpipar.comm.mpi_env import collective
from mpipar.comm.ops import ReduceOp
from mpipar.comm.transport.mpi import MPITransport


def _mpi_op(t: MPITransport, op: ReduceOp) -> Any:
    MPI = t.MPI
    return {"sum": MPI.SUM, "avg": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op.name]


class _Host:
    """The host-side view of a work buffer for one native call (staged if it is on the GPU)."""

    def __init__(self, t: MPITransport, buf: Any, upcast_half: bool = False) -> None:
        self.buf = buf
        self.staged = backend.is_device_array(buf) and not t.cuda_aware
        self.upcast = upcast_half and buf.dtype == np.float16
        if backend.is_device_array(buf):
            backend.synchronize(buf)
        data = backend.to_host(buf) if self.staged else buf
        # float16 has no MPI datatype in many libraries: reductions run in float32, and
        # data movement sends the same 16 bits as uint16.
        self.as_bits = buf.dtype == np.float16 and not self.upcast
        if self.upcast:
            data = data.astype(np.float32)
        elif self.as_bits:
            data = data.view(np.uint16)
        self.data = data

    def new(self, count: int) -> Any:
        """A result buffer of ``count`` elements, in the same space as ``data``."""
        xp = backend.array_module(self.data)
        return xp.empty(count, dtype=self.data.dtype)

    def back(self, data: Any) -> Any:
        """``data`` returned to the caller's array module and dtype."""
        if self.upcast:
            data = data.astype(np.float16)
        elif self.as_bits:
            data = data.view(np.float16)
        if self.staged:
            return backend.to_device(data, backend.array_module(self.buf))
        return data


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
