"""The hang watchdog (mpipar/comm/watchdog.py): the poll loop's deadline and back-off, the
progress board's bookkeeping, the report it gives, and hung jobs that end naming the
operation, the group, its sequence number and the ranks that had not reached it."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpipar.comm import watchdog
from mpipar.comm.watchdog import HEADER, SLOT, SLOTS, CollectiveTimeoutError
from mpipar.testing.launch import run_mpi

SCRIPTS = Path(__file__).resolve().parent.parent / "mpi_scripts"


@pytest.fixture
def timeout_setting():
    """Restores the process's collective timeout after a test that sets it."""
    yield watchdog.set_timeout
    watchdog.set_timeout(None)


# ---------------------------------------------------------------------------- the setting
def test_timeout_defaults_to_300_s_and_reads_the_environment_once(monkeypatch, timeout_setting):
    monkeypatch.delenv(watchdog.ENV, raising=False)
    timeout_setting(None)
    assert watchdog.get_timeout() == watchdog.DEFAULT_TIMEOUT == 300.0
    monkeypatch.setenv(watchdog.ENV, "12.5")
    timeout_setting(None)
    assert watchdog.get_timeout() == 12.5
    timeout_setting(0)
    assert watchdog.get_timeout() == 0.0          # set_timeout wins over the environment


@pytest.mark.parametrize("text", ["soon", "-1", "inf", "nan"])
def test_a_bad_environment_value_is_an_error_naming_the_variable(monkeypatch, timeout_setting, text):
    monkeypatch.setenv(watchdog.ENV, text)
    timeout_setting(None)
    with pytest.raises(ValueError, match=watchdog.ENV):
        watchdog.get_timeout()


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan")])
def test_set_timeout_refuses_what_is_not_a_finite_number_of_seconds(value):
    with pytest.raises(ValueError, match="collective timeout"):
        watchdog.set_timeout(value)


# ---------------------------------------------------------------------------- the poll loop
def test_wait_raises_after_the_deadline_naming_what_it_waited_for(timeout_setting):
    timeout_setting(0.2)
    start = time.perf_counter()
    with pytest.raises(CollectiveTimeoutError, match=r"MPI_Barrier timed out .* after 0\.2 s .*0\.2 s"):
        watchdog.wait(lambda: False, "MPI_Barrier")
    assert time.perf_counter() - start >= 0.2     # never before the deadline


def test_wait_returns_once_the_test_passes_and_0_means_no_deadline(timeout_setting, monkeypatch):
    timeout_setting(0)
    monkeypatch.setattr(watchdog, "SPIN_S", 0.0)
    polls = iter(range(60))
    watchdog.wait(lambda: next(polls) == 50)      # slept between polls, never gave up
    assert next(polls) == 51


