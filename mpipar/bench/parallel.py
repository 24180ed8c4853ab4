"""Step time, overlap, pipeline bubble and memory per parallel layout.

    mpiexec -n 2 python -m mpipar.bench parallel                       # every layout of 2 ranks
    mpiexec -n 2 python -m mpipar.bench parallel --layouts 2x1x1 --zero 0,1,2
    mpiexec -n 2 python -m mpipar.bench parallel --layouts 1x1x2 --schedules gpipe,1f1b \\
        --micro-batches 1,2,4,8 --batch-size 16 --steps 10 --json bubble.json
    mpiexec -n 4 python -m mpipar.bench parallel --layouts 2x1x2,1x2x2 --micro-batches 4

Layouts are DPxTPxPP (``2x1x2``: dp 2, tp 1, pp 2). The default is every layout of the
world size that fits the model and the batch (``Layout.check``, as training decides). ``--schedules`` and ``--micro-batches`` apply to
layouts with a pipeline (pp > 1; the others run M = 1 and no schedule), ``--zero`` to layouts
with data parallelism (dp > 1; the others run zero 0). A configuration that does not fit
(``Layout.check``: e.g. ``--batch-size`` over dp x grad-accum x M) is listed as skipped,
with the reason.

Every configuration is a ``ParallelTrainer`` on COMM_WORLD (``mpipar.comm.make_communicator``);
all of them are built first, then stepped round-robin (one step of each per round) so that a
noisy moment of a shared machine hurts every configuration alike (``--no-interleave``: one
configuration after the other, one trainer alive at a time). ``--warmup`` untimed rounds,
then ``--steps`` timed ones; each timed step starts after a barrier. Per-rank numbers are
gathered once at the end (no collective between the timed steps but the barrier).

Columns (medians over the timed steps):

* ``step ms``: wall time of ``trainer.step`` (barrier to return), the slowest rank's;
* ``tok/s``: global batch x T / step time;
* ``ar ms`` / ``exp ms`` / ``exp%``: the data-parallel gradient reduction (all-reduce, or
  ZeRO's reduce-scatter) of the step: time the background thread spent inside the
  collectives (``CommStats.total_s``), time the main thread waited for them after backward
  (``exposed_s``, the communication overlap did not hide), and exposed / total; per step
  the mean over ranks (exp% = mean exposed / mean total of that step), then the median over
  steps. The goal line adds the worst rank's own median exposed/total. (The largest rank per
  step is in the JSON as ``exposed_fraction_step_max``: on a loaded machine it mostly
  measures which rank finished backward first and waited for the other.)
* ``bubble``: the measured pipeline bubble, the idle fraction of a stage:
  ``1 - (forward + backward compute) / pipeline step wall time`` on one rank (the step's
  ``TrainStepResult.pipe``, summed over its grad-accum chunks), MEAN over all ranks (every
  rank is one pipeline stage), median over steps; ``max`` is the largest rank's (the
  least-loaded stage idles most when stages are uneven); ``theory`` =
  ``bubble_fraction_theory(P, M) = (P-1)/(M+P-1)`` and ``d pp`` = bubble - theory in
  percentage points; ``sim``: the same schedule run by ``schedules.simulate`` with the
  measured forward/backward time per stage (so it includes the stages' imbalance but no
  communication or executor overhead): the part of ``d pp`` that imbalance explains. With
  pp = 1 the "bubble" is the executor's own overhead (theory 0);
* memory per rank in MiB (largest over ranks): ``params``, ``grads`` (what the rank held:
  plain and ZeRO-1 the full buffer (+ the shard); ZeRO-2 the shard + the most per-bucket
  gradient storage held at once; see ``GradSync.memory_report``), ``opt`` (optimiser
  state) and ``act``: the peak bytes held by the pipeline's activation caches during one
  extra, untimed step, measured by wrapping this rank's stage objects' ``forward`` /
  ``backward`` (no change to ``pipeline.py``): a forward's returned cache adds its arrays,
  the backward that consumes it removes them; arrays are counted once each by their base
  buffer, across micro-batches, leaving out parameters, gradients and the shared causal mask.
  ``act sched`` in the JSON is the schedule's peak number of micro-batches in flight
  (``schedules.simulate``).

After the table, one line per goal with the measured value: overlap (dp > 1:
exposed/total <= 30%), bubble (pp > 1: within 10 pp of the theory), ZeRO-1 optimiser state and
ZeRO-2 gradients ~ 1/D of the unsharded bytes (within 10%). Missing a goal is reported, not an
error (the exit code is 0 unless ``--strict``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpipar import runtime
from mpipar.comm import make_communicator
from mpipar.comm.mpi_env import library_version, thread_level_name
from mpipar.data import BatchSampler, load_tokens, split_train_val
from mpipar.nn.attention import causal_mask
from mpipar.nn.gpt import PRESETS
from mpipar.optim import OptimizerSpec
from mpipar.parallel.layout import SCHEDULE_NAMES, Layout, LayoutError, layouts
from mpipar.parallel.schedules import all_ranks, bubble_fraction_theory, simulate
from mpipar.parallel.trainer import ParallelTrainer

MIB = float(1 << 20)
OVERLAP_GOAL = 0.30       # exposed / total all-reduce time
BUBBLE_GOAL_PP = 10.0     # percentage points from (P-1)/(M+P-1)
ZERO_GOAL_TOL = 0.10      # ratio within 10% of 1/D


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="small", help="GPT preset (default small, the training default)")
    p.add_argument("--layouts", default=None,
                   help="comma-separated DPxTPxPP, e.g. 2x1x1,1x2x1,1x1x2 (default: every layout "
                        "of the world size that fits the model)")
    p.add_argument("--batch-size", type=int, default=8, help="GLOBAL batch (sequences per step)")
    p.add_argument("--block-size", type=int, default=None, help="context length (preset's)")
    p.add_argument("--micro-batches", default="1,2,4,8",
                   help="pipeline micro-batches, a list for bubble-vs-M tables (pp > 1 layouts)")
    p.add_argument("--schedules", default="gpipe,1f1b", help="pipeline schedules (pp > 1 layouts)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--zero", default="0,1,2", help="ZeRO stages, a list (dp > 1 layouts)")
    p.add_argument("--bucket-mb", type=float, default=1.0, help="gradient bucket MiB (<= 0: one bucket)")
    p.add_argument("--allreduce", default=None, help="data-parallel algorithm (default: native)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="run configurations one after another instead of round-robin")
    p.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    p.add_argument("--json", metavar="FILE", help="save every measurement as JSON")


# ---------------------------------------------------------------------------- configurations
@dataclass
class Config:
    dp: int
    tp: int
    pp: int
    schedule: str        # "-" without a pipeline
    M: int
    zero: int

    @property
    def layout(self) -> str:
        return f"{self.dp}x{self.tp}x{self.pp}"

    @property
    def name(self) -> str:
        return f"{self.layout} {self.schedule} M={self.M} zero={self.zero}"


@dataclass
class Run:
    """One configuration's trainer and what it recorded on this rank."""

    cfg: Config
    trainer: Any = None
    skipped: str = ""
    steps: list = field(default_factory=list)   # per timed step: see _STEP_FIELDS
    memory: dict = field(default_factory=dict)


