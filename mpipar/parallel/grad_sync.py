"""How one rank's gradients become the update: the ``GradSync`` interface, chosen once.

The trainer does not know whether it runs plain data parallelism or ZeRO: at construction it
asks ``make_grad_sync`` for one object and from then on only calls its methods::

    sync = make_grad_sync(local, mesh, layout, OptimizerSpec("adamw", lr=1e-3))
    pipe.on_stage_backward_done.append(lambda i, names: sync.mark_ready(names))
    sync.begin_step()
    ... backward (accumulation steps, micro-batches); after each synchronised one:
    comm = sync.finish()
    norm = sync.clip_grad_norm(max_norm)     # or, reading squares() with the loss (trainer):
                                             # norm = sync.clip(host_values, max_norm)
    sync.step(lr)

Implementations: ``data_parallel.DataParallelSync`` (buckets all-reduced, the whole
optimiser on every rank) and ``zero.ZeroSync`` (buckets reduce-scattered into a shard, the
optimiser over the shard, parameters all-gathered; stage 1 or 2).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from mpipar.optim import OptimizerSpec
from mpipar.parallel.data_parallel import CommStats, DataParallelSync
from mpipar.parallel.layout import Layout
from mpipar.parallel.zero import ZeroSync


class GradSync(Protocol):
    grads: Mapping[str, Any]
    """What the optimiser reads, by key: this rank's gradients by parameter name, or (ZeRO)
    its shard's pieces, ``"name[a:b]"``, in flat order."""

    every_micro_batch: bool
    """True: reduce after every micro-batch's backward (ZeRO-2, so no full gradient lives
    longer than one micro-batch); False: once per optimiser step."""

    state_names: tuple[str, ...]
    """The optimiser's per-tensor state buffers (``exp_avg`` ...)."""

    @property
    def step_count(self) -> int:
        """Optimiser steps taken."""

    def begin_step(self) -> None:
        """Before a step's first backward: zero what the sync itself accumulates into."""

    def mark_ready(self, names: Iterable[str]) -> None:
        """Backward has finished these parameters' gradients for the step: their
        reduction may start (on the background thread)."""

    def finish(self) -> CommStats:
        """Start what is left, wait for every reduction; ``grads`` then hold the data-parallel
        mean (or this rank's shard of it). Returns the communication's statistics."""

    def squares(self) -> list[Any]:
        """The sum of squares of each gradient this rank counts in the global norm, as 0-d
        arrays of the gradients' module (on a GPU, device values: nothing is read)."""

    def clip(self, sums: Sequence[float], max_norm: float) -> float:
        """The global norm from ``sums`` (``squares()`` read to the host), added over the
        groups the norm spans (the same on every rank), and clip ``grads`` to ``max_norm``
        (0: no clipping). Returns the norm before clipping."""

    def clip_grad_norm(self, max_norm: float) -> float:
        """``clip`` of this rank's ``squares()``, read in one device -> host copy."""

    def step(self, lr: float | None = None) -> CommStats:
        """Apply the optimiser (and make the parameters whole again); the statistics of any
        parameter communication."""

    def state_tensors(self) -> dict[str, Mapping[str, Any]]:
        """Per state buffer, this rank's tensors by parameter name at the local model's
        shapes (collective over dp for ZeRO, whose shards are put together)."""

    state_replicated: bool
    """True: every dp rank holds the same optimiser state (one of them need save it);
    False: each holds its own shard (ZeRO: every one saves its own)."""

    def state_pieces(self) -> dict[str, list[tuple[str, tuple[int, int] | None, Any]]]:
        """Per state buffer, what this rank holds, local (no collective): (parameter name,
        the flat element range [a, b) of the local tensor the piece covers, or None for all
        of it, the piece). What a sharded checkpoint writes."""

    def load_state_tensors(self, tensors: Mapping[str, Mapping[str, Any]], step: int) -> None:
        """The inverse of ``state_tensors``; local, no collective."""

    def compression_state(self) -> dict[str, Any]:
        """This rank's gradient-compression state by bucket key (error-feedback residuals,
        PowerSGD's Q's), 1-D arrays; empty without a lossy ``compress``. Per rank, local."""

    def load_compression_state(self, state: Mapping[str, Any]) -> None:
        """The inverse of ``compression_state``; local, no collective."""

    def memory_report(self) -> dict[str, int]:
        """Bytes on this rank: ``params``; ``grads`` (the gradient storage held at its
        peak so far), ``grads_kept`` (what outlives a step's backward), ``grads_unsharded``;
        ``optimizer_state``, ``optimizer_state_unsharded`` (what plain data parallelism
        holds, for comparison); ``compression_state`` (a lossy ``--compress``'s
        error-feedback residuals, one per bucket, and PowerSGD's Q's: kept from step to
        step, per rank; 0 without compression)."""


