"""Communicator.allgather_json: every rank's JSON value, in rank order, on every rank (the
checkpoint writer's agreement and the trace gather ride on it)."""

import pytest


@pytest.mark.mpi(min_size=1)
def test_allgather_json_returns_every_ranks_value_in_rank_order(comm):
    # lengths that are and are not multiples of the 8-byte words, unicode, nesting, None
    mine = {"rank": comm.rank, "text": "é" * comm.rank + "x" * (3 * comm.rank), "none": None,
            "nested": [comm.rank, [1.5, "a"]]}
    got = comm.allgather_json(mine)
    assert got == [{"rank": r, "text": "é" * r + "x" * (3 * r), "none": None, "nested": [r, [1.5, "a"]]}
                   for r in range(comm.size)]
    assert comm.allgather_json(None) == [None] * comm.size
