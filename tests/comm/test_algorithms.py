"""The from-scratch collective algorithms (ps, tree, dbtree, ring, rhd, hier) against a NumPy
reference computed from every rank's input, at every world size the runner uses (1, 2, 3, 4, 8).

Every rank builds all ranks' inputs from (seed, rank), so it can compute the reference itself.
Inputs of small integers (also stored as floats) have exactly representable partial sums and
are compared bit for bit; random floats are compared within the bound for p-1 roundings in any
order. Each test also checks that all ranks hold the same bytes (one digest per test, compared
through MPI's own allgather) and that repeating a call repeats the bits.

The 8-rank run is oversubscribed on small machines, so cases are grouped into few tests and
lengths/dtypes are crossed sparingly; the whole file stays within a few minutes there.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from mpipar.comm import split_counts
from mpipar.comm.algorithms import get_algorithm
from mpipar.comm.mpi_env import collective
from mpipar.comm.algorithms.dbtree import trees as dbtrees
from mpipar.comm.algorithms.tree import binomial

from helpers import DTYPES, rank_input, reference

ALGS = ["ps", "tree", "dbtree", "ring", "rhd", "hier"]

# option sets that reach the other code paths (pipelining, several servers, node layouts)
VARIANTS = [
    ("ps", {"servers": 2}),
    ("ps", {"servers": 3}),
    ("tree", {"segment_bytes": 256}),
    ("dbtree", {"segment_bytes": 256}),
    ("ring", {"chunk_bytes": 256}),
    ("ring", {"channels": 3}),
    ("ring", {"channels": 4, "ranks_per_node": 2}),
    ("rhd", {"small_bytes": 0}),
    ("rhd", {"small_bytes": 1 << 30}),
    ("hier", {"ranks_per_node": 1}),
    ("hier", {"ranks_per_node": 2, "rails": True}),
    ("hier", {"ranks_per_node": 2, "rails": True, "intra": "rhd", "inter": "rhd"}),
    ("hier", {"ranks_per_node": 2, "inter": "rhd"}),
    ("hier", {"ranks_per_node": 3, "inter": "dbtree", "segment_bytes": 256}),
    ("hier", {"ranks_per_node": 2, "inter": "ps", "servers": 2}),
]


def _lengths(p: int) -> list[int]:
    return sorted({0, 1, max(p - 1, 0), p + 1, 10007})


def _inputs(comm, seed, shape, dtype):
    return [rank_input(seed, r, shape, dtype) for r in range(comm.size)]


class Digest:
    """Running hash of this rank's results; ``check`` compares it across ranks."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def add(self, x) -> None:
        self.h.update(np.ascontiguousarray(x).tobytes())

    def check(self, comm) -> None:
        mine = np.frombuffer(self.h.digest(), dtype=np.uint8)
        allr = np.empty((comm.size, mine.size), dtype=np.uint8)
        collective(comm.p2p.comm, "Allgather", mine, allr)  # lock-safe, beside background work
        for r in range(comm.size):
            assert np.array_equal(allr[r], allr[0]), f"rank {r}'s results differ from rank 0's"


def _exact_allreduce(comm, alg, opts, cases, digest, seed=11):
    for n, dtype, op in cases:
        inputs = _inputs(comm, seed + n, (n,), dtype)
        out = comm.allreduce(inputs[comm.rank], op=op, algorithm=alg, **opts)
        assert out.dtype == np.dtype(dtype) and out.shape == (n,)
        np.testing.assert_array_equal(out, reference(op, inputs), err_msg=f"{alg} {opts} n={n} {dtype} {op}")
        digest.add(out)


# -- all-reduce ------------------------------------------------------------------------------
@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("alg", ALGS)
def test_allreduce_exact(comm, alg):
    """Every length x every dtype (sum) and two dtypes (max, min), bit for bit; repeat = same bits."""
    cases = [(n, dt, "sum") for n in _lengths(comm.size) for dt in DTYPES]
    cases += [(n, dt, op) for n in _lengths(comm.size) for dt in ("float16", "int32") for op in ("max", "min")]
    digest = Digest()
    _exact_allreduce(comm, alg, {}, cases, digest)
    x = rank_input(5, comm.rank, (10007,), "float32")
    first = comm.allreduce(x, algorithm=alg)
    again = comm.allreduce(x, algorithm=alg)
    assert first.tobytes() == again.tobytes()
    digest.check(comm)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("alg,opts", VARIANTS, ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in o.items())}"
                                                     for a, o in VARIANTS])
