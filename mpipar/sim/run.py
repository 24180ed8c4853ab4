"""Run one collective of one algorithm on the simulated network.

    from mpipar.sim import simulate_collective
    res = simulate_collective("allreduce", "ring", size=1024, count=2**20, profile="dgx-h100")
    res.time                     # predicted seconds (the slowest rank)

``count`` is the element count of the whole collective buffer, as nccl-tests counts it: the
allreduce/reduce/broadcast/alltoall buffer, reduce_scatter's input, allgather's output (so a
rank's block is ``split_counts(count, size)[rank]``, as the Communicator cuts it).

With ``data=True`` (default when ``size * count`` is small) every rank gets real inputs
(``inputs``, or small random integers) and ``res.results`` holds what each rank's algorithm
returned, to compare with NumPy. With ``data=False`` buffers are zero-stride placeholders and
only time is simulated.
"""

from __future__ import annotations

import importlib
from typing import Any, Sequence

import numpy as np

from mpipar import backend
from mpipar.comm.algorithms import Algorithm, get_algorithm
from mpipar.comm.algorithms._util import accepted, split_counts
from mpipar.comm.network import Network, Profile, load_profile
from mpipar.comm.ops import get_op
from mpipar.comm.transport.sim import Engine, Periodic, SimResult, SimTransport, placeholder

# Above this many elements in total over all ranks, runs default to size-only buffers.
DATA_LIMIT = 1 << 24


def resolve_profile(profile: Profile | str | None, ranks_per_node: int | None = None) -> Profile:
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    if ranks_per_node is not None:
        prof = prof.with_topology(ranks_per_node)
    return prof


def load_algorithm(name: str) -> Algorithm:
    """The registered algorithm ``name``, or else ``mpipar.comm.algorithms.<name>`` if such a
    module defines ALGORITHM (so a new algorithm can be simulated before it is registered)."""
    try:
        return get_algorithm(name)
    except ValueError:
        try:
            mod = importlib.import_module(f"mpipar.comm.algorithms.{name}")
        except ImportError:
            raise ValueError(f"unknown collective algorithm {name!r}") from None
        return mod.ALGORITHM


def rank_inputs(collective: str, size: int, count: int, dtype: Any, seed: int = 0) -> list[np.ndarray]:
    """Small random integers per rank (exact in every dtype), the shape each rank passes."""
    counts = split_counts(count, size)
    out = []
    for r in range(size):
        n = counts[r] if collective == "allgather" else count
        rng = np.random.default_rng([seed, r])
        out.append(rng.integers(-8, 9, size=n).astype(dtype))
    return out


