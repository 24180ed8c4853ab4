"""slurm/*.sbatch run here as Slurm would run them: through ``bash``, with the ``SLURM_*``
environment of a 2-task allocation and stand-ins on PATH: ``srun`` (records its arguments,
drops the srun-only options and execs ``mpiexec -n $SLURM_NTASKS``) and ``scontrol`` (records
its arguments). Each script is proven to start what it says (tiny model, few steps, through
its pass-through arguments); train.sbatch's requeue path is followed: USR1 to the batch shell
(what ``--signal=B:USR1@120`` sends) gives a checkpoint and ``scontrol requeue``, and the
script run again resumes and finishes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpipar.testing.launch import JobResult, find_mpiexec, mpi_env, run_command

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "slurm").iterdir())
FAST = ["--model", "tiny", "--block-size", "16", "--batch-size", "4", "--threads", "1",
        "--eval-batches", "1", "--eval-interval", "0", "--warmup", "2", "--lr", "3e-3"]
JOB_ID = "4242"
BUDGET_S = 240   # all of one test's jobs together: under pytest's 300 s, so a stuck job fails here

SRUN = """#!/bin/bash
# stand-in srun: mpiexec over the allocation's tasks; srun-only options recorded and dropped
echo "srun $*" >> "$STANDIN_LOG"
n=${SLURM_NTASKS:-1}
while [ $# -gt 0 ]; do
    case "$1" in
        -n|--ntasks) n=$2; shift 2;;
        --ntasks=*) n=${1#*=}; shift;;
        --mpi=*|--kill-on-bad-exit*|--cpu-bind=*|--gpu-bind=*|--gpus-per-task=*) shift;;
        -*) echo "stand-in srun: unknown option $1" >&2; exit 97;;
        *) break;;
    esac
done
exec "$STANDIN_MPIEXEC" -n "$n" "$@"
"""
SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$STANDIN_LOG"
"""


@pytest.fixture
def job(tmp_path):
    """(env, workdir, log of stand-in calls, deadline of the test's jobs) of a 2-task
    allocation submitted from ROOT."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    calls = tmp_path / "calls.log"
    env = mpi_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STANDIN_LOG": str(calls),
                   "STANDIN_MPIEXEC": find_mpiexec(), "MPIPAR_VENV": sys.prefix,
                   "SLURM_NTASKS": "2", "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "mpipar-train",
                   "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_CPUS_PER_TASK": "1"})
    env.pop("MPIPAR_MPIEXEC", None)
    return env, work, calls, time.monotonic() + BUDGET_S


def left(job) -> float:
    return max(1.0, job[3] - time.monotonic())


def sbatch(script: str, args: list[str], job) -> JobResult:
    """The batch script run as Slurm would, its whole process group killed at the deadline."""
    env, work, *_ = job
    return run_command(["bash", str(ROOT / "slurm" / script), *args], timeout=left(job), env=env,
                       cwd=str(work))


def calls_of(job) -> list[str]:
    path = job[2]
    return path.read_text().splitlines() if path.exists() else []


def steps_in(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [e["step"] for e in map(json.loads, log.read_text().splitlines()) if "loss" in e]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_parses(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def test_train_sbatch_checkpoints_on_usr1_requeues_and_resumes(job):
    env, work, *_ = job
    log = work / "run.jsonl"
    argv = [*FAST, "--steps", "40", "--log", str(log)]
    proc = subprocess.Popen(["bash", str(ROOT / "slurm" / "train.sbatch"), *argv], cwd=work,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        while len(steps_in(log)) < 3 and proc.poll() is None and left(job) > 1:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGUSR1)           # Slurm's B:USR1 goes to the batch shell only
        out, _ = proc.communicate(timeout=left(job) / 2)   # half left for the requeued job
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    stopped = len(steps_in(log))
    assert 3 <= stopped < 40, out
    ckpt = work / "checkpoints" / "mpipar-train" / f"step-{stopped}"
    assert f"checkpoint saved to {ckpt}" in out and f"requeueing job {JOB_ID}" in out, out
    assert calls_of(job)[-1] == f"scontrol requeue {JOB_ID}", calls_of(job)
    srun = calls_of(job)[0]
    assert "--resume auto --preempt-status 75" in srun and "--ckpt-dir" in srun, srun

    again = sbatch("train.sbatch", argv, job)                  # the requeued job
    assert again.returncode == 0, again.output
    assert f"steps {stopped} -> 40" in again.output and "done: " in again.output, again.output
    assert steps_in(log) == list(range(40))                    # appended, nothing twice
    assert [c for c in calls_of(job) if c.startswith("scontrol")] == [f"scontrol requeue {JOB_ID}"]


def test_train_sbatch_passes_a_failure_on_and_does_not_requeue(job):
    res = sbatch("train.sbatch", [*FAST, "--steps", "2", "--lr", "nan"], job)
    assert res.returncode == 2, res.output
    assert "mpipar.train: error: argument --lr" in res.output
    assert not [c for c in calls_of(job) if c.startswith("scontrol")]


def test_train_gpu_sbatch_binds_one_rank_per_gpu_and_starts_training(job):
    # --device cpu after the script's --device gpu: this machine has no GPU (the last one wins)
    res = sbatch("train-gpu.sbatch", [*FAST, "--steps", "2", "--device", "cpu"], job)
    assert res.returncode == 0, res.output
    assert "done: 2 steps" in res.output, res.output
    srun = calls_of(job)[0]
    assert "--gpus-per-task=1 --cpu-bind=cores --gpu-bind=closest" in srun, srun
    assert "--device gpu" in srun, srun


def test_bench_sbatch_runs_each_benchmark(job):
    _, work, *_ = job
    res = sbatch("bench.sbatch", ["collectives", "--sizes", "1K", "--iters", "2", "--warmup", "1",
                                  "--algorithms", "ring", "--min-seconds", "0"], job)
    assert res.returncode == 0, res.output
    assert (work / f"bench-collectives-{JOB_ID}.json").exists()
    res = sbatch("bench.sbatch", ["parallel", "--model", "tiny", "--layouts", "2x1x1", "--zero", "0",
                                  "--batch-size", "4", "--block-size", "16", "--steps", "1",
                                  "--warmup", "0"], job)
    assert res.returncode == 0, res.output
    assert (work / f"bench-parallel-{JOB_ID}.json").exists()
    res = sbatch("bench.sbatch", ["nonsense"], job)
    assert res.returncode == 2 and "unknown benchmark 'nonsense'" in res.output


def test_test_sbatch_runs_the_suite_through_srun(job):
    res = sbatch("test.sbatch", ["--mpi-only", "--sizes", "2", "--timeout", "120",
                                 "tests/comm/test_background.py"], job)
    assert res.returncode == 0, res.output
    assert "mpi n=2: ok" in res.output, res.output
    assert any(c.startswith("srun -n 2 ") for c in calls_of(job)), calls_of(job)