def test_allreduce_variants(comm, alg, opts):
    cases = [(n, dt, op) for n in _lengths(comm.size) for dt, op in
             (("float32", "sum"), ("int64", "sum"), ("float16", "max"), ("float64", "min"))]
    digest = Digest()
    _exact_allreduce(comm, alg, opts, cases, digest, seed=23)
    digest.check(comm)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_allreduce_random_floats(comm, alg, dtype):
    """Random floats: within (p-1) u sum|x_i| of the float64 sum (p-1 roundings, any order);
    the same bits on every rank and on a repeated call."""
    n = 4099
    inputs = [np.random.default_rng([7, r]).standard_normal(n).astype(dtype) for r in range(comm.size)]
    out = comm.allreduce(inputs[comm.rank], algorithm=alg)
    exact = np.sum([x.astype(np.float64) for x in inputs], axis=0)
    mag = np.sum([np.abs(x.astype(np.float64)) for x in inputs], axis=0)
    u = np.finfo(dtype).eps / 2
    k = comm.size  # p-1 additions, plus rounding the result once to the dtype
    bound = k * u / (1 - k * u) * mag
    assert np.all(np.abs(out.astype(np.float64) - exact) <= bound)
    again = comm.allreduce(inputs[comm.rank], algorithm=alg)
    assert out.tobytes() == again.tobytes()
    digest = Digest()
    digest.add(out)
    digest.check(comm)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("alg", ALGS)
def test_allreduce_large(comm, alg):
    """A few MiB (several ring chunks / tree segments with the default sizes), exact."""
    n = 3 * (1 << 20) // 4 + 3  # float32: 3 MiB and a bit
    digest = Digest()
    _exact_allreduce(comm, alg, {}, [(n, "float32", "sum")], digest, seed=31)
    digest.check(comm)


def _pools(comm):
    """Every scratch pool the algorithms may have used: the world transport's and those of
    the sub-groups hier keeps in its cache."""
    ts = [comm.transport]
    for found in comm.transport.cache.values():
        if isinstance(found, tuple):
            ts += [g for g in found if g is not None and hasattr(g, "scratch_pool")]
    return [t.scratch_pool for t in ts]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("alg,opts", [(a, {}) for a in ALGS]
                         + [("ring", {"chunk_bytes": 256}), ("ps", {"servers": 2}),
                            ("dbtree", {"segment_bytes": 256}), ("rhd", {"small_bytes": 0})])
def test_scratch_is_reused_and_never_part_of_a_result(comm, alg, opts):
    """Scratch comes from the transport's pool and goes back to it after the call: a result
    never shares memory with it, so later calls cannot overwrite an earlier result, and
    back-to-back calls reuse (not grow) the pool."""
    cases = [(n, dt) for n in (1, comm.size + 1, 10007, 300_001) for dt in ("float32", "int64")]
    kept = []
    for n, dtype in cases:
        inputs = _inputs(comm, 61 + n, (n,), dtype)
        out = comm.allreduce(inputs[comm.rank], algorithm=alg, **opts)
        kept.append((out, reference("sum", inputs)))
        rs = comm.reduce_scatter(inputs[comm.rank], algorithm="ring" if alg == "ring" else "rhd")
        kept.append((rs, None))
    held = [b for pool in _pools(comm) for b in pool.kept()]
    if comm.size > 1:  # some rank used scratch (not each: a parameter server's clients do not)
        somewhere = comm.allreduce(np.array([len(held)]), algorithm="native")
        assert somewhere[0] > 0, "no scratch was given back to a pool"
    for out, ref in kept:
        assert not any(np.shares_memory(out, b) for b in held)
        if ref is not None:  # still the right answer after every later call
            np.testing.assert_array_equal(out, ref)
    before = sum(pool.held_bytes for pool in _pools(comm))
    for n, dtype in cases:
        comm.allreduce(_inputs(comm, 61 + n, (n,), dtype)[comm.rank], algorithm=alg, **opts)
    assert sum(pool.held_bytes for pool in _pools(comm)) == before


# -- reduce, broadcast, reduce-scatter, all-gather ---------------------------------------------
def _supporting(collective: str) -> list[str]:
    return [a for a in ALGS if get_algorithm(a).supports(collective)]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("alg,opts", [(a, {}) for a in _supporting("reduce")]
                         + [("tree", {"segment_bytes": 64})])
