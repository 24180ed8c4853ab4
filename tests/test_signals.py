"""Stop signals reach ``python -m mpipar.train`` as a scheduler sends them: to every rank process
of a 2-rank job (Slurm signals every task; MPICH's hydra forwards TERM, INT and USR1 to every
rank, docs/training.md). The run saves at the next step boundary and exits 0, and the command it
prints resumes it to the uninterrupted run's losses and final state, bitwise; a second signal
exits at once with 128 + its number.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpipar.data.checkpoint import load_training_checkpoint
from mpipar.data.ckpt_dir import open_checkpoint
from mpipar.testing.launch import mpi_env, mpiexec_command, run_mpi

FAST = ["--model", "tiny", "--block-size", "16", "--batch-size", "4", "--threads", "1",
        "--eval-batches", "1", "--eval-interval", "0", "--warmup", "2", "--lr", "3e-3"]
STEPS = 40           # long enough that a signal sent after step 3 lands mid-run
TIMEOUT = 120


def train_command(*argv: str, ranks: int = 2) -> list[str]:
    return mpiexec_command(ranks, [sys.executable, "-m", "mpipar.train", *FAST, *argv])


def rank_pids(launcher: int, expected: int = 2, timeout: float = 60) -> list[int]:
    """The PIDs of the training processes under ``launcher`` (mpiexec -> proxy -> ranks),
    found through /proc."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
        found, todo = [], list(children.get(launcher, []))
        while todo:
            pid = todo.pop()
            todo += children.get(pid, [])
            try:
                if b"mpipar.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                pass
        if len(found) == expected:
            return sorted(found)
        time.sleep(0.05)
    raise AssertionError(f"did not find {expected} rank processes under {launcher}")


def step_losses(path: Path) -> list[tuple[int, float]]:
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return [(e["step"], e["loss"]) for e in entries if "loss" in e]


def wait_for_steps(path: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and len(step_losses(path)) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} never had {n} steps (exit {proc.poll()})")


def interrupt(tmp_path: Path, name: str, signals: list[int], *argv: str, to_launcher: bool = False,
              ranks: int = 2) -> tuple[subprocess.CompletedProcess, Path]:
    """Start a run of ``ranks`` ranks, and after its third step send each of ``signals``
    (back to back) to every rank process (or to mpiexec); the finished job and its log."""
    log = tmp_path / f"{name}.jsonl"
    proc = subprocess.Popen(train_command("--steps", str(STEPS), "--log", str(log), *argv,
                                          ranks=ranks),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=mpi_env(), start_new_session=True)
    try:
        pids = rank_pids(proc.pid, expected=ranks)
        wait_for_steps(log, 3, proc)
        for s in signals:
            for pid in [proc.pid] if to_launcher else pids:
                os.kill(pid, s)
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out), log


def run_resume_command(output: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the ``resume with:`` command the stopped run printed, as printed (its mpiexec and
    python are this test's)."""
    line = next(ln for ln in output.splitlines() if "resume with:" in ln)
    argv = shlex.split(line.split("resume with:", 1)[1])
    assert argv[:6] == ["mpiexec", "-n", "2", "python", "-m", "mpipar.train"], argv
    res = run_mpi(2, [sys.executable, *argv[4:]], timeout=TIMEOUT, env=extra_env)
    return subprocess.CompletedProcess(argv, res.returncode, res.output)


def test_sigterm_saves_and_the_printed_command_resumes_bitwise(tmp_path):
    ref_log, ref_ck = tmp_path / "ref.jsonl", tmp_path / "ref.safetensors"
    ref = run_mpi(2, [sys.executable, "-m", "mpipar.train", *FAST, "--steps", str(STEPS),
                      "--log", str(ref_log), "--save", str(ref_ck)], timeout=TIMEOUT)
    assert ref.returncode == 0, ref.output

    final = tmp_path / "final.safetensors"
    job, log = interrupt(tmp_path, "run", [signal.SIGTERM], "--ckpt-dir", str(tmp_path / "ck"),
                         "--save", str(final))
    assert job.returncode == 0, job.stdout
    stopped = len(step_losses(log))
    assert 3 <= stopped < STEPS, job.stdout
    assert f"SIGTERM at step {stopped}: checkpoint saved to {tmp_path / 'ck' / f'step-{stopped}'}" in job.stdout, job.stdout
    assert not final.exists()                    # stopped: no end-of-run save, no final eval
    assert open_checkpoint(str(tmp_path / "ck")).step == stopped        # the sharded one, latest

    resumed = run_resume_command(job.stdout)
    assert resumed.returncode == 0, resumed.stdout
    got, want = step_losses(log), step_losses(ref_log)
    assert [s for s, _ in got] == list(range(STEPS))            # appended, nothing twice
    assert got == want                                          # bitwise
    a, b = load_training_checkpoint(str(final)), load_training_checkpoint(str(ref_ck))
    assert a.step == b.step == STEPS
    for part in ("model", "optim"):
        x, y = getattr(a, part), getattr(b, part)
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 0), (signal.SIGUSR1, 75)],
                         ids=["SIGINT", "SIGUSR1"])
