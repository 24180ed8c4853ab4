"""The array backend: device choice, dtypes, host copies; the GPU path where CuPy exists."""

import subprocess
import sys

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


# ---- devices, streams, events and pinned copies (issue 15 items 2-3), on the strict double ----
@pytest.mark.parametrize("strict_cupy", [dict(devices=3)], indirect=True)
def test_devices_and_events_on_the_double(strict_cupy):
    cp = strict_cupy.xp
    assert backend.device_count() == 3 and backend.current_device() == 0
    backend.use_device(2)
    assert backend.current_device() == 2 and cp.zeros(2).device.id == 2
    y = cp.ones(4) * 3                       # a kernel on this thread's stream
    ready = backend.record_event()
    other = backend.new_stream()
    with backend.use_stream(other):
        backend.wait_event(ready)            # ordered after y's kernel, on the device
        z = y + 1
    with backend.use_stream(other):
        np.testing.assert_array_equal(backend.to_host(z), np.full(4, 4.0))


def test_devices_without_a_gpu_module_are_no_ops():
    if backend.cupy_available():
        pytest.skip("a GPU is present here")
    assert backend.device_count() == 0 and backend.current_device() is None
    assert backend.record_event() is None and backend.new_stream() is None
    backend.use_device(None)
    backend.wait_event(None)
    with backend.use_stream(None):
        pass


def test_to_host_into_a_pinned_buffer_is_one_pinned_copy(strict_cupy):
    cp = strict_cupy.xp
    x = cp.asarray(np.arange(10, dtype=np.float32))
    pinned = backend.pinned_empty(40, np.uint8).view(np.float32)
    with strict_cupy.counting() as c:
        got = backend.to_host(x, out=pinned)
    assert got is pinned and c.total("d2h") == c.total("d2h_pinned") == 1
    np.testing.assert_array_equal(pinned, np.arange(10))
    host = np.zeros(3)
    assert backend.to_host(np.ones(3), out=host) is host and host.tolist() == [1, 1, 1]


_REALLOCATE = """
import resource, sys
import numpy as np
from mpipar import backend
if sys.argv[1] == "retain":
    assert backend.retain_host_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():                             # as a training step: activations made, then all freed
    acts = [np.ones(1 << 20) for _ in range(20)]
    del acts
step()
before = faults()
for _ in range(5):
    step()
print(faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_host_memory_is_not_faulted_in_again():
    """Twenty 8 MiB arrays allocated, then freed, five times: with glibc's default settings
    the freed heap goes back to the kernel and is faulted in again each time (up to 204,800
    faults of 4 KiB pages, fewer where some are huge pages); retained, it is reused."""
    counts = {}
    for mode in ("default", "retain"):
        out = subprocess.run([sys.executable, "-c", _REALLOCATE, mode], capture_output=True,
                             text=True, timeout=60, check=True)
        counts[mode] = int(out.stdout.split()[-1])
    assert counts["default"] > 5 * (160 << 20) // 4096 // 8, counts   # 8: some pages huge
    assert counts["retain"] < 100, counts