_STEP_FIELDS = ("step_s", "comm_total_s", "comm_exposed_s", "compute_s", "pipe_s",
                "forward_s", "backward_s", "recv_wait_s")


def _ints(text: str) -> list[int]:
    return [int(s) for s in str(text).split(",") if s.strip()]


def _names(text: str) -> list[str]:
    return [s.strip() for s in str(text).split(",") if s.strip()]


def parse_layouts(text: str, world: int) -> list[tuple[int, int, int]]:
    out = []
    for item in _names(text):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise SystemExit(f"--layouts: cannot read {item!r}; write DPxTPxPP, e.g. 2x1x1")
        dp, tp, pp = (int(p) for p in parts)
        if dp * tp * pp != world:
            raise SystemExit(f"--layouts: {item} needs {dp * tp * pp} ranks, the world has {world}")
        out.append((dp, tp, pp))
    return out


def configurations(args: argparse.Namespace, config: Any, world: int) -> list[Config]:
    lays = (parse_layouts(args.layouts, world) if args.layouts
            else [l for l in layouts(world)
                  if Layout(*l).fits(world, config, args.batch_size)])
    schedules, Ms, zeros = _names(args.schedules), _ints(args.micro_batches), _ints(args.zero)
    for s in schedules:
        if s not in SCHEDULE_NAMES:
            raise SystemExit(f"--schedules: {s!r} is not one of {', '.join(SCHEDULE_NAMES)}")
    out = []
    for dp, tp, pp in lays:
        for sched in (schedules if pp > 1 else ["-"]):
            for M in (Ms if pp > 1 else [1]):
                for z in (zeros if dp > 1 else [0]):
                    out.append(Config(dp, tp, pp, sched, M, z))
    return out


