"""Faults of a real training job (``python -m mpipar.train`` under ``mpiexec``): a rank
stopped (SIGSTOP) is named by the hang watchdog within the collective timeout + 30 s; a rank
killed (SIGKILL) ends the job non-zero within 30 s, and the supervisor names its rank.

The ranks' pids come from ``MPIPAR_PID_DIR`` (each rank process writes ``rank<R>.pid``: under
Hydra the supervisor's child, the process that is the rank). Every job is bounded, and
whatever a test stopped is continued and killed afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpipar import train
from mpipar.testing.launch import mpi_env, mpiexec_command

LONG = ["--model", "tiny", "--block-size", "16", "--batch-size", "4", "--threads", "1",
        "--eval-batches", "1", "--eval-interval", "0", "--steps", "1000000"]
STARTED = "step 0: val loss"        # rank 0's line once training's collectives run
START_S = 180                       # generous: 5 engineers share 2 cores


class Job:
    """``mpiexec -n ranks python -m mpipar.train args``, output to a file, pids from files."""

    def __init__(self, tmp: Path, ranks: int, args: list[str]) -> None:
        self.ranks, self.pids_dir, self.log = ranks, tmp / "pids", tmp / "out.txt"
        self.pids_dir.mkdir()
        env = mpi_env({"MPIPAR_PID_DIR": str(self.pids_dir)})
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(mpiexec_command(ranks, [sys.executable, "-m", "mpipar.train", *args]),
                                         stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_started(self) -> dict[int, int]:
        """rank -> pid, once every rank wrote its pid and rank 0 trains."""
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            files = list(self.pids_dir.glob("rank*.pid"))
            if len(files) == self.ranks and STARTED in self.output():
                return {int(f.stem[4:]): int(f.read_text()) for f in files}
            assert self.proc.poll() is None, self.output()
            time.sleep(0.2)
        raise AssertionError(f"the job did not start within {START_S} s:\n{self.output()}")

    def wait_exit(self, within: float) -> float:
        """Seconds until the job ended (fails if it runs longer than ``within``)."""
        start = time.monotonic()
        try:
            self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the job still ran {within:.0f} s later:\n{self.output()}") from None
        return time.monotonic() - start

    def cleanup(self, pids: dict[int, int]) -> None:
        for pid in pids.values():
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_stopped_rank_is_named_by_the_watchdog_within_the_timeout_plus_30_s(tmp_path, ranks):
    limit = 5
    job = Job(tmp_path, ranks, LONG + ["--collective-timeout", str(limit)])
    pids: dict[int, int] = {}
    try:
        pids = job.wait_started()
        os.kill(pids[1], signal.SIGSTOP)
        job.wait_exit(within=limit + 30)
        out = job.output()
        assert job.proc.returncode != 0, out
        assert "CollectiveTimeoutError" in out and "aborting the job" in out, out
        # rank 1 is named: not reached, waited for, or without sign of life in the report
        assert re.search(r"(not reached it|waiting for rank): 1\b|rank 1: [^\n]*no sign of life", out), out
    finally:
        job.cleanup(pids)


def test_a_killed_rank_ends_the_job_within_30_s_naming_its_rank(tmp_path):
    job = Job(tmp_path, 3, LONG)
    pids: dict[int, int] = {}
    try:
        pids = job.wait_started()
        os.kill(pids[1], signal.SIGKILL)
        job.wait_exit(within=30)
        out = job.output()
        assert job.proc.returncode != 0, out
        assert f"[mpipar] rank 1 (pid {pids[1]} on host " in out and "was killed by SIGKILL" in out, out
    finally:
        job.cleanup(pids)


def test_a_bad_collective_timeout_is_refused_before_mpi_starts(capsys):
    assert train.main(["--collective-timeout", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpipar.train: error: argument --collective-timeout: '-1': must be a finite number"), err
