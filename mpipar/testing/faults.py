"""python -m mpipar.testing.faults: the fault table, each fault tried on real jobs.

    python -m mpipar.testing.faults [--out DIR]      # about 2 minutes on 2 cores

Every row starts real ``python -m mpipar.train`` jobs (tiny model) under ``mpiexec``, does
something bad to them (a signal to the ranks or the launcher, a stopped or killed rank, a
damaged checkpoint, an output path that cannot be written, numbers that overflow), and
records how long the job took to end after it, its exit status, the lines it said about it
and what it kept in its checkpoint directory. It prints a Markdown table
(docs/results/production.md). The assertions live in the tests (tests/test_signals.py,
tests/test_faults.py, tests/test_train_ckpt.py, tests/test_numerics.py); this is the
measurement a person reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from mpipar.data.checkpoint import array_sha256
from mpipar.testing.launch import mpi_env, mpiexec_command

FAST = ["-m", "mpipar.train", "--model", "tiny", "--block-size", "32", "--batch-size", "4",
        "--eval-interval", "0", "--eval-batches", "2"]
HANG = str(Path(__file__).resolve().parents[2] / "tests" / "mpi_scripts" / "hang.py")
TIMEOUT = 300


class Table:
    """The rows, and the scratch directory the jobs run in."""

    def __init__(self, work: Path) -> None:
        self.work, self.rows = work, []

    def command(self, n: int, args: list[str]) -> list[str]:
        return mpiexec_command(n, [sys.executable, *args])

    def start(self, n: int, args: list[str], tag: str) -> tuple[subprocess.Popen, Path]:
        pid_dir = self.work / f"pids-{tag}"
        pid_dir.mkdir()
        env = mpi_env({"MPIPAR_PID_DIR": str(pid_dir)})
        proc = subprocess.Popen(self.command(n, [*FAST, *args]), cwd=self.work, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        return proc, pid_dir

    def strike(self, n: int, args: list[str], tag: str, log: Path, after_steps: int,
               hit: Callable[[subprocess.Popen, dict[int, int]], None]) -> tuple[float, int, str]:
        """Start a job, let it log ``after_steps`` steps, ``hit(proc, rank pids)`` it, and
        return (seconds from the hit to the job's end, exit status, output)."""
        proc, pid_dir = self.start(n, args, tag)
        ranks = rank_pids(pid_dir, n)
        wait_for_steps(log, after_steps)
        t0 = time.monotonic()
        hit(proc, ranks)
        return finish(proc, t0)

    def run(self, n: int, args: list[str]) -> tuple[float, int, str]:
        t0 = time.monotonic()
        r = subprocess.run(self.command(n, args), cwd=self.work, env=mpi_env(), text=True,
                           capture_output=True, timeout=TIMEOUT)
        return time.monotonic() - t0, r.returncode, r.stdout + r.stderr

    def add(self, fault: str, seconds: float, status: int, said: str, kept: str) -> None:
        self.rows.append((fault, f"{seconds:.1f} s", status, said, kept))
        print(f"  {fault}: status {status} after {seconds:.1f} s", file=sys.stderr, flush=True)

    def markdown(self) -> str:
        out = ["| fault | time to exit | status | what it said | kept |", "|---|---|---|---|---|"]
        for fault, dt, rc, said, kept in self.rows:
            out.append(f"| {fault} | {dt} | {rc} | {said.replace('|', '/')} | {kept} |")
        return "\n".join(out)


def rank_pids(pid_dir: Path, n: int) -> dict[int, int]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        got = {int(f.stem[4:]): int(t) for f in pid_dir.glob("rank*.pid")
               if (t := f.read_text().strip())}
        if len(got) == n:
            return got
        time.sleep(0.05)
    raise RuntimeError(f"the ranks' pid files did not appear in {pid_dir}")


def wait_for_steps(log: Path, k: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if log.exists() and sum('"loss"' in ln for ln in log.read_text().splitlines()) >= k:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{log}: {k} steps never came")


def finish(proc: subprocess.Popen, t0: float) -> tuple[float, int, str]:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0] + "\n(killed by the fault runner: no end in time)"
    return time.monotonic() - t0, proc.returncode, out


def said(out: str, *keys: str, most: int = 2) -> str:
    """The first lines of ``out`` that contain any of ``keys``, as code spans."""
    lines = [ln.strip() for ln in out.splitlines() if any(k in ln for k in keys)]
    return " / ".join(f"`{ln}`" for ln in lines[:most]) or "-"


def contents(d: Path) -> str:
    """What the checkpoint directory ``d`` holds."""
    names = sorted(x.name for x in d.iterdir()) if d.exists() else []
    return ", ".join(names) or "nothing"


def losses(log: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in map(json.loads, log.read_text().splitlines()) if "loss" in e]


def signals(t: Table) -> None:
    w = t.work
    ref = w / "ref.jsonl"
    t.run(2, [*FAST, "--dp", "2", "--steps", "200", "--log", str(ref)])
    ck, log = w / "ck-term", w / "term.jsonl"
    dt, rc, out = t.strike(2, ["--dp", "2", "--steps", "200", "--ckpt-dir", str(ck),
                               "--ckpt-every", "50", "--log", str(log)], "term", log, 60,
                           lambda proc, ranks: signal_all(ranks, signal.SIGTERM))
    t.add("SIGTERM to both ranks mid-run (dp 2)", dt, rc, said(out, "SIGTERM at"), contents(ck))
    dt, rc, out = t.run(2, [*FAST, "--dp", "2", "--steps", "200", "--ckpt-dir", str(ck),
                            "--log", str(log), "--resume", "auto"])
    t.add("... then the same command with `--resume auto` (whole run)", dt, rc,
          said(out, "resuming from", most=1),
          f"per-step losses of steps 0-199 equal to an uninterrupted run's bitwise: "
          f"{losses(log) == losses(ref)}")
    for what, sig, extra, to_launcher in (
            ("SIGTERM to mpiexec", signal.SIGTERM, [], True),
            ("SIGUSR1 (`sbatch --signal`) to both ranks, `--pp 2 --preempt-status 75`",
             signal.SIGUSR1, ["--pp", "2", "--preempt-status", "75"], False),
            ("SIGINT to both ranks, no `--ckpt-dir`", signal.SIGINT, ["--dp", "2"], False)):
        tag = f"sig{len(t.rows)}"
        ck, log = w / f"ck-{tag}", w / f"{tag}.jsonl"
        keep = [] if "no `--ckpt-dir`" in what else ["--ckpt-dir", str(ck)]
        dt, rc, out = t.strike(
            2, [*(extra or ["--dp", "2"]), "--steps", "300", *keep, "--log", str(log)], tag, log, 30,
            lambda proc, ranks, sig=sig, to_launcher=to_launcher:
                signal_all({0: proc.pid} if to_launcher else ranks, sig))
        t.add(what, dt, rc, said(out, "at step"), contents(ck))
    ck = w / "ck-second"
    proc, pid_dir = t.start(2, ["--dp", "2", "--steps", "5", "--eval-batches", "100000",
                                "--ckpt-dir", str(ck)], "second")
    ranks = rank_pids(pid_dir, 2)
    time.sleep(3)
    signal_all(ranks, signal.SIGTERM)
    time.sleep(2.5)
    t0 = time.monotonic()
    signal_all(ranks, signal.SIGTERM)
    dt, rc, out = finish(proc, t0)
    t.add("a second SIGTERM 2.5 s after the first (the first waits for a step boundary)", dt, rc,
          said(out, "second stop signal", most=1), contents(ck))


def dead_and_stalled(t: Table) -> None:
    w = t.work
    ck, log = w / "ck-kill", w / "kill.jsonl"
    dt, rc, out = t.strike(3, ["--pp", "3", "--steps", "400", "--ckpt-dir", str(ck),
                               "--ckpt-every", "20", "--log", str(log)], "kill", log, 30,
                           lambda proc, ranks: os.kill(ranks[1], signal.SIGKILL))
    t.add("SIGKILL of rank 1 (3 ranks, pp 3)", dt, rc, said(out, "was killed"), contents(ck))
    for n, layout in ((2, ["--dp", "2"]), (3, ["--pp", "3"])):
        ck, log = w / f"ck-stop{n}", w / f"stop{n}.jsonl"
        stopped: list[int] = []

        def stop(proc: subprocess.Popen, ranks: dict[int, int]) -> None:
            stopped.append(ranks[1])
            os.kill(ranks[1], signal.SIGSTOP)

        dt, rc, out = t.strike(n, [*layout, "--steps", "400", "--ckpt-dir", str(ck),
                                   "--ckpt-every", "20", "--log", str(log),
                                   "--collective-timeout", "5"], f"stop{n}", log, 30, stop)
        with_suppressed_lookup(lambda: os.kill(stopped[0], signal.SIGKILL))
        t.add(f"SIGSTOP of rank 1 ({n} ranks, {' '.join(layout)}), `--collective-timeout 5`",
              dt, rc, said(out, "CollectiveTimeoutError:", "has not reached", most=2), contents(ck))
    dt, rc, out = t.run(2, [HANG, "mismatch", "3"])
    t.add("mismatched collective (rank 0 all-reduces, rank 1 broadcasts), timeout 3 s, no "
          "`MPIPAR_DEBUG`", dt, rc, said(out, "CollectiveTimeoutError:", "instead"), "-")


def signal_all(pids: dict[int, int], sig: int) -> None:
    for pid in pids.values():
        os.kill(pid, sig)


def with_suppressed_lookup(fn: Callable[[], None]) -> None:
    try:
        fn()
    except ProcessLookupError:
        pass


def damaged(t: Table) -> None:
    """Resume from copies of a 2-rank checkpoint directory, each damaged one way."""
    w = t.work
    base = w / "ck-term"                     # signals() left step-50 and a later one there

    def newest(d: Path) -> Path:
        return d / (d / "latest").read_text().strip()

    def flip(d: Path) -> None:
        f = sorted(newest(d).glob("rank*"))[0]
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))

    def truncate(d: Path) -> None:
        f = sorted(newest(d).glob("rank*"))[-1]
        f.write_bytes(f.read_bytes()[:1000])

    def remove(d: Path) -> None:
        sorted(newest(d).glob("rank*"))[-1].unlink()

    def nan(d: Path) -> None:
        """A NaN with every checksum made to match: only the value check can find it."""
        from safetensors.numpy import load_file, save_file   # noqa: PLC0415 (optional)

        step = newest(d)
        f = sorted(step.glob("rank*"))[0]
        arrays = load_file(str(f))
        key = next(k for k in arrays if "c_attn.weight" in k)
        arrays[key] = arrays[key].copy()
        arrays[key].flat[0] = float("nan")
        save_file(arrays, str(f))
        manifest = json.loads((step / "manifest.json").read_text())
        entry = manifest["files"][f.name]
        entry["sha256"], entry["bytes"] = hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_size
        for piece in entry["pieces"]:
            if piece["key"] == key:
                piece["sha256"] = array_sha256(arrays[key])
        (step / "manifest.json").write_text(json.dumps(manifest))

    for what, damage, extra in (("a flipped byte in a shard of the newest checkpoint", flip, []),
                                ("a truncated shard", truncate, []),
                                ("a missing shard", remove, []),
                                ("a NaN in a tensor, checksums made to match", nan, []),
                                ("a changed `--seed` on resume", lambda d: None, ["--seed", "1"])):
        d = w / f"damaged-{len(t.rows)}"
        shutil.copytree(base, d)
        damage(d)
        dt, rc, out = t.run(2, [*FAST, "--dp", "2", "--steps", "300", "--resume", str(d), *extra])
        t.add(what, dt, rc, said(out, "error:", most=1).replace(str(d), "CK"),
              f"CK: {contents(d)}, the older one resumable")


