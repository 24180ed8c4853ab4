"""One optimiser step of a GPT on a simulated cluster, run by the code that trains.

    from mpipar.sim.train import simulate_train
    pred = simulate_train(TrainSpec(...), "dgx-a100")
    pred.step_time_s, pred.mfu, pred.breakdown, pred.memory_per_rank_bytes

Every virtual rank of the discrete-event simulator (``comm/transport/sim.py``) builds the real
``ParallelTrainer`` on a ``Communicator`` over its ``SimTransport`` and runs one real
``trainer.step``: the pipeline schedule and its executor, the data-parallel buckets and their
overlap (the rank's communication stream), ZeRO, the tensor-parallel regions and the
collective algorithms are the training code itself. Only the arithmetic is replaced: the
arrays are shape-only (``sim/symbolic.py``) and every kernel advances the rank's virtual clock
by the compute model's time (``sim/compute.py``); messages are priced by the network model.

What is measured on each rank (the code's own timers, which read the virtual clock here and the
wall clock in training: ``Transport.clock``) and how the step's time is split
(``breakdown``, for the rank that finishes last):

* ``compute``: forward and backward kernels; ``recompute``: kernels rerun in backward;
* ``tp_comm``: time inside tensor-parallel collectives (blocking, so all exposed);
* ``pp_comm`` and ``bubble``: time the executor waited on pipeline messages, split into the
  schedule's own idle time (``schedules.simulate`` with this run's per-micro-batch compute
  times and free messages) and the rest;
* ``dp_comm``: time the main thread waited for data-parallel buckets (exposed, not total);
* ``optimizer``: clipping, the optimiser step and ZeRO's parameter all-gather;
* ``other``: what is left (the executor's own bookkeeping, the loss broadcast).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from mpipar.comm.communicator import Communicator
from mpipar.comm.network import Network, Profile, load_profile
from mpipar.comm.transport.sim import Engine, SimTransport
from mpipar.nn import attention, block
from mpipar.nn.gpt import GPTConfig
from mpipar.optim import OptimizerSpec
from mpipar.parallel.layout import Layout
from mpipar.parallel.mesh import Mesh
from mpipar.parallel.schedules import make_schedule, simulate as simulate_schedule
from mpipar.parallel.trainer import ParallelTrainer
from mpipar.sim.mirror import CollectiveTimes, MirroredCommunicator
from mpipar.sim import analytic, memory
from mpipar.sim.compute import ComputeModel
from mpipar.sim.spec import TrainSpec
from mpipar.sim.symbolic import SymbolicNamespace
from mpipar.trace import TRACKS, Span as TraceSpan

# Phases a kernel's time is charged to (see the module docstring).
PHASES = ("compute", "recompute", "tp_comm", "dp_comm", "optimizer")
# Above this many GPUs the step is simulated reduced by default (one rank per stage): it
# agrees with the full simulation (tests/sim/test_sim_train.py, up to 64 ranks) and costs 1/(dp tp)
FULL_LIMIT = 16


@dataclass
class Span(TraceSpan):
    """One interval of a rank's timeline (a trace event, ``mpipar.trace.Span``; track
    "comm" is the rank's communication stream), and what its time counts as."""

    phase: str = ""  # what the time counts as in the breakdown ("" for nested spans)


@dataclass
class RankStep:
    """What one virtual rank measured of its step (virtual seconds from the step's start)."""

    rank: int
    coords: tuple[int, int, int]         # (dp_rank, tp_rank, pp_rank)
    step_s: float
    phases: dict[str, float]             # kernel time by phase
    waits: dict[str, float]              # executor waits: recv, send, tied, loss
    forward_s: float
    backward_s: float
    dp_exposed_s: float
    dp_total_s: float
    optimizer_s: float
    memory: dict[str, int]
    spans: list[Span]


