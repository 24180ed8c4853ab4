"""Launch an MPI job from Python with a hard timeout, for tests and the suite runner.

Finds the launcher next to the running interpreter first (the venv's ``mpiexec`` from the
``mpich`` wheel), then on PATH, or takes ``MPIPAR_MPIEXEC``. Open MPI gets ``--oversubscribe``
(and the two variables it needs to run as root), so that 8 ranks run on a 2-core machine.
"""

from __future__ import annotations

import functools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@functools.lru_cache(maxsize=1)
def find_mpiexec() -> str:
    env = os.environ.get("MPIPAR_MPIEXEC")
    if env:
        return env
    here = Path(sys.executable).parent
    for name in ("mpiexec", "mpirun"):
        cand = here / name
        if cand.exists():
            return str(cand)
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("no mpiexec found: pip install 'mpipar[mpich]' or load your MPI module")


@functools.lru_cache(maxsize=1)
def is_open_mpi() -> bool:
    try:
        out = subprocess.run([find_mpiexec(), "--version"], capture_output=True, text=True, timeout=30)
        return "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout + out.stderr
    except Exception:
        return False


def mpiexec_command(n: int, args: Sequence[str]) -> list[str]:
    cmd = [find_mpiexec(), "-n", str(n)]
    if is_open_mpi():
        cmd.append("--oversubscribe")
    return cmd + list(args)


def mpi_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MPI4PY_RC_THREAD_LEVEL", "serialized")
    env.setdefault("OMP_NUM_THREADS", "1")  # 8 ranks on 2 cores: no BLAS thread storms
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    # Oversubscribed (8 ranks on 2 cores), MPICH's shared-memory device collectives, which it
    # switches to after a few calls, stall: a 3.4 MB all-reduce took 4-12 s instead of 0.05 s.
    # Tests test correctness, so they use MPICH's generic algorithms; benchmarks do not set this.
    env.setdefault("MPIR_CVAR_DEVICE_COLLECTIVES", "none")
    if is_open_mpi():
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.update(extra or {})
    return env


@dataclass
class JobResult:
    returncode: int
    output: str
    seconds: float
    timed_out: bool


def run_mpi(n: int, args: Sequence[str], timeout: float, env: dict[str, str] | None = None,
            cwd: str | None = None, stream: bool = False) -> JobResult:
    """Run ``mpiexec -n n args...`` with the suite's MPI settings (``mpi_env``); see
    ``run_command``."""
    return run_command(mpiexec_command(n, args), timeout, mpi_env(env), cwd, stream)


def run_command(cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None,
                cwd: str | None = None, stream: bool = False) -> JobResult:
    """Run ``cmd`` in a session of its own; kill its whole process group after ``timeout``
    seconds.

    stdout and stderr are merged; with ``stream`` they are also echoed as they arrive. The
    group kill matters for launchers (a batch script, ``mpiexec``): ``subprocess.run``'s
    timeout kills only the direct child, then waits for the pipe to close, which a grandchild
    still holding it (the launcher under a script) can keep open for as long as it runs.
    Hydra's proxies run in sessions of their own, but tear their ranks down once ``mpiexec``
    is gone.
    """
    cmd = list(cmd)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=cwd, start_new_session=True)
    chunks: list[str] = []
    timed_out = False
    try:
        if stream:
            assert proc.stdout is not None
            deadline = start + timeout
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise subprocess.TimeoutExpired(cmd, timeout)
                if sel.select(timeout=min(remaining, 1.0)):
                    line = proc.stdout.readline()
                    if not line:
                        break
                    chunks.append(line)
                    sys.stdout.write(line)
                    sys.stdout.flush()
                elif proc.poll() is not None:
                    rest = proc.stdout.read()
                    chunks.append(rest)
                    sys.stdout.write(rest)
                    break
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        else:
            out, _ = proc.communicate(timeout=timeout)
            chunks.append(out)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        chunks.append(out or "")
        chunks.append(f"\n[mpipar.testing] TIMEOUT: `{' '.join(cmd)}` killed after {timeout:.0f} s\n")
    return JobResult(proc.returncode if not timed_out else 124, "".join(chunks),
                     time.monotonic() - start, timed_out)
