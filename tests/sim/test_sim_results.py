"""The simulator runs the real algorithm code: with real data, every from-scratch algorithm's
simulated result equals the NumPy reference, at powers of two and not, on flat and two-level
networks, with eager and rendezvous messages."""

from __future__ import annotations

import numpy as np
import pytest

from mpipar.comm.algorithms import COLLECTIVES
from mpipar.comm.network import Profile
from mpipar.sim import simulate_collective
from mpipar.sim.run import rank_inputs

from simhelpers import FROM_SCRATCH, available, reference

SIZES = [1, 2, 3, 5, 8, 13]
FLAT = Profile.simple(2e-6, 1e-9, 1e-10, eager_limit=256)  # small eager limit: both protocols
# every (algorithm, collective) it implements; an algorithm not written yet is one skipped case
CASES = [(alg, coll) for alg in FROM_SCRATCH for coll in COLLECTIVES
         if coll != "alltoall" and (available(alg) is None and coll == "allreduce"
                                    or available(alg) is not None and available(alg).supports(coll))]


def _options(alg: str) -> dict:
    # small pieces so that the chunked / segmented / two-level paths all run at small counts
    return {"chunk_bytes": 64, "segment_bytes": 64, "small_bytes": 128, "ranks_per_node": 2}


@pytest.mark.parametrize("p", SIZES)
@pytest.mark.parametrize("alg,coll", CASES, ids=[f"{a}-{c}" for a, c in CASES])
def test_result_equals_numpy(alg, coll, p):
    algorithm = available(alg)
    if algorithm is None:
        pytest.skip(f"{alg} not written yet")
    for count, dtype, op in [(1, "float64", "sum"), (37, "float32", "max"), (300, "int64", "sum")]:
        root = (p - 1) // 2
        inputs = rank_inputs(coll, p, count, dtype, seed=p)
        res = simulate_collective(coll, algorithm, p, count, dtype, op, FLAT, root=root,
                                  inputs=inputs, options=_options(alg))
        want = reference(coll, op, inputs, root)
        for r in range(p):
            if want[r] is not None:
                np.testing.assert_array_equal(np.asarray(res.results[r]).reshape(-1), want[r],
                                              err_msg=f"{alg} {coll} p={p} count={count} rank {r}")
        assert res.time > 0 or p == 1


@pytest.mark.parametrize("p", [6, 16])
def test_hier_on_a_two_level_network(p):
    """hier finds the nodes from the simulated topology (no option) and beats a flat ring
    when the inter-node link is slow."""
    if available("hier") is None or available("ring") is None:
        pytest.skip("hier/ring not written yet")
    prof = Profile.simple(1e-6, 1e-9, 0).with_topology(4)
    prof.intra = Profile.simple(1e-7, 1e-11).link
    inputs = rank_inputs("allreduce", p, 1000, "float64")
    res = simulate_collective("allreduce", "hier", p, 1000, "float64", profile=prof, inputs=inputs)
    want = np.sum(inputs, axis=0)
    assert all(np.array_equal(x, want) for x in res.results)
    ring = simulate_collective("allreduce", "ring", p, 1000, "float64", profile=prof, data=False)
    assert res.time < ring.time


TWO_LEVEL = Profile.simple(2e-6, 1e-9, 1e-10, eager_limit=256).with_topology(4)
TWO_LEVEL.intra = Profile.simple(5e-7, 1e-10).link


@pytest.mark.parametrize("profile", [FLAT, TWO_LEVEL], ids=["flat", "two-level"])
@pytest.mark.parametrize("count", [7, 61, 4099])  # eager only, both, rendezvous only (at p=12)
@pytest.mark.parametrize("alg", ["ring", "rhd", "dbtree", "hier"])
def test_no_data_mode_matches_data_mode_times(alg, count, profile):
    """Size-only buffers change nothing in the timing. Size-only runs send their eager
    sendrecv hops through the simulator's fast path (a closure per rank that remembers its
    last peers); runs with data never do, so this also checks the fast path against the
    general one, message for message (same count) and to the bit (same finish times)."""
    if available(alg) is None:
        pytest.skip(f"{alg} not written yet")
    a = simulate_collective("allreduce", alg, 12, count, "float32", profile=profile, data=True)
    b = simulate_collective("allreduce", alg, 12, count, "float32", profile=profile, data=False)
    assert a.messages == b.messages
    assert a.finish == b.finish


@pytest.mark.parametrize("algorithm", ["ring", "rhd", "auto"])
def test_communicator_runs_on_the_simulator(algorithm):
    """The whole production path (Communicator -> algorithm -> transport) on virtual ranks."""
    from mpipar.comm.communicator import Communicator
    from mpipar.sim import simulate

    if algorithm != "auto" and available(algorithm) is None:
        pytest.skip(f"{algorithm} not written yet")
    p = 7
    inputs = rank_inputs("allreduce", p, 50, "float32")

    def body(t, x):
        comm = Communicator(t, t, algorithm=algorithm, debug=False)
        return comm.allreduce(x.reshape(5, 10), op="avg"), comm.allgather(x[:3])

    res = simulate(body, p, FLAT, args=lambda r: (inputs[r],))
    want = (np.sum(inputs, axis=0) / np.float32(p)).astype(np.float32).reshape(5, 10)
    for avg, gathered in res.results:
        np.testing.assert_array_equal(avg, want)
        np.testing.assert_array_equal(gathered, np.concatenate([x[:3] for x in inputs]))
