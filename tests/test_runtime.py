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
