"""mpipar.runtime: a rank waits for the launcher to read its last words before it aborts;
under Hydra a supervisor names a rank that dies, passes signals on, and takes the rank with it."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mpipar.runtime import death_message, unread_bytes, wait_until_output_read


def test_unread_bytes_counts_what_a_pipe_holds_and_is_zero_for_files(tmp_path):
    r, w = os.pipe()
    try:
        assert unread_bytes(w) == 0
        os.write(w, b"x" * 79)
        assert unread_bytes(w) == 79
        assert unread_bytes(r) == 79  # either end of the pipe sees the same queue
        os.read(r, 50)
        assert unread_bytes(w) == 29
    finally:
        os.close(r)
        os.close(w)
    with open(tmp_path / "f", "w") as f:
        f.write("not a pipe")
        f.flush()
        assert unread_bytes(f.fileno()) == 0
    assert unread_bytes(10_000) == 0  # not an open descriptor: nothing to wait for


def test_wait_gives_up_when_nobody_reads_and_returns_once_the_reader_has_read():
    r, w = os.pipe()
    try:
        os.write(w, b"[mpipar] rank 3/4: uncaught exception\n")
        assert wait_until_output_read(timeout=0.05, fds=(w,)) is False
        assert unread_bytes(w) > 0  # waiting never reads the pipe itself

        reader = threading.Timer(0.02, lambda: os.read(r, 4096))
        reader.start()
        assert wait_until_output_read(timeout=30, fds=(w,)) is True
        reader.join()
        assert unread_bytes(w) == 0
    finally:
        os.close(r)
        os.close(w)


# ---------------------------------------------------------------------------- Progress
PROGRESS_RUN = ["-m", "mpipar.train", "--model", "tiny", "--block-size", "16", "--batch-size", "4",
                "--eval-batches", "1", "--eval-interval", "0", "--steps", "6"]


def _on_a_terminal(argv: list[str], timeout: float = 120, columns: int = 0) -> tuple[int, str]:
    """Run ``python argv`` with stdout and stderr a pseudo-terminal (``columns`` wide, 0: no
    width set); (exit code, output)."""
    import fcntl
    import pty
    import select
    import struct
    import subprocess
    import sys
    import termios
    import time

    master, slave = pty.openpty()
    if columns:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, *argv], stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:                      # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return rc, b"".join(chunks).decode(errors="replace")


def test_progress_is_a_tqdm_bar_on_a_terminal():
    """On a new pseudo-terminal (no width set: the bar is 80 columns) and on one 120 wide."""
    rc, out = _on_a_terminal(PROGRESS_RUN, columns=120)
    assert rc == 0, out
    assert max(len(part) for line in out.split("\n") for part in line.split("\r")
               if "6/6 [" in part) > 80                          # the terminal's width is used
    rc, out = _on_a_terminal(PROGRESS_RUN)
    assert rc == 0, out
    assert "\r" in out and "6/6 [" in out and ("step/s" in out or "s/step" in out), out
    assert "loss " in out and "tok/s" in out                      # the bar's postfix
    assert "step      6/6 |" not in out                           # no plain lines as well


def test_progress_is_plain_lines_on_a_terminal_without_tqdm():
    code = ("import sys, runpy; sys.modules['tqdm'] = None; "
            f"sys.argv = ['mpipar.train'] + {PROGRESS_RUN[2:]!r}; "
            "runpy.run_module('mpipar.train', run_name='__main__')")
    rc, out = _on_a_terminal(["-c", code])
    assert rc == 0, out
    assert "step      6/6 | loss" in out and "6/6 [" not in out, out


def test_progress_is_plain_lines_when_piped():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, *PROGRESS_RUN], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("step ")]
    assert [line.split("|")[0].split()[1] for line in lines if "/6" in line] == [f"{k}/6" for k in range(1, 7)]
    assert "\r" not in res.stdout and "step/s" not in res.stdout + res.stderr
def test_stop_request_first_signal_sets_the_flag_a_repeat_is_the_same_a_later_one_exits():
    import signal

    from mpipar.runtime import StopRequest

    now, exits = [100.0], []
    stop = StopRequest(clock=lambda: now[0], exit=exits.append)
    assert stop.signum == 0 and stop.name == ""
    stop.handle(signal.SIGUSR1)
    assert stop.signum == signal.SIGUSR1 and stop.name == "SIGUSR1"
    now[0] += 0.9                       # forwarded again by the launcher: the same request
    stop.handle(signal.SIGINT)
    assert exits == [] and stop.signum == signal.SIGUSR1
    now[0] += 0.2                       # 1.1 s after the first: "now"
    stop.handle(signal.SIGTERM)
    assert exits == [128 + signal.SIGTERM]


def test_stop_request_installs_and_restores_the_handlers():
    import os
    import signal

    from mpipar.runtime import STOP_SIGNALS, StopRequest

    import time

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    wakeup_before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_before)
    with StopRequest() as stop:
        assert all(signal.getsignal(s) not in before.values() for s in STOP_SIGNALS)
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 30              # the watcher thread takes it
        while stop.signum == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert stop.signum == signal.SIGUSR1
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
    assert signal.set_wakeup_fd(wakeup_before) == wakeup_before


def test_importing_the_library_installs_no_signal_handler():
    import subprocess
    import sys

    code = ("import signal, mpipar.train, mpipar.runtime; "
            "print(all(signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler) "
            "for s in mpipar.runtime.STOP_SIGNALS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr


def test_a_second_signal_ends_a_rank_blocked_inside_mpi():
    """Rank 1 waits in MPI_Recv for a message that never comes (Python runs no handler until
    such a call returns); its second TERM, 3 s after the first, still ends it with 143, and
    the launcher ends the job."""
    import signal
    import subprocess
    import sys
    import time

    from mpipar.testing.launch import mpi_env, mpiexec_command

    code = ("import os, sys, time, numpy as np; from mpi4py import MPI; "
            "from mpipar.runtime import StopRequest; stop = StopRequest().install(); "
            "c = MPI.COMM_WORLD; print('ready', c.rank, os.getpid(), flush=True); "
            "c.Recv(np.zeros(1), source=0) if c.rank == 1 else time.sleep(120)")
    proc = subprocess.Popen(mpiexec_command(2, [sys.executable, "-c", code]), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=mpi_env(), start_new_session=True)
    lines: list[str] = []       # read by a thread, so that a launcher that never starts the
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)                 # ranks fails here, not at pytest's 300 s
    reader.start()
    try:
        deadline, pid = time.monotonic() + 60, None
        while pid is None and time.monotonic() < deadline and proc.poll() is None:
            pid = next((int(l.split()[2]) for l in list(lines) if l.startswith("ready 1 ")), None)
            time.sleep(0.05)
        assert pid is not None, f"rank 1 never said it was ready in 60 s: {''.join(lines)!r}"
        time.sleep(0.5)                                    # inside MPI_Recv by now
        os.kill(pid, signal.SIGTERM)
        time.sleep(3)
        os.kill(pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 143, out
    assert "rank 1: second stop signal (SIGTERM after SIGTERM): exiting at once with status 143" in out


# ---------------------------------------------------------------------------- the supervisor
# A rank as Hydra starts one (its variables faked): supervise(), then what argv[1] says.
RANK = """
import os, signal, sys, time
from mpipar import runtime
runtime.supervise()
what = sys.argv[1]
if what == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if what == "exit":
    sys.exit(3)
