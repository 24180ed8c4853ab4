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

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mpipar.comm.communicator import Communicator
from mpipar.comm.network import Network, Profile, load_profile
from mpipar.comm.transport.sim import Engine, SimTransport
from mpipar.nn.gpt import GPTConfig
from mpipar.optim import OptimizerSpec
from mpipar.parallel.layout import Layout
from mpipar.parallel.schedules import make_schedule, simulate as simulate_schedule
from mpipar.parallel.trainer import ParallelTrainer
from mpipar.sim.spec import TrainSpec

# Phases a kernel's time is charged to (see the module docstring).
PHASES = ("compute", "recompute", "tp_comm", "dp_comm", "optimizer")
BREAKDOWN = ("compute", "recompute", "tp_comm", "pp_comm", "bubble", "dp_comm", "optimizer", "other")


def config_of(spec: TrainSpec) -> GPTConfig:
    return GPTConfig(vocab_size=spec.vocab_size, block_size=spec.block_size, n_layer=spec.n_layer,
                     n_head=spec.n_head, n_embd=spec.n_embd, bias=spec.bias, dropout=0.0)


def layout_of(spec: TrainSpec) -> Layout:
    """The trainer's Layout for ``spec``: every micro-batch of the step goes through the
    pipeline (gradient accumulation over micro-batches when pp = 1, as Megatron does)."""
    return Layout(dp=spec.dp, tp=spec.tp, pp=spec.pp, micro_batches=spec.micro_batches,
                  schedule=spec.schedule, zero=spec.zero, bucket_mb=spec.bucket_mb,
                  allreduce=spec.allreduce)


@dataclass
class Span:
    """One interval of a rank's timeline (a trace event)."""

    track: str       # "main" or "comm" (the rank's communication stream)
    name: str
    t0: float
    t1: float
    args: dict = field(default_factory=dict)


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


class _Observer:
    """Per virtual rank: charges kernel time to the clock and to the current phase, and keeps
    the spans of the rank's timeline. Installed around a real trainer's objects by wrapping
    their methods on the instance (the trainer's code is not changed)."""

    def __init__(self, engine: Engine, rank: int, clock: Callable[[], float]) -> None:
        self.engine, self.rank, self.clock = engine, rank, clock
        self.phase = "compute"
        self.phases = dict.fromkeys(PHASES, 0.0)
        self.spans: list[Span] = []
        self.t0 = 0.0
        self.recording = False

    def charge(self, kind: str, seconds: float) -> None:
        self.engine.advance(seconds)
        self.phases[self.phase] += seconds

    def wrap(self, obj: Any, method: str, phase: str, track: str = "main",
             name: str | None = None) -> None:
        fn = getattr(obj, method)
        label = name or method

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            before, self.phase = self.phase, phase
            t0 = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.recording:
                    self.spans.append(Span(track, label, t0 - self.t0, self.clock() - self.t0))
                self.phase = before

        setattr(obj, method, wrapped)


def _rank_main(t: SimTransport, run: "_Run") -> RankStep:
    world = Communicator(t, t.dup(), algorithm=run.algorithm)
    obs = _Observer(t.engine, t.rank, world.clock)
    xp = run.namespace(obs)
    tr = ParallelTrainer(world, run.config, run.layout, run.optimizer, dtype=run.dtype, xp=xp,
                         grad_clip=1.0, init=False)
    mesh = tr.mesh
    if mesh.tp > 1:
        for m in ("allreduce", "reduce_scatter", "allgather"):
            obs.wrap(mesh.tp_group, m, "tp_comm", name=f"tp {m}")
    for m in ("_allreduce_owned", "_reduce_scatter_owned", "allgather"):
        if mesh.dp > 1:
            obs.wrap(mesh.dp_group, m, "dp_comm", track="comm", name=f"dp {m.strip('_').split('_')[0]}")
    obs.wrap(tr.sync, "clip_grad_norm", "optimizer", name="clip")
    obs.wrap(tr.sync, "step", "optimizer", name="optimizer")
    rows = run.spec.global_batch // mesh.dp
    idx = xp.zeros((rows, run.spec.block_size), dtype="int64")
    world.barrier()                       # every rank starts the step at the same time
    obs.t0 = start = world.clock()
    obs.recording = True
    res = tr.step(idx, idx, lr=1e-4)
    end = world.clock()
    obs.recording = False
    p = res.pipe
    for kind, mb, chunk, a, b in p.events:
        obs.spans.append(Span("main", f"{kind} mb{mb}" + (f" c{chunk}" if chunk else ""), a, b,
                              {"mb": mb, "chunk": chunk}))
    opt = sum(s.t1 - s.t0 for s in obs.spans if s.name in ("clip", "optimizer"))
    return RankStep(
        rank=t.rank, coords=(mesh.dp_rank, mesh.tp_rank, mesh.pp_rank), step_s=end - start,
        phases=dict(obs.phases),
        waits={"recv": p.recv_wait, "send": p.send_wait, "tied": p.tied_reduce, "loss": p.loss_bcast},
        forward_s=p.forward, backward_s=p.backward, dp_exposed_s=res.comm.exposed_s,
        dp_total_s=res.comm.total_s, optimizer_s=opt, memory=dict(tr.memory_report()),
        spans=sorted(obs.spans, key=lambda s: (s.t0, s.t1)))


