"""Process-level helpers: who am I, print on rank 0, and die loudly instead of hanging.

An uncaught exception on one MPI rank would otherwise leave the other ranks blocked in a
collective forever. ``install_abort_handler`` makes it print the rank and the cause and then
call ``MPI_Abort`` on COMM_WORLD, which the launcher turns into a non-zero exit of the whole job.
"""

from __future__ import annotations

import os
import sys
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


def abort_world(message: str, errorcode: int = 1) -> None:
    """Print ``message`` to stderr naming this rank, then end the whole MPI job."""
    rank, size = world_rank(), world_size()
    sys.stderr.write(f"[mpipar] rank {rank}/{size} aborting the job: {message}\n")
    sys.stderr.flush()
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
