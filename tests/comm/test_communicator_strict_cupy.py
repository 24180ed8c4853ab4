"""The Communicator's GPU modes under the strict CuPy double, under ``mpiexec``.

CUDA-aware: device arrays go to MPI through ``__cuda_array_interface__`` (the double's
"device" memory is host memory, so any MPI reads it, and the double counts each pointer a
library read: ``external``); a pointer handed over before its producing kernel is
synchronised is a hazard. What reaches MPI depends on the form MPI runs (issue 15 item 2):
device pointers go to blocking collectives and point-to-point, and to the non-blocking
collectives (``MPI_Iallreduce`` ..., what ``native`` runs once the comm thread exists or the
collective timeout is on) only where ``MPIPAR_CUDA_NONBLOCKING=1`` declares support; otherwise
``native`` stages through the transport's pinned pool. Staged mode (a library that is not
CUDA-aware) copies device -> pooled pinned buffer directly. The staged mode's results run in
test_communicator.py (its ``xp`` fixture's strict-cupy parameter)."""

import numpy as np
import pytest

from mpipar.comm import mpi_env, watchdog
from mpipar.comm.communicator import Communicator
from mpipar.comm.transport.mpi import MPITransport


def _communicator(comm, cuda_aware, cuda_nonblocking=False):  # type: ignore[no-untyped-def]
    p2p = MPITransport(comm.p2p.comm.Dup(), cuda_aware=cuda_aware, owned=True,
                       cuda_nonblocking=cuda_nonblocking)
    return Communicator(p2p, p2p.dup(), algorithm="native", name="gpu")


@pytest.fixture
def cuda_aware(comm):  # type: ignore[no-untyped-def]
    """A Communicator over a duplicate of the world whose transports pass device buffers,
    non-blocking collectives included (declared, as MPIPAR_CUDA_NONBLOCKING=1 does)."""
    c = _communicator(comm, True, cuda_nonblocking=True)
    yield c
    c.free()


@pytest.fixture
def cuda_aware_v4(comm):  # type: ignore[no-untyped-def]
    """CUDA-aware as Open MPI v4 without UCX is: no device memory in non-blocking collectives."""
    c = _communicator(comm, True, cuda_nonblocking=False)
    yield c
    c.free()