def make_grad_sync(local: Any, mesh: Any, layout: Layout, optimizer: OptimizerSpec,
                   reduce_dtype: str = "grad") -> GradSync:
    """The GradSync of ``layout`` for this rank's ``local`` model (a LocalModel) on ``mesh``:
    ZeRO when ``layout.zero`` is 1 or 2, else plain data parallelism, its buckets compressed
    as ``layout.compress`` says (``Layout.check`` refuses compression with ZeRO). The global
    norm counts each parameter once over the tp and pp groups (``LocalModel.counts_in_norm``).
    ``reduce_dtype``: the gradients' dtype on the wire (``data_parallel.REDUCE_DTYPES``)."""
    common = dict(bucket_mb=layout.bucket_mb, algorithm=layout.allreduce,
                  counted=local.counts_in_norm, norm_groups=(mesh.tp_group, mesh.pp_group))
    if layout.zero:
        return ZeroSync(local.param_buffer, local.grads, local.layout, mesh.dp_group, optimizer,
                        stage=layout.zero, reduce_dtype=reduce_dtype, **common)
    return DataParallelSync(local.params, local.grads, local.layout, mesh.dp_group, optimizer,
                            compress=layout.compress, reduce_dtype=reduce_dtype, **common)


# ---- overlap: where the all-reduce of buckets during backward pays ---------------------------
OVERLAP_CHOICES = ("auto", "on", "off")


def _cores(allowed: int, machine: int, ranks_on_node: int) -> float:
    """Cores a rank may run on: its affinity set where it is bound to fewer than its
    machine's, else the machine's shared by the ranks on its node."""
    return allowed if allowed < machine else machine / max(ranks_on_node, 1)


def overlap_has_a_core(world: Any, threads: int, xp: Any = np) -> bool:
    """Collective over ``world`` (the same answer on every rank): whether to all-reduce
    gradient buckets while backward runs (the trainer's ``hooks``). A GPU's backward leaves
    the host free, so always there. On the CPU only where every rank has a core for its
    communication thread beside its ``threads`` compute threads: a rank waiting in MPI spins,
    so without a spare core the communication thread takes the compute's (dp=2 on 2 cores,
    one thread each, shakespeare B=8: 1793 ms a step overlapped, 1680 ms not). Where the
    transport cannot tell which ranks share a node (the simulator's), True, as before."""
    shared_node = getattr(world.transport, "shared_node", None)
    if xp is not np or shared_node is None:
        return True
    machine = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else machine
    ranks = world.allgather_json([shared_node(), allowed, machine])   # [node, allowed, machine]
    nodes = [node for node, _, _ in ranks]
    return all(_cores(a, m, nodes.count(node)) >= threads + 1 for node, a, m in ranks)


def resolve_overlap(choice: str, world: Any, threads: int, xp: Any = np) -> bool:
    """``--overlap`` as the trainer's ``hooks``: "on", "off", or "auto" (collective:
    ``overlap_has_a_core``)."""
    if choice not in OVERLAP_CHOICES:
        raise ValueError(f"overlap must be one of {', '.join(OVERLAP_CHOICES)}, got {choice!r}")
    return overlap_has_a_core(world, threads, xp) if choice == "auto" else choice == "on"