def test_reduce_every_root(comm, alg, opts):
    for n, dtype, op in [(1, "float16", "sum"), (comm.size + 1, "int32", "max"), (10007, "float64", "sum")]:
        inputs = _inputs(comm, 41 + n, (n,), dtype)
        for root in range(comm.size):
            out = comm.reduce(inputs[comm.rank], root=root, op=op, algorithm=alg, **opts)
            if comm.rank == root:
                np.testing.assert_array_equal(out, reference(op, inputs))
            else:
                assert out is None


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("alg,opts", [(a, {}) for a in _supporting("broadcast")]
                         + [("tree", {"segment_bytes": 64}), ("ring", {"chunk_bytes": 64})])
def test_broadcast_every_root(comm, alg, opts):
    for n, dtype in [(0, "float32"), (1, "float16"), (comm.size + 1, "int64"), (10007, "float32")]:
        inputs = _inputs(comm, 43 + n, (n,), dtype)
        for root in range(comm.size):
            out = comm.broadcast(inputs[comm.rank], root=root, algorithm=alg, **opts)
            assert out.tobytes() == inputs[root].tobytes()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("alg,opts", [(a, {}) for a in _supporting("reduce_scatter")]
                         + [("ring", {"chunk_bytes": 64}), ("ring", {"channels": 3, "ranks_per_node": 2})])
def test_reduce_scatter(comm, alg, opts):
    digest = Digest()
    p = comm.size
    shapes = [(n,) for n in _lengths(p)] + [(p + 2, 3), (2 * p - 1, 5)]
    for shape, dtype, op in [(s, dt, op) for s in shapes for dt, op in
                             (("float32", "sum"), ("int64", "sum"), ("float16", "min"))]:
        inputs = _inputs(comm, 47, shape, dtype)
        out = comm.reduce_scatter(inputs[comm.rank], op=op, algorithm=alg, **opts)
        ref = reference(op, inputs)
        rows = split_counts(shape[0], p)
        lo = sum(rows[:comm.rank])
        np.testing.assert_array_equal(out, ref[lo:lo + rows[comm.rank]], err_msg=f"{shape} {dtype} {op}")
        # the blocks of all ranks put back together must be the reference: gather them
        whole = comm.allgather(out, counts=rows, algorithm="native")
        np.testing.assert_array_equal(whole, ref)
        digest.add(whole)
    digest.check(comm)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("alg,opts", [(a, {}) for a in _supporting("allgather")]
                         + [("ring", {"chunk_bytes": 64}), ("ring", {"channels": 3, "ranks_per_node": 2})])
def test_allgather_uneven(comm, alg, opts):
    p = comm.size
    patterns = [[1] * p, [(3 * r + 1) % 4 for r in range(p)], [0] * (p - 1) + [5],
                split_counts(10007, p), [r + 2 for r in range(p)]]
    for counts in patterns:
        for dtype in ("float16", "int64"):
            blocks = [rank_input(53, r, (counts[r], 2), dtype) for r in range(p)]
            out = comm.allgather(blocks[comm.rank], counts=counts, algorithm=alg, **opts)
            np.testing.assert_array_equal(out, np.concatenate(blocks), err_msg=f"{counts} {dtype}")


# -- large-count splitting --------------------------------------------------------------------
@pytest.mark.mpi(min_size=1)
def test_large_count_splitting(comm, monkeypatch):
    """With MAX_MESSAGE_BYTES tiny, every message is cut into pieces; results stay exact."""
    import mpipar.comm.transport.mpi as mpi_transport

    monkeypatch.setattr(mpi_transport, "MAX_MESSAGE_BYTES", 64)
    digest = Digest()
    p = comm.size
    for alg in ALGS:
        _exact_allreduce(comm, alg, {}, [(1001, "float64", "sum"), (p + 1, "float16", "max")], digest, seed=59)
    _exact_allreduce(comm, "ring", {"chunk_bytes": 200}, [(1001, "float32", "sum")], digest, seed=61)
    _exact_allreduce(comm, "tree", {"segment_bytes": 200}, [(1001, "float32", "sum")], digest, seed=61)
    inputs = _inputs(comm, 67, (999,), "int32")
    ref = reference("sum", inputs)
    counts = split_counts(999, p)
    lo = sum(counts[:comm.rank])
    for alg in _supporting("reduce_scatter"):
        block = comm.reduce_scatter(inputs[comm.rank], algorithm=alg)
        np.testing.assert_array_equal(block, ref[lo:lo + counts[comm.rank]])
        np.testing.assert_array_equal(comm.allgather(block, counts=counts, algorithm=alg), ref)
    for alg in _supporting("broadcast"):
        out = comm.broadcast(inputs[comm.rank], root=p - 1, algorithm=alg)
        np.testing.assert_array_equal(out, inputs[p - 1])
    digest.check(comm)


