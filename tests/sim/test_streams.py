"""Each virtual rank's communication stream (``SimTransport.background()``): a second virtual
thread with its own clock, overlapping the main thread, sharing the rank's ports, and the
layers above (GradBuckets) timed on it."""

from __future__ import annotations

import numpy as np
import pytest

from mpipar.comm.algorithms import ring
from mpipar.comm.communicator import Communicator
from mpipar.comm.network import Network, Profile
from mpipar.comm.ops import SUM
from mpipar.comm.transport.base import recv
from mpipar.comm.transport.sim import DeadlockError, Engine
from mpipar.nn.flat import FlatLayout
from mpipar.parallel.data_parallel import GradBuckets

A, B = 2e-6, 1e-9
FLAT = Profile.simple(A, B, 0.0)


def _run(fn, p, prof=FLAT, args=()):
    return Engine(Network(prof, p), p).run(fn, args)


def _ring_time(p, n):
    """A ring all-reduce of n float64 alone on the main thread."""
    return _run(lambda t: ring.allreduce(t, np.ones(n), SUM) is not None and t.clock(), p).results[0]


@pytest.mark.parametrize("compute", [0.0, 3e-6, 1e-3])
def test_stream_allreduce_overlaps_main_thread_compute(compute):
    """A stream all-reduce beside main-thread work finishes at the later of the two."""
    p, n = 4, 1000
    alone = _ring_time(p, n)

    def fn(t):
        buf = np.arange(n, dtype=np.float64) * (t.rank + 1)
        req = t.background().submit(ring.allreduce, t, buf, SUM)
        t.engine.advance(compute)
        main_done = t.clock()
        out = req.wait()
        return main_done, t.clock(), out

    res = _run(fn, p)
    for main_done, end, out in res.results:
        assert main_done == pytest.approx(compute)
        assert end == pytest.approx(max(compute, alone), rel=1e-12)
        np.testing.assert_array_equal(out, np.arange(n) * sum(range(1, p + 1)))
    assert res.time == pytest.approx(max(compute, alone), rel=1e-12)


def test_stream_runs_calls_in_submission_order_from_the_submit_time():
    """Each call starts no earlier than its submitter's clock at submission and the previous
    call's end; wait() moves the waiter to the call's finish."""
    def work(t, seconds):
        start = t.clock()
        t.engine.advance(seconds)
        return start, t.clock(), t.engine.current_rank()

    def fn(t):
        bg = t.background()
        assert bg is t.dup().background()  # one stream per rank, whatever the group
        r1 = bg.submit(work, t, 5.0)
        t.engine.advance(1.0)
        r2 = bg.submit(work, t, 1.0)      # submitted at 1, starts when the first ends (5)
        t.engine.advance(9.0)
        r3 = bg.submit(work, t, 1.0)      # submitted at 10, after the second ended (6)
        got = [r.wait() for r in (r1, r2, r3)]
        return got, t.clock()

    res = _run(fn, 2)
    for r, (got, end) in enumerate(res.results):
        assert got == [(0.0, 5.0, r), (5.0, 6.0, r), (10.0, 11.0, r)]
        assert end == 11.0


def test_main_and_stream_messages_contend_for_one_port():
    """Rank 0 sends n bytes to rank 1 from its main thread and n more from its stream at the
    same virtual time: the second waits for the first on rank 0's send port."""
    n = 100_000
    m = A + 8 * n * B

    def fn(t, dup):
        if t.rank == 0:
            req = t.background().submit(lambda: dup.isend(np.zeros(n), 1, 1).wait())
            t.isend(np.zeros(n), 1, 0).wait()
            req.wait()
            return t.clock()
        a = t.irecv(np.zeros(n), 0, 0)
        b = dup.irecv(np.zeros(n), 0, 1)
        return a.wait() is not None and t.clock(), b.wait() is not None and t.clock()

    res = Engine(Network(FLAT, 2), 2).run(lambda t: fn(t, t.dup()))
    first, second = res.results[1]
    assert sorted([first, second]) == [pytest.approx(m), pytest.approx(2 * m)]


def test_deadlock_inside_a_stream_is_reported():
    def fn(t):
        req = t.background().submit(lambda: recv(t, np.zeros(4), (t.rank + 1) % t.size, 7))
        return req.wait()

    with pytest.raises(DeadlockError) as err:
        _run(fn, 3)
    msg = str(err.value)
    assert "rank 0 (stream): waits for receive from global rank 1 (tag 7)" in msg
    assert "rank 0: waits for its stream's call" in msg


def _comm(t):
    return Communicator(t, t.dup(), algorithm="ring")


def test_grad_buckets_overlap_backward_on_the_simulator():
    """GradBuckets driven on the simulator: buckets all-reduce on each rank's stream while
    the main thread 'computes' the next layers' backward; the step ends at max(compute,
    communication) + what remains, and the exposed time is that remainder."""
    p, n_tensors, numel = 4, 4, 25_000
    layout = FlatLayout([(f"w{i}", (numel,)) for i in range(n_tensors)])
    compute = 1e-3  # per tensor: much longer than one bucket's all-reduce

    def step(t, overlap):
        comm = _comm(t)
        grads = np.full(layout.numel, float(t.rank + 1))
        gb = GradBuckets(grads, layout, comm, bucket_mb=numel * 8 / 2**20)
        for name in reversed(layout.names):  # backward: last tensor first
            t.engine.advance(compute)
            if overlap:
                gb.mark_ready([name])
        stats = gb.finish()
        return t.clock(), stats.total_s, stats.exposed_s, grads[0]

    res_on = Engine(Network(FLAT, p), p).run(lambda t: step(t, True))
    res_off = Engine(Network(FLAT, p), p).run(lambda t: step(t, False))
    one = _ring_time(p, numel)
    for (end_on, total_on, exposed_on, g0), (end_off, total_off, exposed_off, _) in zip(
            res_on.results, res_off.results):
        assert g0 == pytest.approx(np.mean(range(1, p + 1)))
        assert total_on == pytest.approx(n_tensors * one, rel=1e-9)
        # only the last bucket's all-reduce is left once backward ends
        assert exposed_on == pytest.approx(one, rel=1e-6)
        assert end_on == pytest.approx(n_tensors * compute + one, rel=1e-6)
        # without marks every bucket starts in finish(): nothing hidden
        assert exposed_off == pytest.approx(n_tensors * one, rel=1e-6)
        assert end_off == pytest.approx(n_tensors * compute + n_tensors * one, rel=1e-6)
