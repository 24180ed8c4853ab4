"""Every Communicator method against a NumPy reference, at every world size the runner uses
(1, 2, 3, 4, 8), with odd shapes, empty arrays and each dtype; results identical on every rank.

These exercise the interface with the ``native`` algorithm (MPI's own collectives); the
from-scratch algorithms have their own tests in test_algorithms.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpipar import backend
from mpipar.comm import CollectiveMismatchError, split_counts

from helpers import DTYPES, OPS, assert_same_on_all_ranks, rank_input, reference

SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 3), (11, 3, 2)]

pytestmark = pytest.mark.mpi(min_size=1)


def _inputs(comm, seed, shape, dtype):
    return [rank_input(seed, r, shape, dtype) for r in range(comm.size)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_allreduce(comm, xp, shape, op, dtype):
    inputs = _inputs(comm, 1, shape, dtype)
    x = xp.asarray(inputs[comm.rank])
    before = backend.to_host(x).copy()
    out = comm.allreduce(x, op=op)
    assert type(out) is type(x) and out.dtype == x.dtype and out.shape == x.shape
    np.testing.assert_array_equal(backend.to_host(out), reference(op, inputs))
    np.testing.assert_array_equal(backend.to_host(x), before)  # input untouched
    assert_same_on_all_ranks(comm, out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (4, 3)])
def test_reduce_to_every_root(comm, xp, shape, op, dtype):
    inputs = _inputs(comm, 2, shape, dtype)
    for root in range(comm.size):
        out = comm.reduce(xp.asarray(inputs[comm.rank]), root=root, op=op)
        if comm.rank == root:
            assert out.dtype == np.dtype(dtype) and out.shape == shape
            np.testing.assert_array_equal(backend.to_host(out), reference(op, inputs))
        else:
            assert out is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_broadcast_from_every_root(comm, xp, shape, dtype):
    inputs = _inputs(comm, 3, shape, dtype)
    for root in range(comm.size):
        x = xp.asarray(inputs[comm.rank])
        before = backend.to_host(x).copy()
        out = comm.broadcast(x, root=root)
        np.testing.assert_array_equal(backend.to_host(out), inputs[root])
        np.testing.assert_array_equal(backend.to_host(x), before)
        assert out.dtype == x.dtype and out.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("rows", [0, 1, 5, 8, 13])
def test_reduce_scatter_then_allgather_round_trip(comm, xp, rows, op, dtype):
    shape = (rows, 3)
    inputs = _inputs(comm, 4, shape, dtype)
    full = reference(op, inputs)
    counts = split_counts(rows, comm.size)
    lo = sum(counts[: comm.rank])
    block = comm.reduce_scatter(xp.asarray(inputs[comm.rank]), op=op)
    assert block.shape == (counts[comm.rank], 3) and block.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(backend.to_host(block), full[lo: lo + counts[comm.rank]])
    back = comm.allgather(block, counts=counts)
    np.testing.assert_array_equal(backend.to_host(back), full)
    assert_same_on_all_ranks(comm, back)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (4,), (2, 3, 2)])
def test_allgather_equal_shapes(comm, xp, shape, dtype):
    inputs = _inputs(comm, 5, shape, dtype)
    out = comm.allgather(xp.asarray(inputs[comm.rank]))
    np.testing.assert_array_equal(backend.to_host(out), np.concatenate(inputs, axis=0))
    assert_same_on_all_ranks(comm, out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_rank", [0, 1, 3])
def test_alltoall(comm, xp, per_rank, dtype):
    p = comm.size
    inputs = _inputs(comm, 6, (p * per_rank, 2), dtype)
    out = comm.alltoall(xp.asarray(inputs[comm.rank]))
    expected = np.concatenate([inputs[src][comm.rank * per_rank:(comm.rank + 1) * per_rank]
                               for src in range(p)], axis=0)
    np.testing.assert_array_equal(backend.to_host(out), expected)


def test_alltoall_rejects_indivisible(comm):
    if comm.size == 1:
        pytest.skip("every length divides 1")
    with pytest.raises(ValueError, match="divisible"):
        comm.alltoall(np.zeros(comm.size + 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_send_recv_ring(comm, xp, dtype):
    """Each rank sends to its right neighbour: blocking and non-blocking forms."""
    p, r = comm.size, comm.rank
    right, left = (r + 1) % p, (r - 1) % p
    x = xp.asarray(rank_input(7, r, (3, 4), dtype))
    expected = rank_input(7, left, (3, 4), dtype)
    req = comm.irecv(xp.empty((3, 4), dtype=dtype), source=left, tag=11)
    comm.isend(x, dest=right, tag=11).wait()
    got = req.wait()
    np.testing.assert_array_equal(backend.to_host(got), expected)
    # blocking: even ranks send first, odd ranks receive first (no deadlock for any p)
    if p == 1:
        return
    if r % 2 == 0:
        comm.send(x, dest=right, tag=12)
        got = comm.recv(left, tag=12, shape=(3, 4), dtype=dtype, xp=xp)
    else:
        got = comm.recv(left, tag=12, shape=(3, 4), dtype=dtype, xp=xp)
        comm.send(x, dest=right, tag=12)
    np.testing.assert_array_equal(backend.to_host(got), expected)


def test_point_to_point_does_not_match_collective_traffic(comm):
    """A user message with tag 0 in flight during a collective must not be mistaken for the
    collective's own messages (they travel on a private duplicate of the group)."""
    p, r = comm.size, comm.rank
    req = comm.irecv(np.empty(5), source=(r - 1) % p, tag=0)
    comm.isend(np.full(5, float(r)), dest=(r + 1) % p, tag=0)
    total = comm.allreduce(np.ones(5))
    np.testing.assert_array_equal(total, np.full(5, float(p)))
    np.testing.assert_array_equal(req.wait(), np.full(5, float((r - 1) % p)))