# -- hier node layouts ------------------------------------------------------------------------
@pytest.mark.mpi(min_size=1)
def test_hier_groups_cached(comm):
    """The node groups are built once per transport, and nodes follow ranks_per_node."""
    from mpipar.comm.algorithms.hier import groups

    t = comm.transport
    local, leaders = groups(t, 3)
    assert groups(t, 3)[0] is local
    assert local.size == min(3, comm.size - 3 * (comm.rank // 3))
    assert (leaders is not None) == (comm.rank % 3 == 0)
    if leaders is not None:
        assert leaders.size == -(-comm.size // 3)
    shared_local, _ = groups(t, None)  # MPI shared-memory split: one machine, one node
    assert shared_local.size == comm.size


# -- tree shapes (serial) ---------------------------------------------------------------------
def _check_tree(p, parent_children):
    roots = [r for r in range(p) if parent_children[r][0] is None]
    assert len(roots) == 1
    seen, stack = set(), [roots[0]]
    while stack:
        v = stack.pop()
        assert v not in seen
        seen.add(v)
        for k in parent_children[v][1]:
            assert parent_children[k][0] == v
        stack += parent_children[v][1]
    assert seen == set(range(p))


@pytest.mark.parametrize("p", list(range(1, 34)) + [100, 4096])
def test_tree_shapes(p):
    """Binomial trees (every root) and both dbtree trees are spanning trees of depth <= log p + 1;
    dbtree's two trees share almost no interior ranks."""
    for root in ([0, p - 1, p // 2] if p > 1 else [0]):
        specs = [binomial(p, r, root, 0, 1) for r in range(p)]
        _check_tree(p, [(s.parent, s.children) for s in specs])
    a, b = dbtrees(p)
    for tr in (a, b):
        _check_tree(p, tr)
        for v in range(p):
            d, u = 0, v
            while tr[u][0] is not None:
                u, d = tr[u][0], d + 1
            assert d <= (p - 1).bit_length() + 1
    both_interior = sum(1 for v in range(p) if a[v][1] and b[v][1])
    assert both_interior <= 1


# -- shared per-p tables (serial) -------------------------------------------------------------
def test_split_counts_has_one_definition():
    """The Communicator's blocks and the algorithms' are cut by one function, as array_split."""
    from mpipar.comm import communicator
    from mpipar.comm.algorithms import _util

    assert split_counts is communicator.split_counts is _util.split_counts
    for n, parts in ((10, 3), (0, 4), (7, 7), (5, 8), (10007, 6)):
        assert split_counts(n, parts) == [len(a) for a in np.array_split(np.arange(n), parts)]


def test_cached_tables():
    """The tables every rank shares (cached by their arguments, built once in the simulator)
    are what the per-rank computations gave, and are shared, not rebuilt."""
    from mpipar.comm.algorithms._util import offsets, segment_table, segments, split_offsets
    from mpipar.comm.algorithms.dbtree import _tables
    from mpipar.comm.algorithms.ring import _below

    for parts in (1, 2, 3, 7, 8, 100):
        for n in (0, 1, parts - 1, parts, 10007):
            assert list(split_offsets(n, parts)) == offsets(split_counts(n, parts))
            assert split_offsets(n, parts) is split_offsets(n, parts)
        for b in range(parts):
            assert sorted(_below(parts, b)) == [x for x in range(parts) if x != b]
    for lo, hi, seg in ((0, 0, 4), (3, 10, 4), (5, 1005, 64), (0, 7, 100)):
        assert list(segment_table(lo, hi, seg)) == segments(lo, hi, seg)
    assert _tables(100) is _tables(100)
    # the binomial broadcast goes to the largest subtree first; the fold stays smallest first
    spec = binomial(16, 0, 0, 0, 1)
    assert list(spec.children) == [1, 2, 4, 8] and list(spec.bcast_order) == [8, 4, 2, 1]
