"""The reduced (one period of ranks) simulation of a ring equals the full one."""

from __future__ import annotations

import pytest

from mpipar.comm.network import Profile
from mpipar.sim import simulate_collective
from mpipar.sim.run import symmetry_period

FLAT = Profile.simple(3e-6, 1e-9, 2e-10)


@pytest.mark.parametrize("prof", ["dgx-h100", "dgx-a100", "flat"])
@pytest.mark.parametrize("p", [8, 32, 64])
@pytest.mark.parametrize("collective", ["allreduce", "reduce_scatter", "allgather"])
@pytest.mark.parametrize("nbytes", [4096 * 64, 64 << 20])
def test_reduced_ring_equals_full(prof, p, collective, nbytes):
    prof = FLAT if prof == "flat" else prof
    count = nbytes // 4
    full = simulate_collective(collective, "ring", p, count, profile=prof, data=False, symmetric=False)
    reduced = simulate_collective(collective, "ring", p, count, profile=prof, data=False)
    assert reduced.time == pytest.approx(full.time, rel=1e-12)
    assert reduced.finish == pytest.approx(full.finish, rel=1e-12)


def test_symmetry_is_used_only_where_it_holds():
    from mpipar.sim.run import resolve_profile
    dgx = resolve_profile("dgx-h100")
    assert symmetry_period("ring", "allreduce", 64, 64 * 1024, dgx, False, None, {}) == 8
    assert symmetry_period("ring", "allreduce", 64, 64 * 1024 + 1, dgx, False, None, {}) is None
    assert symmetry_period("ring", "allreduce", 64, 64 * 1024, dgx, True, None, {}) is None
    assert symmetry_period("ring", "allreduce", 64, 64 * 1024, dgx, False, None, {"channels": 8}) is None
    assert symmetry_period("rhd", "allreduce", 64, 64 * 1024, dgx, False, None, {}) is None
    assert symmetry_period("ring", "allreduce", 64, 64 * 1024, resolve_profile("local"), False, None, {}) is None
