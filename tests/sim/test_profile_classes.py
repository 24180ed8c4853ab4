"""Profiles with reduction and copy size classes and a per-request post overhead: the JSON
round trip, what the simulator charges for each (reduce_local, isend/irecv but not sendrecv,
the input copy of simulate_collective), and the cost model's use of the reduction classes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mpipar.comm import cost_model as cm
from mpipar.comm.network import Link, Network, Profile, SizeClass, load_profile
from mpipar.comm.ops import SUM
from mpipar.comm.transport.base import sendrecv
from mpipar.comm.transport.sim import placeholder
from mpipar.sim import simulate, simulate_collective

from simhelpers import available, one_message

A, B = 3e-6, 1e-9
EAGER = 4096
# reductions and copies: a fixed cost per call, faster per byte while the buffer fits in cache
REDUCE = Link((SizeClass(1024, 2e-7, 1e-11), SizeClass(65536, 5e-7, 4e-11), SizeClass(None, 1e-6, 9e-11)))
COPY = Link((SizeClass(4096, 1e-7, 5e-12), SizeClass(None, 4e-7, 3e-11)))
POST = 2.5e-6


def _classed(**kw) -> Profile:
    """A one-class network with reduction and copy classes (gamma and copy per byte set too,
    to show the classes replace them)."""
    return Profile.simple(A, B, 7e-10, copy=5e-10, reduce_link=REDUCE, copy_link=COPY,
                          eager_limit=EAGER, **kw)


# -- (a) JSON ------------------------------------------------------------------------------

def test_round_trip_keeps_reduce_copy_classes_and_post_overhead(tmp_path):
    """to_json/from_json and save/load_profile give back an equal profile whose reduce_time,
    copy_time and post_overhead are the original's; the JSON uses the documented keys."""
    prof = _classed(post_overhead=POST, name="classed")
    d = prof.to_json()
    assert d["reduce"] == {"classes": [c.to_json() for c in REDUCE.classes]}
    assert d["copy"] == {"classes": [c.to_json() for c in COPY.classes]}
    assert d["post_overhead_s"] == POST
    path = tmp_path / "classed.json"
    prof.save(path)
    for back in (Profile.from_json(json.loads(json.dumps(d))), load_profile(str(path))):
        assert back == prof
        assert back.post_overhead == POST
        for n in (0, 1, 1024, 1025, 4096, 4097, 65536, 65537, 1 << 24):
            assert back.reduce_time(n) == prof.reduce_time(n)
            assert back.copy_time(n) == prof.copy_time(n)
    # the classes, not gamma/copy per byte, decide
    assert prof.reduce_time(1025) == 5e-7 + 1025 * 4e-11
    assert prof.copy_time(4097) == 4e-7 + 4097 * 3e-11
    assert prof.reduce_time(0) == 0.0 and prof.copy_time(0) == 0.0


def test_round_trip_without_classes_keeps_gamma(tmp_path):
    """A profile without the new fields writes none of their keys, loads back equal, and
    its reduce_time/copy_time are gamma * n and copy * n."""
    prof = Profile.simple(A, B, 7e-10, copy=5e-10, eager_limit=EAGER)
    d = prof.to_json()
    assert not {"reduce", "copy", "post_overhead_s"} & set(d)
    path = tmp_path / "plain.json"
    prof.save(path)
    back = load_profile(str(path))
    assert back == prof
    assert back.reduce_link is None and back.copy_link is None and back.post_overhead == 0.0
    for n in (0, 8, 1000, 1 << 20):
        assert back.reduce_time(n) == 7e-10 * n
        assert back.copy_time(n) == 5e-10 * n


def test_network_reduce_cost_is_reduce_time():
    """Network.reduce_cost gives the profile's reduce_time, and the same again from its cache."""
    prof = _classed()
    net = Network(prof, 4)
    for n in (4, 1024, 1028, 1 << 20, 1024):
        assert net.reduce_cost(n) == prof.reduce_time(n)


# -- (b) reduce_local ----------------------------------------------------------------------

def _reduce_on_rank0(t, dst, src):
    if t.rank == 0:
        t.reduce_local(SUM, dst, src)
    return dst


