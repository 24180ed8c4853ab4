"""When the trainer overlaps the gradient all-reduce with backward (``--overlap auto``): on a
GPU always, on the CPU where every rank has a core for its communication thread."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mpipar.parallel import grad_sync
from mpipar.parallel.grad_sync import overlap_has_a_core, resolve_overlap


class FakeWorld:
    """What the policy reads of a communicator: its transport's ``shared_node`` and
    ``allgather_json``, over ranks whose (node, affinity, machine cores) are given."""

    def __init__(self, ranks, shared=True):
        self.ranks = ranks
        self.calls = 0

        self.transport = type("Transport", (), {})()
        self.transport.shared_node = (lambda: ranks[0][0]) if shared else None

    def allgather_json(self, obj):
        self.calls += 1
        assert obj == list(self.ranks[0])       # this rank is rank 0: its own numbers
        return [list(r) for r in self.ranks]


@pytest.fixture
def this_machine(monkeypatch):
    def set_cores(allowed, machine):
        monkeypatch.setattr(os, "cpu_count", lambda: machine)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(allowed)),
                            raising=False)
    return set_cores


@pytest.mark.parametrize("ranks, threads, want", [
    ([(0, 2, 2), (0, 2, 2)], 1, False),            # 2 ranks share 2 cores: no core to spare
    ([(0, 16, 16), (0, 16, 16)], 1, True),         # 8 cores each
    ([(0, 16, 16), (0, 16, 16)], 8, False),        # 8 threads each fill them
    ([(0, 4, 4), (4, 4, 4)], 2, True),             # one rank per node, 4 cores each
    ([(0, 1, 16), (0, 1, 16)], 1, False),          # bound to one core each
    ([(0, 2, 16), (0, 2, 16)], 1, True),           # bound to two cores each
    ([(0, 8, 8)] + [(1, 8, 8)] * 5, 1, False),     # 5 ranks on 8 cores: node 1 is short
])
def test_a_core_for_the_communication_thread(this_machine, ranks, threads, want):
    this_machine(ranks[0][1], ranks[0][2])
    world = FakeWorld(ranks)
    assert overlap_has_a_core(world, threads) is want
    assert world.calls == 1                         # one collective


def test_gpu_or_unknown_nodes_overlap_without_a_collective(this_machine):
    this_machine(2, 2)
    world = FakeWorld([(0, 2, 2), (0, 2, 2)])
    assert overlap_has_a_core(world, 1, xp=object()) is True       # a GPU's module
    assert overlap_has_a_core(FakeWorld([(0, 2, 2)] * 2, shared=False), 1) is True
    assert world.calls == 0


def test_on_and_off_are_taken_as_said_and_anything_else_is_refused(this_machine):
    this_machine(2, 2)
    world = FakeWorld([(0, 2, 2), (0, 2, 2)])
    assert resolve_overlap("on", world, 1) is True and resolve_overlap("off", world, 1) is False
    assert world.calls == 0
    assert resolve_overlap("auto", world, 1) is False
    with pytest.raises(ValueError, match="overlap must be one of auto, on, off, got 'sometimes'"):
        resolve_overlap("sometimes", world, 1)


def test_cores_of_a_rank():
    assert grad_sync._cores(16, 16, 4) == 4          # unbound: the machine's, shared
    assert grad_sync._cores(3, 16, 4) == 3           # bound: its own set
    assert grad_sync._cores(np.int64(2), 2, 0) == 2
