"""The ``nccl`` algorithm on the strict CuPy double's ``cuda.nccl`` (NCCL over MPI host copies
among the test's ranks): every collective and dtype against NumPy, one NCCL communicator per
group and per split, and its refusals (host arrays, no NCCL, two ranks on one GPU, a buffer
not ordered on the stream given)."""

import numpy as np
import pytest

from mpipar import backend
from mpipar.comm import nccl
from mpipar.comm.communicator import Communicator, split_counts
from mpipar.comm.ops import MAX, SUM
from mpipar.comm.transport.mpi import MPITransport
from mpipar.testing.cupy_double import HazardError, NcclError

DTYPES = ["float16", "float32", "float64", "int32", "int64"]
EIGHT = [dict(devices=8)]       # one GPU per rank, up to 8 ranks on this host


@pytest.fixture
def gpus(strict_cupy, comm):  # type: ignore[no-untyped-def]
    """This rank on its own device of the double (rank r on device r), a Communicator over a
    duplicate of the world whose default algorithm is nccl."""
    strict_cupy.xp.cuda.Device(comm.rank).use()
    p2p = MPITransport(comm.p2p.comm.Dup(), owned=True)
    c = Communicator(p2p, p2p.dup(), algorithm="nccl", name="nccl")
    yield strict_cupy, c
    c.free()
    strict_cupy.xp.cuda.Device(0).use()