def test_sigint_and_sigusr1_stop_like_sigterm_and_a_repeat_is_the_same_signal(tmp_path, signum, status):
    """Each signal sent twice at once (a process group's Ctrl-C plus the launcher's forward)
    is one request: saved once, status 0 (or ``--preempt-status``)."""
    extra = ["--preempt-status", str(status)] if status else []
    job, log = interrupt(tmp_path, "run", [signum, signum], "--ckpt-dir", str(tmp_path / "ck"), *extra)
    assert job.returncode == status, job.stdout
    name = signal.Signals(signum).name
    assert job.stdout.count(f"{name} at step {len(step_losses(log))}: checkpoint saved") == 1, job.stdout
    assert "second stop signal" not in job.stdout, job.stdout
    assert "resume with:" in job.stdout


def test_without_a_checkpoint_directory_a_signal_exits_128_plus_its_number(tmp_path):
    job, log = interrupt(tmp_path, "run", [signal.SIGTERM])
    assert job.returncode == 128 + signal.SIGTERM, job.stdout
    assert f"SIGTERM at step {len(step_losses(log))}: no --ckpt-dir, nothing saved" in job.stdout


def test_a_second_signal_exits_at_once(tmp_path):
    """The first signal arrives during a long evaluation before step 0 (the stop waits for a
    step boundary); the second, 3 s later (beyond the 1 s a repeat may take, with room for a
    loaded machine to run the first handler late), ends the job at once: status 143, one line
    per rank, no evaluation finished, nothing saved."""
    proc = subprocess.Popen(train_command("--eval-batches", "100000", "--steps", "5",   # last wins
                                          "--ckpt-dir", str(tmp_path / "ck")),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=mpi_env(), start_new_session=True)
    try:
        pids = rank_pids(proc.pid)
        assert proc.stdout is not None
        for line in proc.stdout:                 # the header: training has been set up
            if line.startswith("mpipar.train |"):
                break
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        time.sleep(3)
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "second stop signal (SIGTERM after SIGTERM): exiting at once with status 143" in out, out
    # the preflight made --ckpt-dir; nothing was saved in it
    assert "val loss" not in out and not list((tmp_path / "ck").iterdir()), out


def test_sigterm_to_mpiexec_is_forwarded_to_every_rank(tmp_path):
    """MPICH's hydra forwards TERM (and INT, USR1) to the ranks and waits for them: a clean
    stop, as if every rank had been signalled."""
    job, log = interrupt(tmp_path, "run", [signal.SIGTERM], "--ckpt-dir", str(tmp_path / "ck"),
                         to_launcher=True)
    assert job.returncode == 0, job.stdout
    assert f"SIGTERM at step {len(step_losses(log))}: checkpoint saved" in job.stdout, job.stdout


def test_a_compressed_run_stopped_and_resumed_is_the_straight_run(tmp_path):
    """``--compress topk:0.1`` at dp 2: the stop's checkpoint holds each rank's
    error-feedback residuals (they differ per rank), the printed command keeps --compress,
    and the resumed run's losses are the uninterrupted run's, bitwise. The control: the same
    resume with ``--resume-override compression`` (residuals from zero) differs, so the
    residuals are what makes it equal."""
    spec = "topk:0.1"
    ref_log = tmp_path / "ref.jsonl"
    ref = run_mpi(2, [sys.executable, "-m", "mpipar.train", *FAST, "--steps", str(STEPS),
                      "--log", str(ref_log), "--compress", spec], timeout=TIMEOUT)
    assert ref.returncode == 0, ref.output
    ck = tmp_path / "ck"
    job, log = interrupt(tmp_path, "run", [signal.SIGTERM], "--ckpt-dir", str(ck), "--compress", spec)
    assert job.returncode == 0, job.stdout
    stopped = len(step_losses(log))
    line = next(ln for ln in job.stdout.splitlines() if "resume with:" in ln)
    assert f"--compress {spec}" in line, line
    manifest = json.loads((ck / f"step-{stopped}" / "manifest.json").read_text())
    assert manifest["compression"]["scheme"] == spec and manifest["compression"]["dp"] == 2
    ckpt = open_checkpoint(str(ck))
    r0, r1 = (ckpt.compression[f"rank{r}.bucket0"] for r in (0, 1))
    assert r0.shape == r1.shape and not np.array_equal(r0, r1)        # per rank, kept
    ckpt.close()

    control_log = tmp_path / "control.jsonl"
    control = run_resume_command(line + f" --log {control_log} --ckpt-dir {tmp_path / 'ck2'} "
                                        "--resume-override compression")
    assert control.returncode == 0 and "residuals: from zero" in control.stdout, control.stdout
    resumed = run_resume_command(job.stdout)
    assert resumed.returncode == 0 and "residuals: restored" in resumed.stdout, resumed.stdout
    got, want = step_losses(log), step_losses(ref_log)
    assert [s for s, _ in got] == list(range(STEPS))
    assert got == want                                                 # bitwise
    assert step_losses(control_log) != want[stopped:]