if what == "usr1":
    signal.signal(signal.SIGUSR1, lambda *a: sys.exit(0))
    open(os.path.join(os.environ["MPIPAR_PID_DIR"], "ready"), "w").close()
time.sleep(120)
"""


def _rank(tmp_path, what: str, **env: str) -> subprocess.Popen:
    full = {**os.environ, "PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALNRANKS": "8",
            "MPIPAR_PID_DIR": str(tmp_path), **env}
    return subprocess.Popen([sys.executable, "-c", RANK, what], env=full, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _pid_of_rank(tmp_path, name: str = "rank5.pid") -> int:
    deadline = time.monotonic() + 60
    while not (tmp_path / name).exists():
        assert time.monotonic() < deadline, "the rank never wrote its pid"
        time.sleep(0.05)
    return int((tmp_path / "rank5.pid").read_text())


def test_the_supervisor_names_a_killed_rank_and_exits_with_128_plus_the_signal(tmp_path):
    proc = _rank(tmp_path, "kill")
    _, err = proc.communicate(timeout=60)
    child = int((tmp_path / "rank5.pid").read_text())
    assert child != proc.pid                        # the rank is the supervisor's child
    assert err.strip().endswith(f"[mpipar] rank 5 (pid {child} on host {os.uname().nodename}) "
                                "was killed by SIGKILL"), err
    assert proc.returncode == 128 + signal.SIGKILL


def test_the_supervisor_passes_on_an_exit_status(tmp_path):
    proc = _rank(tmp_path, "exit")
    _, err = proc.communicate(timeout=60)
    assert "[mpipar] rank 5" not in err, err       # the rank speaks for its own exit
    assert proc.returncode == 3


def test_the_supervisor_forwards_signals_and_is_silent_on_success(tmp_path):
    proc = _rank(tmp_path, "usr1")
    _pid_of_rank(tmp_path, "ready")
    os.kill(proc.pid, signal.SIGUSR1)               # to the supervisor only: it forwards
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "[mpipar]" not in err, err


def test_the_rank_dies_with_its_supervisor(tmp_path):
    proc = _rank(tmp_path, "sleep")
    child = _pid_of_rank(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)               # as Hydra ends a job: no handler runs
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while _alive(child):
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the rank outlived its supervisor")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"   # a zombie is dead
    except FileNotFoundError:
        return False


def test_no_supervisor_outside_hydra_or_when_disabled(tmp_path):
    proc = _rank(tmp_path, "exit", MPIPAR_SUPERVISE="0")
    _, err = proc.communicate(timeout=60)
    assert int((tmp_path / "rank5.pid").read_text()) == proc.pid and "[mpipar]" not in err, err
    assert proc.returncode == 3


def test_death_message_names_a_signal_and_says_nothing_for_an_exit():
    assert death_message(2, 77, 9).endswith("rank 2 (pid 77 on host " + os.uname().nodename + ") was killed by SIGKILL")
    assert death_message(2, 77, 1 << 8) is None
    assert death_message(2, 77, 0) is None
