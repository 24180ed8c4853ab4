"""Data parallelism: gradient buckets all-reduced while backward is still running.

Every data-parallel rank holds the whole model and a contiguous slice of the global batch;
after backward the gradients are averaged over the dp group, so every rank applies the same
update as the single process would on the whole batch (up to the summation order of the
per-rank partial gradients). Averaging one big buffer at the end of backward leaves the
network idle during backward and the CPU idle during the all-reduce, so, as PyTorch DDP does
(Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training",
VLDB 2020), the flat gradient buffer is cut into buckets of about ``bucket_mb`` MiB and each
bucket's all-reduce starts, on the background communication thread, as soon as backward has
produced every gradient in it::

    backward:  head | block L-1 | block L-2 | ... | block 0 | embedding | finish()
    comm:             [bucket 0 ]  [bucket 1 ]  ...           [bucket k] |wait|
                                                                          ^ exposed time

Buckets follow the REVERSE layout order (backward produces the last layers' gradients
first) and are cut on tensor boundaries: a bucket holds whole tensors, so each bucket is one
contiguous range ``[start, end)`` of the flat buffer (no packing copy), and a tensor larger
than ``bucket_mb`` gets a bucket of its own. Buckets start strictly in index order on every
rank (MPI needs every rank to issue collectives in the same order; a bucket that is ready
early waits for its predecessors), which for the GPT's layout is also the order backward
makes them ready. A tied weight (``transformer.wte.weight``, used by the head and by the
embedding) is ready only once its last use has run backward, so the caller marks names per
stage after that stage's backward, and ``wte`` belongs to the embedding stage.

Typical use (``dp_train_step`` below does exactly this)::

    buckets = GradBuckets(model.grad_buffer, model.layout, mesh.dp_group, bucket_mb=1.0,
                          algorithm="ring")           # None: the group's own choice
    model.zero_grad()
    _, loss, cache = model.forward(x, y)
    backward_stages(model, cache, on_ready=buckets.mark_ready)   # buckets start meanwhile
    stats = buckets.finish()                          # grad_buffer now holds the dp mean
    stats.total_s, stats.exposed_s                    # background vs main-thread wait time

Timing: ``total_s`` is the time the background thread spent inside this step's
collectives (bracketed by clock reads queued on the same worker just before and after each
collective: the worker runs its queue strictly in order, so the pair encloses exactly that
collective); ``exposed_s`` is the time the main thread spent blocked in ``finish()`` waiting
for them. ``exposed_s / total_s`` is the fraction of communication not hidden by backward.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from mpipar.comm.background import worker


# -- partition ---------------------------------------------------------------------------------
@dataclass
class Bucket:
    """Tensors ``names`` occupying ``[start, end)`` of the flat buffer."""

    index: int
    start: int
    end: int
    names: tuple[str, ...]

    @property
    def numel(self) -> int:
        return self.end - self.start


def partition_buckets(layout: Any, itemsize: int, bucket_mb: float | None) -> list[Bucket]:
    """Buckets of whole tensors, about ``bucket_mb`` MiB each, in reverse layout order.

    ``bucket_mb`` None or <= 0 puts everything in one bucket (no overlap). A bucket is closed
    when adding the next tensor would exceed the cap, so it may hold a single larger tensor.
    """
    order = sorted(layout.offsets.items(), key=lambda kv: kv[1][0], reverse=True)
    cap = math.inf if not bucket_mb or bucket_mb <= 0 else max(1, int(bucket_mb * 2**20 / itemsize))
    groups: list[list[tuple[str, tuple[int, int]]]] = []
    cur: list[tuple[str, tuple[int, int]]] = []
    n = 0
    for name, (s, e) in order:
        if cur and n + (e - s) > cap:
            groups.append(cur)
            cur, n = [], 0
        cur.append((name, (s, e)))
        n += e - s
    if cur:
        groups.append(cur)
    buckets = []
    for i, g in enumerate(groups):
        start, end = g[-1][1][0], g[0][1][1]
        if sum(e - s for _, (s, e) in g) != end - start:  # a FlatLayout has no gaps
            raise ValueError(f"bucket {i}: tensors {[k for k, _ in g]} are not contiguous")
        buckets.append(Bucket(i, start, end, tuple(k for k, _ in g)))
    return buckets


# -- statistics --------------------------------------------------------------------------------
@dataclass
class CommStats:
    """Communication of one ``finish()`` (or a sum of several)."""

    collectives: int = 0
    bytes: int = 0
    total_s: float = 0.0     # background thread inside the collectives
    exposed_s: float = 0.0   # main thread blocked waiting for them

    @property
    def exposed_fraction(self) -> float:
        return self.exposed_s / self.total_s if self.total_s > 0 else 0.0

    def __iadd__(self, other: "CommStats") -> "CommStats":
        self.collectives += other.collectives
        self.bytes += other.bytes
        self.total_s += other.total_s
        self.exposed_s += other.exposed_s
        return self

    def __str__(self) -> str:
        return (f"{self.collectives} collectives, {self.bytes / 2**20:.2f} MiB, "
                f"total {self.total_s * 1e3:.2f} ms, exposed {self.exposed_s * 1e3:.2f} ms "
                f"({100 * self.exposed_fraction:.0f}%)")


@dataclass
class _InFlight:
    bucket: Bucket
    handle: Any
    t0: Any           # handle of a clock read queued just before the collective
    t1: Any           # ... and just after it


# -- the bucketed gradient all-reduce ----------------------------------------------------------
class GradBuckets:
    """Average ``grad_buffer`` over ``dp_group`` in buckets, overlapping backward.

    ``grad_buffer`` is a flat 1-D array laid out by ``layout`` (a FlatLayout: ``offsets[name]
    = (start, end)``); any model that has one (the single-process GPT, a tensor- or
    pipeline-parallel local model) works. ``algorithm`` is passed to every all-reduce (None:
    the group's default, e.g. as set per group by ``make_mesh(algorithms=...)``); ``options``
    reach the algorithms that take them (``servers=`` for ps, ``ranks_per_node=`` for hier).

    Per step: ``mark_ready(names)`` any number of times, then ``finish()``. Names may be
    marked in any order and more than once; a step with no marks at all is fine (finish()
    starts every bucket then: correct, but without overlap).
    """

    def __init__(self, grad_buffer: Any, layout: Any, dp_group: Any, bucket_mb: float | None = 1.0,
                 algorithm: str | None = None, **options: Any) -> None:
        if grad_buffer.ndim != 1 or grad_buffer.shape[0] != layout.numel:
            raise ValueError(f"grad_buffer must be 1-D of length {layout.numel}, got {grad_buffer.shape}")
        self.grad_buffer = grad_buffer
        self.itemsize = grad_buffer.itemsize
        self.layout = layout
        self.group = dp_group
        self.algorithm = algorithm
        self.options = options
        self.bucket_mb = bucket_mb
        self.buckets = partition_buckets(layout, grad_buffer.itemsize, bucket_mb)
        self._bucket_of = {name: b.index for b in self.buckets for name in b.names}
        self.totals = CommStats()      # every finish() since construction
        self.last = CommStats()        # the latest finish()
        self._reset()

    # -- per step --------------------------------------------------------------------------
    def _reset(self) -> None:
        self._waiting = [set(b.names) for b in self.buckets]   # names not yet marked
        self._next = 0                                         # next bucket to start
        self._inflight: list[_InFlight] = []

    def mark_ready(self, names: Iterable[str]) -> None:
        """Backward has finished producing the gradients of ``names`` (for this step): start
        every bucket, in index order, whose tensors are now all ready."""
        for name in names:
            i = self._bucket_of.get(name)
            if i is None:
                raise KeyError(f"{name!r} is not a tensor of this gradient buffer's layout")
            self._waiting[i].discard(name)
        while self._next < len(self.buckets) and not self._waiting[self._next]:
            self._start_next()

    def _start_next(self) -> None:
        b = self.buckets[self._next]
        self._next += 1
        if self.group.size == 1:        # the mean over one rank is the gradient itself
            self._store_single(b)
            return
        w = worker()
        t0 = w.submit(time.perf_counter)
        handle = self._start(b)         # input copied now: the buffer may be reused at once
        t1 = w.submit(time.perf_counter)
        self._inflight.append(_InFlight(b, handle, t0, t1))

    def finish(self) -> CommStats:
        """Start what is left, wait for every bucket and store the results; returns this
        step's statistics (also in ``last``, and added to ``totals``)."""
        while self._next < len(self.buckets):
            self._start_next()
        stats = CommStats()
        for f in self._inflight:
            tw = time.perf_counter()
            result = f.handle.wait()
            t1 = f.t1.wait()
            stats.exposed_s += time.perf_counter() - tw
            stats.total_s += t1 - f.t0.wait()
            stats.collectives += 1
            stats.bytes += f.bucket.numel * self.itemsize
            self._store(f.bucket, result)
        self._reset()
        self.last = stats
        self.totals += stats
        return stats

    # -- what a bucket does (ZeRO overrides these) -----------------------------------------
    def _start(self, b: Bucket) -> Any:
        return self.group.iallreduce(self.grad_buffer[b.start:b.end], op="avg",
                                     algorithm=self.algorithm, **self.options)

    def _store(self, b: Bucket, result: Any) -> None:
        self.grad_buffer[b.start:b.end] = result

    def _store_single(self, b: Bucket) -> None:
        """A group of one: nothing to communicate, the gradient is already in place."""

    def __repr__(self) -> str:
        sizes = [b.numel * self.itemsize / 2**20 for b in self.buckets]
        return (f"GradBuckets({len(self.buckets)} buckets, {min(sizes):.3f}..{max(sizes):.3f} MiB, "
                f"dp={self.group.size}, algorithm={self.algorithm or self.group.algorithm})")


# -- driving backward stage by stage ------------------------------------------------------------
def backward_stages(model: Any, cache: list, dloss: float = 1.0,
                    on_ready: Callable[[Sequence[str]], None] | None = None) -> None:
    """``model.backward(cache, dloss)``, calling ``on_ready(stage.names)`` after each stage.

    The same order as ``GPT.backward``: head first, then the blocks in reverse, then the
    embedding. The tied ``transformer.wte.weight`` is listed by the embedding stage only, so
    it is reported once both of its uses have accumulated into it.
    """
    stages = model.stages
    dx = stages[-1].backward(cache[-1], dloss)
    if on_ready is not None:
        on_ready(stages[-1].names)
    for stage, c in zip(reversed(stages[:-1]), reversed(cache[:-1])):
        dx = stage.backward(dx, c)
        if on_ready is not None:
            on_ready(stage.names)


@dataclass
class StepResult:
    loss: float                  # mean over the global batch (averaged over dp)
    grad_norm: float             # before clipping
    comm: CommStats = field(default_factory=CommStats)   # gradient reduction of this step
    param_comm: CommStats = field(default_factory=CommStats)  # ZeRO parameter all-gather


def dp_train_step(model: Any, buckets: Any, optimizer: Any, micro_batches: Sequence[tuple[Any, Any]],
                  lr: float | None = None, grad_clip: float = 0.0, hooks: bool = True) -> StepResult:
    """One optimiser step of data-parallel training (plain, or ZeRO-1/2).

    ``micro_batches``: this rank's K (x, y) pairs (its slice of the global batch, cut into
    K equal micro-batches, e.g. ``sampler.batch(step, dp_rank, dp, m, K)``). Each micro-step's
    loss is scaled by 1/K, so the accumulated gradient is the mean over micro-batches.

    * plain dp: ``buckets`` a GradBuckets, ``optimizer`` an mpipar.optim optimiser over the
      model's parameters. Gradients accumulate locally; buckets start only during the LAST
      micro-step's backward: one reduction per step.
    * ZeRO: ``buckets`` the ZeroOptimizer's ``buckets``, ``optimizer`` the ZeroOptimizer.
      Stage 1 as plain dp (reduce-scatter instead of all-reduce); stage 2 reduce-scatters
      every micro-step into the gradient shard (``reduce_every_micro_step``), so a full
      gradient never has to outlive one micro-step's backward.

    ``hooks=False`` runs the plain ``model.backward`` (no overlap; finish() does it all).
    Returns the dp-mean loss, the gradient norm before clipping and the communication times.
    """
    from mpipar.optim.clip import clip_grad_norm
    from mpipar.parallel.zero import ZeroOptimizer

    K = len(micro_batches)
    if K < 1:
        raise ValueError("dp_train_step needs at least one micro-batch")
    every = bool(getattr(buckets, "reduce_every_micro_step", False))
    zero = isinstance(optimizer, ZeroOptimizer)
    if zero:
        optimizer.zero_grad()
    comm = CommStats()
    loss = 0.0
    for m, (x, y) in enumerate(micro_batches):
        if m == 0 or every:
            model.zero_grad()
        sync = every or m == K - 1
        _, loss_m, cache = model.forward(x, y)
        if hooks:
            backward_stages(model, cache, 1.0 / K, buckets.mark_ready if sync else None)
        else:
            model.backward(cache, 1.0 / K)
        del cache
        loss += float(loss_m) / K
        if sync:
            comm += buckets.finish()
    group = buckets.group
    if group.size > 1:   # every handle is waited for: blocking collectives are safe again
        loss = float(group.allreduce(np.array([loss], dtype=np.float64), op="avg")[0])
    if zero:
        norm = optimizer.clip_grad_norm(grad_clip)
        optimizer.step(lr=lr)
        return StepResult(loss, norm, comm, optimizer.last_param_comm)
    norm = clip_grad_norm(model.grads, grad_clip)
    optimizer.step(model.grads, lr=lr)
    return StepResult(loss, norm, comm)


def memory_report(model: Any, optimizer: Any) -> dict[str, int]:
    """Bytes per rank of plain data parallelism: parameters, gradients, optimiser state
    (every rank holds all three in full). Activations are not measured here."""
    state = sum(int(a.nbytes) for bufs in optimizer.state.values() for a in bufs.values())
    return {"params": int(model.param_buffer.nbytes), "grads": int(model.grad_buffer.nbytes),
            "optimizer_state": state}
