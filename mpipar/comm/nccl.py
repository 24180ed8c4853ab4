"""NVIDIA's NCCL as an mpipar algorithm named ``nccl``: collectives on device memory, one rank
per GPU, through CuPy's binding (``cupy.cuda.nccl``).

    comm = make_communicator(algorithm="nccl")      # or allreduce(x, algorithm="nccl")
    y = comm.allreduce(cupy_array, op="avg")

Each Communicator's algorithm transport (and each ``split`` of it: a new transport) gets its
own ``NcclCommunicator``, made at its first NCCL collective, which is collective over the
group anyway: every rank's (node, GPU) is all-gathered over MPI first, and two ranks on one
GPU are refused by name (NCCL itself would stop with "invalid usage"); then rank 0's
``get_unique_id()`` is broadcast over MPI and every rank joins with
``NcclCommunicator(size, id, rank)`` on its current device. Every call is queued on the
calling thread's current stream (``backend.current_stream_ptr``), so it is ordered after the
kernels that wrote the buffer on that stream and before those that read the result; the
stream is never synchronised here (NCCL reads device memory inside CUDA's ordering, unlike MPI).

A Communicator whose default is ``nccl`` sends host arrays (a loss, a stop flag) through
``native``; asked for by name, ``nccl`` refuses them. NCCL's collectives take equal blocks:
an uneven ``reduce_scatter`` is an all-reduce of which this rank keeps its block, an uneven
``allgather`` pads every block to the largest. It has no
all-to-all (the Communicator then uses ``native``). ``avg`` is a sum here, divided once by the
Communicator as for every algorithm. In the simulator (a transport with its own ``native``)
``nccl`` is priced as the native collectives are.
"""

from __future__ import annotations

import socket
from typing import Any

import numpy as np

from mpipar import backend
from mpipar.comm.algorithms import Algorithm
from mpipar.comm.mpi_env import collective
from mpipar.comm.ops import ReduceOp

# numpy dtype name -> cupy.cuda.nccl's constant (bfloat16: where an array module has one)
DTYPES = {"float16": "NCCL_FLOAT16", "bfloat16": "NCCL_BFLOAT16", "float32": "NCCL_FLOAT32",
          "float64": "NCCL_FLOAT64", "int32": "NCCL_INT32", "int64": "NCCL_INT64"}
# mpipar's op -> NCCL's (avg is summed; the Communicator divides the identical sums)
OPS = {"sum": "NCCL_SUM", "avg": "NCCL_SUM", "max": "NCCL_MAX", "min": "NCCL_MIN"}
_HOST_BYTES = 256        # a rank's node name and GPU bus id, as the all-gathered record

_CACHE_KEY = "nccl"


class SharedGPUError(RuntimeError):
    """Two ranks of one NCCL group are on the same GPU (NCCL needs one rank per GPU)."""


def _where(t: Any) -> list[tuple[int, str, int, str]]:
    """Every rank's (world rank, node, device ordinal, PCI bus id), all-gathered over MPI."""
    device, bus = backend.gpu_identity()
    world = t.MPI.COMM_WORLD.Get_rank()
    text = f"{world}\0{socket.gethostname()}\0{device}\0{bus}".encode()[:_HOST_BYTES]
    mine = np.zeros(_HOST_BYTES, dtype=np.uint8)
    mine[:len(text)] = np.frombuffer(text, dtype=np.uint8)
    table = np.empty((t.size, _HOST_BYTES), dtype=np.uint8)
    collective(t.comm, "Allgather", mine, table)
    rows = []
    for row in table:
        w, host, dev, pci = row.tobytes().rstrip(b"\0").decode(errors="replace").split("\0")
        rows.append((int(w), host, int(dev), pci))
    return rows


def check_one_rank_per_gpu(t: Any) -> None:
    """Raise SharedGPUError on every rank of ``t``'s group (collective) if two of its ranks
    use the same GPU: the same PCI bus id on the same node. Ranks are named by their rank in
    the world."""
    seen: dict[tuple[str, str], tuple[int, int]] = {}
    for world, host, device, bus in _where(t):
        first = seen.setdefault((host, bus), (world, device))
        if first[0] != world:
            raise SharedGPUError(
                f"ranks {first[0]} and {world} share GPU {device} ({bus}) on node {host}: "
                f"NCCL needs one rank per GPU (give each rank its own device, or use an "
                f"MPI algorithm)")


