"""The strict CuPy double: each refusal, each hazard it claims to catch (planted), counters."""

import threading

import numpy as np
import pytest

from mpipar import backend
from mpipar.testing.cupy_double import CUPY_NAMES, HazardError, StrictCupy

IMPLICIT = "Implicit conversion to a NumPy array is not allowed"


@pytest.fixture
def d():
    return StrictCupy(seed=0)


def dev(d, *shape):
    return d.xp.asarray(np.arange(np.prod(shape), dtype=np.float32).reshape(shape))


# ---- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("convert", [np.asarray, np.array, lambda x: x.__array__(),
                                     lambda x: np.float32(1) + np.ones(3) * np.asarray(x)])
def test_no_implicit_numpy_conversion(d, convert):
    with pytest.raises(TypeError, match=IMPLICIT):
        convert(dev(d, 3))


@pytest.mark.parametrize("convert", [memoryview, bytes, lambda x: np.frombuffer(x, np.uint8)])
def test_no_buffer_protocol(d, convert):
    with pytest.raises(TypeError):
        convert(dev(d, 3))


def test_no_array_interface(d):
    assert not hasattr(dev(d, 3), "__array_interface__")


def test_numpy_arrays_are_not_kernel_inputs(d):
    with pytest.raises(TypeError, match="Unsupported type"):
        dev(d, 3) + np.ones(3, np.float32)
    with pytest.raises(TypeError, match="Unsupported type"):
        d.xp.add(dev(d, 3), np.ones(3, np.float32))


def test_scalar_conversions_are_counted_copies_or_refused(d):
    x = dev(d, 4)
    with d.counting() as c:
        assert float(x.sum()) == 6.0 and int(x[1]) == 1 and bool(x[1]) and x[2].item() == 2.0
        assert x.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert c.total("d2h") == 5 and c.total("syncs") == 5
    assert all(site.startswith("tests/testing/test_cupy_double.py:") for site in c.d2h)
    strict = StrictCupy(refuse_scalars=True)
    y = strict.xp.ones(2)
    for convert in (float, int, bool, lambda v: v.item(), lambda v: v.tolist()):
        with pytest.raises(TypeError, match="synchronising device -> host copy"):
            convert(y[0])
    with pytest.raises(TypeError, match="synchronising"):
        if y[0]:
            pass


def test_iteration_yields_device_arrays(d):
    items = list(dev(d, 3))
    assert all(isinstance(i, d.xp.ndarray) and i.shape == () for i in items)
    with pytest.raises(TypeError, match="0-d"):
        iter(dev(d, 3).sum())


def test_reductions_stay_on_the_device(d):
    s = dev(d, 2, 3).sum()
    assert isinstance(s, d.xp.ndarray) and s.shape == ()
    assert isinstance(d.xp.max(dev(d, 3)), d.xp.ndarray)


def test_only_cupys_names(d):
    for name in ("asarray", "zeros", "matmul", "add", "where", "fuse", "ElementwiseKernel"):
        assert name in CUPY_NAMES and hasattr(d.xp, name)
    for name in ("asfarray", "float128", "lib", "ctypeslib", "erf"):
        with pytest.raises(AttributeError, match=name):
            getattr(d.xp, name)
    nccl = d.xp.cuda.nccl           # modelled (tests/comm/test_nccl.py), with CuPy's names only
    assert nccl.NCCL_FLOAT32 == 7 and nccl.NCCL_BFLOAT16 == 9 and nccl.available
    for name in ("send", "ncclAllReduce", "NCCL_FLOAT8"):   # left out, or not CuPy's
        with pytest.raises(AttributeError, match=name):
            getattr(nccl, name)
    assert d.xp.cuda.runtime.getDeviceCount() == 2
    rng = d.xp.random.default_rng([1, 2, 3])
    assert isinstance(rng.standard_normal((2,)), d.xp.ndarray)
    with pytest.raises(AttributeError):
        rng.bytes  # noqa: B018  (NumPy's Generator has it, CuPy's not)


def test_explicit_copies_are_counted_by_call_site(d):
    with d.counting() as c:
        x = d.xp.asarray(np.ones(3))
        x.set(np.zeros(3))
        h = x.get()
        h2 = d.xp.asnumpy(x)
        out = np.empty(3)
        d.xp.asnumpy(x, out=out)
    assert isinstance(h, np.ndarray) and isinstance(h2, np.ndarray)
    assert c.total("h2d") == 2 and c.total("d2h") == 3 and c.total("syncs") == 3
    assert len(c.d2h) == 3  # three lines, three sites
    assert d.counters.total("d2h") >= 3  # the double's own totals include the region


def test_backend_funnels_are_skipped_in_call_sites(strict_cupy):
    x = strict_cupy.xp.ones(3)
    with strict_cupy.counting() as c:
        backend.to_host(x)
    (site,) = c.d2h
    assert site.startswith("tests/testing/test_cupy_double.py:")


