"""Gradient compression (mpipar/comm/compress.py) against NumPy, at every world size the
runner uses (1, 2, 3, 4, 8): the means, the error-feedback identity, int8's bound and its
overflow-free sum, top-k's selection and counted bytes, the specs, the residuals' round trip,
and the device path on the strict CuPy double."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpipar import backend
from mpipar.comm.communicator import Communicator
from mpipar.comm.compress import GradientCompressor, TopK, make_compressor
from mpipar.comm.transport.mpi import MPITransport

from helpers import assert_same_on_all_ranks

LOSSY = ["fp16", "int8", "topk:0.1", "topk:0.01"]
U16 = 2.0 ** -11  # float16's unit roundoff


def _x(seed: int, rank: int, n: int, dtype: str = "float64", call: int = 0) -> np.ndarray:
    """Rank ``rank``'s bucket at call ``call``: normal numbers of spread magnitudes."""
    rng = np.random.default_rng([seed, rank, call])
    return (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 30.0], size=n)).astype(dtype)


def _all(comm, seed, n, dtype="float64", call=0):  # type: ignore[no-untyped-def]
    return [_x(seed, r, n, dtype, call) for r in range(comm.size)]


def _sum_over_ranks(comm, a: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Sum over ranks in float64, in rank order (an all-gather, summed here)."""
    g = comm.allgather(np.ascontiguousarray(a, dtype=np.float64).reshape(-1))
    return g.reshape(comm.size, -1).sum(axis=0)


# -- specs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, kind", [("none", "Uncompressed"), ("fp16", "Float16"),
                                        ("int8", "Int8"), ("topk:0.01", "TopK"),
                                        ("topk:1", "TopK"), (" topk:1e-3 ", "TopK")])
def test_specs_make_one_class_each(spec, kind):
    c = make_compressor(spec)
    assert type(c).__name__ == kind and isinstance(c, GradientCompressor)
    assert c.bytes_sent == 0 and c.state_dict() == {}


@pytest.mark.parametrize("spec, message", [
    ("topk:1.5", "topk ratio 1.5 is not in (0, 1]"),
    ("topk:0", "topk ratio 0 is not in (0, 1]"),
    ("topk:-0.1", "topk ratio -0.1 is not in (0, 1]"),
    ("topk:nan", "topk ratio nan is not in (0, 1]"),
    ("topk:abc", "topk ratio 'abc' is not a number"),
    ("topk", "topk needs a ratio"),
    ("topk:", "topk needs a ratio"),
    ("int8:4", "int8 takes no argument"),
    ("bf16", "unknown compression 'bf16'; choose from none, fp16, int8, topk:RATIO"),
    ("powersgd:4", "unknown compression 'powersgd:4'"),
    ("", "unknown compression ''"),
])
def test_bad_specs_name_what_is_wrong(spec, message):
    with pytest.raises(ValueError) as e:
        make_compressor(spec)
    assert message in str(e.value)


def test_topk_k_is_the_ceiling_and_ties_go_to_lower_indices():
    assert [TopK(r).k(10) for r in (0.01, 0.1, 0.15, 0.5, 1.0)] == [1, 1, 2, 5, 10]
    assert TopK(0.3).k(0) == 0
    v = np.array([1.0, -3.0, 2.0, -2.0, 2.0, 0.5, -2.0, 3.0])
    # |v| = 1 3 2 2 2 .5 2 3: the two 3s, then the 2s from the left
    assert TopK(0.5).select(v).tolist() == [1, 2, 3, 7]
    assert TopK(0.25).select(v).tolist() == [1, 7]
    assert TopK(0.375).select(v).tolist() == [1, 2, 7]
    assert TopK(1 / 8).select(np.ones(8)).tolist() == [0]


# -- the means ---------------------------------------------------------------------------------
MPI = pytest.mark.mpi(min_size=1)


@MPI
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_none_is_numpy_mean(comm, xp, n, dtype):
    inputs = _all(comm, 1, n, dtype)
    c = make_compressor("none")
    got = c.allreduce_mean(comm, "b", xp.asarray(inputs[comm.rank]))
    assert backend.array_module(got) is xp and got.dtype == np.dtype(dtype)
    tol = 1e-13 if dtype == "float64" else 1e-6
    np.testing.assert_allclose(backend.to_host(got), np.mean(np.stack(inputs), axis=0),
                               rtol=tol, atol=tol * 30)
    assert_same_on_all_ranks(comm, got)
    itemsize = np.dtype(dtype).itemsize
    assert c.last_call == {"payload": n * itemsize if comm.size > 1 else 0}
    assert c.state_dict() == {}


@MPI
@pytest.mark.parametrize("algorithm", [None, "ring", "rhd"])
def test_topk_full_ratio_equals_uncompressed(comm, algorithm):
    for call in range(3):
        x = _x(2, comm.rank, 513, call=call)
        full = make_compressor("none").allreduce_mean(comm, "b", x)
        got = make_compressor("topk:1.0").allreduce_mean(comm, "b", x, algorithm=algorithm)
        assert np.max(np.abs(got - full)) <= 1e-10
        assert_same_on_all_ranks(comm, got)


@MPI
@pytest.mark.parametrize("spec", LOSSY)
@pytest.mark.parametrize("algorithm", [None, "ring"])
def test_error_feedback_nothing_is_lost(comm, spec, algorithm):
    """Over T calls: p * sum_t mean_t (what the group applied: the sum of the decompressed
    payloads) + sum_ranks r_T = sum_t sum_ranks x_t. int8 and topk sum the payloads
    themselves: equal to float64 rounding (1e-12 relative to the inputs' scale). fp16 sums
    them in float16: each call adds at most (p - 1) roundings of partial sums, bounded here
    by (p - 1) 2^-10 sum_ranks |x_t| (slack 2 for the residual and the 1 + u factors) plus
    (p - 1) p 2^-24 a call for float16 subnormals; in a group of one it is exact too."""
    p, n, T = comm.size, 301, 6
    c = make_compressor(spec)
    applied = np.zeros(n)
    truth = np.zeros(n)
    bound = np.zeros(n)
    for t in range(T):
        inputs = _all(comm, 3, n, call=t)
        mean = c.allreduce_mean(comm, "bucket", inputs[comm.rank], algorithm=algorithm)
        assert_same_on_all_ranks(comm, mean)
        applied += p * mean
        truth += np.sum(inputs, axis=0)
        bound += (p - 1) * (2 * U16 * np.sum(np.abs(inputs), axis=0) + p * 2.0 ** -24)
    residuals = _sum_over_ranks(comm, c.state_dict()["bucket"])
    err = np.abs(applied + residuals - truth)
    scale = np.max(np.abs(truth)) + 1.0
    if spec == "fp16":
        assert np.all(err <= bound + 1e-12 * scale)
    else:
        assert np.max(err) <= 1e-12 * scale
    if spec != "topk:0.01":   # the residual is there and smaller than the inputs
        assert 0 < np.max(np.abs(residuals)) < np.max(np.abs(truth))


@MPI
def test_fp16_sends_float16_of_v_over_p_and_keeps_the_rest(comm):
    """The fp16 identity above is loose where p > 1 (the float16 sum rounds as much as the
    residual holds), so here each call's payloads are recovered from every rank's residuals,
    c = (x + r_before - r_after) / p, and checked: c is float16(v / p) exactly (so r_after is
    exactly v - p c), and under native (float16 summed in float32, rounded once; inputs of one
    scale, so the float32 sum is exact) the mean is float16(sum_ranks c) bit for bit."""
    p, n = comm.size, 97
    c = make_compressor("fp16")
    before = np.zeros((p, n))
    for t in range(4):
        rng = [np.random.default_rng([9, r, t]) for r in range(p)]
        inputs = np.stack([g.uniform(0.5, 2.0, n) * g.choice([-1.0, 1.0], n) for g in rng])
        mean = c.allreduce_mean(comm, "h", inputs[comm.rank])
        after = comm.allgather(c.state_dict()["h"]).reshape(p, n)
        v = inputs + before
        payload = (v - after) / p
        np.testing.assert_array_equal(payload, (v / p).astype(np.float16).astype(np.float64))
        want = payload.astype(np.float32).sum(axis=0).astype(np.float16).astype(np.float64)
        np.testing.assert_array_equal(mean, want)
        before = after


@MPI
def test_int8_one_call_within_half_a_step(comm):
    """r = 0 at the first call: each rank's q = rint(x / s) is within s / 2 of x / s, so the
    mean is within s / 2 = max_ranks max|x| / 254 of the true mean (+ float64 rounding)."""
    n = 1000
    inputs = _all(comm, 4, n)
    got = make_compressor("int8").allreduce_mean(comm, "b", inputs[comm.rank])
    s = max(np.max(np.abs(a)) for a in inputs) / 127
    err = np.abs(got - np.mean(np.stack(inputs), axis=0))
    assert np.max(err) <= s / 2 * (1 + 1e-12)
    assert np.max(err) > 0  # lossy: something was rounded


@MPI
def test_int8_sum_at_the_scales_edge_does_not_overflow(comm):
    """Every rank at +-max: every q is +-127, the sum of p of them is +-127 p (1016 at 8
    ranks, far outside int8); the mean is exactly +-max where the ranks agree."""
    p, M = comm.size, 5.25
    x = np.full(64, M)
    x[1::2] = -M
    x[2] = M if comm.rank % 2 else -M        # ranks disagree here: mean (p odd ? +-M/p : 0)
    c = make_compressor("int8")
    got = c.allreduce_mean(comm, "edge", x)
    want = np.where(np.arange(64) % 2, -M, M)
    want[2] = M * (p // 2 - (p - p // 2)) / p
    np.testing.assert_allclose(got, want, rtol=4e-16 * 4, atol=4e-15)
    assert np.max(np.abs(c.state_dict()["edge"])) <= 4e-15  # on the grid: nothing left over
    assert c.last_call == ({"scale": 8, "payload": 64} if p > 1 else {"scale": 0, "payload": 0})


@MPI
@pytest.mark.parametrize("dtype, index_bytes", [("float32", 4), ("float64", 4)])
@pytest.mark.parametrize("ratio, n", [(0.01, 1000), (0.1, 333), (0.5, 9)])
def test_topk_sends_exactly_k_pairs_and_counts_their_bytes(comm, dtype, index_bytes, ratio, n):
    p = comm.size
    c = make_compressor(f"topk:{ratio}")
    k = math.ceil(ratio * n)
    inputs = _all(comm, 5, n, dtype)
    total = 0
    for call in range(3):
        x = inputs[comm.rank] if call == 0 else _x(5, comm.rank, n, dtype, call)
        before = c.state_dict().get("b", np.zeros(n, dtype))
        c.allreduce_mean(comm, "b", x)
        after = c.state_dict()["b"]
        # exactly k entries left the residual (v - D(c) is 0 exactly where an entry was sent)
        v = x + before
        sent = (after == 0) & (v != 0)
        assert int(sent.sum()) == k
        want = {"index": k * index_bytes, "value": k * np.dtype(dtype).itemsize} if p > 1 else \
            {"index": 0, "value": 0}
        assert c.last_call == want and c.last_bytes == sum(want.values())
        total += sum(want.values())
    assert c.bytes_sent == total and c.calls == 3


@MPI
def test_topk_ties_are_deterministic(comm):
    """All |x| equal: every rank sends its first k indices; the mean is theirs."""
    p, n = comm.size, 40
    x = np.where(np.arange(n) % 3, 1.0, -1.0) * (comm.rank + 1)
    got = make_compressor("topk:0.25").allreduce_mean(comm, "t", x)
    signs = np.where(np.arange(n) % 3, 1.0, -1.0)
    want = np.zeros(n)
    want[:10] = signs[:10] * sum(r + 1 for r in range(p)) / p
    np.testing.assert_array_equal(got, want)


@MPI
@pytest.mark.parametrize("spec", LOSSY)
def test_state_dict_round_trip_gives_bitwise_the_same_next_result(comm, spec):
    n = 257
    a = make_compressor(spec)
    for t in range(3):
        a.allreduce_mean(comm, "b0", _x(6, comm.rank, n, call=t))
        a.allreduce_mean(comm, "b1", _x(7, comm.rank, n // 2, call=t))
    state = a.state_dict()
    assert sorted(state) == ["b0", "b1"] and all(type(r) is np.ndarray for r in state.values())
    b = make_compressor(spec)
    b.load_state_dict({k: r.copy() for k, r in state.items()})
    for t in (3, 4):
        x = _x(6, comm.rank, n, call=t)
        assert np.array_equal(a.allreduce_mean(comm, "b0", x), b.allreduce_mean(comm, "b0", x))
    assert all(np.array_equal(a.state_dict()[k], b.state_dict()[k]) for k in ("b0", "b1"))
    state["b0"][:] = 0  # state_dict's arrays are copies, not the live residuals
    assert not np.array_equal(a.state_dict()["b0"], state["b0"])


@MPI
def test_a_residual_of_the_wrong_shape_is_refused(comm):
    c = make_compressor("fp16")
    c.load_state_dict({"b": np.zeros(5)})
    with pytest.raises(ValueError, match="residual of shape"):
        c.allreduce_mean(comm, "b", np.ones(6))
    with pytest.raises(ValueError, match="1-D"):
        c.allreduce_mean(comm, "c", np.ones((2, 3)))


@MPI
@pytest.mark.parametrize("spec", ["int8", "topk:0.1"])
def test_gather_schemes_on_a_group_whose_default_has_no_allgather(comm, spec):
    """A tree-default group runs the all-gathers on native (the same result); tree asked for
    explicitly cannot all-gather: the Communicator's error, on every rank alike."""
    p2p = MPITransport(comm.p2p.comm.Dup(), owned=True)
    tree = Communicator(p2p, p2p.dup(), algorithm="tree", name="tree")
    try:
        x = _x(10, comm.rank, 150)
        want = make_compressor(spec).allreduce_mean(comm, "b", x)
        np.testing.assert_array_equal(make_compressor(spec).allreduce_mean(tree, "b", x), want)
        if comm.size > 1:
            with pytest.raises(ValueError, match="algorithm 'tree' has no allgather"):
                make_compressor(spec).allreduce_mean(comm, "b", x, algorithm="tree")
    finally:
        tree.free()


@MPI
@pytest.mark.parametrize("spec", ["none", "fp16", "int8", "topk:0.05"])
def test_queued_on_the_communication_thread_gives_the_same_means(comm, spec):
    """How the trainer will overlap it: the whole call queued on the group's background
    thread, two buckets in flight, the same means and residuals as called in turn."""
    a, b = make_compressor(spec), make_compressor(spec)
    for t in range(2):
        xs = [_x(11, comm.rank, 120, call=t), _x(12, comm.rank, 77, call=t)]
        handles = [comm.background().submit(a.allreduce_mean, comm, f"b{i}", x) for i, x in enumerate(xs)]
        got = [h.wait() for h in handles]
        for i, x in enumerate(xs):
            np.testing.assert_array_equal(got[i], b.allreduce_mean(comm, f"b{i}", x))
    assert a.bytes_sent == b.bytes_sent
    assert all(np.array_equal(r, b.state_dict()[k]) for k, r in a.state_dict().items())


# -- the device path ---------------------------------------------------------------------------
@MPI
@pytest.mark.parametrize("spec", ["none", "fp16", "int8", "topk:0.1", "topk:1.0"])
def test_device_arrays_give_the_host_result(comm, xp, spec):
    """Device arrays (the strict CuPy double where no GPU is) give bitwise NumPy's means and
    residuals, device arrays back; residuals loaded from host arrays go to the device."""
    n = 203
    host, dev = make_compressor(spec), make_compressor(spec)
    for t in range(3):
        x = _x(8, comm.rank, n, "float32", call=t)
        want = host.allreduce_mean(comm, "b", x)
        got = dev.allreduce_mean(comm, "b", xp.asarray(x))
        assert backend.array_module(got) is xp and got.dtype == np.float32
        np.testing.assert_array_equal(backend.to_host(got), want)
    if spec != "none":
        resumed = make_compressor(spec)
        resumed.load_state_dict({k: backend.to_host(r) for k, r in dev.state_dict().items()})
        x = _x(8, comm.rank, n, "float32", call=9)
        got = resumed.allreduce_mean(comm, "b", xp.asarray(x))
        np.testing.assert_array_equal(backend.to_host(got), host.allreduce_mean(comm, "b", x))
