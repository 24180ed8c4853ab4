"""The Communicator's CUDA-aware mode under the strict CuPy double: device arrays go to MPI
through ``__cuda_array_interface__`` (the double's "device" memory is host memory, so any MPI
reads it), and a pointer handed over before its producing kernel is synchronised is a hazard.
The staged mode runs in test_communicator.py (its ``xp`` fixture's strict-cupy parameter)."""

import numpy as np
import pytest

from mpipar.comm.communicator import Communicator
from mpipar.comm.transport.mpi import MPITransport


@pytest.fixture
def cuda_aware(comm):  # type: ignore[no-untyped-def]
    """A Communicator over a duplicate of the world whose transports pass device buffers."""
    p2p = MPITransport(comm.p2p.comm.Dup(), cuda_aware=True, owned=True)
    c = Communicator(p2p, p2p.dup(), algorithm="native", name="cuda-aware")
    yield c
    c.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["native", "ring", "rhd"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int64"])
def test_cuda_aware_collectives_on_the_double(cuda_aware, strict_cupy, algorithm, dtype):
    cp, n, r = strict_cupy.xp, cuda_aware.size, cuda_aware.rank
    x = cp.asarray(np.arange(12, dtype=dtype) + r)
    got = cuda_aware.allreduce(x, op="sum", algorithm=algorithm)
    assert isinstance(got, cp.ndarray)
    np.testing.assert_array_equal(got.get(), n * np.arange(12, dtype=dtype) + n * (n - 1) // 2)
    g = cuda_aware.allgather(x, algorithm=algorithm)
    np.testing.assert_array_equal(g.get(), np.concatenate([np.arange(12, dtype=dtype) + k for k in range(n)]))


@pytest.mark.mpi(min_size=2)
def test_float16_native_hands_mpi_an_unsynchronised_cast(cuda_aware, strict_cupy):
    """Issue 15 item 2: native float16 reductions synchronise the stream, then queue the
    float32 up-cast and hand its pointer to MPI at once. The double catches it on every rank
    (before any message moves); the fix must turn this test around."""
    x = strict_cupy.xp.ones(8, dtype=np.float16)
    with pytest.raises(TypeError):   # mpi4py reports the refused buffer as "expecting buffer"
        cuda_aware.allreduce(x, op="sum", algorithm="native")
    assert strict_cupy.hazards and all("mpipar/comm/native.py" in h for h in strict_cupy.hazards)
    strict_cupy.hazards.clear()