# ---- devices ----------------------------------------------------------------------------------
def test_device_is_per_thread_and_arrays_remember_theirs(d):
    cp = d.xp
    with cp.cuda.Device(1):
        a = cp.ones(3)
        seen = []
        t = threading.Thread(target=lambda: seen.append(cp.cuda.Device().id))
        t.start()
        t.join(timeout=30)
        assert seen == [0]  # another thread starts on device 0
    assert a.device.id == 1 and cp.cuda.Device().id == 0
    with pytest.raises(ValueError, match="array device = 1 while current = 0"):
        a + cp.ones(3)
    with cp.cuda.Device(1):
        (a + 1).get()


# ---- streams: planted hazards -----------------------------------------------------------------
def test_unsynchronised_hand_off_between_threads_is_caught(d):
    cp = d.xp
    x = cp.ones(1000)
    y = x * 2  # queued on the main thread's stream: not known complete
    errors = []

    def consumer():
        try:
            (y + 1).get()
        except HazardError as e:
            errors.append(str(e))

    t = threading.Thread(target=consumer)
    t.start()
    t.join(timeout=30)
    (msg,) = errors
    assert msg.count("tests/testing/test_cupy_double.py:") == 2  # the write and the read


def test_hand_off_ordered_by_an_event_or_a_synchronize_is_fine(d):
    cp = d.xp
    y = cp.ones(10) * 2
    ev = cp.cuda.get_current_stream().record()
    out = []

    def consumer():
        cp.cuda.get_current_stream().wait_event(ev)
        z = y + 1                    # ordered on the GPU after the event
        cp.cuda.get_current_stream().synchronize()
        out.append(z.get())

    t = threading.Thread(target=consumer)
    t.start()
    t.join(timeout=30)
    np.testing.assert_array_equal(out[0], np.full(10, 3.0))
    w = cp.ones(4) * 3
    cp.cuda.get_current_stream().synchronize()
    t = threading.Thread(target=lambda: out.append(w.get()))
    t.start()
    t.join(timeout=30)
    np.testing.assert_array_equal(out[1], np.full(4, 3.0))


def test_legacy_null_stream_orders_threads(d):
    legacy = StrictCupy(per_thread_default_stream=False)
    y = legacy.xp.ones(3) * 2
    out = []
    t = threading.Thread(target=lambda: out.append((y + 1).get()))
    t.start()
    t.join(timeout=30)
    assert len(out) == 1


def test_reading_on_another_stream_without_a_wait_is_caught(d):
    cp = d.xp
    s = cp.cuda.Stream(non_blocking=True)
    y = cp.ones(3) * 2
    with s, pytest.raises(HazardError, match="no event wait or synchronize"):
        y + 1
    ev = cp.cuda.Event()
    ev.record()                       # on the default stream, after y's write
    s.wait_event(ev)
    with s:
        y + 1


def test_staging_without_synchronize_is_caught(d):
    """The staged transport copies a device buffer to the host on the communication thread:
    without a synchronize (or event) after the producing kernel, the copy may read stale data."""
    cp = d.xp
    grad = cp.ones(16) * 0.5
    errors = []

    def stage():
        try:
            host = np.empty(16)
            cp.asnumpy(grad, out=host)
        except HazardError as e:
            errors.append(e)

    t = threading.Thread(target=stage)
    t.start()
    t.join(timeout=30)
    assert len(errors) == 1 and "host read" in str(errors[0])
    cp.cuda.runtime.deviceSynchronize()
    t = threading.Thread(target=stage)
    t.start()
    t.join(timeout=30)
    assert len(errors) == 1


def test_staging_on_a_stream_that_waited_for_the_write_is_ordered(d):
    """The communication thread's own stream, made to wait for an event recorded after the
    producing kernel (comm/background.py), copies the buffer to the host after it is written."""
    cp = d.xp
    grad = cp.ones(16) * 0.5
    ready = cp.cuda.Event()
    ready.record()
    errors, got = [], []

    def stage(wait):  # type: ignore[no-untyped-def]
        s = cp.cuda.Stream(non_blocking=True)
        if wait:
            s.wait_event(ready)
        try:
            with s:
                got.append(cp.asnumpy(grad, out=np.empty(16)))
        except HazardError as e:
            errors.append(e)

    for wait in (False, True):
        t = threading.Thread(target=stage, args=(wait,))
        t.start()
        t.join(timeout=30)
    assert len(errors) == 1 and "host read" in str(errors[0]) and len(got) == 1
    np.testing.assert_array_equal(got[0], np.full(16, 0.5))


def test_device_pointer_to_mpi_before_synchronize_is_caught(d):
    """CUDA-aware MPI reads ``__cuda_array_interface__``'s pointer outside CUDA's ordering."""
    cp = d.xp
    half = cp.ones(8, dtype=np.float16)
    up = half.astype(np.float32)      # the cast kernel, queued
    with pytest.raises(HazardError, match="has not been synchronised"):
        up.__cuda_array_interface__  # noqa: B018
    cp.cuda.get_current_stream().synchronize()
    assert up.__cuda_array_interface__["shape"] == (8,)


