"""BufferPool: the free lists behind staged GPU messages and the algorithms' scratch."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mpipar.comm.algorithms._util import give_scratch, take_scratch
from mpipar.comm.transport.pool import BufferPool


def test_take_gives_exact_length_from_a_size_class():
    pool = BufferPool()
    a = pool.take(100)
    assert a.dtype == np.uint8 and a.nbytes == 100 and a.base.nbytes == 128
    assert pool.take(0).nbytes == 0


def test_given_buffer_comes_back_for_the_same_class_only():
    pool = BufferPool()
    a = pool.take(100)
    pool.give(a)
    assert pool.held_bytes == 128
    assert not np.shares_memory(pool.take(200), a)  # class 256: a new buffer
    b = pool.take(120)  # class 128: a's memory
    assert np.shares_memory(a, b) and pool.held_bytes == 0


def test_a_buffer_is_never_handed_out_twice():
    pool = BufferPool()
    a = pool.take(64)
    pool.give(a)
    pool.give(a[:10])  # the same owner given again (a view of it): kept once
    assert pool.held_bytes == 64
    b, c = pool.take(64), pool.take(64)
    assert not np.shares_memory(b, c)


def test_views_of_another_dtype_are_given_back_by_their_owner():
    pool = BufferPool()
    f = pool.take(4 * 25).view(np.float32)
    assert f.size == 25
    pool.give(f[3:7])
    assert pool.held_bytes == 128


def test_foreign_buffers_are_not_kept():
    pool = BufferPool()
    pool.give(np.empty(100, dtype=np.uint8))  # not a size class
    pool.give(np.empty(16, dtype=np.float64))  # 128 bytes, but not a uint8 buffer of ours
    assert pool.held_bytes == 0


def test_the_limit_bounds_what_is_kept():
    pool = BufferPool(max_bytes=1000)
    big, small = pool.take(1024), pool.take(512)
    pool.give(big)  # would exceed the limit: dropped
    pool.give(small)
    assert pool.held_bytes == 512
    assert not np.shares_memory(pool.take(1024), big)


def test_concurrent_takers_get_distinct_buffers():
    pool = BufferPool()
    for _ in range(8):
        pool.give(pool.take(4096))
    got: list[np.ndarray] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = [pool.take(4096) for _ in range(50)]
        with lock:
            got.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    addresses = [b.__array_interface__["data"][0] for b in got]
    assert len(set(addresses)) == len(got)


class _T:
    """A transport with a scratch pool (as MPITransport), or without (as SimTransport)."""

    def __init__(self, pool: BufferPool | None) -> None:
        self.scratch_pool = pool


@pytest.mark.parametrize("dtype", ["float16", "float32", "int64", "complex128"])
def test_scratch_comes_from_the_transport_pool_in_the_callers_dtype(dtype):
    pool = BufferPool()
    t = _T(pool)
    like = np.zeros(3, dtype=dtype)
    s = take_scratch(t, like, 1000)
    assert s.dtype == np.dtype(dtype) and s.shape == (1000,)
    s[:] = 1  # writable
    give_scratch(t, s)
    again = take_scratch(t, like, 900)
    assert np.shares_memory(s, again)


def test_without_a_pool_scratch_is_new_memory():
    t = _T(None)
    like = np.zeros(3, dtype=np.float32)
    s = take_scratch(t, like, 10)
    give_scratch(t, s)
    assert not np.shares_memory(s, take_scratch(t, like, 10))


def test_scratch_limit_comes_from_the_environment(monkeypatch):
    from mpipar.comm.transport import mpi as mpi_transport

    monkeypatch.delenv("MPIPAR_SCRATCH_BYTES", raising=False)
    assert mpi_transport._scratch_limit() == mpi_transport.SCRATCH_BYTES
    monkeypatch.setenv("MPIPAR_SCRATCH_BYTES", "0")
    assert mpi_transport._scratch_limit() == 0  # keep nothing: every call allocates
    monkeypatch.setenv("MPIPAR_SCRATCH_BYTES", "lots")
    with pytest.raises(ValueError, match="MPIPAR_SCRATCH_BYTES"):
        mpi_transport._scratch_limit()