# ---------------------------------------------------------------------------- activation meter
def _arrays(obj: Any, out: list) -> None:
    if obj is None or isinstance(obj, (int, float, str, bool)):
        return
    if hasattr(obj, "nbytes") and hasattr(obj, "shape"):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _arrays(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _arrays(o, out)


def _root(a: Any) -> Any:
    while getattr(a, "base", None) is not None and hasattr(a.base, "nbytes"):
        a = a.base
    return a


class ActivationMeter:
    """Peak bytes referenced by the live caches of this rank's stages, while installed.

    Wraps each stage object's ``forward`` / ``backward`` (instance attributes, removed again
    by ``remove``): the cache a forward returns is registered, its arrays counted once by
    base buffer (reference-counted across caches, so an array shared by two caches counts
    once); the backward that receives that cache releases it."""

    def __init__(self, stages: list, exclude: list) -> None:
        self.stages = stages
        self.exclude = {id(_root(a)) for a in exclude if a is not None}
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list] = {}       # id(root) -> [root, count]
        self._caches: dict[int, tuple] = {}    # id(cache) -> (cache, [root ids])
        for st in stages:
            self._wrap(st)

    def _add(self, cache: Any) -> None:
        arrays: list = []
        _arrays(cache, arrays)
        ids = []
        for a in arrays:
            r = _root(a)
            k = id(r)
            if k in self.exclude or k in ids:
                continue
            ids.append(k)
            ent = self._refs.get(k)
            if ent is None:
                self._refs[k] = [r, 1]
                self.live += int(r.nbytes)
            else:
                ent[1] += 1
        self._caches[id(cache)] = (cache, ids)
        self.peak = max(self.peak, self.live)

    def _release(self, cache_id: int) -> None:
        _, ids = self._caches.pop(cache_id)
        for k in ids:
            ent = self._refs[k]
            ent[1] -= 1
            if ent[1] == 0:
                self.live -= int(ent[0].nbytes)
                del self._refs[k]

    def _wrap(self, st: Any) -> None:
        fwd, bwd = st.forward, st.backward

        def forward(*a: Any, **kw: Any) -> Any:
            out = fwd(*a, **kw)
            if isinstance(out, tuple) and out[-1] is not None:
                self._add(out[-1])
            return out

        def backward(*a: Any, **kw: Any) -> Any:
            held = [id(x) for x in list(a) + list(kw.values()) if id(x) in self._caches]
            out = bwd(*a, **kw)
            for k in held:
                self._release(k)
            return out

        st.forward, st.backward = forward, backward

    def remove(self) -> None:
        for st in self.stages:
            for attr in ("forward", "backward"):
                if attr in vars(st):
                    delattr(st, attr)