def test_split_even_odd(comm):
    sub = comm.split(color=comm.rank % 2, key=-comm.rank)  # reversed order inside the group
    members = [r for r in range(comm.size) if r % 2 == comm.rank % 2]
    assert sub.size == len(members)
    assert sub.rank == sorted(members, reverse=True).index(comm.rank)
    out = sub.allreduce(np.array([comm.rank], dtype=np.int64))
    assert out[0] == sum(members)
    assert sub.algorithm == comm.algorithm


def test_split_undefined_color_gets_none(comm):
    sub = comm.split(color=None if comm.rank == 0 else 1, key=comm.rank)
    if comm.rank == 0:
        assert sub is None
    else:
        assert sub.size == comm.size - 1
        sub.barrier()


def test_barrier(comm):
    comm.barrier()


def test_bad_arguments_raise_before_communicating(comm):
    with pytest.raises(ValueError, match="unknown reduction op"):
        comm.allreduce(np.ones(3), op="prod")
    with pytest.raises(TypeError, match="unsupported dtype"):
        comm.allreduce(np.ones(3, dtype=np.complex64))
    with pytest.raises(TypeError, match="numpy or cupy array"):
        comm.allreduce([1.0, 2.0])
    with pytest.raises(ValueError, match="root"):
        comm.broadcast(np.ones(3), root=comm.size)
    with pytest.raises(ValueError, match="unknown collective algorithm"):
        comm.allreduce(np.ones(3), algorithm="no-such-algorithm")
    with pytest.raises(ValueError, match="not in this group"):
        comm.isend(np.ones(3), dest=comm.size)


@pytest.mark.mpi(min_size=2)
def test_debug_mode_names_ranks_that_disagree(comm):
    """MPIPAR_DEBUG: a rank calling with another count gets a clear error on every rank,
    instead of a hang or silently mixed data."""
    from mpipar.comm.communicator import Communicator

    checked = Communicator(comm.p2p, comm.transport, debug=True)
    n = 4 if comm.rank != 1 else 5
    with pytest.raises(CollectiveMismatchError, match=r"ranks \[1\] differ") as err:
        checked.allreduce(np.ones(n))
    assert "count=5" in str(err.value) and "count=4" in str(err.value)
    comm.barrier()


def test_large_messages_are_split(comm, monkeypatch):
    """Messages longer than the MPI count limit go in pieces (patched small, not gigabytes)."""
    import mpipar.comm.transport.mpi as mpi_transport

    monkeypatch.setattr(mpi_transport, "MAX_MESSAGE_BYTES", 24)
    p, r = comm.size, comm.rank
    x = np.arange(101, dtype=np.float64) + r
    req = comm.irecv(np.empty(101), source=(r - 1) % p, tag=3)
    comm.isend(x, dest=(r + 1) % p, tag=3).wait()
    np.testing.assert_array_equal(req.wait(), np.arange(101, dtype=np.float64) + (r - 1) % p)
