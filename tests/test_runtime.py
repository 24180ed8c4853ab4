"""mpipar.runtime: a rank waits for the launcher to read its last words before it aborts."""

import os
import threading

from mpipar.runtime import unread_bytes, wait_until_output_read


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

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with StopRequest() as stop:
        assert all(signal.getsignal(s) == stop.handle for s in STOP_SIGNALS)
        os.kill(os.getpid(), signal.SIGUSR1)            # delivered to this (main) thread
        assert stop.signum == signal.SIGUSR1
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def test_importing_the_library_installs_no_signal_handler():
    import subprocess
    import sys

    code = ("import signal, mpipar.train, mpipar.runtime; "
            "print(all(signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler) "
            "for s in mpipar.runtime.STOP_SIGNALS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