def simulate_collective(collective: str, algorithm: str | Algorithm, size: int, count: int,
                        dtype: Any = "float32", op: str = "sum", profile: Profile | str | None = None,
                        *, root: int = 0, data: bool | None = None,
                        inputs: Sequence[np.ndarray] | None = None,
                        ranks_per_node: int | None = None, nic_serialization: bool = True,
                        options: dict[str, Any] | None = None,
                        nodes: Sequence[int] | None = None, symmetric: bool | None = None,
                        input_copy: bool = True) -> SimResult:
    """Simulate one ``collective`` by ``algorithm`` (``native``: the profile's busbw tables)
    over ``size`` ranks. ``nodes``: the node of each rank (default: consecutive ranks fill
    nodes of the profile's ``ranks_per_node``), e.g. ``[0, 1, 2, 3]`` for a data-parallel
    group of one rank per node. ``symmetric``: None (default) simulates one period of a
    shift-invariant run where ``symmetry_period`` finds one (the same times; ``finish`` and
    ``results`` repeat the period's for the other ranks); False: always every rank."""
    alg = load_algorithm(algorithm) if isinstance(algorithm, str) else algorithm
    fn = getattr(alg, collective, None)
    if fn is None:
        raise ValueError(f"algorithm {alg.name!r} has no {collective}")
    dt = backend.resolve_dtype(dtype)
    prof = resolve_profile(profile, ranks_per_node)
    if data is None:
        data = inputs is not None or size * count <= DATA_LIMIT
    if data and inputs is None:
        inputs = rank_inputs(collective, size, count, dt)
    counts = split_counts(count, size)
    rop = get_op(op)

    def work(r: int) -> np.ndarray:
        if data:
            return np.array(inputs[r], dtype=dt, copy=True).reshape(-1)
        return placeholder(counts[r] if collective == "allgather" else count, dt)

    def args(r: int) -> tuple:
        buf = work(r)
        return {"allreduce": (buf, rop), "reduce": (buf, rop, root), "broadcast": (buf, root),
                "reduce_scatter": (buf, rop, counts), "allgather": (buf, counts),
                "alltoall": (buf,)}[collective]

    opts = accepted(fn, dict(options or {}))
    period = symmetry_period(alg.name, collective, size, count, prof, data, nodes, opts) \
        if symmetric is not False else None
    if period is not None:  # a ring is shift-invariant by whole nodes: simulate one period
        rpn = prof.levels(size)[0]
        logical = [r // rpn for r in range(size)]
        net = Network(prof, period, nic_serialization=nic_serialization, nodes=logical[:period])
        engine = Engine(net, period, data=False)
        ranks = Periodic(size, period)
        res = engine.run(fn, args, opts, transport=lambda e, r: SimTransport(e, 0, r, ranks, logical))
        res.finish = [res.finish[r % period] for r in range(size)]  # rank r + m is rank r
        res.results = [res.results[r % period] for r in range(size)]
    else:
        net = Network(prof, size, nic_serialization=nic_serialization,
                      nodes=list(nodes) if nodes is not None else None)
        engine = Engine(net, size, data=data)
        res = engine.run(fn, args, opts)
    # Every rank copies its input into a fresh work buffer before the algorithm starts
    # (Communicator._work_copy) and pays the call's fixed cost (argument checks, the
    # algorithm's set-up; measured per algorithm by bench calibrate): all clocks start that
    # much later, the same on every rank.
    # (``input_copy=False``: a caller that prices the copy itself, as the training simulator's
    # compute model does)
    shift = prof.call_overhead.get(alg.name, 0.0)
    if input_copy:
        shift += prof.copy_time((counts[0] if collective == "allgather" else count) * dt.itemsize)
    if shift:
        res.time += shift
        res.finish = [f + shift for f in res.finish]
    return res


def symmetry_period(algorithm: str, collective: str, size: int, count: int, prof: Profile,
                    data: bool, nodes: Any, options: dict[str, Any]) -> int | None:
    """The period of ranks a run can be reduced to, or None. The one-ring ``ring`` (no
    channels) on equal blocks (count % size == 0) with time only (no data) is invariant under
    a shift by a whole node: rank r + m does at every hop what r does, on the same kind of
    links and ports, so the m ranks of one node (two ranks on a flat network), with the ring
    closed over them, see the times of all (tests/sim/test_symmetry.py checks reduced = full
    up to 64 ranks). Not with one-way pricing or transfers_need_cpu (their state is not
    shift-invariant as recorded), given nodes, or a last partial node."""
    if data or nodes is not None or algorithm != "ring" or options.get("channels", 1) != 1:
        return None
    if collective not in ("allreduce", "reduce_scatter", "allgather") or count % size:
        return None
    if prof.oneway_link is not None or prof.transfers_need_cpu:
        return None
    m = max(2, prof.levels(size)[0])
    return m if size % m == 0 and size >= 4 * m else None


def simulate(fn: Any, size: int, profile: Profile | str | None = None, *, args: Any = (),
             kwargs: dict[str, Any] | None = None, data: bool = True,
             ranks_per_node: int | None = None, nic_serialization: bool = True,
             nodes: Sequence[int] | None = None) -> SimResult:
    """Run any ``fn(transport, *args(rank), **kwargs)`` on ``size`` virtual ranks
    (``nodes`` as for ``simulate_collective``)."""
    prof = resolve_profile(profile, ranks_per_node)
    net = Network(prof, size, nic_serialization=nic_serialization,
                  nodes=list(nodes) if nodes is not None else None)
    engine = Engine(net, size, data=data)
    return engine.run(fn, args, kwargs)