@pytest.mark.parametrize("data", [True, False])
@pytest.mark.parametrize("count", [1, 256, 257, 16384, 16385, 1 << 18])
def test_reduce_local_charges_the_reduction_class(count, data):
    """Rank 0's one reduce_local of count float32 elements takes exactly
    reduce_link.time(4 count) (not gamma * n); rank 1, which does nothing, finishes at 0."""
    prof = _classed()
    nbytes = 4 * count
    if data:
        bufs = [(np.full(count, r + 1, np.float32), np.full(count, 10, np.float32)) for r in range(2)]
    else:
        bufs = [(placeholder(count), placeholder(count)) for _ in range(2)]
    res = simulate(_reduce_on_rank0, 2, prof, args=lambda r: bufs[r], data=data)
    assert res.finish[0] == REDUCE.time(nbytes)
    assert res.time == REDUCE.time(nbytes)
    assert res.finish[1] == 0.0
    assert res.time != prof.gamma * nbytes
    if data:
        np.testing.assert_array_equal(res.results[0], np.full(count, 11, np.float32))


def test_reduce_local_without_classes_charges_gamma():
    """Without reduce_link the charge is gamma * nbytes."""
    prof = Profile.simple(A, B, 7e-10)
    count = 1000
    res = simulate(_reduce_on_rank0, 2, prof,
                   args=lambda r: (np.ones(count, np.float32), np.ones(count, np.float32)))
    assert res.time == pytest.approx(7e-10 * 4 * count, rel=1e-15)


def test_reduce_local_of_nothing_is_free():
    """An empty reduce_local costs nothing, though the first class has a fixed cost."""
    res = simulate(_reduce_on_rank0, 2, _classed(),
                   args=lambda r: (np.ones(0, np.float32), np.ones(0, np.float32)))
    assert res.time == 0.0


# -- (c) post overhead ---------------------------------------------------------------------

@pytest.mark.parametrize("nbytes", [8, EAGER, EAGER + 8, 1 << 16])
def test_post_overhead_delays_isend_and_irecv(nbytes):
    """Each rank posts one request, so each finishes exactly o later. Eager (n <= limit): the
    sender finishes at its post time o, the message arrives at o + alpha + n beta. Rendezvous:
    the transfer starts when both are posted (o on both) and the send completes on arrival."""
    m = A + nbytes * B
    buf = lambda r: (np.zeros(nbytes, np.uint8),)  # noqa: E731
    for o in (0.0, POST):
        res = simulate(one_message, 2, Profile.simple(A, B, eager_limit=EAGER, post_overhead=o), args=buf)
        sender = o if nbytes <= EAGER else o + m
        assert res.finish[0] == pytest.approx(sender, rel=1e-12, abs=1e-18)
        assert res.finish[1] == pytest.approx(o + m, rel=1e-12)
    base = simulate(one_message, 2, Profile.simple(A, B, eager_limit=EAGER), args=buf)
    with_o = simulate(one_message, 2, Profile.simple(A, B, eager_limit=EAGER, post_overhead=POST), args=buf)
    for r in range(2):
        assert with_o.finish[r] - base.finish[r] == pytest.approx(POST, rel=1e-9)


def test_post_overhead_is_charged_at_posting():
    """The clock moves by o when the request is posted, before any wait: a receive posted
    after its message has arrived (the receiver busy reducing for D > o + m) completes at
    D + o, the sender's clock reads o right after its isend."""
    n, g, count = 8, 1e-9, 4096
    m = A + n * B
    d = g * 4 * count
    assert d > POST + m

    def late_receiver(t, buf, x):
        if t.rank == 0:
            req = t.isend(buf, 1)
            posted = t.now
            req.wait()
        else:
            t.reduce_local(SUM, x, x)
            req = t.irecv(buf, 0)
            posted = t.now
            req.wait()
        return posted

    prof = Profile.simple(A, B, g, eager_limit=EAGER, post_overhead=POST)
    res = simulate(late_receiver, 2, prof,
                   args=lambda r: (np.zeros(n, np.uint8), np.ones(count, np.float32)))
    assert res.results[0] == POST
    assert res.results[1] == pytest.approx(d + POST, rel=1e-12)
    assert res.finish == pytest.approx([POST, d + POST], rel=1e-12)


