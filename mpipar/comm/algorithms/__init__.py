"""Registry of collective algorithms, each written once over the point-to-point transport.

An algorithm is a set of functions on flat (1-D, contiguous) work buffers owned by the
caller (the Communicator has already copied the user's input):

    allreduce(t, buf, op, **options) -> buf                   (every rank: the reduction)
    reduce(t, buf, op, root, **options) -> buf                (root: the reduction)
    broadcast(t, buf, root, **options) -> buf
    reduce_scatter(t, buf, op, counts, **options) -> block    (rank r: counts[r] elements)
    allgather(t, block, counts, **options) -> full            (sum(counts) elements)
    alltoall(t, buf, **options) -> buf                        (size equal blocks)

``t`` is a ``Transport`` (``transport/base.py``: ``rank``, ``size``, ``isend``, ``irecv``,
``reduce_local``, ``split``, ``cache`` and optional members such as ``sendrecv`` and
``scratch_pool``; nothing else). ``op`` is a ReduceOp (sum, max or min: ``avg`` is finished
by the caller). A function may be missing where the algorithm has no natural form of that collective.
Modules are imported on first use, so a name costs nothing until chosen.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import Callable, Optional

COLLECTIVES = ("allreduce", "reduce", "broadcast", "reduce_scatter", "allgather", "alltoall")


@dataclass(frozen=True)
class Algorithm:
    name: str
    allreduce: Optional[Callable] = None
    reduce: Optional[Callable] = None
    broadcast: Optional[Callable] = None
    reduce_scatter: Optional[Callable] = None
    allgather: Optional[Callable] = None
    alltoall: Optional[Callable] = None
    device_only: bool = False     # reduces device memory only (nccl): a group whose default it
                                  # is sends host arrays through native instead

    def supports(self, collective: str) -> bool:
        return getattr(self, collective) is not None

    def collectives(self) -> list[str]:
        return [f.name for f in fields(self) if f.name in COLLECTIVES and getattr(self, f.name) is not None]


# name -> module defining ALGORITHM (an Algorithm); "auto" is resolved by the Communicator.
_MODULES: dict[str, str] = {
    "native": "mpipar.comm.native",
    "ps": "mpipar.comm.algorithms.ps",
    "tree": "mpipar.comm.algorithms.tree",
    "dbtree": "mpipar.comm.algorithms.dbtree",
    "ring": "mpipar.comm.algorithms.ring",
    "rhd": "mpipar.comm.algorithms.rhd",
    "hier": "mpipar.comm.algorithms.hier",
    "nccl": "mpipar.comm.nccl",
}
# algorithms that reduce device memory only (a library's: NCCL), left out of what runs on host
# arrays (benchmarks, calibration, the simulator's default list)
_DEVICE_ONLY = frozenset({"nccl"})   # (their Algorithm says device_only)

_loaded: dict[str, Algorithm] = {}


def algorithm_names() -> list[str]:
    """Every registered name (``auto`` apart)."""
    return list(_MODULES)


def host_algorithm_names() -> list[str]:
    """The names whose collectives take host (NumPy) arrays too: all but ``nccl``."""
    return [n for n in _MODULES if n not in _DEVICE_ONLY]


def get_algorithm(name: str) -> Algorithm:
    if name not in _MODULES:
        known = ", ".join(list(_MODULES) + ["auto"])
        raise ValueError(f"unknown collective algorithm {name!r}; choose from {known}")
    if name not in _loaded:
        _loaded[name] = importlib.import_module(_MODULES[name]).ALGORITHM
    return _loaded[name]
