"""Symmetric groups simulated by one member: the reduced simulation of a training step.

In a dp x tp x pp step every tensor-parallel peer does the same work on its shard, and every
data-parallel replica the same work on its rows: their clocks move in step. The reduced
simulation therefore runs one rank per pipeline stage (tp rank 0 of dp replica 0) through the
real trainer, and gives it, as its tp and dp groups, a ``MirroredCommunicator``: the real
``Communicator`` (its argument checks, work copies, result shapes, non-blocking forms and
background stream are all the same code) whose one substituted method, ``_run``, does not send
the algorithm's messages to peers that do not exist but charges the time the very same
algorithm takes on that group, on the cluster, with every member present: simulated once per
(collective, algorithm, bytes) on the group's own placement and cached (``CollectiveTimes``).

What this leaves out, and tests/sim/test_sim_train.py bounds by comparing with the full
simulation at up to 64 ranks: contention between different groups' messages on one link
(the full simulation books tp, dp and pp traffic on the same ports), and members that are
not symmetric (the first and last pipeline stages are not mirrored: every stage runs).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from mpipar.backend import array_module
from mpipar.comm.communicator import Communicator
from mpipar.comm.network import Profile
from mpipar.comm.transport.sim import SimTransport
from mpipar.sim.run import simulate_collective


class CollectiveTimes:
    """Seconds one collective takes on a group whose members are ``stride`` global ranks
    apart (tp: 1, dp: tp), on ``profile``'s cluster: the simulation of that algorithm with
    every member, once per (collective, algorithm, size, bytes)."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._time = lru_cache(maxsize=None)(self._simulate)

    def ranks_per_node(self, stride: int) -> int:
        """Members of a group ``stride`` ranks apart that share a node (consecutive in the
        group, so the group is a regular two-level network)."""
        rpn = self.profile.ranks_per_node or 1
        return max(rpn // stride, 1) if rpn % stride == 0 or stride > rpn else 1

    def __call__(self, collective: str, algorithm: str, size: int, stride: int, nbytes: int,
                 itemsize: int) -> float:
        return self._time(collective, algorithm, size, stride, nbytes, itemsize)

    def _simulate(self, collective: str, algorithm: str, size: int, stride: int, nbytes: int,
                  itemsize: int) -> float:
        count = max(nbytes // itemsize, 1)
        dtype = {2: "float16", 4: "float32", 8: "float64"}[itemsize]
        # the input copy is the Communicator's own, priced by the compute model already
        res = simulate_collective(collective, algorithm, size, count, dtype, "sum", self.profile,
                                  data=False, ranks_per_node=self.ranks_per_node(stride),
                                  input_copy=False)
        return res.time


class MirrorTransport:
    """The transport of a mirrored group as its one simulated member sees it: the group's
    size and this member's rank, and the member's own clock and communication stream (those
    of its real ``SimTransport``)."""

    scratch_pool = None
    shared_node = None
    sendrecv = None
    ranks_per_node = None
    native = None
    begin_collective = None          # the whole group's time, overhead included: CollectiveTimes

    def __init__(self, real: SimTransport, rank: int, size: int) -> None:
        self.real, self.rank, self.size = real, rank, size
        self.cache: dict[Any, Any] = {}

    def clock(self) -> float:
        return self.real.clock()

    def background(self) -> Any:
        return self.real.background()

    def dup(self) -> "MirrorTransport":
        return self

    def barrier(self) -> None:
        """Symmetric members arrive together: nothing to wait for."""

    def free(self) -> None:
        """Nothing to release."""


class MirroredCommunicator(Communicator):
    """A Communicator of ``size`` symmetric members, of which this is member ``rank``; its
    collectives cost what ``times`` says the algorithm takes on the whole group (see the
    module docstring). Members are ``stride`` global ranks apart."""

    def __init__(self, real: SimTransport, rank: int, size: int, stride: int, times: CollectiveTimes,
                 algorithm: str) -> None:
        t = MirrorTransport(real, rank, size)
        super().__init__(t, t, algorithm=algorithm)
        self.stride, self.times, self._engine = stride, times, real.engine

    def _run(self, collective: str, algorithm: str | None, nbytes: int, *args: Any,
             **call_options: Any) -> Any:
        alg = self._resolve(collective, algorithm, nbytes)
        buf = args[0]
        self._engine.advance(self.times(collective, alg.name, self.size, self.stride, nbytes,
                                        buf.itemsize))
        if collective == "reduce_scatter":
            counts = args[2]
            return buf[:counts[self.rank]]
        if collective == "allgather":
            counts = args[1]
            return array_module(buf).empty(sum(counts), dtype=buf.dtype)
        return buf

    def split(self, color: int | None, key: int = 0) -> "Communicator | None":
        raise NotImplementedError("a mirrored group is not split (the trainer splits only "
                                  "the pipeline group, which is simulated in full)")
