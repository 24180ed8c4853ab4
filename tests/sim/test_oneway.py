"""One-way pricing: a profile's ``oneway`` link prices the messages a rank sends while it
receives nothing; everything sent while receiving (sendrecv, an isend beside a pending irecv)
costs the ordinary link's, measured as an exchange. Exact virtual times against hand sums."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mpipar.comm.network import Link, Profile, SizeClass, load_profile
from mpipar.comm.transport.base import sendrecv
from mpipar.comm.transport.sim import placeholder
from mpipar.sim import simulate, simulate_collective

from simhelpers import one_message

A, B = 4e-6, 2e-9        # exchange: alpha, beta
A1, B1 = 3e-6, 1e-9      # one way: cheaper per byte, as measured on one host
EAGER = 4096
ONEWAY = Link((SizeClass(None, A1, B1),))


def _prof(oneway: Link | None = ONEWAY, **kw) -> Profile:
    return Profile.simple(A, B, eager_limit=EAGER, oneway_link=oneway, **kw)


@pytest.mark.parametrize("nbytes", [8, EAGER, EAGER + 8, 1 << 16])
def test_lone_message_costs_the_oneway_link(nbytes):
    """Eager or rendezvous, a message whose sender is not receiving arrives at
    alpha1 + n beta1; without a oneway link at alpha + n beta."""
    buf = lambda r: (np.zeros(nbytes, np.uint8),)  # noqa: E731
    res = simulate(one_message, 2, _prof(), args=buf)
    assert res.finish[1] == pytest.approx(A1 + nbytes * B1, rel=1e-12)
    plain = simulate(one_message, 2, _prof(None), args=buf)
    assert plain.finish[1] == pytest.approx(A + nbytes * B, rel=1e-12)


@pytest.mark.parametrize("data", [True, False])
@pytest.mark.parametrize("nbytes", [8, EAGER, EAGER + 8, 1 << 16])
def test_exchange_costs_the_ordinary_link(nbytes, data):
    """sendrecv (fast path and general path) is sending while receiving: two swaps take
    2 (alpha + n beta) whatever the oneway link says."""

    def swap(t, s, r):
        peer = 1 - t.rank
        sendrecv(t, s, peer, r, peer, 3)
        sendrecv(t, s, peer, r, peer, 3)
        return r

    def args(r):
        if data:
            return np.full(nbytes, r + 1, np.uint8), np.zeros(nbytes, np.uint8)
        return placeholder(nbytes, np.uint8), placeholder(nbytes, np.uint8)

    res = simulate(swap, 2, _prof(), args=args, data=data)
    assert res.finish == pytest.approx([2 * (A + nbytes * B)] * 2, rel=1e-12)


@pytest.mark.parametrize("nbytes", [8, EAGER + 8])
def test_isend_beside_a_pending_irecv_is_an_exchange(nbytes):
    """irecv posted, then isend, then both waited (a chunked ring's hop): ordinary price; the
    same isend after the receive has arrived: one-way price."""

    def posted_first(t, s, r):
        peer = 1 - t.rank
        rq = t.irecv(r, peer, 1)
        t.isend(s, peer, 1).wait()
        rq.wait()
        return t.now

    def received_first(t, s, r):
        # rank 1 waits for rank 0's message before answering: nothing is in flight towards
        # rank 1 when it sends, nor towards rank 0 when it sent
        if t.rank == 0:
            t.isend(s, 1, 1).wait()
            t.irecv(r, 1, 2).wait()
        else:
            t.irecv(r, 0, 1).wait()
            t.isend(s, 0, 2).wait()
        return t.now

    args = lambda r: (np.zeros(nbytes, np.uint8), np.zeros(nbytes, np.uint8))  # noqa: E731
    ex = simulate(posted_first, 2, _prof(), args=args)
    assert ex.finish == pytest.approx([A + nbytes * B] * 2, rel=1e-12)
    pp = simulate(received_first, 2, _prof(), args=args)
    assert pp.finish[0] == pytest.approx(2 * (A1 + nbytes * B1), rel=1e-12)


def test_a_receive_still_in_flight_counts_as_receiving():
    """Rank 1's eager message to rank 0 is matched at once but arrives later: rank 0's send
    posted before that arrival is an exchange, one posted after it is one-way."""
    n = 8
    m, m1 = A + n * B, A1 + n * B1

    def f(t, s, r):
        if t.rank == 1:
            t.isend(s, 0, 1).wait()             # eager: arrives at m
            t.irecv(r, 0, 2).wait()
            t.irecv(r, 0, 3).wait()
        else:
            rq = t.irecv(r, 1, 1)               # matched, arrival m still ahead at clock 0
            t.isend(s, 1, 2).wait()             # sent while receiving: m
            rq.wait()                           # clock -> m
            t.isend(s, 1, 3).wait()             # nothing in flight: m + m1
        return t.now

    res = simulate(f, 2, _prof(), args=lambda r: (np.zeros(n, np.uint8), np.zeros(n, np.uint8)))
    assert res.finish[1] == pytest.approx(m + m1, rel=1e-12)


def test_round_trip_keeps_the_oneway_link(tmp_path):
    prof = _prof(name="ow")
    d = prof.to_json()
    assert d["oneway"] == ONEWAY.to_json()
    prof.save(tmp_path / "ow.json")
    assert load_profile(str(tmp_path / "ow.json")) == prof
    assert "oneway" not in _prof(None).to_json()
    assert Profile.from_json(json.loads(json.dumps(_prof(None).to_json()))).oneway_link is None


@pytest.mark.parametrize("alg", ["ring", "rhd", "tree", "dbtree", "ps"])
@pytest.mark.parametrize("p", [2, 3, 5, 8])
def test_oneway_equal_to_link_changes_nothing(alg, p):
    """A oneway link identical to the ordinary one gives the same times as none at all, for
    every algorithm (the choice between them is the only thing the link changes)."""
    same = Link((SizeClass(None, A, B),))
    for count in (1000, 300_000):
        a = simulate_collective("allreduce", alg, p, count, profile=_prof(None), data=False)
        b = simulate_collective("allreduce", alg, p, count, profile=_prof(same), data=False)
        assert b.finish == pytest.approx(a.finish, rel=1e-12)


def test_tree_and_ps_at_two_ranks_are_one_way_and_ring_is_not():
    """At 2 ranks a single-segment tree and the parameter server send each message one way
    (up, reduce, down), so a cheaper oneway link makes them faster by exactly the two
    messages' difference; ring and rhd only exchange, so they do not move."""
    count = 1 << 14  # 64 KiB: one tree segment, rendezvous
    n = 4 * count
    saving = 2 * ((A + n * B) - (A1 + n * B1))
    for alg in ("tree", "ps"):
        a = simulate_collective("allreduce", alg, 2, count, profile=_prof(None), data=False)
        b = simulate_collective("allreduce", alg, 2, count, profile=_prof(), data=False)
        assert a.time - b.time == pytest.approx(saving, rel=1e-9)
    for alg in ("ring", "rhd"):
        a = simulate_collective("allreduce", alg, 2, count, profile=_prof(None), data=False)
        b = simulate_collective("allreduce", alg, 2, count, profile=_prof(), data=False)
        assert b.time == pytest.approx(a.time, rel=1e-12)


def test_oneway_is_ignored_on_a_two_level_network():
    """With a topology the intra and inter links price everything (the oneway link belongs
    to the flat network it was measured on)."""
    two = _prof().with_topology(2)
    none = _prof(None).with_topology(2)
    for alg in ("tree", "ps"):
        a = simulate_collective("allreduce", alg, 4, 1 << 14, profile=none, data=False)
        b = simulate_collective("allreduce", alg, 4, 1 << 14, profile=two, data=False)
        assert b.finish == pytest.approx(a.finish, rel=1e-12)


def test_results_are_still_right_with_oneway_pricing():
    """Pricing changes times only: data runs still give the NumPy sum on every rank."""
    rng = np.random.default_rng(3)
    xs = [rng.integers(-5, 6, size=1001).astype(np.float64) for _ in range(5)]
    for alg in ("tree", "ps", "ring", "dbtree"):
        res = simulate_collective("allreduce", alg, 5, 1001, profile=_prof(), data=True,
                                  dtype="float64", inputs=[x.copy() for x in xs])
        for out in res.results:
            np.testing.assert_array_equal(out, np.sum(xs, axis=0))