def refused_before_step_0(t: Table) -> None:
    for what, extra in (("`--ckpt-dir` not writable (/proc/sys)", ["--ckpt-dir", "/proc/sys"]),
                        ("`--log` in a missing directory", ["--log", "/nonexistent/x.jsonl"]),
                        ("`--trace` in a missing directory", ["--trace", "/nonexistent/t.json"])):
        dt, rc, out = t.run(2, [*FAST, "--dp", "2", "--steps", "5", *extra])
        t.add(what, dt, rc, said(out, "error:", most=1),
              "nothing trained" if "step 0:" not in out else "TRAINED")
    ck = t.work / "ck-nan"
    dt, rc, out = t.run(2, [*FAST, "--dp", "2", "--steps", "20", "--lr", "1e30",
                            "--ckpt-dir", str(ck), "--ckpt-every", "1"])
    t.add("`--lr 1e30` (gradients overflow), dp 2, a checkpoint every step", dt, rc,
          said(out, "stopped:", most=1), contents(ck))


def crash_mid_save(t: Table) -> None:
    ck, log = t.work / "ck-crash", t.work / "crash.jsonl"
    proc, pid_dir = t.start(2, ["--dp", "2", "--steps", "400", "--ckpt-dir", str(ck),
                                "--ckpt-every", "1", "--log", str(log)], "crash")
    rank_pids(pid_dir, 2)
    wait_for_steps(log, 20)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(x.name.startswith(".tmp") for x in ck.iterdir()):
        pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    left = contents(ck)
    dt, rc, out = t.run(2, [*FAST, "--dp", "2", "--steps", "400", "--ckpt-dir", str(ck),
                            "--log", str(log), "--resume", "auto"])
    t.add(f"SIGKILL of the whole job while it saves (left: {left}), then `--resume auto`",
          dt, rc, said(out, "removed what", "resuming from"), contents(ck))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.testing.faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="scratch directory (default: a new one in /tmp)")
    args = p.parse_args(argv)
    work = Path(args.out or f"/tmp/mpipar-faults-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    table = Table(work)
    for part in (signals, dead_and_stalled, damaged, refused_before_step_0, crash_mid_save):
        part(table)
    print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