@pytest.fixture
def staged(comm):  # type: ignore[no-untyped-def]
    """A library that is not CUDA-aware: every device buffer staged through pinned memory."""
    c = _communicator(comm, False)
    yield c
    c.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["native", "ring", "rhd"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int64"])
def test_cuda_aware_collectives_on_the_double(cuda_aware, strict_cupy, algorithm, dtype):
    cp, n, r = strict_cupy.xp, cuda_aware.size, cuda_aware.rank
    x = cp.asarray(np.arange(12, dtype=dtype) + r)
    with strict_cupy.counting() as c:
        got = cuda_aware.allreduce(x, op="sum", algorithm=algorithm)
    assert isinstance(got, cp.ndarray)
    assert c.total("external") > 0 and c.total("d2h") == 0     # MPI read device memory
    np.testing.assert_array_equal(got.get(), n * np.arange(12, dtype=dtype) + n * (n - 1) // 2)
    g = cuda_aware.allgather(x, algorithm=algorithm)
    np.testing.assert_array_equal(g.get(), np.concatenate([np.arange(12, dtype=dtype) + k for k in range(n)]))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("op", ["sum", "avg", "max"])
def test_float16_native_hands_mpi_the_cast_after_it_ran(cuda_aware, strict_cupy, op):
    """Issue 15 item 2: native float16 reductions up-cast to float32 on the device; the cast
    is queued before the stream is synchronised, so MPI reads the float32 buffer only once it
    is written (the double raised a HazardError at comm/native.py when the sync came first)."""
    cp, n, r = strict_cupy.xp, cuda_aware.size, cuda_aware.rank
    x = cp.asarray((np.arange(8) + r).astype(np.float16))
    with strict_cupy.counting() as c:
        got = cuda_aware.allreduce(x, op=op, algorithm="native")
    assert c.total("external") > 0                      # the float32 cast reached MPI directly
    assert got.dtype == np.float16 and isinstance(got, cp.ndarray)
    ranks = [(np.arange(8) + k).astype(np.float32) for k in range(n)]
    want = {"sum": sum(ranks), "avg": sum(ranks) / n, "max": np.max(ranks, axis=0)}[op]
    np.testing.assert_array_equal(got.get(), want.astype(np.float16))
    rs = cuda_aware.reduce_scatter(cp.asarray(np.ones((n, 3), dtype=np.float16)), op="sum")
    np.testing.assert_array_equal(rs.get(), np.full((1, 3), n, dtype=np.float16))
    assert not strict_cupy.hazards


def _collectives(c, cp, n, r):  # type: ignore[no-untyped-def]
    """Every native collective once on device arrays: [(result, expected)], read later (a
    test's own .get() is a device -> host copy the counters would see)."""
    x = cp.asarray(np.arange(6, dtype=np.float32) + r)
    total = n * np.arange(6) + n * (n - 1) / 2
    out = [(c.allreduce(x), total), (c.broadcast(x, root=0), np.arange(6)),
           (c.allgather(x), np.concatenate([np.arange(6) + k for k in range(n)])),
           (c.reduce_scatter(cp.asarray(np.ones((n, 2), dtype=np.float32))), np.full((1, 2), n)),
           (c.alltoall(cp.asarray(np.full((n, 2), r, np.int64))), np.repeat(np.arange(n), 2).reshape(n, 2))]
    red = c.reduce(x, root=0)
    return out + ([(red, total)] if r == 0 else [])


def _check(results):  # type: ignore[no-untyped-def]
    for got, want in results:
        np.testing.assert_array_equal(got.get(), want)


@pytest.mark.mpi(min_size=2)
def test_nonblocking_native_collectives_never_get_device_pointers(cuda_aware_v4, strict_cupy):
    """Issue 15 item 2: with the collective timeout on (or the comm thread running) native
    collectives are MPI's non-blocking forms, which Open MPI v4's CUDA support does not take
    on device memory: staged through pinned memory instead, unless support is declared."""
    assert mpi_env.nonblocking_collectives()
    with strict_cupy.counting() as c:
        results = _collectives(cuda_aware_v4, strict_cupy.xp, cuda_aware_v4.size, cuda_aware_v4.rank)
    _check(results)
    assert c.total("external") == 0, c.external
    assert c.total("d2h_pinned") == c.total("d2h") > 0      # staged, straight into pinned


@pytest.mark.mpi(min_size=2)
def test_blocking_native_collectives_take_device_pointers(cuda_aware_v4, strict_cupy, monkeypatch):
    """No comm thread and no collective timeout: MPI's blocking forms, which every CUDA-aware
    library takes on device memory, get the device buffers themselves (nothing staged)."""
    monkeypatch.setattr(mpi_env, "_concurrent", False)   # the worker is idle between tests
    before = watchdog.get_timeout()
    watchdog.set_timeout(0)
    try:
        assert not mpi_env.nonblocking_collectives()
        with strict_cupy.counting() as c:
            results = _collectives(cuda_aware_v4, strict_cupy.xp, cuda_aware_v4.size,
                                   cuda_aware_v4.rank)
    finally:
        watchdog.set_timeout(before)
    _check(results)
    assert c.total("external") > 0 and c.total("d2h") == c.total("d2h_pinned") == 0


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["native", "ring", "rhd"])
def test_staged_allreduce_copies_straight_into_pinned_buffers(staged, strict_cupy, algorithm):
    """Issue 15 item 3: every device -> host copy of a staged all-reduce lands in a pooled
    pinned buffer (no pageable intermediate), and no device pointer reaches MPI."""
    cp, n, r = strict_cupy.xp, staged.size, staged.rank
    x = cp.asarray(np.arange(1000, dtype=np.float32) + r)
    staged.allreduce(x, algorithm=algorithm)              # warm: the pool holds its buffers
    with strict_cupy.counting() as c:
        got = staged.allreduce(x, algorithm=algorithm)
    np.testing.assert_array_equal(got.get(), n * np.arange(1000) + n * (n - 1) / 2)
    assert c.total("d2h") > 0 and c.total("d2h") == c.total("d2h_pinned"), c.d2h
    assert c.total("external") == 0