# ---------------------------------------------------------------------------- running
def _build(run: Run, world: Any, config: Any, args: argparse.Namespace) -> None:
    c = run.cfg
    layout = Layout(c.dp, c.tp, c.pp, micro_batches=c.M, grad_accum=args.grad_accum,
                    schedule=c.schedule if c.pp > 1 else "1f1b", zero=c.zero,
                    bucket_mb=args.bucket_mb if args.bucket_mb > 0 else None,
                    allreduce=args.allreduce)
    try:
        # identical on every rank: a LayoutError stops all ranks before any collective
        layout.check(world.size, config, args.batch_size)
    except LayoutError as e:
        run.skipped = str(e)
        return
    run.trainer = ParallelTrainer(world, config, layout, OptimizerSpec("adamw", lr=1e-3, weight_decay=0.1),
                                  dtype=args.dtype, grad_clip=1.0)


def _one_step(run: Run, world: Any, sampler: Any, step: int, record: bool) -> None:
    tr = run.trainer
    mesh = tr.mesh
    x, y = sampler.batch(step, mesh.dp_rank, mesh.dp)
    world.barrier()
    t0 = time.perf_counter()
    res = tr.step(x, y)
    dt = time.perf_counter() - t0
    if record:
        p = res.pipe                           # summed over the step's accumulation chunks
        run.steps.append((dt, res.comm.total_s, res.comm.exposed_s, p.compute, p.step,
                          p.forward, p.backward, p.recv_wait))


def _measure_memory(run: Run, world: Any, sampler: Any, step: int) -> None:
    """One extra untimed step with the activation meter installed; then the memory report."""
    tr = run.trainer
    local = tr.local
    exclude = [local.param_buffer, local.grad_buffer,
               causal_mask(sampler.block_size, local.param_buffer.dtype, tr.xp)]
    meter = ActivationMeter(list(tr.pipe.stages), exclude)
    try:
        _one_step(run, world, sampler, step, record=False)
    finally:
        meter.remove()
    mem = dict(tr.memory_report())
    mem["activations"] = int(meter.peak)
    run.memory = mem


