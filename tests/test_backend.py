"""The array backend: device choice, dtypes, host copies; the GPU path where CuPy exists."""

import numpy as np
import pytest

from mpipar import backend


def test_cpu_is_numpy():
    assert backend.get_xp("cpu") is np
    assert backend.device_name(np) == "cpu"


def test_auto_picks_cupy_only_with_a_gpu():
    xp = backend.get_xp("auto")
    assert (xp is not np) == backend.cupy_available()


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="device must be one of"):
        backend.get_xp("tpu")


@pytest.mark.skipif(backend.cupy_available(), reason="a GPU is present here")
def test_gpu_without_cupy_is_a_clear_error():
    with pytest.raises(RuntimeError, match="CuPy"):
        backend.get_xp("gpu")


@pytest.mark.parametrize("name", backend.SUPPORTED_DTYPES)
def test_supported_dtypes_resolve(name):
    assert backend.resolve_dtype(name) == np.dtype(name)


@pytest.mark.parametrize("name", ["complex64", "bool", "uint8", "object"])
def test_unsupported_dtypes_are_rejected(name):
    with pytest.raises(TypeError, match="unsupported dtype"):
        backend.resolve_dtype(name)


def test_round_trip_host_device(xp):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    d = backend.to_device(x, xp)
    assert backend.array_module(d) is xp
    backend.synchronize(d)
    h = backend.to_host(d)
    assert isinstance(h, np.ndarray)
    np.testing.assert_array_equal(h, x)


def test_pinned_empty_is_a_host_buffer():
    buf = backend.pinned_empty(16, np.float64)
    assert isinstance(buf, np.ndarray) and buf.shape == (16,) and buf.dtype == np.float64
    buf[:] = 1.0
    assert backend.pinned_empty(0, np.uint8).size == 0


def test_staging_pool_reuses_buffers():
    from mpipar.comm.transport.staging import PinnedPool

    pool = PinnedPool()
    a = pool.take(100)
    assert a.nbytes == 100
    pool.give(a)
    b = pool.take(120)  # same power-of-two class (128): the same memory comes back
    assert b.nbytes == 120 and np.shares_memory(a, b)


def test_use_gpu_module_is_the_gpu_module_inside_the_block_only():
    """The one hook by which a test double (the strict CuPy of mpipar.testing.cupy_double)
    reaches the backend: inside the block it is CuPy; after it, what was there before."""
    from mpipar.testing.cupy_double import StrictCupy

    d = StrictCupy()
    before = backend.cupy_available()
    with backend.use_gpu_module(d.xp):
        assert backend.get_xp("gpu") is d.xp and backend.get_xp("auto") is d.xp
        x = backend.to_device(np.ones(3), d.xp)
        assert backend.is_device_array(x) and backend.array_module(x) is d.xp
    assert backend.cupy_available() == before
    assert not backend.is_device_array(x)
    assert backend.get_xp("auto") is not d.xp
