"""python -m mpipar.train --ps-servers K: parameter-server runs of the command line.

Launched as a user would (mpiexec through the suite's launcher, bounded at 120 s each):
a sync run of 1 server + 2 workers logs the one process's losses (within 1e-10, float64),
its checkpoint resumes under 2 servers + 1 worker and in one process to the same final
validation loss, an async run with a slowed worker logs its staleness, and a stop signal
saves the servers' state (sync: at the next step; async: after the next evaluation) and the
printed command resumes it bitwise.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys

import numpy as np

from mpipar import train
from mpipar.testing.launch import run_mpi
from test_signals import FAST as SIGNAL_FAST, STEPS, interrupt, step_losses
from test_train import FAST, read_log, train_ranks

TOL = 1e-10


def _entries(path):
    return [json.loads(line) for line in open(path)]


def test_sync_servers_train_like_one_process_and_checkpoints_move(tmp_path):
    one, ps, ck = tmp_path / "one.jsonl", tmp_path / "ps.jsonl", tmp_path / "ck"
    common = FAST + ["--steps", "6", "--dtype", "float64"]
    assert train.main(common + ["--log", str(one)]) == 0
    job = train_ranks(3, *common, "--ps-servers", "1", "--ckpt-dir", str(ck), "--ckpt-every", "3",
                      "--log", str(ps))
    assert job.returncode == 0, job.output
    assert "parameter servers: 1 (rank 2), workers: 2 (ranks 0..1" in job.output
    (s1, v1), (s2, v2) = read_log(one), read_log(ps)
    np.testing.assert_allclose([e["loss"] for e in s2], [e["loss"] for e in s1], rtol=TOL, atol=0)
    np.testing.assert_allclose(v2[-1]["val_loss"], v1[-1]["val_loss"], rtol=TOL, atol=0)
    staleness = next(e["staleness"] for e in _entries(ps) if "staleness" in e)
    assert staleness["lag"] == {"applied": 12, "max": 0, "mean": 0.0, "counts": {"0": 12}}
    # the servers' state at step 3, gathered into an ordinary checkpoint: 2 servers and 1
    # worker continue it, and so does one process, to the straight run's end
    for n, extra, name in ((3, ["--ps-servers", "2"], "ps2"), (1, [], "plain")):
        log = tmp_path / f"{name}.jsonl"
        argv = common + extra + ["--resume", str(ck / "step-3"), "--log", str(log)]
        if n == 1:
            assert train.main(argv) == 0
        else:
            job = train_ranks(n, *argv)
            assert job.returncode == 0, job.output
        steps, vals = read_log(log)
        assert [e["step"] for e in steps] == [3, 4, 5]
        np.testing.assert_allclose([e["loss"] for e in steps], [e["loss"] for e in s1[3:]],
                                   rtol=TOL, atol=0, err_msg=name)
        np.testing.assert_allclose(vals[-1]["val_loss"], v1[-1]["val_loss"], rtol=TOL, atol=0)


def test_async_with_a_slowed_worker_reports_staleness(tmp_path):
    log = tmp_path / "async.jsonl"
    job = train_ranks(3, *FAST, "--steps", "8", "--ps-servers", "1", "--ps-mode", "async",
                      "--slow-rank", "1", "--slow-factor", "8", "--eval-interval", "4",
                      "--log", str(log))
    assert job.returncode == 0, job.output
    assert "parameter servers, async: 16 gradients applied" in job.output
    st = next(e["staleness"] for e in _entries(log) if "staleness" in e)
    assert st["lag"]["applied"] == 16 and st["lag"]["max"] >= 1
    steps, vals = read_log(log)
    assert [e["step"] for e in steps] == list(range(8)) and len(vals) == 3
    assert all(np.isfinite(e["loss"]) for e in steps)


def test_a_stop_signal_saves_the_servers_state_and_the_run_resumes_bitwise(tmp_path):
    """sync: the stop is agreed at the next step boundary; the printed command (3 ranks)
    resumes to the straight run's losses bitwise. async: agreed only at the boundary after an
    evaluation (every 5 steps here), where every rank meets."""
    straight = tmp_path / "straight.jsonl"
    job = train_ranks(3, *SIGNAL_FAST, "--steps", str(STEPS), "--ps-servers", "1", "--log",
                      str(straight))
    assert job.returncode == 0, job.output
    job, log = interrupt(tmp_path, "sync", [signal.SIGTERM], "--ps-servers", "1", "--ckpt-dir",
                         str(tmp_path / "ck"), ranks=3)
    out = job.stdout
    assert job.returncode == 0, out
    stopped = len(step_losses(log))
    assert 3 <= stopped < STEPS and f"SIGTERM at step {stopped}: checkpoint saved" in out, out
    line = next(ln for ln in out.splitlines() if "resume with:" in ln)
    argv = shlex.split(line.split("resume with:", 1)[1])
    assert argv[:6] == ["mpiexec", "-n", "3", "python", "-m", "mpipar.train"], argv
    resumed = run_mpi(3, [sys.executable, *argv[4:]], timeout=120)
    assert resumed.returncode == 0, resumed.output
    assert step_losses(log) == step_losses(straight)

    job, log = interrupt(tmp_path, "async", [signal.SIGTERM], "--ps-servers", "1", "--ps-mode",
                         "async", "--eval-interval", "5", "--ckpt-dir", str(tmp_path / "ck-async"),
                         ranks=3)
    out = job.stdout
    assert job.returncode == 0, out
    stopped = len(step_losses(log))
    assert stopped % 5 == 0 and 5 <= stopped < STEPS, out
    assert f"SIGTERM at step {stopped}: checkpoint saved" in out, out
