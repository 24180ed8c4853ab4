"""The engine itself, with small algorithms written here: timing rules, deadlock detection,
split, errors, and the zero-memory placeholders."""

from __future__ import annotations

import numpy as np
import pytest

from mpipar.comm.network import Profile
from mpipar.comm.ops import SUM
from mpipar.comm.transport.base import recv, send, sendrecv
from mpipar.comm.transport.sim import DeadlockError, RankError, placeholder
from mpipar.sim import simulate

A, B, G = 3e-6, 1e-9, 2e-10
FLAT = Profile.simple(A, B, G)


def naive_allreduce(t, buf, op):
    """Everyone sends to rank 0, which folds in rank order and sends the sum back."""
    if t.rank == 0:
        tmp = np.empty_like(buf)
        for q in range(1, t.size):
            recv(t, tmp, q)
            t.reduce_local(op, buf, tmp)
        for q in range(1, t.size):
            send(t, buf, q)
    else:
        send(t, buf, 0)
        recv(t, buf, 0)
    return buf


def test_naive_allreduce_result_and_time():
    p, n = 5, 10
    data = [np.arange(n, dtype=np.float64) * (r + 1) for r in range(p)]
    res = simulate(naive_allreduce, p, FLAT, args=lambda r: (data[r].copy(), SUM))
    for out in res.results:
        np.testing.assert_array_equal(out, sum(data))
    m = A + 8 * n * B
    # gather: p-1 messages queue at rank 0's receive port; each fold after its arrival;
    # then p-1 sends one after another through its send port
    gather = max(m + (p - 1) * 8 * n * G, (p - 1) * m + 8 * n * G)
    assert res.time == pytest.approx(gather + (p - 1) * m, rel=1e-12)
    assert res.finish[1] == pytest.approx(gather + m, rel=1e-12)
    assert res.messages == 2 * (p - 1)


def test_ports_off_lets_messages_overlap():
    p, n = 5, 10
    res = simulate(naive_allreduce, p, FLAT, args=lambda r: (np.zeros(n), SUM), nic_serialization=False)
    m = A + 8 * n * B
    # no port queueing: all pushes arrive at m, folds are serial, all pulls take m
    assert res.time == pytest.approx(m + (p - 1) * 8 * n * G + m, rel=1e-12)


def test_eager_versus_rendezvous():
    """Eager: a send completes at once and the message leaves when sent. Rendezvous: it
    leaves when the receive is posted too."""

    def late_receiver(t, buf):
        if t.rank == 0:
            t.isend(buf, 1).wait()
        else:
            t.reduce_local(SUM, buf, buf)  # busy for 100 bytes * gamma... scaled below
            recv(t, buf, 0)
        return t.now

    prof = Profile.simple(1e-6, 1e-9, 1e-6, eager_limit=50)  # gamma large: a 100 us compute
    small = simulate(late_receiver, 2, prof, args=lambda r: (np.zeros(5),))  # 40 B: eager
    big = simulate(late_receiver, 2, prof, args=lambda r: (np.zeros(100),))  # 800 B: rendezvous
    assert small.results[0] == 0.0  # the eager send returned at once
    assert small.results[1] == pytest.approx(40e-6)  # arrived long before the receive
    assert big.results[0] == pytest.approx(800e-6 + 1e-6 + 800e-9)  # waited for the receive
    assert big.results[1] == big.results[0]


def test_deadlock_is_reported_with_the_ranks():
    def both_receive_first(t, buf):
        recv(t, buf, (t.rank + 1) % t.size)
        send(t, buf, (t.rank + 1) % t.size)

    with pytest.raises(DeadlockError, match=r"3 of 3 virtual ranks.*ranks 0-2") as exc:
        simulate(both_receive_first, 3, FLAT, args=lambda r: (np.zeros(4),))
    assert "receive from global rank 1" in str(exc.value)


def test_partial_deadlock_names_only_the_stuck_ranks():
    def one_waits_forever(t, buf):
        if t.rank == 2:
            recv(t, buf, 0, tag=99)

    with pytest.raises(DeadlockError, match=r"1 of 4 virtual ranks.*ranks 2\b"):
        simulate(one_waits_forever, 4, FLAT, args=lambda r: (np.zeros(4),))


def test_exception_in_a_rank_names_it():
    def bad(t):
        if t.rank == 3:
            raise KeyError("boom")

    with pytest.raises(RankError, match="virtual rank 3 of 4 raised KeyError"):
        simulate(bad, 4, FLAT)


def test_truncation_is_an_error():
    def mismatch(t):
        if t.rank == 0:
            send(t, np.zeros(8), 1)
        else:
            recv(t, np.zeros(4), 0)

    with pytest.raises(RankError, match="truncated"):
        simulate(mismatch, 2, FLAT)


def test_split_maps_ranks_and_shares_the_clock():
    def halves(t):
        sub = t.split(t.rank % 2, key=-t.rank)  # reversed order inside each half
        total = sendrecv(sub, np.array([float(t.rank)]), (sub.rank + 1) % sub.size,
                         np.zeros(1), (sub.rank - 1) % sub.size)
        none = t.split(None if t.rank else 0, 0)
        return sub.rank, sub.size, sub.ranks, float(total[0]), none is None, t.now

    res = simulate(halves, 6, FLAT)
    rank, size, ranks, got, none, now = res.results[0]
    assert (rank, size, ranks) == (2, 3, [4, 2, 0])
    assert got == 2.0  # from its left neighbour in the sub-group: global rank 2
    assert not none and all(r[4] for r in res.results[1:])
    assert now == pytest.approx(A + 8 * B)


def test_test_polls_until_done():
    def polling(t, buf):
        if t.rank == 0:
            req = t.irecv(buf, 1)
            spins = 0
            while not req.test():
                spins += 1
            return buf.copy()
        send(t, buf + 1, 0)

    res = simulate(polling, 2, FLAT, args=lambda r: (np.zeros(3),))
    np.testing.assert_array_equal(res.results[0], np.ones(3))
    assert res.finish[0] == pytest.approx(A + 24 * B)  # test() succeeding moved the clock


def test_placeholder_costs_no_memory():
    x = placeholder(1 << 40, np.float32)  # 4 TiB "array"
    assert x.nbytes == 4 << 40 and x[10:20].nbytes == 40 and x[::2].size == 1 << 39

    def size_only(t, buf):
        return sendrecv(t, buf[: 1 << 30], (t.rank + 1) % t.size, buf[: 1 << 30], (t.rank - 1) % t.size)

    res = simulate(size_only, 4, FLAT, args=lambda r: (x,), data=False)
    assert res.time == pytest.approx(A + 4 * (1 << 30) * B)


def test_polling_forever_is_a_deadlock():
    def poll_nothing(t, buf):
        if t.rank == 0:
            req = t.irecv(buf, 1, tag=5)
            while not req.test():
                pass

    with pytest.raises(RankError, match="polls with test"):
        simulate(poll_nothing, 2, FLAT, args=lambda r: (np.zeros(2),))
