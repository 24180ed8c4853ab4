"""Thousands of virtual ranks in one process."""

from __future__ import annotations

import os

import pytest

from mpipar.comm import cost_model as cm
from mpipar.sim import load_profile, simulate_collective

from simhelpers import available


@pytest.mark.parametrize("alg,nbytes", [("rhd", 16384), ("tree", 65536)])
def test_4096_ranks_log_p_algorithms(alg, nbytes):
    if available(alg) is None:
        pytest.skip(f"{alg} not written yet")
    prof = load_profile("dgx-h100")
    res = simulate_collective("allreduce", alg, 4096, nbytes // 4, "float32", profile=prof, data=False)
    assert len(res.finish) == 4096 and res.time > 0
    # CPU seconds, not wall: this 2-core machine is shared, and wall time is whatever is left
    assert res.cpu < 20, f"{alg} at 4096 ranks took {res.cpu:.1f} s of CPU ({res.wall:.1f} s wall)"
    est = cm.predict(alg, "allreduce", 4096, nbytes, prof)
    assert res.time == pytest.approx(est, rel=0.5)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MPIPAR_RUN_SLOW"), reason="minutes of CPU: set MPIPAR_RUN_SLOW=1")
def test_4096_ranks_ring():
    """2 (p-1) hops per rank: 33.5 M messages, about 3 us of CPU each (algorithm and engine):
    minutes, not seconds, in CPython. Opt-in."""
    if available("ring") is None:
        pytest.skip("ring not written yet")
    prof = load_profile("dgx-h100").with_topology(1)
    res = simulate_collective("allreduce", "ring", 4096, 1 << 22, "float32", profile=prof, data=False)
    assert res.time == pytest.approx(cm.predict("ring", "allreduce", 4096, 1 << 24, prof), rel=1e-9)