class Observer:
    """Per virtual rank: charges kernel time to the clock and to the current phase, keeps the
    spans of the rank's timeline, and memoises stage calls. Installed around a real trainer's
    objects by wrapping their methods on the instance (the trainer's code is not changed)."""

    def __init__(self, engine: Engine | None, clock: Callable[[], float]) -> None:
        self.engine, self.clock = engine, clock
        self.phase = "compute"
        self.phases = dict.fromkeys(PHASES, 0.0)
        self.spans: list[Span] = []
        self.t0 = 0.0
        self.recording = False
        self._recorder: list | None = None   # the events of the stage call being memoised
        self._in_comm = 0
        self._depth = dict.fromkeys(TRACKS, 0)  # wrapped calls in progress per track

    def charge(self, kind: str, seconds: float) -> None:
        """A kernel of ``kind`` took ``seconds`` (the symbolic namespace calls this)."""
        self.engine.advance(seconds)
        self.phases[self.phase] += seconds
        rec = self._recorder
        if rec is not None and not self._in_comm:
            if rec and rec[-1][0] is _KERNELS and rec[-1][1] == self.phase:
                rec[-1][2] += seconds
            else:
                rec.append([_KERNELS, self.phase, seconds])

    def wrap(self, obj: Any, method: str, phase: str, track: str = "main",
             name: str | None = None, collective: bool = False) -> None:
        """Charge what ``obj.method`` does to ``phase`` and log it as a span; ``collective``:
        a stage call being memoised replays it (with an input of the same shape)."""
        fn = getattr(obj, method)
        label = name or method
        # a mirrored group's collective takes a time that depends on its shape alone (no peer
        # to wait for): a replay charges that time instead of calling it again
        fixed = isinstance(obj, MirroredCommunicator)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            rec = self._recorder if collective and not self._in_comm else None
            if rec is not None and not fixed:
                x = args[0]
                rec.append((wrapped, x.shape, x.dtype, args[1:], kwargs))
            before, self.phase = self.phase, phase
            self._in_comm += collective
            outer = self._depth[track] == 0
            self._depth[track] += 1
            t0, k0 = self.clock(), self.phases[phase]
            # the span's place is taken when the call starts, so spans that start together
            # (a call and the first collective inside it, on a virtual clock) keep call order
            slot = len(self.spans) if self.recording else None
            if slot is not None:
                self.spans.append(None)  # type: ignore[arg-type]
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth[track] -= 1
                self._in_comm -= collective
                t1 = self.clock()
                if rec is not None and fixed:   # its time, and the kernel time inside it
                    rec.append((_FIXED, phase, t1 - t0, self.phases[phase] - k0, track, label, outer))
                if slot is not None:
                    self.spans[slot] = Span(track, label, t0 - self.t0, t1 - self.t0,
                                            phase=phase if outer else "")
                self.phase = before

        setattr(obj, method, wrapped)

    def memoize(self, stage: Any, method: str, xp: Any) -> None:
        """After two calls for given input shapes, ``stage.method`` is replayed: the second
        call's kernel times charged again and its collectives called again on inputs of the
        same shapes, returning that call's result. (The second, not the first: a first call
        may do one-time work, such as building the causal mask.) Exact for a symbolic
        namespace, where a call's kernels depend only on shapes (tests/sim/test_sim_train.py
        compares both ways)."""
        fn = getattr(stage, method)
        table: dict[tuple, tuple[list, Any] | None] = {}

        def wrapped(*args: Any) -> Any:
            key = tuple((a.shape, a.dtype) if hasattr(a, "shape") else
                        id(a) if isinstance(a, tuple) else type(a) for a in args)
            if key not in table:           # the first call: run it
                table[key] = None
                return fn(*args)
            hit = table[key]
            if hit is None:                # the second: run it and keep what it did
                outer, self._recorder = self._recorder, []
                try:
                    out = fn(*args)
                    table[key] = (self._recorder, out)
                finally:
                    self._recorder = outer
                return out
            events, out = hit
            engine, phases = self.engine, self.phases
            for ev in events:
                kind = ev[0]
                if kind is _KERNELS:
                    engine.advance(ev[2])
                    phases[ev[1]] += ev[2]
                elif kind is _FIXED:          # a mirrored collective: its time, and its span
                    _, phase, seconds, kernels, track, label, outer = ev
                    t0 = self.clock()
                    engine.advance(seconds)
                    phases[phase] += kernels
                    if self.recording:
                        self.spans.append(Span(track, label, t0 - self.t0, t0 + seconds - self.t0,
                                               phase=phase if outer else ""))
                else:
                    call, shape, dtype, rest, kwargs = ev
                    call(xp.empty(shape, dtype=dtype), *rest, **kwargs)
            return out

        setattr(stage, method, wrapped)


