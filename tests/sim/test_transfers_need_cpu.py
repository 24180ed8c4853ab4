"""``transfers_need_cpu``: a rendezvous transfer into a rank makes no progress while that rank
runs ``reduce_local``, nor before the previous transfer into it has landed (one host's
shared memory, where the receiving process copies the data out while inside MPI). Exact
virtual times against hand sums; eager messages and profiles without the flag unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mpipar.comm.network import Profile
from mpipar.comm.ops import SUM
from mpipar.sim import simulate, simulate_collective

A, B, GAMMA = 4e-6, 2e-9, 1e-9
EAGER = 4096
N = 1 << 16                       # rendezvous
C = A + N * B                     # one message
D = GAMMA * N                     # reducing N bytes


def _prof(cpu: bool) -> Profile:
    return Profile.simple(A, B, GAMMA, eager_limit=EAGER, transfers_need_cpu=cpu)


def _segments(k: int, nbytes: int = N):
    """Rank 1 sends k segments at once; rank 0 posts every receive, then waits for each and
    reduces it into its own buffer (a tree root's loop). Returns each rank's clock at the end."""

    def fn(t):
        segs = [np.zeros(nbytes, np.uint8) for _ in range(k)]
        if t.rank == 1:
            for req in [t.isend(s, 0, 7) for s in segs]:
                req.wait()
            return None
        mine = np.zeros(nbytes, np.uint8)
        reqs = [t.irecv(s, 1, 7) for s in segs]
        for req, s in zip(reqs, segs):
            req.wait()
            t.reduce_local(SUM, mine, s)
        return None
    return fn


@pytest.mark.parametrize("cpu", [False, True])
def test_a_reduction_delays_a_transfer_only_when_it_needs_the_cpu(cpu):
    """Rank 0 posts a receive, reduces N bytes, then waits: the transfer ran meanwhile
    (lands at C, the rank is free at max(C, D)), or it waited for the reduction (D + C).
    (The sender waited before the receiver did, so its completion stays at C: see the
    engine's docstring.)"""

    def fn(t):
        buf = np.zeros(N, np.uint8)
        if t.rank == 1:
            t.isend(buf, 0, 3).wait()
            return None
        req = t.irecv(buf, 1, 3)
        t.reduce_local(SUM, np.zeros(N, np.uint8), np.zeros(N, np.uint8))
        req.wait()
        return None

    res = simulate(fn, 2, _prof(cpu), data=False)
    want = D + C if cpu else max(C, D)
    assert res.finish[0] == pytest.approx(want, rel=1e-12)
    assert res.finish[1] == pytest.approx(C, rel=1e-12)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_pipelined_segments_do_not_hide_the_reductions(k):
    """k segments into a rank that reduces each as it lands: k (C + D) when the copies need
    the CPU (each copy waits for the reduction before it), C + (k-1) max(C, D) + D without."""
    with_cpu = simulate(_segments(k), 2, _prof(True), data=False)
    plain = simulate(_segments(k), 2, _prof(False), data=False)
    assert with_cpu.finish[0] == pytest.approx(k * (C + D), rel=1e-12)
    assert plain.finish[0] == pytest.approx(C + (k - 1) * max(C, D) + D, rel=1e-12)


def test_eager_messages_are_not_delayed():
    small = EAGER // 2
    cpu = simulate(_segments(3, small), 2, _prof(True), data=False)
    plain = simulate(_segments(3, small), 2, _prof(False), data=False)
    assert cpu.finish == pytest.approx(plain.finish, rel=1e-12)


@pytest.mark.parametrize("alg", ["ring", "rhd"])
@pytest.mark.parametrize("p", [2, 4])
def test_exchanges_are_unchanged(alg, p):
    """Ring and rhd reduce only after their sendrecv has landed: nothing to stall."""
    for count in (1000, 1 << 16):
        a = simulate_collective("allreduce", alg, p, count, profile=_prof(False), data=False)
        b = simulate_collective("allreduce", alg, p, count, profile=_prof(True), data=False)
        assert b.finish == pytest.approx(a.finish, rel=1e-12)


def test_hier_reduce_then_broadcast_costs_what_ps_does_at_two_ranks():
    """Two ranks on one node: hier is tree's segmented reduce then broadcast; ps sends the
    whole vector up, reduces it and sends it back. Measured, the two take the same time
    (0.95-1.09 of each other over 26 runs here); with the flag the simulator agrees but for
    the latency of hier's 6 more messages (4 segments each way instead of one message), and
    without it hier's segments hide all but one reduction."""
    count = 4 << 18  # 4 MiB of float32: 4 tree segments of 1 MiB
    times = {}
    for cpu in (False, True):
        for alg in ("hier", "ps"):
            times[alg, cpu] = simulate_collective("allreduce", alg, 2, count, profile=_prof(cpu),
                                                  data=False).time
    assert times["hier", True] == pytest.approx(times["ps", True] + 6 * A, rel=1e-9)
    assert times["hier", False] < 0.95 * times["ps", False]
    assert times["ps", True] == pytest.approx(times["ps", False], rel=1e-12)


def test_ignored_on_a_two_level_network():
    """As the one-way link, the flag describes the flat network it was measured on."""
    for alg in ("tree", "ps"):
        a = simulate_collective("allreduce", alg, 4, 1 << 16, profile=_prof(False).with_topology(2), data=False)
        b = simulate_collective("allreduce", alg, 4, 1 << 16, profile=_prof(True).with_topology(2), data=False)
        assert b.finish == pytest.approx(a.finish, rel=1e-12)
    flat = simulate_collective("allreduce", "tree", 2, 1 << 20, profile=_prof(True), data=False)
    plain = simulate_collective("allreduce", "tree", 2, 1 << 20, profile=_prof(False), data=False)
    assert flat.time > plain.time  # and it does act on the flat one (4 MiB: 4 segments)


def test_results_are_still_right():
    rng = np.random.default_rng(4)
    xs = [rng.integers(-5, 6, size=70_001).astype(np.float64) for _ in range(3)]
    for alg in ("tree", "dbtree", "ps", "hier", "ring"):
        res = simulate_collective("allreduce", alg, 3, 70_001, profile=_prof(True), data=True,
                                  dtype="float64", inputs=[x.copy() for x in xs])
        for out in res.results:
            np.testing.assert_array_equal(out, np.sum(xs, axis=0))


def test_round_trip_and_default():
    d = json.loads(json.dumps(_prof(True).to_json()))
    assert d["transfers_need_cpu"] is True
    assert Profile.from_json(d).transfers_need_cpu is True
    assert "transfers_need_cpu" not in _prof(False).to_json()
    assert Profile.from_json(json.loads(json.dumps(_prof(False).to_json()))).transfers_need_cpu is False
