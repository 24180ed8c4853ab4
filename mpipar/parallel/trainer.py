"""One training step under any dp x tp x pp layout: the pieces of ``parallel/`` put together.

    trainer = ParallelTrainer(world, config, dp=2, tp=2, pp=2, micro_batches=4, schedule="1f1b")
    for step in range(steps):
        x, y = sampler.batch(step, trainer.mesh.dp_rank, trainer.mesh.dp)   # this dp rank's rows
        result = trainer.step(x, y, lr=cosine_lr(step, ...))
    sd = trainer.full_state_dict()              # the whole nanoGPT state dict, every rank

Per step, on every rank:

1. this data-parallel rank's rows of the global batch are cut into ``grad_accum`` chunks,
   and each chunk into ``micro_batches`` pipeline micro-batches;
2. the pipeline executor runs the schedule (GPipe or 1F1B) over this rank's stages, which
   are tensor-parallel when tp > 1; gradients accumulate in the local flat gradient buffer,
   each micro-batch's loss scaled by 1 / (grad_accum x micro_batches);
3. during the last chunk's backward, each stage's gradients are handed to the data-parallel
   buckets as soon as they are final, and their all-reduce (or ZeRO reduce-scatter) starts
   on the background thread; the tied embedding is summed between first and last stage;
4. the global gradient norm counts every parameter once (tensor-parallel replicas and the
   tied embedding's second copy are not counted twice) and clips like the single process;
5. the optimiser (or its ZeRO shard) updates the local parameters.

Batch semantics follow Megatron: ``--batch-size`` is the global batch; what a rank computes
is its share, so changing the layout never changes what is trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpipar import backend
from mpipar.parallel.data_parallel import CommStats, GradBuckets
from mpipar.parallel.mesh import LayoutError, make_mesh
from mpipar.parallel.model import build_local_model, gather_full_state_dict, local_pieces
from mpipar.parallel.partition import balanced_layers, gpt_stage_costs, parse_stage_layers
from mpipar.parallel.pipeline import PipelineExecutor, split_micro_batches
from mpipar.parallel.schedules import make_schedule


@dataclass
class TrainStepResult:
    loss: float                                  # mean over the global batch
    grad_norm: float                             # before clipping
    comm: CommStats = field(default_factory=CommStats)    # data-parallel gradient reduction
    bubble: float = 0.0                          # this rank's measured pipeline idle fraction


def check_batch(batch_size: int, dp: int, grad_accum: int, micro_batches: int) -> None:
    """The global batch must split evenly over dp ranks, accumulation steps and micro-batches."""
    parts = dp * grad_accum * micro_batches
    if batch_size < 1 or batch_size % parts:
        raise LayoutError(f"--batch-size {batch_size} does not divide into dp {dp} x grad-accum "
                          f"{grad_accum} x micro-batches {micro_batches} = {parts} equal parts")


class ParallelTrainer:
    """This rank's share of training one GPT under a dp x tp x pp layout."""

    def __init__(self, world: Any, config: Any, *, dp: int, tp: int, pp: int, seed: int = 0,
                 dtype: str = "float32", xp: Any = np, micro_batches: int = 1,
                 schedule: str = "1f1b", grad_accum: int = 1, bucket_mb: float | None = 1.0,
                 allreduce: str | None = None, zero: int = 0, optimizer: str = "adamw",
                 lr: float = 1e-3, weight_decay: float = 0.0, betas: tuple = (0.9, 0.95),
                 grad_clip: float = 0.0, stage_layers: str | None = None,
                 hooks: bool = True) -> None:
        from mpipar.optim import OPTIMIZERS

        if zero not in (0, 1, 2):
            raise LayoutError(f"--zero must be 0, 1 or 2, got {zero}")
        if micro_batches < 1 or grad_accum < 1:
            raise LayoutError("--micro-batches and --grad-accum must be at least 1")
        if schedule not in ("gpipe", "1f1b"):
            raise LayoutError(f"--schedule must be gpipe or 1f1b, got {schedule!r}")
        if optimizer not in OPTIMIZERS:
            raise LayoutError(f"unknown optimizer {optimizer!r}")
        # every check above and in make_mesh / build_local_model is local and identical on
        # every rank, so a bad layout stops all ranks before any collective
        layers = (parse_stage_layers(stage_layers, config.n_layer, pp) if stage_layers
                  else balanced_layers(config.n_layer, pp, gpt_stage_costs(config, config.block_size))
                  if pp <= config.n_layer else None)
        self.mesh = mesh = make_mesh(world, dp, tp, pp,
                                     algorithms={"dp": allreduce} if allreduce else None)
        self.config = config
        self.local = local = build_local_model(config, mesh, seed=seed, dtype=dtype, xp=xp,
                                               stage_layers=layers)
        self.xp = xp
        self.micro_batches, self.grad_accum, self.zero = micro_batches, grad_accum, zero
        self.grad_clip = float(grad_clip)
        self.schedule = schedule
        self.instructions = list(make_schedule(schedule, pp, mesh.pp_rank, micro_batches))
        self._one_micro_batch = list(make_schedule(schedule, 1, 0, 1)) if pp == 1 else []
        self.pipe = PipelineExecutor(local, mesh.pp_group)
        hyper: dict[str, Any] = dict(lr=lr, weight_decay=weight_decay)
        if optimizer == "adamw":
            hyper["betas"] = betas
        if zero:
            from mpipar.parallel.zero import ZeroOptimizer

            self.optimizer = ZeroOptimizer(local.param_buffer, local.grads, local.layout,
                                           mesh.dp_group, optimizer, stage=zero, bucket_mb=bucket_mb,
                                           algorithm=allreduce, **hyper)
            self.buckets = self.optimizer.buckets
            self._grads = self.optimizer.grads                  # "name[a:b]" -> shard piece
            self._name_of = self.optimizer.name_of
        else:
            self.optimizer = OPTIMIZERS[optimizer](local.params, **hyper)
            self.buckets = GradBuckets(local.grad_buffer, local.layout, mesh.dp_group,
                                       bucket_mb=bucket_mb, algorithm=allreduce)
            self._grads = local.grads
            self._name_of = {n: n for n in local.grads}
        self._sync_now = False
        if hooks:
            self.pipe.on_stage_backward_done.append(self._on_stage_done)
        # which local gradients the global norm counts (each parameter exactly once)
        self._norm_weight = {key: self._counts_in_norm(name) for key, name in self._name_of.items()}

    # -- helpers ---------------------------------------------------------------------------------
    def _on_stage_done(self, index: int, names: list[str]) -> None:
        if self._sync_now:
            self.buckets.mark_ready(names)

    def _counts_in_norm(self, name: str) -> bool:
        local, mesh = self.local, self.mesh
        if name in local.tied_names and not local.first_stage:
            return False                          # the tied wte's second copy
        if local.shard_spec.get(name) is None and mesh.tp_rank != 0:
            return False                          # replicated across tp: count on tp rank 0
        return True

    def global_grad_norm(self) -> float:
        """Norm of the full model's gradient, identical on every rank."""
        total = 0.0
        for key, g in self._grads.items():
            if self._norm_weight[key]:
                flat = g.reshape(-1)
                total += float(flat @ flat)
        mesh = self.mesh
        groups = [mesh.tp_group, mesh.pp_group] + ([mesh.dp_group] if self.zero else [])
        for group in groups:                      # ZeRO: shards are distinct over dp too
            if group.size > 1:
                total = float(group.allreduce(np.array([total]), op="sum")[0])
        return math.sqrt(total)

    # -- one step --------------------------------------------------------------------------------
    def step(self, idx: Any, targets: Any, lr: float | None = None) -> TrainStepResult:
        """One optimiser step on this dp rank's rows ``idx``, ``targets`` (B/dp, T)."""
        xp, K, M = self.xp, self.grad_accum, self.micro_batches
        idx, targets = xp.asarray(idx), xp.asarray(targets)
        rows = idx.shape[0]
        if rows % (K * M):
            raise LayoutError(f"{rows} rows per data-parallel rank do not split into grad-accum {K} "
                              f"x micro-batches {M}")
        every = bool(getattr(self.buckets, "reduce_every_micro_step", False))  # ZeRO-2
        instructions = self.instructions
        if every and self.mesh.pp == 1 and M > 1:
            # ZeRO-2 on one stage: run the M micro-batches as accumulation steps, each
            # reduce-scattered as its backward ends, so that no gradient bucket outlives one
            # micro-batch (the executor would sum all M in the model's gradients first)
            K, M, instructions = K * M, 1, self._one_micro_batch
        if self.zero:
            self.optimizer.zero_grad()
        comm = CommStats()
        loss = 0.0
        chunk = rows // K
        for k in range(K):
            sync = every or k == K - 1
            self._sync_now = sync
            mbs = split_micro_batches(idx[k * chunk:(k + 1) * chunk], targets[k * chunk:(k + 1) * chunk], M)
            loss += self.pipe.step(instructions, mbs, dloss_scale=1.0 / K,
                                   zero_grad=(k == 0 or every), reduce_tied=sync) / K
            if sync:
                comm += self.buckets.finish()
        self._sync_now = False
        dp = self.mesh.dp_group
        if dp.size > 1:
            loss = float(dp.allreduce(np.array([loss]), op="avg")[0])
        norm = self.global_grad_norm()
        if self.grad_clip > 0 and norm > self.grad_clip:
            scale = self.grad_clip / (norm + 1e-6)       # as optim.clip_grad_norm
            for g in self._grads.values():
                g *= scale
        if self.zero:
            self.optimizer.step(lr=lr)
        else:
            self.optimizer.step(self._grads, lr=lr)
        backend.synchronize(xp)
        return TrainStepResult(loss, norm, comm, self.pipe.last.bubble)

    # -- evaluation and the full model ----------------------------------------------------------
    def evaluate(self, idx: Any, targets: Any) -> float:
        """Mean loss of this dp rank's rows (forward only through the pipeline), averaged
        over dp: the same number on every rank."""
        xp, M = self.xp, self.micro_batches
        idx, targets = xp.asarray(idx), xp.asarray(targets)
        mbs = split_micro_batches(idx, targets, M)
        self.local.eval()
        try:
            loss = self._forward_loss(mbs)
        finally:
            self.local.train()
        dp = self.mesh.dp_group
        if dp.size > 1:
            loss = float(dp.allreduce(np.array([loss]), op="avg")[0])
        return loss

    def _forward_loss(self, mbs: list) -> float:
        """Forward through the pipeline, stage by stage over point-to-point messages."""
        local, pp = self.local, self.mesh.pp_group
        xp = self.xp
        total = 0.0
        C = self.config.n_embd
        for x_idx, y in mbs:
            B, T = x_idx.shape
            if local.first_stage:
                h = x_idx
            else:
                h = pp.recv(pp.rank - 1, tag=7001, shape=(B, T, C), dtype=local.param_buffer.dtype, xp=xp)
            stages = local.stages
            body = stages[:-1] if local.last_stage else stages
            for st in body:
                h, _ = st.forward(h)
            if local.last_stage:
                _, loss, _ = stages[-1].forward(h, y)
                total += float(loss)
            else:
                pp.send(xp.ascontiguousarray(h), pp.rank + 1, tag=7001)
        total /= len(mbs)
        if pp.size > 1:                          # the loss lives on the last stage
            total = float(pp.broadcast(np.array([total]), root=pp.size - 1)[0])
        return total

    def full_state_dict(self) -> dict[str, np.ndarray]:
        """The whole model's nanoGPT state dict, assembled from every tp/pp rank."""
        return gather_full_state_dict(self.local, self.mesh)

    def _state_names(self) -> tuple[str, ...]:
        return self.optimizer.state_names if self.zero else tuple(self.optimizer.state)

    def full_optimizer_state(self) -> dict[str, Any]:
        """The optimiser's state as one process would hold it: ``{"step": int,
        "<state>.<nanoGPT name>": full-shape host array}`` (the keys and shapes of
        ``Optimizer.state_dict()`` on a single-process GPT), on every rank. So a checkpoint does
        not depend on the layout that wrote it: any dp x tp x pp, with or without ZeRO, or one
        process, can resume from it. Collective over the world (ZeRO's shards are summed over
        the dp group first, then every tp/pp piece as the parameters are)."""
        local = self.local
        if self.zero:
            flat = self.optimizer.unsharded_state()
            per_state = {s: local.layout.views(buf) for s, buf in flat.items()}
        else:
            per_state = {s: self.optimizer.state[s] for s in self._state_names()}
        out: dict[str, Any] = {"step": int(self.optimizer.step_count)}
        for s, tensors in per_state.items():
            for name, full in gather_full_state_dict(local, self.mesh, tensors=tensors).items():
                out[f"{s}.{name}"] = full
        return out

    def load_full_optimizer_state(self, sd: dict[str, Any]) -> None:
        """Restore from ``full_optimizer_state()`` (of any layout) or a single process's
        ``Optimizer.state_dict()``: this rank takes its slices. Local, no collective: a missing
        or misshapen tensor raises on every rank alike, before training starts."""
        if "step" not in sd:
            raise KeyError("optimiser state has no 'step'")
        local, step = self.local, int(np.asarray(sd["step"]))
        pieces = {s: local_pieces(local, sd, prefix=f"{s}.", what="the optimiser state")
                  for s in self._state_names()}
        if self.zero:
            flat = {}
            for s, by_name in pieces.items():
                buf = np.zeros(local.layout.numel, dtype=local.dtype)
                views = local.layout.views(buf)
                for name, piece in by_name.items():
                    views[name][...] = piece
                flat[s] = buf
            self.optimizer.load_unsharded_state(flat, step)
        else:
            self.optimizer.load_state_dict(
                {"step": step} | {f"{s}.{name}": piece for s, by_name in pieces.items()
                                  for name, piece in by_name.items()})

    def memory_report(self) -> dict[str, int]:
        """Bytes held by this rank: parameters, gradients, optimiser state. Under ZeRO-2 the
        gradients are what was held at the peak so far (shard + live buckets): run a step
        first."""
        if self.zero:
            rep = self.optimizer.memory_report()
            return {"params": rep["params"], "grads": rep["grads_allocated"],
                    "optimizer_state": rep["optimizer_state"]}
        state = sum(int(a.nbytes) for bufs in self.optimizer.state.values() for a in bufs.values())
        return {"params": int(self.local.param_buffer.nbytes),
                "grads": int(self.local.grad_buffer.nbytes), "optimizer_state": state}


