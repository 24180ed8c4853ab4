"""The harness itself: a failure on one rank must end the whole job quickly, naming the rank."""

import sys
from pathlib import Path

from mpipar.testing.launch import run_mpi

HERE = Path(__file__).parent


def test_exception_on_rank_3_of_4_aborts_job_naming_rank():
    job = run_mpi(4, [sys.executable, str(HERE / "mpi_scripts" / "raise_on_rank.py"), "3"], timeout=60)
    assert not job.timed_out, job.output
    assert job.seconds < 30, f"took {job.seconds:.1f} s\n{job.output}"
    assert job.returncode != 0, job.output
    assert "rank 3/4" in job.output, job.output
    assert "deliberate failure on rank 3" in job.output, job.output


def test_failing_mpi_test_on_rank_3_aborts_pytest_job_naming_rank_and_test():
    args = [sys.executable, "-m", "pytest", "-q", "--with-mpi", "-p", "no:cacheprovider",
            str(HERE / "mpi_scripts" / "rank3_fails_child.py")]
    job = run_mpi(4, args, timeout=90)
    assert not job.timed_out, job.output
    assert job.seconds < 60, f"took {job.seconds:.1f} s\n{job.output}"
    assert job.returncode != 0, job.output
    assert "rank 3/4: test" in job.output and "test_rank3_fails FAILED" in job.output, job.output