def test_a_view_shares_its_bases_write_history(d):
    cp = d.xp
    x = cp.zeros(8)
    cp.cuda.get_current_stream().synchronize()
    x[2:4] = 1.0
    view = x.reshape(2, 4)
    with pytest.raises(HazardError):
        view.__cuda_array_interface__  # noqa: B018


# ---- atomics ----------------------------------------------------------------------------------
def _embedding_grad(cp, idx, dout, vocab):
    g = cp.zeros((vocab, dout.shape[1]), dtype=np.float32)
    cp.add.at(g, idx, dout)
    return g.get()


def _segment_sum_grad(cp, idx, dout, vocab):
    order = cp.argsort(idx, kind="stable")
    sorted_idx = idx[order].get()
    starts = np.flatnonzero(np.r_[True, sorted_idx[1:] != sorted_idx[:-1]])
    sums = cp.add.reduceat(dout[order], cp.asarray(starts), axis=0)
    g = np.zeros((vocab, dout.shape[1]), dtype=np.float32)
    g[sorted_idx[starts]] = sums.get()
    return g


def test_scatter_add_order_is_random_and_a_segment_sum_repeats():
    d = StrictCupy()  # unseeded: a new order every call, as GPU atomics
    cp = d.xp
    rng = np.random.default_rng(0)
    idx = cp.asarray(rng.integers(0, 4, 2000))
    dout = cp.asarray((rng.standard_normal((2000, 3)) * 10.0 ** rng.integers(-3, 3, (2000, 1))).astype(np.float32))
    first = _embedding_grad(cp, idx, dout, 4)
    assert any(not np.array_equal(first, _embedding_grad(cp, idx, dout, 4)) for _ in range(20))
    np.testing.assert_allclose(first, _embedding_grad(cp, idx, dout, 4), rtol=1e-3, atol=1e-3)
    ref = _segment_sum_grad(cp, idx, dout, 4)
    assert all(np.array_equal(ref, _segment_sum_grad(cp, idx, dout, 4)) for _ in range(5))
    np.testing.assert_allclose(ref, first, rtol=1e-3, atol=1e-3)
    g = cp.zeros((4, 3), dtype=np.float32)
    d.cupyx.scatter_add(g, idx, dout)
    np.testing.assert_allclose(g.get(), first, rtol=1e-3, atol=1e-3)


# ---- counters over a region -------------------------------------------------------------------
def test_counting_a_region(d):
    cp = d.xp
    x = cp.ones(100)
    with d.counting() as c:
        for _ in range(3):
            x = x * 2
        cp.cuda.get_current_stream().synchronize()
        float(x[0])
    assert c.total("kernels") == 4 and c.total("syncs") == 2 and c.total("d2h") == 1
    outside = d.counters.total("kernels")
    x + 1
    assert d.counters.total("kernels") == outside + 1 and c.total("kernels") == 4


# ---- the backend hook -------------------------------------------------------------------------
def test_backend_sees_the_double_only_inside_the_fixture(strict_cupy):
    cp = strict_cupy.xp
    assert backend.get_xp("gpu") is cp and backend.cupy_available()
    x = backend.to_device(np.ones(3), cp)
    assert backend.is_device_array(x) and backend.array_module(x) is cp
    backend.synchronize(x)
    np.testing.assert_array_equal(backend.to_host(x), np.ones(3))
    buf = backend.pinned_empty(8, np.float32)
    assert isinstance(buf, np.ndarray) and buf.nbytes == 32


def test_copies_straight_into_pinned_memory_are_told_apart(strict_cupy):
    """Staging into a pooled page-locked buffer (backend.pinned_empty) is the fast path; a
    copy into ordinary host memory (what .get() makes) is not."""
    x = strict_cupy.xp.ones(16, dtype=np.float32)
    pinned = backend.pinned_empty(16, np.float32)
    with strict_cupy.counting() as c:
        strict_cupy.xp.asnumpy(x, out=pinned)
        pinned[:] = x.get()
        strict_cupy.xp.asnumpy(x, out=np.empty(16, np.float32))
    assert c.total("d2h") == 3 and c.total("d2h_pinned") == 1


def test_scatter_add_of_an_empty_masked_selection_adds_nothing():
    """A tensor-parallel rank whose vocabulary shard no token of the batch falls in scatters
    zero rows of shape (0, C): nothing changes (8-rank CI found the double refusing it)."""
    cp = StrictCupy(seed=0).xp
    grad = cp.zeros((4, 3))
    mine = cp.asarray(np.zeros(5, dtype=bool))
    cp.add.at(grad, cp.asarray(np.arange(5))[mine], cp.ones((5, 3))[mine])
    assert (cp.asnumpy(grad) == 0).all()
