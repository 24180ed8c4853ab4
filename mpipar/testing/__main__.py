"""python -m mpipar.testing [--sizes 1,2,3,4,8] [--timeout S] [pytest args...]

Runs the whole test suite: first the serial tests (``-m "not mpi"``), then the MPI tests
(``-m mpi``, pytest-mpi's ``--with-mpi``) under ``mpiexec -n N`` for each world size.
Each launch has a hard timeout; a failing rank aborts its job at once (tests/conftest.py).
Exits non-zero if any part failed, and prints one summary line per part plus a closing
``N passed, N failed`` line over all parts. The summary also names each failed test (pytest's
``FAILED``/``ERROR`` lines), and for a part that ended before pytest could count (a launch
timed out or a process died) the last lines it printed: a CI log is often read from its end.

The serial tests time out by SIGALRM (``--timeout-method=signal``): a test that hangs fails on
its own and the rest still run. MPI tests keep the ini's thread method, which also ends a rank
stuck inside an MPI call (that a signal handler could not interrupt) and so the whole job.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

from mpipar.testing.launch import run_mpi

_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected)")


def _counts(output: str) -> dict[str, int]:
    """pytest's closing counts, from the last summary line of ``output``."""
    lines = [ln for ln in output.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    found: dict[str, int] = {}
    if lines:
        for num, what in _COUNT.findall(lines[-1]):
            found[what.rstrip("s") if what.startswith("error") else what] = int(num)
    return found


def _failures(output: str) -> list[str]:
    """pytest's ``FAILED tests/...`` and ``ERROR tests/...`` lines in ``output``, each once."""
    seen: dict[str, None] = {}
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            seen.setdefault(line.rstrip(), None)
    return list(seen)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpipar.testing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2,3,4,8", help="MPI world sizes (comma separated)")
    ap.add_argument("--timeout", type=float, default=1800,
                    help="seconds per MPI launch (a guard against a hang that pytest's per-test "
                         "timeout cannot end; a whole world size takes 10-15 minutes at 8 ranks here)")
    ap.add_argument("--serial-only", action="store_true")
    ap.add_argument("--mpi-only", action="store_true")
    args, pytest_args = ap.parse_known_args(argv)
    paths = [a for a in pytest_args if not a.startswith("-")] or ["tests"]
    flags = [a for a in pytest_args if a.startswith("-")]

    results: list[tuple[str, int, dict[str, int], float, str]] = []
    if not args.mpi_only:
        start = time.monotonic()
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not mpi", "--timeout-method=signal",
               *flags, *paths]
        print(f"== serial tests: {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sys.stdout.write(proc.stdout)
        rc = proc.returncode if proc.returncode != 5 else 0  # 5: nothing collected
        results.append(("serial", rc, _counts(proc.stdout), time.monotonic() - start, proc.stdout))
    if not args.serial_only:
        for n in [int(s) for s in args.sizes.split(",") if s]:
            # -p no:cacheprovider: ranks must not race on .pytest_cache
            cmd = [sys.executable, "-m", "mpipar.testing.rank0_output", "-q", "--with-mpi", "-m", "mpi",
                   "-p", "no:cacheprovider", *flags, *paths]
            print(f"== MPI tests at world size {n}: mpiexec -n {n} {' '.join(cmd)}", flush=True)
            job = run_mpi(n, cmd, timeout=args.timeout, stream=True)
            rc = job.returncode if job.returncode != 5 else 0
            results.append((f"mpi n={n}", rc, _counts(job.output), job.seconds, job.output))

    print("\n== summary")
    total_pass = total_fail = total_skip = 0
    details: list[str] = []
    for name, rc, counts, secs, output in results:
        failed = counts.get("failed", 0) + counts.get("error", 0)
        if rc and not failed:  # aborted or timed out before pytest could count: one failure
            failed = 1
            tail = output.splitlines()[-40:]
            details += [f"-- {name} ended before pytest counted (exit {rc}); its last lines:",
                        *("   " + ln for ln in tail)]
        details += [f"-- {name}: {ln}" for ln in _failures(output)]
        total_pass += counts.get("passed", 0)
        total_fail += failed
        total_skip += counts.get("skipped", 0)
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        print(f"{name:>10}: {status:<18} {counts.get('passed', 0)} passed, {failed} failed, "
              f"{counts.get('skipped', 0)} skipped in {secs:.0f} s")
    print(f"{total_pass} passed, {total_fail} failed, {total_skip} skipped")
    if details:
        print("\n".join(details))
    return 0 if all(rc == 0 for _, rc, *_ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