_KERNELS = object()   # marks a kernel-time entry among a memoised call's events
_FIXED = object()     # ... and a mirrored collective's (its time depends on its shape only)


def _sim_mesh(t: SimTransport, run: "SimulatedRun", times: CollectiveTimes) -> tuple[Any, Mesh | None]:
    """The world and mesh of one virtual rank: the real split of the world in the full
    simulation; in the reduced one, this pipeline stage's real pp group and mirrored tp and dp
    groups (``sim/mirror.py``)."""
    lay = run.layout
    if not run.reduced:
        return Communicator(t, t.dup(), algorithm=run.algorithm), None
    stage = t.rank
    world = MirroredCommunicator(t, stage * lay.dp * lay.tp, lay.world_size, 1, times, run.algorithm)
    pp = Communicator(t, t.dup(), algorithm=run.algorithm)
    tp = MirroredCommunicator(t, 0, lay.tp, 1, times, run.algorithm)
    dp = MirroredCommunicator(t, 0, lay.dp, lay.tp, times, lay.allreduce or run.algorithm)
    return world, Mesh(lay.dp, lay.tp, lay.pp, world.rank, 0, 0, stage, world, dp, tp, pp)


def instrument(tr: ParallelTrainer, obs: Observer) -> None:
    """Install ``obs`` around a trainer's collectives and optimiser (real or simulated: the
    spans are the same, which tests/sim/test_sim_train.py checks against a real two-rank run)."""
    mesh = tr.mesh
    if mesh.tp > 1:
        for m in ("allreduce", "reduce_scatter", "allgather"):
            obs.wrap(mesh.tp_group, m, "tp_comm", name=f"tp {m}", collective=True)
    if mesh.dp > 1:
        for m, label in (("_allreduce_owned", "allreduce"), ("_reduce_scatter_owned", "reduce_scatter"),
                         ("allgather", "allgather")):
            obs.wrap(mesh.dp_group, m, "dp_comm", track="comm", name=f"dp {label}")
    obs.wrap(tr.sync, "clip", "optimizer", name="clip")
    obs.wrap(tr.sync, "step", "optimizer", name="optimizer")


def observed_step(tr: ParallelTrainer, obs: Observer, idx: Any, targets: Any,
                  barrier: Callable[[], None]) -> tuple[Any, float]:
    """One ``tr.step`` from a common start (after ``barrier``), with its spans recorded in
    ``obs`` from that start; returns the step's result and its duration on this rank."""
    barrier()
    obs.t0 = start = obs.clock()
    obs.phases = dict.fromkeys(PHASES, 0.0)   # what building the trainer charged is not the step's
    obs.recording = True
    res = tr.step(idx, targets, lr=1e-4)
    end = obs.clock()
    obs.recording = False
    for kind, mb, chunk, a, b in res.pipe.events:
        obs.spans.append(Span("main", f"{kind} mb{mb}" + (f" c{chunk}" if chunk else ""), a, b,
                              {"mb": mb, "chunk": chunk}))
    obs.spans.sort(key=lambda s: s.t0)          # stable: ties keep the order calls began
    return res, end - start


