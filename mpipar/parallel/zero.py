"""ZeRO stages 1 and 2: the optimiser state (and gradients) sharded over the dp group.

Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
SC 2020. Plain data parallelism keeps on every rank what only needs to exist once: with
AdamW the two moments are 2x the parameters. ZeRO gives each of the D ranks 1/D of the
flat buffer to own:

    stage 1  gradients reduce-scattered (mean), each rank updates only its shard of the
             parameters with optimiser state for that shard only, then the parameters are
             all-gathered so that every rank again holds the whole model.
    stage 2  as stage 1, and gradients persist only as the shard: every micro-step's buckets
             are reduce-scattered as backward produces them and summed into the shard.

Shards. The buckets of ``GradBuckets`` (reverse layout order, whole tensors, ~bucket_mb MiB)
are each split into D nearly equal contiguous blocks exactly as ``Communicator.reduce_scatter``
splits axis 0 (``split_counts``: the first ``n % D`` blocks have one element more), and rank
r owns block r of EVERY bucket (as PyTorch FSDP shards each flat parameter). So a bucket's
reduce-scatter lands directly in its owner's shard and can start as soon as the bucket is
ready, overlapping backward, and its parameter all-gather is the same split undone
(``allgather(counts=split_counts(...))``). With one bucket (``bucket_mb=None``) the shards
are D contiguous ranges of the whole flat buffer. Instead of padding the flat buffer to a
multiple of D, the uneven split is used: shards differ by at most one element per bucket,
and no padding is allocated or sent.

The optimiser (SGD or AdamW from ``mpipar.optim``, elementwise) runs on 1-D slices: for each
owned block, the pieces of the tensors that intersect it, named ``"name[a:b]"`` (element
range within the tensor). Parameter pieces are views of the model's ``param_buffer``, so the
update lands in place; gradient pieces are views of the shard. Weight decay is decided by
the FULL tensor (``decay(name, full_tensor)``), since every piece is 1-D.

Algorithms: a bucket uses ``algorithm`` (None: the group's default) for its reduce-scatter
and all-gather when that algorithm implements them (ring, rhd, native); otherwise MPI's
native collective is used (what the Communicator does for a default algorithm lacking them).

Memory. ZeRO-1 and -2 keep full parameters on every rank. Stage 1 keeps the model's full
gradient buffer (gradients accumulate there over micro-steps) besides the shard. Stage 2
gives every gradient tensor of the model's ``GradStore`` (``model.grads``) storage of its own (``GradStore.use_buckets``): a tensor exists from the
first write of backward into it until its bucket is complete, when the bucket is gathered
into one array that is handed to the reduce-scatter (no further copy) and the tensors are
freed, so the full gradient never exists at once. What is held at the peak is the shard,
the tensors of buckets backward is still filling (the tied embedding is written by the
head, first in backward, and by the embedding, last: it lives through the whole backward)
and the buckets in flight. With pipeline parallelism a stage's buckets fill over all
micro-batches of a step, so they live through the step. ``memory_report`` gives what this
rank really held at its peak (``grads``) and what outlives a step's backward (``grads_kept``:
stage 1 the full buffer and the shard, stage 2 the shard).

``ZeroSync`` is ZeRO as a ``GradSync`` (``grad_sync.py``): the trainer drives it exactly as
it drives plain data parallelism, and never asks which stage it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mpipar import backend
from mpipar.comm.algorithms import get_algorithm
from mpipar.comm.communicator import split_counts
from mpipar.nn.grads import GradStore
from mpipar.optim import OptimizerSpec, decays_by_default
from mpipar.parallel.data_parallel import Bucket, BucketedSync, CommStats, GradBuckets, TimedCollectives


def _algorithm_for(group: Any, algorithm: str | None, collective: str) -> str | None:
    """``algorithm`` if it implements ``collective``, else native (None: the group decides)."""
    name = algorithm or group.algorithm
    if algorithm is None or name == "auto" or get_algorithm(name).supports(collective):
        return algorithm
    return "native"


class ShardedGradBuckets(GradBuckets):
    """GradBuckets whose buckets are reduce-scattered (mean) into this rank's gradient shard.

    With ``reduce_every_micro_step`` (stage 2) the gradients of ``store`` (the model's
    GradStore) move into per-tensor storage; a complete bucket is gathered into one array
    donated to its reduce-scatter, which frees its tensors (stage 1 accumulates micro-steps
    in the full buffer)."""

    def __init__(self, grad_buffer: Any, layout: Any, dp_group: Any, bucket_mb: float | None = 1.0,
                 algorithm: str | None = None, reduce_every_micro_step: bool = False,
                 store: GradStore | None = None, reduce_dtype: str = "grad", **options: Any) -> None:
        super().__init__(grad_buffer, layout, dp_group, bucket_mb, algorithm,
                         reduce_dtype=reduce_dtype, **options)
        self.reduce_every_micro_step = reduce_every_micro_step
        self.rs_algorithm = _algorithm_for(dp_group, algorithm, "reduce_scatter")
        D, r = dp_group.size, dp_group.rank
        self.counts: list[list[int]] = []
        self.blocks: list[tuple[int, int]] = []       # owned [lo, hi) of each bucket, flat index
        self.shard_offsets: list[int] = []             # where that block sits in the shard
        pos = 0
        for b in self.buckets:
            c = split_counts(b.numel, D)
            lo = b.start + sum(c[:r])
            self.counts.append(c)
            self.blocks.append((lo, lo + c[r]))
            self.shard_offsets.append(pos)
            pos += c[r]
        self.shard_numel = pos
        xp = backend.array_module(grad_buffer)
        self.shard_grad = xp.zeros(pos, dtype=grad_buffer.dtype)
        self.store = store if reduce_every_micro_step else None
        if self.store is not None:
            self.store.use_buckets([(b.start, b.end) for b in self.buckets])
            self.grad_buffer = None                    # the model's flat buffer is gone

    def _shard_view(self, b: Bucket) -> Any:
        so = self.shard_offsets[b.index]
        return self.shard_grad[so:so + self.counts[b.index][self.group.rank]]

    def _start(self, b: Bucket) -> Any:
        if self.store is not None:                    # a fresh array: handed over, not copied
            return self.group.ireduce_scatter(self._on_wire(self.store.take(b.index)), op="avg",
                                              donate=True, algorithm=self.rs_algorithm,
                                              **self.options)
        return self.group.ireduce_scatter(self._on_wire(self.grad_buffer[b.start:b.end]), op="avg",
                                          algorithm=self.rs_algorithm, **self.options)

    def _store(self, b: Bucket, result: Any) -> None:
        self._shard_view(b)[...] += result            # the shard was zeroed at step start

    def _store_single(self, b: Bucket) -> None:
        g = self.store.take(b.index) if self.store is not None else self.grad_buffer[b.start:b.end]
        self._shard_view(b)[...] += g


class ZeroSync(BucketedSync):
    """ZeRO-1/2 over flat ``param_buffer`` / gradients laid out by ``layout``: a ``GradSync``.

        zero = ZeroSync(model.param_buffer, model.grads, model.layout, dp_group,
                        OptimizerSpec("adamw", lr=1e-3, weight_decay=0.1), stage=2)
        zero.begin_step()                                  # zero the gradient shard
        ... backward, calling zero.mark_ready(names) as stages finish
        zero.finish()                                      # shard = mean gradient block
        norm = zero.clip_grad_norm(1.0)                    # global norm over all shards
        zero.step(lr=lr)                                   # shard update + param all-gather

    ``grads``: the model's GradStore (``model.grads``). Stage 1 keeps its flat buffer; stage 2
    frees it and gives each bucket storage of its own for the time between backward writing
    it and its reduce-scatter (module docstring, Memory). ``counted``/``norm_groups``
    as for ``DataParallelSync``; the shards differ over the dp group, so it is added to the
    norm's groups here.
    """

    def __init__(self, param_buffer: Any, grads: GradStore, layout: Any, dp_group: Any,
                 optimizer: OptimizerSpec, stage: int = 1, bucket_mb: float | None = 1.0,
                 algorithm: str | None = None, counted: Callable[[str], bool] | None = None,
                 norm_groups: Sequence[Any] = (),
                 decay: Callable[[str, Any], bool] = decays_by_default,
                 options: dict[str, Any] | None = None, reduce_dtype: str = "grad") -> None:
        if stage not in (1, 2):
            raise ValueError(f"ZeRO stage must be 1 or 2, got {stage}")
        grad_buffer = grads.buffer
        if grad_buffer is None:
            raise ValueError("the GradStore has no flat buffer any more (another ZeroSync "
                             "moved it into buckets): build the model afresh")
        if param_buffer.shape != grad_buffer.shape or param_buffer.shape[0] != layout.numel:
            raise ValueError("param_buffer and the gradients must both be 1-D of layout.numel")
        self.stage = stage
        self.every_micro_batch = stage == 2          # reduce-scatter every micro-step
        self.param_buffer, self.layout = param_buffer, layout
        # the optimiser state's dtype: the parameters', float32 for 16-bit ones (the masters)
        self.state_dtype = backend.compute_dtype(param_buffer.dtype)
        self.itemsize, self.full_grad_bytes = grad_buffer.itemsize, int(grad_buffer.nbytes)
        self.group = dp_group
        self.options = dict(options or {})
        buckets = ShardedGradBuckets(grad_buffer, layout, dp_group, bucket_mb, algorithm,
                                     reduce_every_micro_step=stage == 2, store=grads,
                                     reduce_dtype=reduce_dtype, **self.options)
        del grad_buffer                                  # stage 2: freed now
        self.ag_algorithm = _algorithm_for(dp_group, algorithm, "allgather")

        # the optimiser over 1-D pieces: key "name[a:b]" -> views of params and grad shard,
        # in flat order (so the norm adds the squares in the single process's order)
        full = layout.views(param_buffer)
        pieces = []
        for b, (lo, hi), so in zip(buckets.buckets, buckets.blocks, buckets.shard_offsets):
            for name in b.names:
                s, e = layout.offsets[name]
                x0, x1 = max(lo, s), min(hi, e)
                if x0 < x1:
                    pieces.append((x0, x1, name, so + x0 - lo))
        params: dict[str, Any] = {}
        grads_of: dict[str, Any] = {}      # optimiser key "name[a:b]" -> view of the shard
        self.name_of: dict[str, str] = {}  # optimiser key "name[a:b]" -> parameter name
        self._place: dict[str, tuple[int, int]] = {}  # optimiser key -> its range of param_buffer
        for x0, x1, name, at in sorted(pieces):
            s = layout.offsets[name][0]
            key = f"{name}[{x0 - s}:{x1 - s}]"
            params[key] = param_buffer[x0:x1]
            grads_of[key] = buckets.shard_grad[at:at + x1 - x0]
            self.name_of[key] = name
            self._place[key] = (x0, x1)

        def piece_decay(key: str, p: Any) -> bool:
            name = self.name_of[key]
            return decay(name, full[name])                       # the full tensor's ndim

        # a rank owning nothing (fewer elements than ranks) has no optimiser
        self.optimizer = optimizer.build(params, decay=piece_decay) if params else None
        self._steps = 0
        self.state_names: tuple[str, ...] = optimizer.state_names
        # the shards are distinct over dp: the norm adds over the dp group too
        super().__init__(grads_of, buckets,
                         [k for k, n in self.name_of.items() if counted is None or counted(n)],
                         tuple(norm_groups) + (dp_group,))

    # -- the step ----------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Zero the gradient shard (the model's own buffer is zeroed by the model)."""
        self.buckets.shard_grad.fill(0)

    def step(self, lr: float | None = None) -> CommStats:
        """Update this rank's shard, then all-gather the parameters bucket by bucket."""
        self._steps += 1
        if self.optimizer is not None:
            self.optimizer.step(self.grads, lr=lr)
        stats = CommStats()
        if self.group.size > 1:
            timed = TimedCollectives(self.group)
            for b, (lo, hi), c in zip(self.buckets.buckets, self.buckets.blocks, self.buckets.counts):
                timed.start(lambda lo=lo, hi=hi, c=c: self.group.iallgather(
                    self.param_buffer[lo:hi], counts=c, algorithm=self.ag_algorithm, **self.options),
                    b.numel * self.param_buffer.itemsize, b)
            for b, full in timed.drain(stats):
                self.param_buffer[b.start:b.end] = full
        return stats

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Optimiser steps taken (as ``Optimizer.step_count``), also on a rank owning nothing."""
        return self._steps

    def state_tensors(self) -> dict[str, Mapping[str, Any]]:
        """Every state buffer (``exp_avg`` ...) whole, as this rank's model's tensors by name
        (host arrays), on every dp rank. Collective over the dp group: each rank writes its
        pieces into zeros and the buffers are summed, each element by exactly one rank, so
        the bits are the owners' (x + 0 is exact)."""
        out = {}
        for s in self.state_names:
            flat = np.zeros(self.layout.numel, dtype=self.state_dtype)
            if self.optimizer is not None:
                for key, piece in self.optimizer.state[s].items():
                    lo, hi = self._place[key]
                    flat[lo:hi] = backend.to_host(piece)
            if self.group.size > 1:
                flat = self.group.allreduce(flat, op="sum")
            out[s] = self.layout.views(flat)
        return out

    state_replicated = False      # each dp rank holds its own shard of the state

    def state_pieces(self) -> dict[str, list[tuple[str, tuple[int, int] | None, Any]]]:
        """Per state buffer, what THIS rank holds, without communication: (parameter name,
        the element range [a, b) of the local tensor, flattened, that the piece covers,
        the piece). A sharded checkpoint writes these as they are, from every dp rank."""
        out: dict[str, list[tuple[str, tuple[int, int] | None, Any]]] = {s: [] for s in self.state_names}
        if self.optimizer is not None:
            for s in self.state_names:
                for key, piece in self.optimizer.state[s].items():
                    name, (lo, hi) = self.name_of[key], self._place[key]
                    start = self.layout.offsets[name][0]
                    out[s].append((name, (lo - start, hi - start), piece))
        return out

    def load_state_tensors(self, tensors: Mapping[str, Mapping[str, Any]], step: int) -> None:
        """The inverse of ``state_tensors`` (local, no collective): take this rank's pieces
        of every state tensor; any dp size and bucket size may have written them."""
        if self.optimizer is not None:
            sd: dict[str, Any] = {"step": int(step)}
            for s in self.state_names:
                by_name = tensors[s]
                for key in self.optimizer.state[s]:
                    name, (lo, hi) = self.name_of[key], self._place[key]
                    start = self.layout.offsets[name][0]
                    sd[f"{s}.{key}"] = backend.to_host(by_name[name]).reshape(-1)[lo - start:hi - start]
            self.optimizer.load_state_dict(sd)
        self._steps = int(step)

    # -- memory ------------------------------------------------------------------------------
    def memory_report(self) -> dict[str, int]:
        """Bytes on this rank (see ``grad_sync.GradSync.memory_report``). ``grads``: what
        this rank held: the shard plus the model's full buffer, or under stage 2 with a
        GradStore the most bucket storage held at once so far (``GradStore.peak_bytes``);
        ``grads_kept``: what outlives a step's backward (stage 1: the full buffer + the
        shard; stage 2: the shard); ``*_unsharded``: what plain data parallelism holds."""
        shard = int(self.buckets.shard_grad.nbytes)
        full = self.full_grad_bytes
        store = self.buckets.store
        model_grads = store.peak_bytes if store is not None else full   # stage 2 / stage 1
        state = 0 if self.optimizer is None else sum(
            int(a.nbytes) for bufs in self.optimizer.state.values() for a in bufs.values())
        return {
            "params": int(self.param_buffer.nbytes),
            "grads": model_grads + shard,
            "grads_kept": shard if self.stage == 2 else full + shard,
            "grads_unsharded": full,
            "optimizer_state": state,
            "optimizer_state_unsharded": len(self.state_names) * self.layout.numel
                                         * self.state_dtype.itemsize,
            "compression_state": self.compression_bytes(),      # 0: ZeRO does not compress
        }

    def __repr__(self) -> str:
        return (f"ZeroSync(stage={self.stage}, dp={self.group.size}, "
                f"shard={self.buckets.shard_numel} of {self.layout.numel} elements, "
                f"{len(self.buckets.buckets)} buckets)")
