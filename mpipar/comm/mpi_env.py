"""Importing mpi4py the way mpipar needs it: at the thread level mpipar really uses.

mpi4py asks for MPI_THREAD_MULTIPLE by default, which makes MPICH take a lock around every
call (small collectives about 10x slower). mpipar makes MPI calls from one thread at a time, so it
asks for MPI_THREAD_SERIALIZED unless the user says otherwise through ``MPI4PY_RC_THREAD_LEVEL``
or ``MPIPAR_THREAD_LEVEL``. Benchmarks print the level actually granted.

It also picks each rank's GPU (``select_gpu``): which ranks share a node is MPI's to say.
"""

from __future__ import annotations

import os
import sys
import threading
import zlib
from types import ModuleType
from typing import Any

import numpy as np

from mpipar import backend
from mpipar.comm import watchdog

DEFAULT_THREAD_LEVEL = "serialized"
THREAD_LEVEL_NAMES = {0: "single", 1: "funneled", 2: "serialized", 3: "multiple"}


def import_mpi() -> ModuleType:
    """``mpi4py.MPI``, initialised at mpipar's thread level if nobody initialised it yet."""
    if "mpi4py.MPI" not in sys.modules:
        import mpi4py

        if "MPI4PY_RC_THREAD_LEVEL" not in os.environ:
            mpi4py.rc.thread_level = os.environ.get("MPIPAR_THREAD_LEVEL", DEFAULT_THREAD_LEVEL)
    from mpi4py import MPI

    return MPI


def thread_level_name() -> str:
    MPI = import_mpi()
    level = MPI.Query_thread()
    names = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
             MPI.THREAD_SERIALIZED: "serialized", MPI.THREAD_MULTIPLE: "multiple"}
    return names.get(level, str(level))


def library_version() -> str:
    """First line of MPI_Get_library_version, e.g. 'MPICH Version: 5.0.2'."""
    MPI = import_mpi()
    return " ".join(MPI.Get_library_version().splitlines()[0].split())


def is_cuda_aware() -> bool:
    """Whether the MPI library may be handed CUDA device pointers.

    ``MPIPAR_CUDA_AWARE=0|1`` overrides. Otherwise ask the library itself (Open MPI's
    ``MPIX_Query_cuda_support``, MPICH's ``MPIX_GPU_query_support``); when it cannot answer,
    assume NOT: a non-CUDA-aware Open MPI handed a device pointer segfaults, while staging
    through host memory is merely slower.
    """
    env = os.environ.get("MPIPAR_CUDA_AWARE")
    if env in ("0", "1"):
        return env == "1"
    MPI = import_mpi()
    try:
        import ctypes

        lib = ctypes.CDLL(MPI.__file__)  # dlsym on this handle also searches libmpi
        version = MPI.Get_library_version()
        if "Open MPI" in version and hasattr(lib, "MPIX_Query_cuda_support"):
            return bool(lib.MPIX_Query_cuda_support())
        if "MPICH" in version and hasattr(lib, "MPIX_GPU_query_support"):
            supported = ctypes.c_int(0)
            lib.MPIX_GPU_query_support(0, ctypes.byref(supported))  # 0 = MPIX_GPU_SUPPORT_CUDA
            return bool(supported.value)
    except Exception:
        pass
    return False


def cuda_nonblocking_collectives() -> bool:
    """Whether device pointers may go to MPI's NON-BLOCKING collectives (``MPI_Iallreduce``
    ...): only where the user declares it, ``MPIPAR_CUDA_NONBLOCKING=1``. Open MPI v4's
    CUDA support (smcuda, without UCX) takes device memory in point-to-point and blocking
    collectives only ("Which MPI APIs do NOT work with CUDA-aware?", its FAQ), and no library
    query tells the two apart; so by default ``native`` stages a device buffer through pinned
    host memory whenever the collective will be its non-blocking form (``nonblocking_collectives``)."""
    return os.environ.get("MPIPAR_CUDA_NONBLOCKING") == "1"


# -- several threads, one MPI_THREAD_SERIALIZED library --------------------------------------
# Once a background communication thread exists (comm/background.py), every MPI call takes
# MPI_LOCK, and waiting is done by polling with the lock released between polls: a thread
# blocked inside MPI while holding the lock would stop the other thread of this rank from
# making progress that a peer rank may be waiting for.
MPI_LOCK = threading.Lock()
_concurrent = False


def enter_concurrent_mode() -> None:
    global _concurrent
    _concurrent = True


def concurrent_mode() -> bool:
    return _concurrent


def wait_all(requests: list, what: Any = None) -> None:
    """Wait for every request: Testall polls through ``watchdog.wait``, so the wait has the
    collective timeout and backs off (``what`` says what is awaited, for its message). In
    concurrent mode each poll takes the lock and the GIL is yielded between polls, so no
    thread ever blocks inside MPI holding the lock."""
    testall = _testall or _bind()
    with MPI_LOCK:
        if testall(requests):
            return
    if _concurrent:
        def test() -> bool:
            with MPI_LOCK:
                return testall(requests)
    else:
        def test() -> bool:
            return testall(requests)
    watchdog.wait(test, what, yield_gil=_concurrent)


_testall: Any = None


def _bind() -> Any:
    global _testall
    _testall = import_mpi().Request.Testall
    return _testall


