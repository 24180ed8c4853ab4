"""Gradient compression (mpipar/comm/compress.py) against NumPy, at every world size the
runner uses (1, 2, 3, 4, 8): the means, the error-feedback identity, int8's bound and its
overflow-free sum, top-k's selection and counted bytes, bf16's rounding (ml_dtypes' on NumPy,
the bit patterns' on the strict CuPy double), PowerSGD's factors, bytes and full rank, the
specs, the residuals' round trip, and the device path on the strict CuPy double."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpipar import backend
from mpipar.comm.communicator import Communicator
from mpipar.comm.compress import GradientCompressor, PowerSGD, TopK, make_compressor
from mpipar.comm.transport.mpi import MPITransport

from helpers import assert_same_on_all_ranks

LOSSY = ["fp16", "bf16", "int8", "topk:0.1", "topk:0.01", "powersgd:2"]
U16 = 2.0 ** -11  # float16's unit roundoff
UB16 = 2.0 ** -8  # bfloat16's


def _shapes(n: int) -> list[tuple[int, ...]]:
    """Tensors of n entries in all: a wide k x 2k matrix, a tall 2k x k one (PowerSGD
    transposes it), a vector of the rest (what the schemes other than PowerSGD ignore)."""
    k = max(1, math.isqrt(n // 4))
    return [(k, 2 * k), (2 * k, k), (n - 4 * k * k,)]


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
                                        ("topk:1", "TopK"), (" topk:1e-3 ", "TopK"),
                                        ("bf16", "BFloat16"), ("powersgd:4", "PowerSGD"),
                                        ("powersgd: 1", "PowerSGD")])
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
    ("bf16:2", "bf16 takes no argument"),
    ("powersgd", "powersgd needs a rank, as powersgd:4"),
    ("powersgd:", "powersgd needs a rank"),
    ("powersgd:0", "powersgd rank 0 is not >= 1"),
    ("powersgd:1.5", "powersgd rank '1.5' is not an integer"),
    ("bogus", "unknown compression 'bogus'; choose from none, fp16, bf16, int8, topk:RATIO, "
              "powersgd:RANK"),
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
    payloads) + sum_ranks r_T = sum_t sum_ranks x_t. int8, topk and bf16 sum the payloads
    themselves (bf16: p values of 8 significant bits, exactly in float64), and PowerSGD's
    mean is the same D on every rank with r = v - D: equal to float64 rounding (1e-12
    relative to the inputs' scale). fp16 sums
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
        mean = c.allreduce_mean(comm, "bucket", inputs[comm.rank], algorithm=algorithm,
                                shapes=_shapes(n))
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
        a.allreduce_mean(comm, "b0", _x(6, comm.rank, n, call=t), shapes=_shapes(n))
        a.allreduce_mean(comm, "b1", _x(7, comm.rank, n // 2, call=t), shapes=_shapes(n // 2))
    state = a.state_dict()
    keys = ["b0", "b0.Q", "b1", "b1.Q"] if spec.startswith("powersgd") else ["b0", "b1"]
    assert sorted(state) == keys and all(type(r) is np.ndarray for r in state.values())
    b = make_compressor(spec)
    b.load_state_dict({k: r.copy() for k, r in state.items()})
    for t in (3, 4):
        x = _x(6, comm.rank, n, call=t)
        assert np.array_equal(a.allreduce_mean(comm, "b0", x, shapes=_shapes(n)),
                              b.allreduce_mean(comm, "b0", x, shapes=_shapes(n)))
    assert all(np.array_equal(a.state_dict()[k], b.state_dict()[k]) for k in keys)
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


# -- bf16 ------------------------------------------------------------------------------------
@MPI
def test_bf16_one_call_within_its_rounding(comm):
    """r = 0: each rank's D(c) = p bfloat16(float32(x / p)) is within 2^-8 |x| of x
    (bfloat16's half unit in the last of 8 significant bits, plus float32's 2^-24), so the
    mean is within 2^-8 mean_ranks |x|; the counted payload is 2 bytes an element."""
    n = 1001
    inputs = _all(comm, 13, n)
    c = make_compressor("bf16")
    got = c.allreduce_mean(comm, "b", inputs[comm.rank])
    assert_same_on_all_ranks(comm, got)
    err = np.abs(got - np.mean(np.stack(inputs), axis=0))
    bound = UB16 * (1 + 2.0 ** -15) * np.mean(np.abs(np.stack(inputs)), axis=0)
    assert np.all(err <= bound) and np.max(err) > 0
    assert c.last_call == {"payload": 2 * (n + 1) if comm.size > 1 else 0}


def test_bf16_bit_rounding_is_ml_dtypes_rounding(xp):
    """The rounding on float32 bit patterns (the CuPy path) against ml_dtypes' cast, on
    ties to even, the largest finite values (which round to infinity), subnormals, zeros of
    both signs, infinities and NaN: the same bits (a NaN as some quiet NaN)."""
    import ml_dtypes

    from mpipar.comm.compress import _bf16_bits, _bf16_value

    rng = np.random.default_rng(14)
    u = np.concatenate([rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32),
                        np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0xFF7FFFFF,
                                  0x7F7F8000, 0x00000001, 0x00008000, 0x80000000, 0x00000000,
                                  0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001],
                                 dtype=np.uint32)])
    a = u.view(np.float32)
    with np.errstate(invalid="ignore"):       # NaN inputs, on purpose
        want = a.astype(ml_dtypes.bfloat16)
    got = backend.to_host(_bf16_bits(xp, xp.asarray(a)))
    nan = np.isnan(a)
    np.testing.assert_array_equal(got[~nan], want.view(np.uint16)[~nan])
    assert np.all(np.isnan(got[nan].view(ml_dtypes.bfloat16).astype(np.float32)))
    back = backend.to_host(_bf16_value(xp, xp.asarray(got)))
    np.testing.assert_array_equal(back[~nan], want.astype(np.float32)[~nan])


# -- PowerSGD --------------------------------------------------------------------------------
def _plan_bytes(shapes, rank: int, itemsize: int) -> dict[str, int]:
    """Bytes of P, Q and the vectors (the module docstring): a matrix, its first dimension
    by the rest, oriented n <= m, r = min(rank, n): P n r, Q m r elements."""
    out = {"P": 0, "Q": 0, "vectors": 0}
    for shape in shapes:
        size = math.prod(shape)
        if len(shape) >= 2:
            n, m = sorted((shape[0], size // shape[0]))
            r = min(rank, n)
            out["P"] += n * r * itemsize
            out["Q"] += m * r * itemsize
        else:
            out["vectors"] += size * itemsize
    return out


@MPI
@pytest.mark.parametrize("rank", [1, 3, 100])
def test_powersgd_counts_factor_bytes(comm, rank):
    shapes = [(12, 40), (40, 12), (3, 4, 5), (17,), (7,)]
    n = sum(math.prod(s) for s in shapes)
    c = make_compressor(f"powersgd:{rank}")
    for t in range(2):
        c.allreduce_mean(comm, "b", _x(15, comm.rank, n, call=t), shapes=shapes)
        want = _plan_bytes(shapes, rank, 8) if comm.size > 1 else {"P": 0, "Q": 0, "vectors": 0}
        assert c.last_call == want
    assert c.bytes_sent == 2 * sum(want.values())
    q = c.state_dict()["b.Q"]                 # the warm start: every matrix's m x r Q
    assert q.size == _plan_bytes(shapes, rank, 1)["Q"]
    assert_same_on_all_ranks(comm, q)


@MPI
@pytest.mark.parametrize("algorithm", [None, "ring", "rhd", "tree", "dbtree", "ps", "hier"])
def test_powersgd_full_rank_is_the_mean_even_of_rank_deficient_matrices(comm, algorithm):
    """Rank >= min(n, m): P^ is square orthogonal, so the mean comes back to rounding,
    also when every rank's matrix has rank 2 (Gram-Schmidt would divide by ~0 there; QR
    does not), through every all-reduce algorithm (PowerSGD only all-reduces)."""
    rng = np.random.default_rng([16, comm.rank])
    low = [rng.standard_normal((9, 2)) @ rng.standard_normal((2, 30)),   # rank 2, wide
           rng.standard_normal((30, 2)) @ rng.standard_normal((2, 9))]   # rank 2, tall
    vec = rng.standard_normal(11)
    x = np.concatenate([low[0].ravel(), low[1].ravel(), vec])
    shapes = [(9, 30), (30, 9), (11,)]
    want = np.mean(np.stack(comm.allgather(x.reshape(1, -1))), axis=0).ravel()
    c = make_compressor("powersgd:9")
    for t in range(2):                        # the seeded Q, then the warm-started one
        got = c.allreduce_mean(comm, "b", x, algorithm=algorithm, shapes=shapes)
        assert np.max(np.abs(got - want)) <= 1e-12 * np.max(np.abs(want))
        assert_same_on_all_ranks(comm, got)
    # r = v - D is this rank's deviation from the mean; nothing of the mean was dropped, so
    # over the ranks the residuals cancel (and the next call's mean is unchanged by them)
    assert np.max(np.abs(_sum_over_ranks(comm, c.state_dict()["b"]))) <= 1e-12 * comm.size * np.max(np.abs(x))


@MPI
def test_powersgd_recovers_a_rank_r_mean_in_one_call(comm):
    """Every rank's matrix a multiple of the same rank-2 U W^T: P = M Q spans U, P^ P^T
    projects onto it, D = P^ P^T mean(M) = mean(M) with rank 2 of min(n, m) = 16."""
    rng = np.random.default_rng(17)
    u, w = rng.standard_normal((16, 2)), rng.standard_normal((2, 48))
    x = ((1.0 + comm.rank) * (u @ w)).ravel()
    want = np.mean([1.0 + r for r in range(comm.size)]) * (u @ w).ravel()
    got = make_compressor("powersgd:2").allreduce_mean(comm, "m", x, shapes=[(16, 48)])
    assert np.max(np.abs(got - want)) <= 1e-12 * np.max(np.abs(want))
    # rank 1 of the same does not: what it drops goes to the residual
    c = make_compressor("powersgd:1")
    got = c.allreduce_mean(comm, "m", x, shapes=[(16, 48)])
    assert np.max(np.abs(got - want)) > 1e-3 * np.max(np.abs(want))


@MPI
@pytest.mark.parametrize("algorithm", [None, "ring"])
def test_powersgd_error_feedback_per_rank(comm, algorithm):
    """Vogels' e = M - P^ Q^T with P^ Q^T the returned mean: on each rank, over T calls,
    sum_t mean_t + r_T = sum_t x_t for the matrices' entries (to float64 rounding); the
    vectors travel whole (residual exactly 0, mean the plain mean)."""
    n, T = 301, 5
    shapes = _shapes(n)
    split = n - shapes[-1][0]
    c = make_compressor("powersgd:1")
    sent, truth = np.zeros(n), np.zeros(n)
    for t in range(T):
        inputs = _all(comm, 18, n, call=t)
        mean = c.allreduce_mean(comm, "b", inputs[comm.rank], algorithm=algorithm, shapes=shapes)
        sent += mean
        truth += inputs[comm.rank]
        np.testing.assert_allclose(mean[split:], np.mean(np.stack(inputs), axis=0)[split:],
                                   rtol=1e-13, atol=1e-13)
    r = c.state_dict()["b"]
    err = np.abs(sent + r - truth)[:split]
    assert np.max(err) <= 1e-12 * (np.max(np.abs(truth)) + 1)
    assert np.all(r[split:] == 0) and np.max(np.abs(r[:split])) > 0


@MPI
def test_powersgd_refuses_what_does_not_fit(comm):
    c = make_compressor("powersgd:2")
    with pytest.raises(ValueError, match="hold 12 elements, the bucket 13"):
        c.allreduce_mean(comm, "b", np.ones(13), shapes=[(3, 4)])
    c.load_state_dict({"b": np.zeros(12), "b.Q": np.zeros(5)})
    with pytest.raises(ValueError, match="PowerSGD Q of 5 float64 elements does not fit"):
        c.allreduce_mean(comm, "b", np.ones(12), shapes=[(3, 4)])


def test_powersgd_plan_orients_and_caps():
    mats, vecs = PowerSGD(4).plan([(3, 10), (10, 3), (2, 3, 4), (5,), (0, 7), (0,)])
    assert [(m.offset, m.n, m.m, m.r, m.transposed) for m in mats] == \
        [(0, 3, 10, 3, False), (30, 3, 10, 3, True), (60, 2, 12, 2, False)]
    assert vecs == [(84, 89)]


# -- the device path ---------------------------------------------------------------------------
@MPI
@pytest.mark.parametrize("spec", ["none", "fp16", "bf16", "int8", "topk:0.1", "topk:1.0", "powersgd:2"])
def test_device_arrays_give_the_host_result(comm, xp, spec):
    """Device arrays (the strict CuPy double where no GPU is) give bitwise NumPy's means and
    residuals, device arrays back; residuals loaded from host arrays go to the device."""
    n = 203
    host, dev = make_compressor(spec), make_compressor(spec)
    for t in range(3):
        x = _x(8, comm.rank, n, "float32", call=t)
        want = host.allreduce_mean(comm, "b", x, shapes=_shapes(n))
        got = dev.allreduce_mean(comm, "b", xp.asarray(x), shapes=_shapes(n))
        assert backend.array_module(got) is xp and got.dtype == np.float32
        np.testing.assert_array_equal(backend.to_host(got), want)
    if spec != "none":
        resumed = make_compressor(spec)
        resumed.load_state_dict({k: backend.to_host(r) for k, r in dev.state_dict().items()})
        x = _x(8, comm.rank, n, "float32", call=9)
        got = resumed.allreduce_mean(comm, "b", xp.asarray(x), shapes=_shapes(n))
        np.testing.assert_array_equal(backend.to_host(got),
                                      host.allreduce_mean(comm, "b", x, shapes=_shapes(n)))


def test_a_widened_residual_is_rounded_back_exactly_or_refused():
    """A checkpoint holds a 16-bit bucket's residual as float32: loaded with the bucket's
    dtype it is that residual again, bit for bit; float32 values no float16 holds are not
    a float16 bucket's residual."""
    c = make_compressor("topk:0.5")
    r16 = np.array([1.5, -2.25, 6e-8], dtype=np.float16)
    c.load_state_dict({"b": r16.astype(np.float32)}, dtype=np.float16)
    got = c.state_dict()["b"]
    assert got.dtype == np.float16 and got.tobytes() == r16.tobytes()
    with pytest.raises(ValueError, match="residual 'b' of dtype float32 does not round to float16 exactly"):
        c.load_state_dict({"b": np.array([0.1], dtype=np.float32)}, dtype=np.float16)