def test_post_overhead_counts_every_request():
    """Rank 1 posts three receives before waiting on any: its clock is 3 o when it starts
    waiting, so a message that arrives earlier than that does not decide its finish."""

    def three(t, bufs):
        if t.rank == 0:
            for i, b in enumerate(bufs):
                t.isend(b, 1, i).wait()
        else:
            reqs = [t.irecv(b, 0, i) for i, b in enumerate(bufs)]
            for q in reqs:
                q.wait()
        return None

    n = 8
    m = A + n * B
    o = 10 * m  # posting dominates: the messages are all in before rank 1's last post
    prof = Profile.simple(A, B, eager_limit=EAGER, post_overhead=o)
    res = simulate(three, 2, prof, args=lambda r: ([np.zeros(n, np.uint8) for _ in range(3)],))
    assert res.finish[0] == pytest.approx(3 * o, rel=1e-12)
    # rank 0's third send is posted at 3 o and arrives at 3 o + m
    assert res.finish[1] == pytest.approx(3 * o + m, rel=1e-12)


def _exchange(t, sbuf, rbuf):
    """Ranks 0 and 1 swap buffers with sendrecv, twice."""
    peer = 1 - t.rank
    sendrecv(t, sbuf, peer, rbuf, peer, 3)
    sendrecv(t, sbuf, peer, rbuf, peer, 3)
    return rbuf


@pytest.mark.parametrize("data", [True, False])
@pytest.mark.parametrize("nbytes", [8, EAGER, EAGER + 8, 1 << 16])
def test_sendrecv_is_not_charged_post_overhead(nbytes, data):
    """sendrecv posts nothing: two swaps take 2 (alpha + n beta) on both ranks with or
    without o, on the fast path (data=False, eager) and the general one (data, or rendezvous)."""
    m = A + nbytes * B

    def args(r):
        if data:
            return np.full(nbytes, r + 1, np.uint8), np.zeros(nbytes, np.uint8)
        return placeholder(nbytes, np.uint8), placeholder(nbytes, np.uint8)

    for o in (0.0, POST):
        res = simulate(_exchange, 2, Profile.simple(A, B, eager_limit=EAGER, post_overhead=o),
                       args=args, data=data)
        assert res.finish == pytest.approx([2 * m, 2 * m], rel=1e-12)
        if data:
            assert res.results[0][0] == 2 and res.results[1][0] == 1


# -- (d) the input copy --------------------------------------------------------------------

@pytest.mark.parametrize("collective,count", [("allreduce", 1 << 10), ("allreduce", 1 << 14),
                                              ("allgather", 1 << 14), ("broadcast", 3000)])
