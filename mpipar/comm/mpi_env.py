"""Importing mpi4py the way mpipar needs it: at the thread level mpipar really uses.

mpi4py asks for MPI_THREAD_MULTIPLE by default, which makes MPICH take a lock around every
call (small collectives about 10x slower). mpipar makes MPI calls from one thread at a time, so it
asks for MPI_THREAD_SERIALIZED unless the user says otherwise through ``MPI4PY_RC_THREAD_LEVEL``
or ``MPIPAR_THREAD_LEVEL``. Benchmarks print the level actually granted.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from types import ModuleType

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


def wait_all(requests: list) -> None:
    """MPI_Waitall, or, in concurrent mode, Testall polls that never block holding the lock."""
    MPI = import_mpi()
    if not _concurrent:
        MPI.Request.Waitall(requests)
        return
    polls = 0
    while True:
        with MPI_LOCK:
            if MPI.Request.Testall(requests):
                return
        polls += 1
        time.sleep(0 if polls < 200 else 20e-6)  # yield the GIL; back off when it takes long


def collective(comm: object, name: str, *args: object, **kwargs: object) -> None:
    """``comm.<name>(...)`` (e.g. "Allreduce"); in concurrent mode its non-blocking form
    (``Iallreduce``) started under the lock and completed by polling."""
    if not _concurrent:
        getattr(comm, name)(*args, **kwargs)
        return
    with MPI_LOCK:
        req = getattr(comm, "I" + name.lower())(*args, **kwargs)
    wait_all([req])