def _nccl(t: Any, buf: Any, collective_name: str) -> tuple[Any, Any]:
    """(cupy.cuda.nccl, this transport's NcclCommunicator), made at the first call."""
    if not backend.is_device_array(buf):
        raise TypeError(f"the nccl algorithm reduces device (CuPy) arrays; {collective_name} got "
                        f"a host {type(buf).__module__.split('.')[0]} {buf.dtype} array of "
                        f"{buf.size} elements (use another algorithm for host memory)")
    if buf.dtype.name not in DTYPES:
        raise TypeError(f"NCCL has no {buf.dtype} ({collective_name}); it takes "
                        f"{', '.join(DTYPES)}")
    lib = backend.nccl_module()
    comm = t.cache.get(_CACHE_KEY)
    if comm is None:
        check_one_rank_per_gpu(t)
        uid = np.zeros(128, dtype=np.int8)          # ncclUniqueId: 128 chars
        if t.rank == 0:
            uid[:] = np.array(lib.get_unique_id(), dtype=np.int64).astype(np.int8)
        collective(t.comm, "Bcast", uid, root=0)
        comm = t.cache[_CACHE_KEY] = lib.NcclCommunicator(t.size, tuple(int(v) for v in uid),
                                                          t.rank)
    return lib, comm


def _dtype(lib: Any, buf: Any) -> int:
    return int(getattr(lib, DTYPES[buf.dtype.name]))


def _op(lib: Any, op: ReduceOp) -> int:
    return int(getattr(lib, OPS[op.name]))


def allreduce(t: Any, buf: Any, op: ReduceOp) -> Any:
    if t.native is not None:  # a transport with its own (the simulator's)
        return t.native.allreduce(buf, op)
    lib, comm = _nccl(t, buf, "allreduce")
    ptr = backend.device_pointer(buf)
    comm.allReduce(ptr, ptr, buf.size, _dtype(lib, buf), _op(lib, op), backend.current_stream_ptr())
    return buf


def reduce(t: Any, buf: Any, op: ReduceOp, root: int) -> Any:
    if t.native is not None:  # a transport with its own (the simulator's)
        return t.native.reduce(buf, op, root)
    lib, comm = _nccl(t, buf, "reduce")
    ptr = backend.device_pointer(buf)
    comm.reduce(ptr, ptr, buf.size, _dtype(lib, buf), _op(lib, op), root,
                backend.current_stream_ptr())
    return buf


def broadcast(t: Any, buf: Any, root: int) -> Any:
    if t.native is not None:  # a transport with its own (the simulator's)
        return t.native.broadcast(buf, root)
    lib, comm = _nccl(t, buf, "broadcast")
    comm.bcast(backend.device_pointer(buf), buf.size, _dtype(lib, buf), root,
               backend.current_stream_ptr())
    return buf


def reduce_scatter(t: Any, buf: Any, op: ReduceOp, counts: list[int]) -> Any:
    if t.native is not None:  # a transport with its own (the simulator's)
        return t.native.reduce_scatter(buf, op, counts)
    lib, comm = _nccl(t, buf, "reduce_scatter")
    start = sum(counts[:t.rank])
    if len(set(counts)) > 1:     # NCCL's blocks are equal: reduce all, keep this rank's
        return allreduce(t, buf, op)[start:start + counts[t.rank]]
    xp = backend.array_module(buf)
    out = xp.empty(counts[t.rank], dtype=buf.dtype)
    comm.reduceScatter(backend.device_pointer(buf), backend.device_pointer(out), counts[t.rank],
                       _dtype(lib, buf), _op(lib, op), backend.current_stream_ptr())
    return out


def allgather(t: Any, block: Any, counts: list[int]) -> Any:
    if t.native is not None:  # a transport with its own (the simulator's)
        return t.native.allgather(block, counts)
    lib, comm = _nccl(t, block, "allgather")
    xp = backend.array_module(block)
    width = max(counts)
    if len(set(counts)) > 1:     # NCCL's blocks are equal: pad each to the largest
        padded = xp.zeros(width, dtype=block.dtype)
        padded[:block.size] = block
        block = padded
    out = xp.empty(width * t.size, dtype=block.dtype)
    comm.allGather(backend.device_pointer(block), backend.device_pointer(out), width,
                   _dtype(lib, block), backend.current_stream_ptr())
    if len(set(counts)) > 1:
        out = xp.concatenate([out[r * width:r * width + c] for r, c in enumerate(counts)])
    return out


ALGORITHM = Algorithm("nccl", allreduce=allreduce, reduce=reduce, broadcast=broadcast,
                      reduce_scatter=reduce_scatter, allgather=allgather, device_only=True)
