"""Shared helpers for the simulator tests: algorithm names and NumPy references."""

from __future__ import annotations

import numpy as np

from mpipar.comm.communicator import split_counts
from mpipar.sim.run import load_algorithm

FROM_SCRATCH = ("ring", "rhd", "tree", "dbtree", "ps", "hier")


def available(name: str):
    """The algorithm, or None while its module has not landed."""
    try:
        return load_algorithm(name)
    except (ValueError, ImportError):
        return None


def reference(collective: str, op: str, inputs: list[np.ndarray], root: int = 0) -> list:
    """What each rank must hold after ``collective`` (None: nothing to check on that rank)."""
    p = len(inputs)
    stack = np.stack(inputs) if collective != "allgather" else None
    if collective == "allgather":
        full = np.concatenate(inputs)
        return [full] * p
    red = {"sum": lambda s: s.sum(axis=0, dtype=s.dtype), "max": lambda s: s.max(axis=0),
           "min": lambda s: s.min(axis=0)}[op](stack)
    if collective == "allreduce":
        return [red] * p
    if collective == "reduce":
        return [red if r == root else None for r in range(p)]
    if collective == "broadcast":
        return [inputs[root]] * p
    if collective == "reduce_scatter":
        counts = split_counts(red.size, p)
        off = np.concatenate([[0], np.cumsum(counts)])
        return [red[off[r]:off[r + 1]] for r in range(p)]
    raise ValueError(collective)


def one_message(t, buf):
    """Rank 0 sends ``buf`` to rank 1 with isend + wait, rank 1 receives it with irecv + wait;
    nothing comes back. Returns the rank's clock."""
    if t.rank == 0:
        t.isend(buf, 1, 5).wait()
    else:
        t.irecv(buf, 0, 5).wait()
    return t.now