@contextlib.contextmanager
def _recompute_phase(engine: Engine, observers: dict[int, Observer]) -> Iterator[None]:
    """While the run lasts, the recomputations of the blocks' policies (``block.FullRecompute
    .rerun``, ``attention.RecomputeProbabilities.restore``: objects every rank shares) charge
    the running rank's "recompute" phase."""
    patched = [(block.RECOMPUTE["full"], "rerun"), (attention.RECOMPUTE, "restore")]

    def phase(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            obs = observers[engine.current_rank()]
            before, obs.phase = obs.phase, "recompute"
            try:
                return fn(*args, **kwargs)
            finally:
                obs.phase = before
        return wrapped

    for obj, name in patched:
        setattr(obj, name, phase(getattr(obj, name)))
    try:
        yield
    finally:
        for obj, name in patched:
            delattr(obj, name)             # the class's method again


def _rank_main(t: SimTransport, run: "SimulatedRun", times: CollectiveTimes) -> RankStep:
    world, mesh = _sim_mesh(t, run, times)
    obs = Observer(t.engine, t.clock)
    run.observers[t.engine.current_rank()] = obs
    xp = run.namespace(obs)
    # the trainer's own --precision: 16-bit compute, fp32 masters (run.dtype is the compute dtype)
    tr = ParallelTrainer(world, run.config, run.layout, run.optimizer, dtype="float32", xp=xp,
                         grad_clip=1.0, init=False, mesh=mesh, precision=run.spec.precision)
    mesh = tr.mesh
    instrument(tr, obs)
    if run.memoize:
        for st in tr.pipe.stages:
            obs.memoize(st, "forward", xp)
            obs.memoize(st, "backward", xp)
    idx = xp.zeros((run.spec.global_batch // mesh.dp, run.spec.block_size), dtype="int64")
    res, step_s = observed_step(tr, obs, idx, idx, t.barrier)
    p = res.pipe
    opt = sum(s.t1 - s.t0 for s in obs.spans if s.phase == "optimizer")
    return RankStep(
        rank=mesh.rank, coords=(mesh.dp_rank, mesh.tp_rank, mesh.pp_rank), step_s=step_s,
        phases=dict(obs.phases),
        waits={"recv": p.recv_wait, "send": p.send_wait, "tied": p.tied_reduce, "loss": p.loss_bcast},
        forward_s=p.forward, backward_s=p.backward, dp_exposed_s=res.comm.exposed_s,
        dp_total_s=res.comm.total_s, optimizer_s=opt, memory=dict(tr.memory_report()),
        spans=obs.spans)


@dataclass
class SimulatedRun:
    spec: TrainSpec
    config: GPTConfig
    layout: Layout
    optimizer: OptimizerSpec
    dtype: str
    algorithm: str
    namespace: Callable[[Observer], Any]
    reduced: bool
    memoize: bool
    observers: dict[int, Observer] = field(default_factory=dict)  # by engine rank


@dataclass
class TrainPrediction:
    spec: TrainSpec
    profile: str
    step_time_s: float
    tokens_per_s: float
    model_flops_per_gpu: float          # model FLOP/s per GPU (no recompute counted)
    mfu: float                          # model_flops_per_gpu / the GPU's peak
    breakdown: dict[str, float]
    critical_rank: int
    memory_per_rank_bytes: dict[str, int]
    memory_stage: int                   # the pipeline stage of the most loaded rank
    gpu_memory_bytes: int | None        # the profile's GPU memory (None: not given)
    ranks: list[RankStep]
    reduced: bool
    wall_s: float
    cpu_s: float
    run: SimulatedRun = field(repr=False)

    @property
    def fits(self) -> bool:
        return self.gpu_memory_bytes is None or self.memory_per_rank_bytes["peak"] <= self.gpu_memory_bytes

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.to_json(), "profile": self.profile,
                "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
                "model_flops_per_gpu": self.model_flops_per_gpu, "mfu": self.mfu,
                "breakdown": self.breakdown, "critical_rank": self.critical_rank,
                "memory_per_rank_bytes": self.memory_per_rank_bytes,
                "memory_stage": self.memory_stage, "gpu_memory_bytes": self.gpu_memory_bytes,
                "fits": self.fits,
                "simulator": {"ranks": len(self.ranks), "reduced": self.reduced,
                              "wall_s": self.wall_s, "cpu_s": self.cpu_s}}


def schedule_idle(run: SimulatedRun, ranks: list[RankStep], crit: RankStep) -> tuple[float, float]:
    """The schedule's own idle time on ``crit``'s pipeline rank: ``schedules.simulate`` of
    every stage's instruction list with this run's mean forward and backward time per
    micro-batch on each stage and messages that cost nothing. Returns (idle before the rank's
    last instruction, idle until the whole pipeline's last one)."""
    P, M, V = run.layout.pp, run.layout.micro_batches, run.spec.virtual_stages
    if P == 1:
        return 0.0, 0.0
    dp, tp = crit.coords[0], crit.coords[1]
    pipe = sorted((r for r in ranks if r.coords[0] == dp and r.coords[1] == tp), key=lambda r: r.coords[2])
    units = M * V                            # forwards (and backwards) per rank and step
    name = "interleaved" if V > 1 else run.layout.schedule
    lists = [make_schedule(name, P, s, M, chunks=V) for s in range(P)]
    res = simulate_schedule(lists, f=[r.forward_s / units for r in pipe],
                            b=[r.backward_s / units for r in pipe], comm=0.0)
    s = crit.coords[2]
    return res.finish[s] - res.busy[s], res.step_time - res.busy[s]


def breakdown_of(run: SimulatedRun, ranks: list[RankStep], crit: RankStep) -> dict[str, float]:
    ph = crit.phases
    waits = sum(crit.waits.values())
    bubble = min(schedule_idle(run, ranks, crit)[1], waits)
    # compute and recompute are kernel time; tensor-parallel time is the collectives' spans,
    # messages included (outside the optimiser's, whose norm all-reduce over tp is optimiser)
    out = {"compute": ph["compute"], "recompute": ph["recompute"],
           "tp_comm": sum(s.t1 - s.t0 for s in crit.spans if s.phase == "tp_comm"),
           "pp_comm": waits - bubble, "bubble": bubble, "dp_comm": crit.dp_exposed_s,
           "optimizer": crit.optimizer_s}
    out["other"] = max(crit.step_s - sum(out.values()), 0.0)
    return out


def check_spec(spec: TrainSpec) -> None:
    """Raise LayoutError (``Layout.check``, the one fit check) or ValueError unless ``spec``
    is a step the trainer can run on ``spec.gpus`` ranks."""
    spec.check()
    spec.layout.check(spec.gpus, spec.gpt_config, spec.global_batch)


def simulate_train(spec: TrainSpec, profile: Profile | str | None = None, *,
                   namespace: Callable[[Observer], Any] | None = None,
                   algorithm: str = "native", reduced: bool | None = None,
                   memoize: bool = True) -> TrainPrediction:
    """Simulate one optimiser step of ``spec`` on ``profile``'s cluster (see the module doc).

    ``reduced``: one rank per pipeline stage with mirrored tp and dp peers (``sim/mirror.py``);
    None: reduced above ``FULL_LIMIT`` GPUs. ``memoize``: replay stage calls after the first
    per input shape (``Observer.memoize``)."""
    check_spec(spec)
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    config, layout = spec.gpt_config, spec.layout
    compute = ComputeModel.from_profile(prof)
    if namespace is None:
        # a profile without nodes (this machine's) runs every rank on one host
        on_host = compute.on_host_with(min(prof.ranks_per_node or spec.gpus, spec.gpus))
        namespace = lambda obs: SymbolicNamespace(on_host, obs.charge)  # noqa: E731
    if reduced is None:
        reduced = spec.gpus > FULL_LIMIT
    run = SimulatedRun(spec, config, layout, OptimizerSpec(spec.optimizer, lr=1e-4), spec.compute_dtype,
               algorithm, namespace, reduced, memoize)
    n = spec.pp if reduced else spec.gpus
    times = CollectiveTimes(prof)
    net_prof = prof
    if reduced:  # stage s is global rank s * dp * tp: stages per node, if more than one
        net_prof = prof.with_topology(times.ranks_per_node(spec.dp * spec.tp))
    engine = Engine(Network(net_prof, n), n, data=False)
    t0, c0 = time.perf_counter(), time.process_time()
    with _recompute_phase(engine, run.observers):
        res = engine.run(_rank_main, [(run, times)] * n)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ranks: list[RankStep] = res.results
    crit = max(ranks, key=lambda r: (r.step_s, r.coords[2]))
    step = crit.step_s
    flops = analytic.model_flops_per_step(spec) / step / spec.gpus if step else 0.0
    peak = compute.peak_flops(spec.compute_dtype)
    est = memory.estimate(spec)
    mem = {"params": est.params, "grads": est.grads, "optimizer": est.optimizer,
           "activations": est.activations, "peak": est.peak}
    cap = compute.memory_capacity_bytes
    return TrainPrediction(spec, prof.name, step, spec.tokens_per_step / step if step else 0.0,
                           flops, analytic.mfu(spec, step, peak) if step and peak else 0.0,
                           breakdown_of(run, ranks, crit),
                           crit.rank, mem, est.stage, cap, ranks, reduced, wall, cpu, run)

