"""Thousands of virtual ranks in one process."""

from __future__ import annotations

import os

import pytest

from mpipar.comm import cost_model as cm
from mpipar.comm.network import load_profile
from mpipar.sim import simulate_collective

from simhelpers import available


@pytest.mark.parametrize("alg,nbytes", [("rhd", 16384), ("tree", 65536)])
def test_4096_ranks_log_p_algorithms(alg, nbytes):
    if available(alg) is None:
        pytest.skip(f"{alg} not written yet")
    prof = load_profile("dgx-h100")
    res = simulate_collective("allreduce", alg, 4096, nbytes // 4, "float32", profile=prof, data=False)
    assert len(res.finish) == 4096 and res.time > 0
    # (how long the simulation takes is measured by `python -m mpipar.sim collectives`, not here)
    est = cm.predict(alg, "allreduce", 4096, nbytes, prof)
    assert res.time == pytest.approx(est, rel=0.5)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MPIPAR_RUN_SLOW"), reason="minutes of CPU: set MPIPAR_RUN_SLOW=1")
def test_4096_ranks_ring():
    """2 (p-1) hops per rank: 33.5 M messages, about 1.4 us of CPU each (algorithm and
    engine): most of a minute in CPython. Opt-in."""
    if available("ring") is None:
        pytest.skip("ring not written yet")
    prof = load_profile("dgx-h100").with_topology(1)
    res = simulate_collective("allreduce", "ring", 4096, 1 << 22, "float32", profile=prof, data=False)
    assert res.time == pytest.approx(cm.predict("ring", "allreduce", 4096, 1 << 24, prof), rel=1e-9)