def test_wait_spins_then_sleeps_growing_intervals_capped(timeout_setting, monkeypatch):
    timeout_setting(0)
    sleeps: list[float] = []
    clock = iter(np.arange(0.0, 100.0, 0.05))     # each poll 50 ms later: a long wait
    monkeypatch.setattr(watchdog.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(watchdog.time, "sleep", sleeps.append)
    polls = iter(range(1000))
    watchdog.wait(lambda: next(polls) == 500)
    assert sleeps, "a long wait must sleep"
    assert sleeps == sorted(sleeps)               # growing ...
    assert max(sleeps) == watchdog.SLEEP_CAP_S    # ... to the cap
    elapsed = np.arange(1, len(sleeps) + 1) * 0.05
    assert np.all(np.array(sleeps) <= elapsed * watchdog.SLEEP_FRACTION + 1e-12)  # <= 1% of the wait


# ---------------------------------------------------------------------------- the report
def _row(beat_ns: int, *slots: tuple[int, int, int, int]) -> list[int]:
    row = [0] * (HEADER + SLOT * SLOTS)
    row[0], row[1] = 1234, beat_ns
    for i, s in enumerate(slots):
        row[HEADER + SLOT * i: HEADER + SLOT * (i + 1)] = list(s)
    return row


NOW = 1_000 * 10**9
AR, BC = watchdog.OP_CODES["allreduce"], watchdog.OP_CODES["broadcast"]


@pytest.mark.parametrize("row, behind, words", [
    (None, True, "no answer"),
    (_row(NOW, (77, 56, AR, -(NOW - 61 * 10**9))), True, "has not reached it; last in allreduce #56 on [0..3], left it 61.0 s ago"),
    (_row(NOW, (77, 57, BC, NOW - 10**9)), True, "called broadcast #57 instead"),
    (_row(NOW - 30 * 10**9, (77, 57, AR, NOW - 30 * 10**9)), True, "in it, not progressing; no sign of life for 30.0 s"),
    (_row(NOW, (77, 57, AR, NOW - 10**9)), False, "in allreduce #57 on [0..3] for 1.0 s"),
    (_row(NOW, (78, 3, AR, NOW)), True, "not on the board for this group"),
])
def test_a_peer_line_says_whether_it_had_reached_the_collective(row, behind, words):
    line, late = watchdog._peer_line(3, row, 77, 57, "allreduce", {77: (0, 1, 2, 3)}, NOW, 2.0)
    assert line.startswith("rank 3: ") and words in line, line
    assert late is behind


def test_group_ids_differ_by_members_and_by_how_many_were_made_before():
    a = watchdog.group_id([0, 1, 2, 3], 0)
    assert a == watchdog.group_id((0, 1, 2, 3), 0)          # a function of the members alone
    assert len({a, watchdog.group_id([0, 1, 2, 3], 1), watchdog.group_id([0, 1], 0)}) == 3
    assert watchdog.describe_members([4, 5, 6, 7]) == "[4..7]"
    assert watchdog.describe_members([0, 2]) == "[0, 2]"


# ---------------------------------------------------------------------------- the board (MPI)
def _slot(board, gid: int) -> list[int] | None:
    mem = list(board.mem)
    return next((mem[HEADER + SLOT * i: HEADER + SLOT * (i + 1)] for i in range(SLOTS)
                 if mem[HEADER + SLOT * i] == gid), None)


@pytest.mark.mpi(min_size=1)
def test_board_counts_each_groups_collectives_across_split_and_free(comm):
    board = watchdog.board()
    assert board is not None and board.mem[0] > 0                  # pid
    world = comm._watch
    assert world.members == tuple(range(comm.size))
    before = comm._seq
    comm.allreduce(np.ones(3))
    comm.barrier()
    assert comm._seq == before + 2
    s = _slot(board, world.gid)
    if comm.size > 1:                                    # a group of one sends nothing
        assert s[1] == comm._seq and s[2] == watchdog.OP_CODES["barrier"] and s[3] < 0  # left
    sub = comm.split(color=comm.rank % 2, key=comm.rank)
    again = comm.split(color=comm.rank % 2, key=comm.rank)
    members = tuple(r for r in range(comm.size) if r % 2 == comm.rank % 2)
    assert sub._watch.members == again._watch.members == members
    assert sub._watch.gid != again._watch.gid                      # the second group of them
    ids = comm.p2p.comm.allgather((sub._watch.gid, again._watch.gid))
    assert all(i == ids[comm.rank] for r, i in enumerate(ids) if r % 2 == comm.rank % 2)  # agreed
    for _ in range(3):
        sub.allreduce(np.ones(2))
    assert sub._seq == 3 and _slot(board, again._watch.gid)[1] == 0
    if sub.size > 1:
        assert _slot(board, sub._watch.gid)[1] == 3
    if comm.size > 1:
        assert _slot(board, world.gid)[1] == comm._seq              # the world's count stays
    peer = (comm.rank + 1) % comm.size
    rows = board.read([peer, comm.rank])                           # an RMA read of a peer
    assert rows[peer] is not None and rows[peer][0] > 0 and rows[comm.rank][0] > 0
    gid = sub._watch.gid
    sub.free()
    again.free()
    assert _slot(board, gid) is None                               # the slot is released


@pytest.mark.mpi(min_size=1)
def test_summary_gives_the_timeout_and_every_ranks_pid_on_rank_0(comm, timeout_setting):
    timeout_setting(7)
    text = watchdog.summary()
    pids = comm.p2p.comm.allgather(os.getpid())
    if comm.rank == 0:
        assert text == "collective timeout 7 s | pids " + " ".join(f"{r}:{p}" for r, p in enumerate(pids))
    else:
        assert text == ""


def _hang(mode: str, limit: float = 3.0):
    job = run_mpi(2, [sys.executable, str(SCRIPTS / "hang.py"), mode, str(limit)], timeout=120)
    assert not job.timed_out, job.output
    assert job.returncode != 0, job.output
    assert job.seconds < limit + 30, job.output
    assert "CollectiveTimeoutError" in job.output and "aborting the job" in job.output, job.output
    return job.output


def test_a_mismatched_collective_ends_the_job_naming_op_group_sequence_and_ranks():
    out = _hang("mismatch")
    # rank 0 waits in all-reduce #2 of the world, which rank 1 never called (and the reverse)
    zero = re.search(r"allreduce #2 \(64 B float32, native\) on group \[0, 1\] timed out on world "
                     r"rank 0 after \d+\.\d s \(the collective timeout is 3 s\); ranks that had not "
                     r"reached it: 1\n  rank 0: this rank\n  rank 1: called broadcast #2 instead", out)
    one = re.search(r"broadcast #2 \(64 B float32, native\) on group \[0, 1\] timed out on world "
                    r"rank 1 after \d+\.\d s \(the collective timeout is 3 s\); ranks that had not "
                    r"reached it: 0\n  rank 0: called allreduce #2 instead", out)
    assert zero or one, out


def test_a_receive_that_never_gets_its_message_ends_the_job_naming_the_peer():
    out = _hang("recv")
    assert re.search(r"recv of 64 B from rank 1 \(world rank 1\), tag 7, on group \[0, 1\] \(after "
                     r"collective #1 of the group\) timed out on world rank 0 after \d+\.\d s \(the "
                     r"collective timeout is 3 s\); waiting for rank: 1\n  rank 1: last in allreduce "
                     r"#1 on \[0, 1\], left it", out), out


@pytest.mark.mpi(min_size=2)
def test_native_collectives_agree_with_the_timeout_on_and_off(comm, timeout_setting):
    """Non-blocking forms polled (timeout on) and blocking calls (timeout 0) give the same
    bits (the blocking path is taken only with no background thread)."""
    x = np.arange(10, dtype=np.float64) * (comm.rank + 1)
    results = []
    for limit in (30.0, 0.0):
        timeout_setting(limit)
        results.append((comm.allreduce(x), comm.broadcast(x, root=1),
                        comm.allgather(x[:3]), comm.reduce_scatter(x.reshape(5, 2))))
        comm.barrier()
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(results[0][0], np.arange(10) * comm.size * (comm.size + 1) / 2)