def collective(comm: Any, name: str, *args: Any, **kwargs: Any) -> None:
    """``comm.<name>(...)`` (e.g. "Allreduce") as its non-blocking form (``Iallreduce``),
    started under the lock and completed by ``wait_all``: a blocking MPI call cannot be
    timed out, and in concurrent mode must not hold the lock while it blocks.

    With the collective timeout disabled (0) and no background thread, the blocking call
    itself: MPICH's non-blocking form of a small collective costs about 7 us more (an 8-byte
    all-reduce through the Communicator, 34 -> 41 us measured), which nothing then buys."""
    if not nonblocking_collectives():
        getattr(comm, name)(*args, **kwargs)
        return
    with MPI_LOCK:
        req = getattr(comm, _NONBLOCKING[name])(*args, **kwargs)
    wait_all([req], name)


def nonblocking_collectives() -> bool:
    """Whether ``collective`` calls MPI's non-blocking form now: once the communication
    thread exists, or while the collective timeout is on (the default)."""
    return _concurrent or bool(watchdog.get_timeout())


# MPI_<name> -> its non-blocking form, as mpi4py names them
_NONBLOCKING = {name: "I" + name.lower() for name in (
    "Allreduce", "Reduce", "Bcast", "Reduce_scatter", "Allgather", "Allgatherv", "Alltoall",
    "Barrier", "Gather", "Scatter")}


# -- which GPU this rank uses (issue 15 item 2) ------------------------------------------------
GPU_ENV = "MPIPAR_GPU"
GPU_CHOICES = ("auto", "shared")


class GPUSelectionError(RuntimeError):
    """This rank cannot be given a GPU of its own as asked (the counts are in the message)."""


def parse_gpu_choice(text: str) -> str | int:
    """``auto`` (one GPU per node-local rank; more ranks than GPUs is an error), ``shared``
    (node-local rank modulo the GPUs: ranks share on purpose) or a device number."""
    text = text.strip()
    if text in GPU_CHOICES:
        return text
    if text.isdigit():
        return int(text)
    raise ValueError(f"{text!r} is not a GPU choice: expected auto, shared or a device number")


def gpu_choice(choice: str | int | None = None) -> str | int:
    """``choice``, else ``MPIPAR_GPU`` (parsed), else ``auto``."""
    if choice is not None:
        return choice
    text = os.environ.get(GPU_ENV)
    if text is None:
        return "auto"
    try:
        return parse_gpu_choice(text)
    except ValueError as e:
        raise ValueError(f"{GPU_ENV}: {e}") from None


def choose_gpu(local_rank: int, local_size: int, devices: int, choice: str | int = "auto") -> int:
    """The device of node-local rank ``local_rank`` of ``local_size`` ranks that see the same
    ``devices`` GPUs. No MPI: ``select_gpu`` supplies the counts."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"{devices} GPU(s)" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
    if devices < 1:
        raise GPUSelectionError("no GPU is visible to this rank")
    if isinstance(choice, int):
        if not 0 <= choice < devices:
            raise GPUSelectionError(f"GPU {choice} asked for, but this rank sees {seen}")
        return choice
    if choice == "shared":
        return local_rank % devices
    if local_size > devices:
        raise GPUSelectionError(
            f"{local_size} ranks on this node see the same {seen}: ranks would share a GPU; run "
            f"at most {devices} ranks per node, or ask for sharing ({GPU_ENV}=shared)")
    return local_rank


def node_local_rank(mpi_comm: Any = None) -> tuple[int, int]:
    """Collective over ``mpi_comm`` (default the world): this rank's index among the ranks of
    its node (MPI's shared-memory split) that see the same GPUs (CUDA_VISIBLE_DEVICES: a
    launcher that binds one GPU to each rank makes groups of one), and how many they are."""
    MPI = import_mpi()
    comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    seen = zlib.crc32(os.environ.get("CUDA_VISIBLE_DEVICES", "<all>").encode()) & 0x7FFFFFFF
    same = node.Split(seen, key=node.Get_rank())
    rank, size = same.Get_rank(), same.Get_size()
    same.Free()
    node.Free()
    return rank, size


_MESSAGE_BYTES = 1024


def select_gpu(mpi_comm: Any = None, choice: str | int | None = None) -> int | None:
    """Collective over ``mpi_comm`` (default the world): make this rank's GPU its current
    device (``choose_gpu`` of its node-local rank; ``choice`` or ``MPIPAR_GPU`` overrides) and
    return it; None where there is no GPU module (nothing to choose). Every rank raises the
    same ``GPUSelectionError`` (the lowest failing rank's, naming it) if any rank cannot be
    served, so no rank trains while another has stopped. Call it before making any device
    array: an array lives on the device current when it was made."""
    if not backend.cupy_available():
        return None
    MPI = import_mpi()
    comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
    local_rank, local_size = node_local_rank(comm)
    device, error = None, ""
    try:
        device = choose_gpu(local_rank, local_size, backend.device_count(), gpu_choice(choice))
    except (GPUSelectionError, ValueError) as e:
        error = str(e)
    rank, size = comm.Get_rank(), comm.Get_size()
    failed = np.array([rank if error else size], dtype=np.int64)
    collective(comm, "Allreduce", MPI.IN_PLACE, failed, op=MPI.MIN)
    first = int(failed[0])
    if first < size:
        text = np.zeros(_MESSAGE_BYTES, dtype=np.uint8)
        if rank == first:
            raw = error.encode()[:_MESSAGE_BYTES]
            text[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        collective(comm, "Bcast", text, root=first)
        message = text.tobytes().rstrip(b"\0").decode(errors="replace")
        raise GPUSelectionError(f"rank {first}: {message}")
    backend.use_device(device)
    return device
