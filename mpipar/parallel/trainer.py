"""One training step under any dp x tp x pp layout: the pieces of ``parallel/`` put together.

    layout = Layout(dp=2, tp=2, pp=2, micro_batches=4, schedule="1f1b")
    trainer = ParallelTrainer(world, config, layout, OptimizerSpec("adamw", lr=1e-3))
    for step in range(steps):
        x, y = sampler.batch(step, trainer.mesh.dp_rank, trainer.mesh.dp)   # this dp rank's rows
        result = trainer.step(x, y, lr=cosine_lr(step, ...))
    sd = trainer.full_state_dict()              # the whole nanoGPT state dict, every rank

One process is the layout 1 x 1 x 1 of the same trainer (a world of one rank): the
single-process reference and every parallel run are this code. Per step, on every rank:

1. this data-parallel rank's rows of the global batch are cut into ``grad_accum`` chunks,
   and each chunk into ``micro_batches`` pipeline micro-batches;
2. the pipeline executor runs the schedule (GPipe, 1F1B, or interleaved 1F1B over
   ``layout.virtual_stages`` model chunks: ``Layout.schedule_for``) over this rank's
   stages, which are tensor-parallel when tp > 1; gradients accumulate in the local gradients, each
   micro-batch's loss scaled by 1 / (grad_accum x micro_batches);
3. during the last chunk's backward (the instructions say so: ``sync=True``), each stage's
   gradients are handed to the gradient synchronisation (``GradSync``: plain data-parallel
   buckets or ZeRO, chosen once at construction) as soon as they are final, and their
   all-reduce or reduce-scatter starts on the background thread; the tied embedding is
   summed between first and last stage;
4. the global gradient norm counts every parameter once (tensor-parallel replicas and the
   tied embedding's second copy are not counted twice) and clips like the single process;
   each tensor's sum of squares and each micro-batch loss stay on the device until one
   read of all of them (``backend.host_scalars``: on a GPU the step's one wait for the
   device before the update), then the norm and the loss are added over their groups on
   the host;
   a loss or norm that is not finite goes to the numerics policy (``parallel/numerics.py``:
   by default the run stops naming the first non-finite gradient) before any update;
5. the GradSync applies the optimiser (ZeRO: to its shard, then all-gathers parameters).

Mixed precision (``precision`` bf16 / fp16, ``optim/mixed.py``): the local model, its
activations and gradients are 16-bit, the GradSync's optimiser keeps float32 masters. The
loss scaler (chosen once: fp16's dynamic scale, else none) multiplies d loss by its scale S,
the sums of squares are divided by S^2 before the norm, and it stands in front of the
numerics policy: an fp16 gradient overflow is skipped and the scale lowered there.

Evaluation runs the forward-only schedule through the same executor.

Batch semantics follow Megatron: the global batch is what one optimiser step trains on;
what a rank computes is its share, so changing the layout never changes what is trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import numpy as np

from mpipar import backend, trace
from mpipar.nn.gpt import param_shapes
from mpipar.optim import OptimizerSpec, Precision
from mpipar.parallel.data_parallel import CommStats
from mpipar.parallel.grad_sync import GradSync, make_grad_sync
from mpipar.parallel.layout import Layout
from mpipar.parallel.mesh import Mesh, make_mesh
from mpipar.parallel.model import (allreduce_sequence_parallel_grads, build_local_model,
                                   gather_full_state_dict, local_pieces)
from mpipar.parallel.numerics import NonFinite, NumericsPolicy, StopOnNonFinite, locate
from mpipar.parallel.pipeline import PipelineExecutor, StepTimes, mean_loss, split_micro_batches
from mpipar.parallel.schedules import Instruction


@dataclass
class TrainStepResult:
    loss: float                                  # mean over the global batch
    grad_norm: float                             # before clipping
    comm: CommStats = field(default_factory=CommStats)        # data-parallel gradient reduction
    param_comm: CommStats = field(default_factory=CommStats)  # ZeRO's parameter all-gather
    pipe: StepTimes = field(default_factory=StepTimes)        # this rank's pipeline, summed over
                                                              # the step's accumulation chunks
    skipped: bool = False        # the numerics policy dropped the step (non-finite, not applied)

    @property
    def bubble(self) -> float:
        """This rank's measured pipeline idle fraction."""
        return self.pipe.bubble