def _summarise(run: Run, world: Any, args: argparse.Namespace, T: int) -> dict:
    c = run.cfg
    row: dict[str, Any] = dict(layout=c.layout, dp=c.dp, tp=c.tp, pp=c.pp, schedule=c.schedule,
                               M=c.M, zero=c.zero)
    if run.skipped:
        return row | {"skipped": run.skipped}
    a = np.asarray(run.steps, dtype=np.float64).reshape(1, -1)
    allr = np.asarray(world.allgather(a)).reshape(world.size, -1, len(_STEP_FIELDS))  # rank, step, field
    F = {k: allr[:, :, i] for i, k in enumerate(_STEP_FIELDS)}
    step_s = F["step_s"].max(axis=0)                                  # slowest rank per step
    total, exposed = F["comm_total_s"], F["comm_exposed_s"]
    frac = np.where(total > 0, exposed / np.maximum(total, 1e-12), 0.0)  # rank, step
    tot_m, exp_m = total.mean(axis=0), exposed.mean(axis=0)            # per step, mean over ranks
    frac_m = np.where(tot_m > 0, exp_m / np.maximum(tot_m, 1e-12), 0.0)
    bub = 1.0 - F["compute_s"] / np.maximum(F["pipe_s"], 1e-12)        # rank, step
    med = lambda v: float(statistics.median(v.tolist()))             # noqa: E731
    keys = ("params", "grads", "optimizer_state", "activations", "grads_unsharded",
            "optimizer_state_unsharded", "grads_kept")
    mem = np.asarray([[run.memory[k] for k in keys]], dtype=np.float64)
    mem_all = np.asarray(world.allgather(mem)).reshape(world.size, len(keys))
    theory = bubble_fraction_theory(c.pp, c.M)
    sim = simulate(all_ranks(c.schedule if c.pp > 1 else "1f1b", c.pp, c.M))
    row |= dict(
        step_s=med(step_s), tokens_per_s=args.batch_size * T / med(step_s),
        comm_total_s=med(tot_m), comm_exposed_s=med(exp_m),
        exposed_fraction=med(frac_m) if c.dp > 1 else None,
        exposed_fraction_per_rank=[med(frac[r]) for r in range(world.size)] if c.dp > 1 else None,
        exposed_fraction_step_max=med(frac.max(axis=0)) if c.dp > 1 else None,
        bubble=med(bub.mean(axis=0)), bubble_max=med(bub.max(axis=0)), bubble_min=med(bub.min(axis=0)),
        bubble_per_rank=[med(bub[r]) for r in range(world.size)],
        bubble_theory=theory, forward_s=med(F["forward_s"].mean(axis=0)),
        backward_s=med(F["backward_s"].mean(axis=0)), recv_wait_s=med(F["recv_wait_s"].mean(axis=0)),
        act_in_flight_sched=int(max(sim.peak_activations)),
        memory_max={k: int(mem_all[:, i].max()) for i, k in enumerate(keys)},
        memory_per_rank=[{k: int(mem_all[r, i]) for i, k in enumerate(keys)} for r in range(world.size)],
        zero_opt_ratio=float((mem_all[:, 2] / np.maximum(mem_all[:, 5], 1)).max()),
        zero_grad_ratio=float((mem_all[:, 1] / np.maximum(mem_all[:, 4], 1)).max()),
        zero_grad_kept_ratio=float((mem_all[:, 6] / np.maximum(mem_all[:, 4], 1)).max()),
        steps_raw={k: F[k].tolist() for k in _STEP_FIELDS},
    )
    row["bubble_diff_pp"] = 100.0 * (row["bubble"] - theory)
    # the same schedule simulated with this run's measured compute per stage: the bubble that
    # stage imbalance alone explains (communication and executor overhead free)
    if c.pp > 1:
        per_rank = F["forward_s"] + F["backward_s"]                    # rank, step
        f_r = np.median(F["forward_s"], axis=1)                         # per rank
        b_r = np.median(F["backward_s"], axis=1)
        stage_f = np.zeros(c.pp)
        stage_b = np.zeros(c.pp)
        for rank in range(world.size):                                  # mean over dp/tp replicas
            pr = rank // (c.dp * c.tp)
            stage_f[pr] += f_r[rank] / (c.dp * c.tp)
            stage_b[pr] += b_r[rank] / (c.dp * c.tp)
        fm, bm = stage_f.mean(), stage_b.mean()
        if fm > 0 and bm > 0 and per_rank.size:
            sim_m = simulate(all_ranks(c.schedule, c.pp, c.M), f=fm / c.M, b=bm / c.M,
                             stage_scale=list((stage_f + stage_b) / (fm + bm)))
            row["bubble_sim"] = float(np.mean(sim_m.bubble))
            row["stage_compute_s"] = (stage_f + stage_b).tolist()
    row.setdefault("bubble_sim", theory)
    return row


def run_all(world: Any, args: argparse.Namespace) -> tuple[list[dict], Any, int]:
    if args.model not in PRESETS:
        raise SystemExit(f"--model {args.model!r}: choose from {', '.join(PRESETS)}")
    config = PRESETS[args.model]
    if args.block_size:
        config = config.replace(block_size=args.block_size)
    T = config.block_size
    train, _ = split_train_val(load_tokens(None))
    sampler = BatchSampler(train, args.batch_size, T, seed=0)
    runs = [Run(c) for c in configurations(args, config, world.size)]
    n_rounds = args.warmup + args.steps

    def go(group: list[Run]) -> None:
        live = [r for r in group if not r.skipped]
        for step in range(n_rounds):
            for r in live:
                _one_step(r, world, sampler, step, record=step >= args.warmup)
        for r in live:
            _measure_memory(r, world, sampler, n_rounds)

    if args.interleave:
        for r in runs:
            _build(r, world, config, args)
        go(runs)
    else:
        for r in runs:
            _build(r, world, config, args)
            go([r])
            r.trainer = None
    rows = [_summarise(r, world, args, T) for r in runs]
    return rows, config, T