def inputs(n: int, dtype: str, rank: int) -> np.ndarray:
    """Small integers: every sum of them is exact in every dtype, so results compare bitwise."""
    return ((np.arange(n) * 7 + 3 * rank) % 11 - 5).astype(dtype)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("strict_cupy", EIGHT, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_collective_and_dtype_matches_numpy(gpus, dtype):
    d, c = gpus
    cp, n, r = d.xp, c.size, c.rank
    every = [inputs(10, dtype, k) for k in range(n)]
    x = cp.asarray(every[r])
    total = np.sum(np.stack(every), axis=0, dtype=dtype)
    for op, want in [("sum", total), ("max", np.max(every, axis=0)), ("min", np.min(every, axis=0))]:
        got = c.allreduce(x, op=op)
        assert isinstance(got, cp.ndarray) and got.dtype == dtype
        np.testing.assert_array_equal(got.get(), want)
    reduced = c.reduce(x, root=n - 1, op="sum")
    if r == n - 1:
        np.testing.assert_array_equal(reduced.get(), total)
    else:
        assert reduced is None
    root = 1 % n
    np.testing.assert_array_equal(c.broadcast(x, root=root).get(), every[root])
    for rows in (2 * n, 2 * n + 1):          # equal blocks, then the uneven split
        def mine(k: int) -> np.ndarray:
            return np.stack([inputs(3, dtype, k + i) for i in range(rows)])
        full = np.sum([mine(k) for k in range(n)], axis=0, dtype=dtype)
        lo, count = sum(split_counts(rows, n)[:r]), split_counts(rows, n)[r]
        np.testing.assert_array_equal(c.reduce_scatter(cp.asarray(mine(r)), op="sum").get(),
                                      full[lo:lo + count])
    np.testing.assert_array_equal(c.allgather(x).get(), np.concatenate(every))
    counts = [k % 3 + 1 for k in range(n)]     # uneven rows per rank
    part = cp.asarray(np.full((counts[r], 2), r, dtype=dtype))
    np.testing.assert_array_equal(c.allgather(part, counts=counts).get(),
                                  np.concatenate([np.full((k % 3 + 1, 2), k, dtype) for k in range(n)]))
    if n > 1:
        assert isinstance(c.transport.cache["nccl"], d.xp.cuda.nccl.NcclCommunicator)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("strict_cupy", EIGHT, indirect=True)
def test_each_split_has_its_own_nccl_communicator(gpus):
    d, c = gpus
    cp = d.xp
    half = c.split(color=c.rank % 2, key=c.rank)
    members = [k for k in range(c.size) if k % 2 == c.rank % 2]
    got = half.allreduce(cp.asarray(np.array([c.rank, 1.0])), op="sum")
    np.testing.assert_array_equal(got.get(), [sum(members), len(members)])
    c.allreduce(cp.ones(2))
    if half.size > 1:
        assert half.transport.cache["nccl"] is not c.transport.cache["nccl"]
        assert half.transport.cache["nccl"].size() == len(members)
    half.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("strict_cupy", EIGHT, indirect=True)
def test_ranks_on_one_gpu_are_refused_by_name(gpus):
    d, c = gpus
    d.xp.cuda.Device(c.rank // 2).use()        # ranks 0 and 1 on device 0
    with pytest.raises(nccl.SharedGPUError, match=r"ranks 0 and 1 share GPU 0 \(0000:01:00.0\) on node "):
        c.allreduce(d.xp.ones(4))
    assert "nccl" not in c.transport.cache      # refused before NCCL was asked


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("strict_cupy", EIGHT, indirect=True)
def test_the_doubles_nccl_refuses_two_ranks_on_one_device_as_nccl_does(gpus):
    d, c = gpus
    lib = d.xp.cuda.nccl
    d.xp.cuda.Device(0).use()
    uid = np.array(lib.get_unique_id() if c.rank == 0 else [0] * 128, dtype=np.int64)
    uid = c.broadcast(uid)   # host memory: through native
    with pytest.raises(NcclError, match="NCCL_ERROR_INVALID_USAGE"):
        lib.NcclCommunicator(c.size, tuple(int(v) for v in uid), c.rank)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("strict_cupy", EIGHT, indirect=True)
def test_a_buffer_written_on_another_stream_is_a_hazard(gpus):
    """The double's NCCL reads a send buffer on the stream it is given: one written on another
    stream needs an event wait first, as on a GPU (planted here; fixed by the wait)."""
    d, c = gpus
    cp, lib = d.xp, d.xp.cuda.nccl
    uid = np.array(lib.get_unique_id() if c.rank == 0 else [0] * 128, dtype=np.int64)
    comm = lib.NcclCommunicator(c.size, tuple(int(v) for v in c.broadcast(uid)), c.rank)
    side = cp.cuda.Stream()
    with side:
        x = cp.ones(4, dtype=np.float32) * 2
    here = cp.cuda.get_current_stream()
    with pytest.raises(HazardError, match="with no event wait"):
        comm.allReduce(x.data.ptr, x.data.ptr, 4, lib.NCCL_FLOAT32, lib.NCCL_SUM, here.ptr)
    here.wait_event(side.record())
    comm.allReduce(x.data.ptr, x.data.ptr, 4, lib.NCCL_FLOAT32, lib.NCCL_SUM, here.ptr)
    np.testing.assert_array_equal(x.get(), np.full(4, 2.0 * c.size, np.float32))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("strict_cupy", EIGHT, indirect=True)
def test_bfloat16_and_groups_in_the_doubles_nccl(gpus):
    """The double has CuPy's NCCL_BFLOAT16 (bits in uint16, reduced in float32 and rounded);
    calls between groupStart and groupEnd run at groupEnd."""
    d, c = gpus
    cp, lib = d.xp, d.xp.cuda.nccl
    uid = np.array(lib.get_unique_id() if c.rank == 0 else [0] * 128, dtype=np.int64)
    comm = lib.NcclCommunicator(c.size, tuple(int(v) for v in c.broadcast(uid)), c.rank)
    bits = (np.array([1.5, -2.0, 3.0], np.float32).view(np.uint32) >> 16).astype(np.uint16)
    x, y = cp.asarray(bits), cp.asarray(np.full(2, c.rank, np.int64))
    s = cp.cuda.get_current_stream().ptr
    lib.groupStart()
    comm.allReduce(x.data.ptr, x.data.ptr, 3, lib.NCCL_BFLOAT16, lib.NCCL_SUM, s)
    comm.allReduce(y.data.ptr, y.data.ptr, 2, lib.NCCL_INT64, lib.NCCL_MAX, s)
    np.testing.assert_array_equal(y.get(), [c.rank, c.rank])     # not run yet
    lib.groupEnd()
    got = (x.get().astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(got, np.array([1.5, -2.0, 3.0], np.float32) * c.size)
    np.testing.assert_array_equal(y.get(), [c.size - 1] * 2)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("strict_cupy", EIGHT, indirect=True)
def test_background_collectives_run_on_each_ranks_gpu(gpus):
    d, c = gpus
    h = c.iallreduce(d.xp.ones(4), op="sum")
    np.testing.assert_array_equal(h.wait().get(), np.full(4, c.size, np.float64))


def test_host_arrays_and_a_missing_nccl_are_refused_clearly(strict_cupy, monkeypatch):
    class T:       # a group of two that must never be reached
        native, rank, size, cache = None, 0, 2, {}
    with pytest.raises(TypeError, match="nccl algorithm reduces device .CuPy. arrays; allreduce got "
                                        "a host numpy float32 array of 3 elements"):
        nccl.allreduce(T(), np.ones(3, np.float32), None)
    monkeypatch.delattr(strict_cupy.xp.cuda, "nccl")
    with pytest.raises(RuntimeError, match="NCCL is not available: this CuPy has no cupy.cuda.nccl"):
        nccl.allreduce(T(), strict_cupy.xp.ones(3), None)
    assert T.cache == {}


def test_no_gpu_module_means_no_nccl(monkeypatch):
    monkeypatch.setattr(backend, "_gpu", lambda: None)
    with pytest.raises(RuntimeError, match="NCCL needs CuPy with a visible GPU"):
        backend.nccl_module()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("gpu", ["strict-cupy", "cupy"])
def test_every_function_on_one_rank_calls_nccl(gpu, request, comm):
    """A group of one never reaches an algorithm through the Communicator, so the functions
    are called directly here: on one GPU this is real NCCL (a one-rank NcclCommunicator)."""
    if comm.size != 1:
        pytest.skip("one rank: the functions called directly")
    if gpu == "cupy":
        if not backend.cupy_available():
            pytest.skip("CuPy with a GPU not available")
        xp = backend.cupy_module()
    else:
        xp = request.getfixturevalue("strict_cupy").xp
    t = MPITransport(comm.p2p.comm.Dup(), owned=True)
    try:
        for dtype in DTYPES:
            host = inputs(6, dtype, 0)
            for fn, extra in ((nccl.allreduce, (SUM,)), (nccl.allreduce, (MAX,)),
                              (nccl.reduce, (SUM, 0)), (nccl.broadcast, (0,)),
                              (nccl.reduce_scatter, (SUM, [6])), (nccl.allgather, ([6],))):
                got = fn(t, xp.asarray(host), *extra)
                np.testing.assert_array_equal(got.get(), host, err_msg=f"{fn.__name__} {dtype}")
        assert isinstance(t.cache["nccl"], backend.nccl_module().NcclCommunicator)
    finally:
        t.free()
