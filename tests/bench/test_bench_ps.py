"""``python -m mpipar.bench ps``: a short real run under mpiexec (1 server + 2 workers).

In float64 the all-reduce baseline and ``ps sync`` train the same numbers (their validation
losses agree within 1e-10); sync's recorded staleness is 0 and ssp:1's at most 1; every
configuration is reported."""

from __future__ import annotations

import json
import os
import sys

from mpipar.testing.launch import run_mpi


def test_bench_ps_short_run(tmp_path):
    out = tmp_path / "ps.json"
    path = os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")
    job = run_mpi(3, [sys.executable, "-m", "mpipar.bench", "ps", "--steps", "4", "--warmup", "1",
                      "--ssp", "1", "--eval-batches", "1", "--dtype", "float64", "--block-size",
                      "16", "--json", str(out)], timeout=180, env={"PYTHONPATH": path})
    assert job.returncode == 0, job.output
    assert "goal: async/SSP samples/s >= 1.5x sync's" in job.output
    results = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert list(results) == ["all-reduce dp=2", "ps sync", "ps async", "ps ssp:1"]
    base, sync = results["all-reduce dp=2"]["val_loss"], results["ps sync"]["val_loss"]
    assert abs(sync - base) <= 1e-10 * abs(base), (sync, base)
    assert results["ps sync"]["staleness"]["lag"]["max"] == 0
    assert results["ps ssp:1"]["staleness"]["lag"]["max"] <= 1
    for r in results.values():
        assert len(r["step_ms"]) == 2 and r["samples_per_s"] > 0 and len(r["cpu_share"]) == 3
