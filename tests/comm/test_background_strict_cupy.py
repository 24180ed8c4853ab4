"""The communication thread on a GPU, under the strict CuPy double (issue 15 item 2): it runs
on the device of the thread that submitted, on a stream of its own, ordered by events after
the kernels that made its input, and the waiting thread's stream is ordered after the
collective before it uses the result. Per-thread default streams (the double's default), so
nothing else orders the two threads."""

import numpy as np
import pytest

from mpipar import backend
from mpipar.comm.communicator import Communicator
from mpipar.comm.transport.mpi import MPITransport


@pytest.fixture
def cuda_aware(comm):  # type: ignore[no-untyped-def]
    """Device buffers straight to MPI, non-blocking collectives included (declared)."""
    p2p = MPITransport(comm.p2p.comm.Dup(), cuda_aware=True, owned=True, cuda_nonblocking=True)
    c = Communicator(p2p, p2p.dup(), algorithm="native", name="gpu")
    yield c
    c.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("strict_cupy", [dict(devices=2)], indirect=True)
@pytest.mark.parametrize("algorithm", ["native", "ring"])
def test_background_collectives_run_on_the_owners_device_and_their_own_stream(
        cuda_aware, strict_cupy, algorithm):
    cp = strict_cupy.xp
    n, r = cuda_aware.size, cuda_aware.rank
    with cp.cuda.Device(1):
        main = cp.cuda.get_current_stream()
        x = cp.asarray(np.arange(64, dtype=np.float32) + r) * 2   # a kernel just queued
        seen = cuda_aware.background().submit(
            lambda: (backend.current_device(), cp.cuda.get_current_stream())).wait()
        h = cuda_aware.iallreduce(x, algorithm=algorithm)
        y = h.wait() + 1       # a kernel on the main stream reading the comm thread's result
        assert y.device.id == 1
        got = y.get()
    assert seen[0] == 1 and seen[1] is not main and seen[1].device_id == 1
    np.testing.assert_array_equal(got, 2 * (n * np.arange(64) + n * (n - 1) / 2) + 1)


@pytest.mark.mpi(min_size=2)
def test_a_result_read_without_the_handles_event_is_a_hazard(cuda_aware, strict_cupy):
    """The planted bug: the comm thread's all-reduce (avg) ends with the division kernel on
    its stream, which nothing synchronises (CUDA-aware: no staging copy after it); reading
    the result on the main stream without the event ``Handle.wait`` waits on reads stale data."""
    cp = strict_cupy.xp
    x = cp.asarray(np.full(32, 2.0, dtype=np.float32))
    h = cuda_aware.iallreduce(x, op="avg", algorithm="ring")
    h._done.wait()
    with pytest.raises(Exception, match="no event wait or synchronize"):
        h._result + 1
    np.testing.assert_array_equal((h.wait() + 1).get(), np.full(32, 3.0))