@dataclass
class _Run:
    spec: TrainSpec
    config: GPTConfig
    layout: Layout
    optimizer: OptimizerSpec
    dtype: str
    algorithm: str
    namespace: Callable[[_Observer], Any]


@dataclass
class TrainPrediction:
    spec: TrainSpec
    profile: str
    step_time_s: float
    tokens_per_s: float
    breakdown: dict[str, float]
    critical_rank: int
    ranks: list[RankStep]
    wall_s: float
    cpu_s: float

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.to_json(), "profile": self.profile,
                "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
                "breakdown": self.breakdown, "critical_rank": self.critical_rank,
                "simulator": {"ranks": len(self.ranks), "wall_s": self.wall_s, "cpu_s": self.cpu_s}}


def _bubble(run: _Run, ranks: list[RankStep], crit: RankStep) -> float:
    """The schedule's own idle time on ``crit``'s pipeline rank: ``schedules.simulate`` of
    every stage's instruction list with this run's mean forward and backward time per
    micro-batch on each stage and messages that cost nothing."""
    P, M = run.layout.pp, run.layout.micro_batches
    if P == 1:
        return 0.0
    dp, tp = crit.coords[0], crit.coords[1]
    pipe = sorted((r for r in ranks if r.coords[0] == dp and r.coords[1] == tp), key=lambda r: r.coords[2])
    f = [r.forward_s / M for r in pipe]
    b = [r.backward_s / M for r in pipe]
    lists = [make_schedule(run.layout.schedule, P, s, M) for s in range(P)]
    scale = [b[s] / b[0] if b[0] else 1.0 for s in range(P)]
    res = simulate_schedule(lists, f=f[0], b=b[0], comm=0.0, stage_scale=scale)
    s = crit.coords[2]
    return max(res.step_time - res.busy[s], 0.0)


def breakdown_of(run: _Run, ranks: list[RankStep], crit: RankStep) -> dict[str, float]:
    ph = crit.phases
    waits = sum(crit.waits.values())
    bubble = min(_bubble(run, ranks, crit), waits)
    out = {"compute": ph["compute"], "recompute": ph["recompute"], "tp_comm": ph["tp_comm"],
           "pp_comm": waits - bubble, "bubble": bubble, "dp_comm": crit.dp_exposed_s,
           "optimizer": crit.optimizer_s}
    # the phases above count kernel time; tensor-parallel time is the span, messages included
    out["tp_comm"] = sum(s.t1 - s.t0 for s in crit.spans if s.name.startswith("tp "))
    out["other"] = max(crit.step_s - sum(out.values()), 0.0)
    return out


def simulate_train(spec: TrainSpec, profile: Profile | str | None = None, *,
                   namespace: Callable[[_Observer], Any] | None = None,
                   algorithm: str = "ring") -> TrainPrediction:
    """Simulate one optimiser step of ``spec`` on ``profile``'s cluster (see the module doc)."""
    spec.check()
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    config, layout = config_of(spec), layout_of(spec)
    layout.check(spec.gpus, config, spec.global_batch)
    if namespace is None:
        raise NotImplementedError("the symbolic namespace is not wired yet")
    run = _Run(spec, config, layout, OptimizerSpec(spec.optimizer, lr=1e-4), spec.compute_dtype,
               algorithm, namespace)
    n = spec.gpus
    engine = Engine(Network(prof, n), n, data=False)
    t0, c0 = time.perf_counter(), time.process_time()
    res = engine.run(_rank_main, [(run,)] * n)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ranks: list[RankStep] = res.results
    crit = max(ranks, key=lambda r: (r.step_s, r.coords[2]))
    step = crit.step_s
    return TrainPrediction(spec, prof.name, step, spec.tokens_per_step / step if step else 0.0,
                           breakdown_of(run, ranks, crit), crit.rank, ranks, wall, cpu)