def test_simulate_collective_adds_the_copy_class(collective, count):
    """The copy shifts the result, and every rank's finish, by copy_link.time(input bytes):
    the whole buffer for allreduce/broadcast, a rank's block for allgather."""
    if available("ring") is None:
        pytest.skip("ring not written yet")
    without = Profile.simple(A, B, 2e-10, reduce_link=REDUCE, eager_limit=EAGER)
    with_copy = Profile.simple(A, B, 2e-10, reduce_link=REDUCE, copy_link=COPY, eager_limit=EAGER)
    base = simulate_collective(collective, "ring", 4, count, profile=without, data=False)
    shifted = simulate_collective(collective, "ring", 4, count, profile=with_copy, data=False)
    nbytes = 4 * (count // 4 if collective == "allgather" else count)
    assert COPY.time(nbytes) != 0.0
    assert shifted.time - base.time == pytest.approx(COPY.time(nbytes), rel=1e-9)
    for b, s in zip(base.finish, shifted.finish):
        assert s - b == pytest.approx(COPY.time(nbytes), rel=1e-9)


def test_simulate_collective_copy_per_byte_without_classes():
    """Without copy_link, the shift is copy * input bytes."""
    count = 1 << 12
    base = simulate_collective("allreduce", "ring", 4, count, profile=Profile.simple(A, B), data=False)
    shifted = simulate_collective("allreduce", "ring", 4, count, profile=Profile.simple(A, B, copy=3e-10),
                                  data=False)
    assert shifted.time - base.time == pytest.approx(3e-10 * 4 * count, rel=1e-9)


def test_call_overhead_round_trips_and_shifts_only_its_algorithm():
    """call_overhead (per algorithm) survives JSON and shifts that algorithm's result, and
    every rank's finish, by exactly its value; other algorithms are untouched."""
    if available("ring") is None or available("rhd") is None:
        pytest.skip("ring/rhd not written yet")
    plain = Profile.simple(A, B, 2e-10, eager_limit=EAGER)
    over = Profile.simple(A, B, 2e-10, eager_limit=EAGER, call_overhead={"ring": 3e-5})
    back = Profile.from_json(json.loads(json.dumps(over.to_json())))
    assert back == over and back.to_json()["call_overhead_s"] == {"ring": 3e-5}
    assert "call_overhead_s" not in plain.to_json()
    for alg, extra in (("ring", 3e-5), ("rhd", 0.0)):
        base = simulate_collective("allreduce", alg, 4, 5000, profile=plain, data=False)
        got = simulate_collective("allreduce", alg, 4, 5000, profile=back, data=False)
        assert got.time - base.time == pytest.approx(extra, abs=1e-15)
        assert [g - b for g, b in zip(got.finish, base.finish)] == pytest.approx([extra] * 4, abs=1e-15)


# -- (e) the cost model --------------------------------------------------------------------

@pytest.mark.parametrize("alg", ["ring", "rhd", "tree"])
@pytest.mark.parametrize("nbytes", [4096, 65536, 1 << 20])
def test_predict_with_reduce_classes_equals_the_simulator(alg, nbytes):
    """Where the formula is exact (cm.exact), predict on a profile with reduction classes is
    the simulator's time to 1e-9: both charge reduce_link.time(block bytes)."""
    p = 4
    if available(alg) is None:
        pytest.skip(f"{alg} not written yet")
    if not cm.exact(alg, "allreduce", p, nbytes):
        pytest.skip("formula is an estimate here")
    prof = Profile.simple(A, B, 2e-10, reduce_link=REDUCE)
    sim = simulate_collective("allreduce", alg, p, nbytes // 4, "float32", profile=prof, data=False).time
    pred = cm.predict(alg, "allreduce", p, nbytes, prof)
    assert pred == pytest.approx(sim, rel=1e-9)
    # and the classes matter: with gamma alone both would be something else
    assert pred != pytest.approx(cm.predict(alg, "allreduce", p, nbytes, Profile.simple(A, B, 2e-10)),
                                 rel=1e-6)


def test_ring_predict_closed_form_with_reduce_classes():
    """Ring at p=4: (p-1) (2 m(b) + reduce_link.time(b)), b = n/p."""
    p, n = 4, 65536
    b = n // p
    prof = Profile.simple(A, B, reduce_link=REDUCE)
    assert cm.predict("ring", "allreduce", p, n, prof) == pytest.approx(
        (p - 1) * (2 * (A + b * B) + REDUCE.time(b)), rel=1e-12)


@pytest.mark.parametrize("alg", ["ring", "rhd", "tree", "ps", "dbtree"])
def test_predict_linear_reduce_class_equals_gamma(alg):
    """A reduction class of alpha 0 and beta gamma predicts what gamma per byte predicts."""
    g = 3e-10
    as_gamma = Profile.simple(A, B, g)
    as_link = Profile.simple(A, B, 0.0, reduce_link=Link.simple(0.0, g))
    for n in (4096, 65536, 1 << 20, 3 << 20):
        assert cm.predict(alg, "allreduce", 4, n, as_link) == pytest.approx(
            cm.predict(alg, "allreduce", 4, n, as_gamma), rel=1e-12)
    net = cm.Net.from_profile(as_link)
    assert net.reduce(1000) == pytest.approx(g * 1000, rel=1e-15)