@dataclass(frozen=True)
class _Chunk:
    """One accumulation chunk of a step: its instructions and what it does around them."""

    instructions: list[Instruction]
    micro_batches: int
    zero_grad: bool        # zero the local gradients first
    sync: bool             # its backward hands gradients to the GradSync; finish() after it


class ParallelTrainer:
    """This rank's share of training one GPT under ``layout`` on ``world`` (a Communicator
    of ``layout.world_size`` ranks; one rank for the single process).

    ``mesh``: the groups to use instead of splitting ``world`` (the simulator's reduced runs
    give groups whose peers are mirrored, ``sim/mirror.py``); ``init=False``: parameters
    start at zero, without initialising the whole model on the host (``build_local_model``);
    ``numerics``: what a step with a non-finite loss or gradient norm does (default: stop,
    ``NonFiniteError`` naming the first non-finite gradient, before the update);
    ``grad_sync``: what makes the GradSync (default ``make_grad_sync``; a parameter-server
    worker's pushes its gradients instead, ``param_server.PushGradients``)."""

    def __init__(self, world: Any, config: Any, layout: Layout = Layout(),
                 optimizer: OptimizerSpec = OptimizerSpec(), *, seed: int = 0,
                 dtype: str = "float32", xp: ModuleType = np, grad_clip: float = 0.0,
                 hooks: bool = True, init: bool = True, mesh: Mesh | None = None,
                 numerics: NumericsPolicy | None = None, precision: str | Precision = "fp32",
                 grad_reduce_dtype: str = "grad",
                 grad_sync: Callable[..., GradSync] = make_grad_sync) -> None:
        # every check here and in make_mesh / build_local_model is local and identical on
        # every rank, so a bad layout stops all ranks before any collective
        layout.check(world.size, config)
        if not (math.isfinite(grad_clip) and grad_clip >= 0):
            raise ValueError(f"the clipping norm must be a finite number >= 0, got {grad_clip}")
        self.layout, self.config, self.xp = layout, config, xp
        self.grad_clip = float(grad_clip)
        self.numerics = numerics if numerics is not None else StopOnNonFinite()
        self.precision = precision if isinstance(precision, Precision) else Precision(precision)
        self.precision.check_device(xp)
        model_dtype = self.precision.model_dtype(dtype)
        # fp16's loss scale stands in front of the numerics policy (optim/mixed.py)
        self.scaler = self.precision.loss_scaler(self.numerics)
        self._order = list(param_shapes(config))          # nanoGPT order, for reports
        if mesh is None:
            mesh = make_mesh(world, layout.dp, layout.tp, layout.pp,
                             algorithms={"dp": layout.allreduce} if layout.allreduce else None)
        elif (mesh.dp, mesh.tp, mesh.pp) != (layout.dp, layout.tp, layout.pp):
            raise ValueError(f"mesh {mesh.dp} x {mesh.tp} x {mesh.pp} is not the layout's "
                             f"{layout.dp} x {layout.tp} x {layout.pp}")
        self.mesh = mesh
        self.local = build_local_model(config, mesh, seed=seed, dtype=model_dtype, xp=xp,
                                       layout=layout, init=init)
        self.pipe = PipelineExecutor(self.local, mesh.pp_group, chunks=self.local.chunks)
        self.sync = grad_sync(self.local, mesh, layout,
                              self.precision.optimizer(optimizer, self.scaler),
                              reduce_dtype=grad_reduce_dtype)
        # a stage's final gradients: under sequence parallelism the layer norms' summed over
        # tp first, then handed to the GradSync
        if self.local.sequence_parallel_names:
            self.pipe.on_stage_backward_done.append(
                lambda i, names: allreduce_sequence_parallel_grads(self.local, names))
        if hooks:
            self.pipe.on_stage_backward_done.append(lambda i, names: self.sync.mark_ready(names))
        self._plan = self._make_plan()
        self._evaluation = layout.evaluation_schedule_for(mesh.pp_rank)

    def _make_plan(self) -> list[_Chunk]:
        """The chunks of one step. Only the last accumulation chunk synchronises, unless the
        GradSync reduces every micro-batch (ZeRO-2): then every chunk does, and on one
        pipeline stage the micro-batches run as chunks of one, each reduce-scattered as its
        backward ends, so that no gradient bucket outlives one micro-batch (the executor
        would sum all of them in the model's gradients first)."""
        lay, mesh = self.layout, self.mesh
        K, M, every = lay.grad_accum, lay.micro_batches, self.sync.every_micro_batch
        if every and mesh.pp == 1 and M > 1:
            K, M = K * M, 1
        last = lay.schedule_for(mesh.pp_rank, M, sync=True)
        inner = last if every else lay.schedule_for(mesh.pp_rank, M, sync=False)
        return [_Chunk(last if k == K - 1 else inner, M, zero_grad=every or k == 0,
                       sync=every or k == K - 1) for k in range(K)]

    # -- one step --------------------------------------------------------------------------------
    def step(self, idx: Any, targets: Any, lr: float | None = None) -> TrainStepResult:
        """One optimiser step on this dp rank's rows ``idx``, ``targets`` (B/dp, T)."""
        xp, K = self.xp, len(self._plan)
        idx, targets = xp.asarray(idx), xp.asarray(targets)
        rows = idx.shape[0]
        self.layout.check_batch(rows * self.mesh.dp)
        chunk = rows // K
        self._set_act_shape(chunk // self._plan[0].micro_batches, idx.shape[1])
        self.sync.begin_step()
        comm, times, losses = CommStats(), StepTimes(), []
        for k, c in enumerate(self._plan):
            part = slice(k * chunk, (k + 1) * chunk)
            mbs = split_micro_batches(idx[part], targets[part], c.micro_batches)
            losses.append(self.pipe.run(c.instructions, mbs, dloss_scale=self.scaler.scale / K,
                                        zero_grad=c.zero_grad))
            times += self.pipe.last
            if c.sync:
                comm += self.sync.finish()
        rec = trace.recorder()
        t0 = rec.now()
        # the step's one device -> host read: every gradient's sum of squares and every
        # micro-batch loss (on a GPU the host waits for the device here, once)
        squares = self.sync.squares()
        values = backend.host_scalars(squares + [x for chunk_losses in losses for x in chunk_losses])
        sums, rest = values[:len(squares)], values[len(squares):]
        if self.scaler.scale != 1.0:    # the norm of the true gradients (S a power of 2: exact)
            sums = [x / self.scaler.scale ** 2 for x in sums]
        loss = 0.0
        for chunk_losses in losses:
            loss += mean_loss(rest[:len(chunk_losses)]) / K
            rest = rest[len(chunk_losses):]
        t_loss = self.pipe.clock()
        loss = self.pipe.share_loss(loss)
        times.loss_bcast += self.pipe.clock() - t_loss
        loss = self._dp_mean(loss)
        norm = self.sync.clip(sums, self.grad_clip)
        t1 = rec.now()
        # the same numbers on every rank, so every rank takes the same branch; the step named
        # is the optimiser's count (a resumed run's continues the saved one)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            report = locate(self.mesh.world, self.sync.step_count, "gradient", self.sync.grads,
                            self._order, loss, norm)
            if self.scaler.on_nonfinite(report):
                return TrainStepResult(loss, norm, comm, CommStats(), times, skipped=True)
        param_comm = self.sync.step(lr)
        self.scaler.on_finite()
        backend.synchronize(xp)
        rec.add("clip", t0, t1, "optimizer")
        rec.add("optimizer", t1, rec.now(), "optimizer")
        return TrainStepResult(loss, norm, comm, param_comm, times)

    def nonfinite_state(self, step: int) -> NonFinite | None:
        """Collective over the world: the first parameter, else the first tensor of an
        optimiser state buffer (nanoGPT order, over all ranks), that holds a NaN or an
        infinity; None when everything is finite: what a checkpoint of ``step`` must not be
        written with. (Finite gradients can still overflow Adam's second moment.) Each rank
        looks only at what it holds (ZeRO's pieces as they are: nothing is gathered)."""
        report = locate(self.mesh.world, step, "parameter", self.local.params, self._order)
        for s, held in self.sync.state_pieces().items():
            if report.tensor is not None:
                break
            pieces = {name if flat is None else f"{name}[{flat[0]}:{flat[1]}]": arr
                      for name, flat, arr in held}
            report = locate(self.mesh.world, step, f"optimiser state {s}", pieces, self._order)
        return report if report.tensor is not None else None

    def _set_act_shape(self, B: int, T: int) -> None:
        """What the executor's receive buffers hold: this model's activation shape for a
        micro-batch (sequence parallelism sends (B, T/tp, C))."""
        self.pipe.act_shape = self.local.activation_shape(B, T)

    def _dp_mean(self, value: float) -> float:
        dp = self.mesh.dp_group
        if dp.size == 1:
            return value
        return float(dp.allreduce(np.array([value]), op="avg")[0])

    # -- evaluation and the full model ----------------------------------------------------------
    def evaluate(self, idx: Any, targets: Any) -> float:
        """Mean loss of this dp rank's rows (the forward-only schedule, dropout off),
        averaged over dp: the same number on every rank."""
        xp = self.xp
        mbs = split_micro_batches(xp.asarray(idx), xp.asarray(targets), self.layout.micro_batches)
        self._set_act_shape(mbs[0][0].shape[0], mbs[0][0].shape[1])
        rec = trace.recorder()
        t0 = rec.now()
        self.local.eval()
        try:
            loss = self.pipe.step(self._evaluation, mbs, zero_grad=False)
        finally:
            self.local.train()
        loss = self._dp_mean(loss)
        rec.add("evaluate", t0, rec.now(), "evaluate")
        return loss

    def full_state_dict(self) -> dict[str, np.ndarray]:
        """The whole model's nanoGPT state dict, assembled from every tp/pp rank."""
        # 16-bit parameters as float32 (exact): checkpoints hold float32 and float64 only
        return {k: v.astype(backend.compute_dtype(v.dtype), copy=False)
                for k, v in gather_full_state_dict(self.local, self.mesh).items()}

    def full_optimizer_state(self) -> dict[str, Any]:
        """The optimiser's state as one process would hold it: ``{"step": int,
        "<state>.<nanoGPT name>": full-shape host array}`` (the keys and shapes of
        ``Optimizer.state_dict()`` on a single-process GPT), on every rank. So a checkpoint does
        not depend on the layout that wrote it: any dp x tp x pp, with or without ZeRO, or one
        process, can resume from it. Collective over the world (ZeRO's shards are summed over
        the dp group first, then every tp/pp piece as the parameters are)."""
        out: dict[str, Any] = {"step": int(self.sync.step_count)}
        for s, tensors in self.sync.state_tensors().items():
            for name, full in gather_full_state_dict(self.local, self.mesh, tensors=tensors).items():
                out[f"{s}.{name}"] = full
        # fp16's loss scale and its clean-step count, as one-element arrays of the state's
        # dtype (exact: a power of two and an integer below 2^24)
        dt = backend.compute_dtype(self.local.dtype)
        out.update({k: np.array([v], dtype=dt) for k, v in self.scaler.state_dict().items()})
        return out

    def load_full_optimizer_state(self, sd: dict[str, Any]) -> None:
        """Restore from ``full_optimizer_state()`` (of any layout) or a single process's
        ``Optimizer.state_dict()``: this rank takes its slices. Local, no collective: a missing
        or misshapen tensor raises on every rank alike, before training starts."""
        if "step" not in sd:
            raise KeyError("optimiser state has no 'step'")
        pieces = {s: local_pieces(self.local, sd, prefix=f"{s}.", what="the optimiser state")
                  for s in self.sync.state_names}
        self.sync.load_state_tensors(pieces, int(np.asarray(sd["step"])))
        self.scaler.load_state_dict(sd)

    def close(self) -> None:
        """Collective over the world: free the groups this trainer split off it (the mesh's
        and the tied embedding's); the trainer is unusable afterwards. MPI has a few thousand
        communicators per process, and a process that builds many trainers (a test suite, a
        benchmark of layouts) runs out without this."""
        if self.pipe.tied_group is not None:
            self.pipe.tied_group.free()
        for group in (self.mesh.tp_group, self.mesh.dp_group, self.mesh.pp_group):
            group.free()

    def memory_report(self) -> dict[str, int]:
        """Bytes held by this rank (``GradSync.memory_report``): parameters, gradients (at
        their peak so far: run a step first), optimiser state, and their unsharded sizes."""
        return self.sync.memory_report()