# ---------------------------------------------------------------------------- report
COLUMNS = (("layout", 7), ("sched", 5), ("M", 3), ("zero", 4), ("step ms", 8), ("tok/s", 8),
           ("ar ms", 7), ("exp ms", 7), ("exp%", 5), ("bubble", 6), ("max", 5), ("theory", 6),
           ("d pp", 6), ("sim", 5), ("params", 7), ("grads", 7), ("opt", 7), ("act", 7))


def _cells(r: dict) -> list[str]:
    head = [r["layout"], r["schedule"], str(r["M"]), str(r["zero"])]
    if "skipped" in r:
        return head + ["skipped: " + r["skipped"]]
    dp = r["dp"] > 1
    m = r["memory_max"]
    return head + [
        f"{r['step_s'] * 1e3:.1f}", f"{r['tokens_per_s']:.0f}",
        f"{r['comm_total_s'] * 1e3:.2f}" if dp else "-", f"{r['comm_exposed_s'] * 1e3:.2f}" if dp else "-",
        f"{100 * r['exposed_fraction']:.0f}" if dp else "-",
        f"{r['bubble']:.3f}", f"{r['bubble_max']:.2f}", f"{r['bubble_theory']:.3f}",
        f"{r['bubble_diff_pp']:+.1f}", f"{r['bubble_sim']:.2f}",
        f"{m['params'] / MIB:.2f}", f"{m['grads'] / MIB:.2f}", f"{m['optimizer_state'] / MIB:.2f}",
        f"{m['activations'] / MIB:.2f}"]