def choose_layout(world_size: int, config: Any, batch_size: int, micro_batches: int = 1,
                  grad_accum: int = 1) -> tuple[int, int, int, str]:
    """(dp, tp, pp, reason) for ``world_size`` ranks when the user gave no layout.

    Data parallelism first (on CPUs and small models it moves the least data per step: one
    gradient all-reduce, overlapped with backward), as far as the batch allows; then tensor
    parallelism over adjacent ranks where it divides heads, MLP width and vocabulary; then
    pipeline stages for what is left.
    """
    per = micro_batches * grad_accum
    dp = max(d for d in range(1, world_size + 1)
             if world_size % d == 0 and batch_size % (d * per) == 0)
    rest = world_size // dp
    tp = 1
    for t in sorted((t for t in range(1, rest + 1) if rest % t == 0), reverse=True):
        if config.n_head % t == 0 and (4 * config.n_embd) % t == 0 and config.vocab_size % t == 0:
            tp = t
            break
    pp = rest // tp
    if pp > config.n_layer:
        raise LayoutError(f"cannot lay out {world_size} ranks for this model and batch: "
                          f"give --dp/--tp/--pp explicitly")
    why = (f"dp={dp} (largest data-parallel degree that divides batch {batch_size} into "
           f"{per} micro-step(s) per rank)")
    if tp > 1:
        why += f", tp={tp} (divides {config.n_head} heads, MLP {4 * config.n_embd}, vocab {config.vocab_size})"
    if pp > 1:
        why += f", pp={pp} (the rest, as pipeline stages)"
    return dp, tp, pp, why
