"""Shared helpers for communication tests: per-rank inputs and cross-rank agreement."""

from __future__ import annotations

import numpy as np

from mpipar import backend

DTYPES = ["float16", "float32", "float64", "int32", "int64"]
OPS = ["sum", "avg", "max", "min"]


def rank_input(seed: int, rank: int, shape: tuple, dtype: str) -> np.ndarray:
    """Rank ``rank``'s input: small integers (stored in ``dtype``), so that float partial
    sums are exactly representable and results can be compared bit for bit."""
    rng = np.random.default_rng([seed, rank])
    return rng.integers(-8, 9, size=shape).astype(dtype)


def reference(op: str, inputs: list[np.ndarray]) -> np.ndarray:
    """What a reduction over ``inputs`` must give, computed the way the contract defines."""
    dtype = inputs[0].dtype
    stack = np.stack(inputs)
    if op in ("sum", "avg"):
        total = stack.sum(axis=0, dtype=np.float64 if dtype.kind == "f" else np.int64).astype(dtype)
        if op == "sum":
            return total
        if dtype.kind == "i":
            return np.floor_divide(total, len(inputs)).astype(dtype)
        return (total / dtype.type(len(inputs))).astype(dtype)
    return (stack.max if op == "max" else stack.min)(axis=0).astype(dtype)


def assert_same_on_all_ranks(comm, result) -> None:
    """Every rank holds the same bytes (checked through MPI's own allgather, on the user
    communicator and through mpi_env.collective, so it is safe while background collectives
    are still running on the algorithm communicator)."""
    from mpipar.comm.mpi_env import collective

    host = np.ascontiguousarray(backend.to_host(result)).reshape(-1).view(np.uint8)
    n = comm.size
    gathered = np.empty((n, host.size), dtype=np.uint8)
    collective(comm.p2p.comm, "Allgather", host, gathered)
    for r in range(n):
        assert np.array_equal(gathered[r], gathered[0]), f"rank {r} differs from rank 0"

# every algorithm that implements allreduce, for tests that run each one
ALGORITHMS_FOR_BACKGROUND = ["native", "ring", "rhd", "tree", "dbtree", "ps", "hier"]