def format_rows(rows: list[dict]) -> str:
    widths = [w for _, w in COLUMNS]
    lines = ["  ".join(f"{name:>{w}}" for name, w in COLUMNS)]
    for r in rows:
        cells = _cells(r)
        if "skipped" in r:                       # the reason runs on past the columns
            lines.append("  ".join(f"{c:>{w}}" for c, w in zip(cells[:-1], widths)) + "  " + cells[-1])
        else:
            lines.append("  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def goal_lines(rows: list[dict]) -> list[tuple[str, bool]]:
    """(line, met) per goal (overlap, bubble, ZeRO memory) that the rows measure."""
    out: list[tuple[int, str, bool]] = []       # (kind, line, met): overlap, bubble, ZeRO
    for r in rows:
        if "skipped" in r:
            continue
        c = f"{r['layout']} {r['schedule']} M={r['M']} zero={r['zero']}"
        if r["dp"] > 1:
            f = r["exposed_fraction"]
            ok = f <= OVERLAP_GOAL
            worst = max(r["exposed_fraction_per_rank"])
            out.append((0, f"overlap {c}: exposed/total = {100 * f:.0f}% "
                        f"({r['comm_exposed_s'] * 1e3:.2f} of {r['comm_total_s'] * 1e3:.2f} ms; worst "
                        f"rank {100 * worst:.0f}%) (goal <= {100 * OVERLAP_GOAL:.0f}%)", ok))
        if r["pp"] > 1:
            d = r["bubble_diff_pp"]
            ok = abs(d) <= BUBBLE_GOAL_PP
            out.append((1, f"bubble {r['schedule']} M={r['M']} ({r['layout']} zero={r['zero']}): measured "
                        f"{r['bubble']:.3f} vs theory {r['bubble_theory']:.3f} ({d:+.1f} pp, goal within "
                        f"{BUBBLE_GOAL_PP:.0f} pp; with measured stage imbalance "
                        f"{r['bubble_sim']:.3f})", ok))
        D = r["dp"]
        if r["zero"] >= 1 and D > 1:
            q = r["zero_opt_ratio"]
            ok = abs(q * D - 1) <= ZERO_GOAL_TOL
            out.append((2, f"ZeRO-{r['zero']} {r['layout']}: optimiser state = {q:.3f} of unsharded at D={D} "
                        f"(goal ~1/D = {1 / D:.3f})", ok))
        if r["zero"] == 2 and D > 1:
            q = r["zero_grad_kept_ratio"]
            ok = abs(q * D - 1) <= ZERO_GOAL_TOL
            out.append((2, f"ZeRO-2 {r['layout']}: gradients kept across the step = {q:.3f} of "
                        f"unsharded at D={D} (goal ~1/D = {1 / D:.3f}); peak held during backward "
                        f"{r['zero_grad_ratio']:.3f} (shard + the buckets being filled)", ok))
        elif r["zero"] == 1 and D > 1:
            out.append((2, f"ZeRO-1 {r['layout']}: gradients = {r['zero_grad_ratio']:.3f} of unsharded "
                        f"(full buffer + shard; no goal)", True))
    return [(line, ok) for _, line, ok in sorted(out, key=lambda t: t[0])]


def header(world: Any, args: argparse.Namespace, config: Any, T: int) -> dict:
    return {"mpi_library": library_version(), "thread_level": thread_level_name(), "ranks": world.size,
            "host": platform.node(), "python": platform.python_version(), "numpy": np.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "model": args.model, "config": {k: getattr(config, k) for k in
                                            ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")},
            "batch_size": args.batch_size, "block_size": T, "dtype": args.dtype,
            "grad_accum": args.grad_accum, "bucket_mb": args.bucket_mb,
            "allreduce": args.allreduce or "native", "steps": args.steps, "warmup": args.warmup,
            "interleave": args.interleave,
            "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS")}


def main(args: argparse.Namespace, comm: Any = None) -> int:
    """Run the benchmark; ``comm``: a Communicator over COMM_WORLD (default: made here)."""
    if comm is None:
        comm = make_communicator()
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    t_start = time.perf_counter()
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows, config, T = run_all(comm, args)

    meta = header(comm, args, config, T)
    meta["loadavg_start"] = list(load0) if load0 else None
    meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    meta["seconds"] = time.perf_counter() - t_start
    goals = goal_lines(rows)
    if comm.rank == 0:
        cfg = meta["config"]
        runtime.print0(f"# mpipar parallel benchmark: {meta['ranks']} ranks, {meta['mpi_library']}, MPI thread "
               f"level {meta['thread_level']}, {meta['host']}")
        runtime.print0(f"# model {args.model} (L={cfg['n_layer']} H={cfg['n_head']} C={cfg['n_embd']} "
               f"V={cfg['vocab_size']}), global batch {args.batch_size} x T {T}, dtype {args.dtype}, "
               f"grad-accum {args.grad_accum}, buckets {args.bucket_mb} MiB, allreduce "
               f"{meta['allreduce']}, OPENBLAS_NUM_THREADS={meta['openblas_threads']}")
        runtime.print0(f"# {args.steps} timed steps after {args.warmup} warm-up, medians; "
               f"{'interleaved round-robin' if args.interleave else 'one configuration at a time'}; "
               f"load average {' '.join(f'{v:.2f}' for v in load0 or ())} at start, "
               f"{' '.join(f'{v:.2f}' for v in meta['loadavg_end'] or ())} at end")
        runtime.print0(format_rows(rows))
        runtime.print0("# step ms: slowest rank; ar/exp ms: dp gradient collectives total / not hidden by "
               "backward (mean over ranks); exp% = exposed/total")
        runtime.print0("# bubble: 1 - compute/pipeline-step per rank, mean over ranks (max: largest rank); "
               "theory (P-1)/(M+P-1); d pp = bubble - theory; sim: the schedule simulated with the "
               "measured compute per stage (imbalance only, no comm/overhead)")
        runtime.print0("# memory: MiB per rank (largest rank): params, grads, opt(imiser state), act(ivation "
               "caches, peak during a step)")
        for line, ok in goals:
            runtime.print0(f"# goal {'ok  ' if ok else 'MISS'} {line}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "args": {k: v for k, v in vars(args).items()
                                                  if not k.startswith("_") and not callable(v)},
                           "rows": rows, "goals": [{"line": l, "met": ok} for l, ok in goals]},
                          f, indent=1)
            runtime.print0(f"# saved {args.json}")
    missed = sum(not ok for _, ok in goals)
    return 1 if args.strict and missed else 0
