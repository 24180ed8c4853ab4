"""The planner: the fastest layout of a GPT on a cluster, from the simulator.

    rows = plan(base, "dgx-a100", gpus=512)       # base: a TrainSpec whose layout is ignored
    rows[0].spec                                  # the first choice, rows[0].step_time_s ...

Three passes, cheapest first:

1. enumerate every layout of ``gpus``: dp x tp x pp (``Layout.layouts``), micro-batch
   sizes, schedules (GPipe, 1F1B, interleaved 1F1B with 2 and 4 virtual stages), ZeRO
   stages, activation recompute and, with tp > 1, sequence parallelism; keep those the
   trainer can run (``train.check_spec``, i.e. ``Layout.check``) and whose memory fits the
   profile's GPU (``memory.estimate``);
2. rank them by the closed-form step time (``analytic.step_time``);
3. simulate the ``simulate`` best with the trainer itself (``train.simulate_train``) and order
   those by the simulated step time.

Among layouts of equal predicted time the simpler one comes first (fewer pipeline stages,
then less tensor parallelism, no recompute, no ZeRO).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator

from mpipar.comm.network import Profile, load_profile
from mpipar.parallel.layout import LayoutError, layouts
from mpipar.sim import analytic, memory
from mpipar.sim.compute import ComputeModel
from mpipar.sim.spec import RECOMPUTE, TrainSpec
from mpipar.sim.train import TrainPrediction, check_spec, simulate_train


@dataclass
class PlanRow:
    spec: TrainSpec
    analytic_s: float                       # the closed-form step time (pass 2)
    memory_bytes: int                       # peak bytes of the most loaded rank
    prediction: TrainPrediction | None      # the simulation (pass 3), if it was simulated

    @property
    def step_time_s(self) -> float:
        return self.prediction.step_time_s if self.prediction is not None else self.analytic_s

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layout": describe(self.spec), "spec": self.spec.to_json(),
                             "analytic_step_time_s": self.analytic_s,
                             "memory_peak_bytes": self.memory_bytes, "simulated": self.prediction is not None}
        if self.prediction is not None:
            p = self.prediction
            d.update(step_time_s=p.step_time_s, tokens_per_s=p.tokens_per_s, mfu=p.mfu,
                     breakdown=p.breakdown, memory_per_rank_bytes=p.memory_per_rank_bytes)
        return d


def describe(s: TrainSpec) -> str:
    sched = "interleaved" if s.virtual_stages > 1 else s.schedule
    parts = [f"dp{s.dp} tp{s.tp} pp{s.pp}", f"mb{s.micro_batch}"]
    if s.pp > 1:
        parts.append(sched + (f"x{s.virtual_stages}" if s.virtual_stages > 1 else ""))
    if s.zero:
        parts.append(f"zero{s.zero}")
    if s.recompute != "none":
        parts.append(f"rc-{s.recompute}")
    if s.sequence_parallel:
        parts.append("sp")
    return " ".join(parts)


def _simplicity(s: TrainSpec) -> tuple:
    return (s.pp, s.tp, s.virtual_stages, s.recompute != "none", s.zero, s.sequence_parallel,
            -s.micro_batch)


def candidates(base: TrainSpec, gpus: int, *, recompute: tuple[str, ...] = RECOMPUTE,
               zero: tuple[int, ...] = (0, 1, 2), virtual_stages: tuple[int, ...] = (1, 2, 4),
               sequence_parallel: bool = True) -> Iterator[TrainSpec]:
    """Every layout of ``gpus`` for ``base``'s model, batch and precision that the trainer can
    run (memory not checked here)."""
    for dp, tp, pp in layouts(gpus):
        per_dp = base.global_batch // dp if base.global_batch % dp == 0 else 0
        mbs = [b for b in range(1, per_dp + 1) if per_dp % b == 0]
        for mb, v, sched, z, rc, sp in itertools.product(
                mbs, virtual_stages, ("1f1b", "gpipe"), zero, recompute,  # 1F1B wins ties
                (False, True) if sequence_parallel else (False,)):
            if (pp == 1 and (sched == "gpipe" or v > 1)) or (v > 1 and sched != "1f1b"):
                continue                    # one schedule without a pipeline
            if (dp == 1 and z) or (sp and tp == 1):
                continue                    # nothing to shard or to split
            spec = base.with_(dp=dp, tp=tp, pp=pp, micro_batch=mb, virtual_stages=v,
                              schedule=sched, zero=z, recompute=rc, sequence_parallel=sp)
            try:
                check_spec(spec)
            except (LayoutError, ValueError):
                continue
            yield spec


def plan(base: TrainSpec, profile: Profile | str, gpus: int, *, top: int = 10,
         simulate: int = 10, **choices: Any) -> list[PlanRow]:
    """The ``top`` layouts, best first (see the module docstring); ``choices`` restrict the
    enumeration (``candidates``' keywords)."""
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    compute = ComputeModel.from_profile(prof)
    cap = compute.memory_capacity_bytes
    rows = []
    for spec in candidates(base, gpus, **choices):
        mem = memory.estimate(spec)
        if cap is not None and mem.peak > cap:
            continue
        rows.append(PlanRow(spec, analytic.step_time(spec, prof, compute).total, mem.peak, None))
    rows.sort(key=lambda r: (r.analytic_s, _simplicity(r.spec)))
    for r in rows[:simulate]:
        r.prediction = simulate_train(r.spec, prof)
    best = sorted(rows[:simulate], key=lambda r: (r.step_time_s, _simplicity(r.spec)))
    return (best + rows[simulate:])[:top] if top else best + rows[simulate:]
