"""Non-blocking collectives on the background thread: same results as blocking ones, in
order, overlapping with work on the main thread, and mixed safely with blocking collectives
on another communicator (the MPI_THREAD_SERIALIZED lock-and-poll rule)."""

import numpy as np
import pytest

from helpers import ALGORITHMS_FOR_BACKGROUND, assert_same_on_all_ranks, rank_input, reference
from mpipar.comm import split_counts

pytestmark = pytest.mark.mpi(min_size=1)


@pytest.mark.parametrize("algorithm", ALGORITHMS_FOR_BACKGROUND)
def test_iallreduce_matches_reference_in_order(comm, algorithm):
    inputs = [[rank_input(20 + k, r, (257,), "float64") for r in range(comm.size)] for k in range(5)]
    mine = [inputs[k][comm.rank].copy() for k in range(5)]
    handles = [comm.iallreduce(x, op="sum", algorithm=algorithm) for x in mine]
    for x in mine:
        x[:] = -99.0  # the input was copied at call time: overwriting it changes nothing
    a = np.ones((64, 64))
    for _ in range(5):
        a = np.tanh(a @ a * 1e-3)  # work on the main thread while the collectives run
    for k, h in enumerate(handles):
        out = h.wait()
        np.testing.assert_array_equal(out, reference("sum", inputs[k]))
        assert_same_on_all_ranks(comm, out)


def test_background_mixed_with_blocking_on_another_group(comm):
    """A blocking collective on one communicator while background ones run on another."""
    sub = comm.split(color=comm.rank % 2, key=comm.rank)
    handles = [comm.iallreduce(np.full(1000, float(comm.rank + k))) for k in range(4)]
    members = [r for r in range(comm.size) if r % 2 == comm.rank % 2]
    for k in range(4):
        got = sub.allreduce(np.array([comm.rank + k], dtype=np.int64))
        assert got[0] == sum(members) + k * len(members)
    p = comm.size
    for k, h in enumerate(handles):
        np.testing.assert_array_equal(h.wait(), np.full(1000, float(p * (p - 1) / 2 + k * p)))


def test_ireduce_scatter_and_iallgather(comm):
    inputs = [rank_input(30, r, (11, 2), "int64") for r in range(comm.size)]
    full = reference("sum", inputs)
    block = comm.ireduce_scatter(inputs[comm.rank]).wait()
    from mpipar.comm import split_counts

    counts = split_counts(11, comm.size)
    back = comm.iallgather(block, counts=counts).wait()
    np.testing.assert_array_equal(back, full)


@pytest.mark.parametrize("algorithm", ["native", "ring", "rhd"])
def test_ireduce_scatter_copies_its_input_unless_donated(comm, algorithm):
    inputs = [rank_input(31, r, (13, 3), "float64") for r in range(comm.size)]
    full = reference("sum", inputs)
    counts = split_counts(13, comm.size)
    lo = sum(counts[:comm.rank])
    kept = inputs[comm.rank].copy()
    block = comm.ireduce_scatter(kept, algorithm=algorithm).wait()
    np.testing.assert_array_equal(kept, inputs[comm.rank])        # copied: left as it was
    np.testing.assert_array_equal(block, full[lo:lo + counts[comm.rank]])
    given = inputs[comm.rank].copy()
    donated = comm.ireduce_scatter(given, algorithm=algorithm, donate=True).wait()
    np.testing.assert_array_equal(donated, block)
    with pytest.raises(ValueError, match="contiguous"):
        comm.ireduce_scatter(np.ones((4, 6))[:, ::2], donate=True)


def test_error_in_background_collective_reaches_waiter(comm):
    h = comm.iallreduce(np.ones(3), algorithm="ring", no_such_option_is_ignored=1)
    np.testing.assert_array_equal(h.wait(), np.full(3, float(comm.size)))
    with pytest.raises(ValueError, match="unknown reduction op"):
        comm.iallreduce(np.ones(3), op="prod").wait()
