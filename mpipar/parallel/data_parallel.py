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

``DataParallelSync`` is plain data parallelism as a ``GradSync`` (``grad_sync.py``): the
buckets above, and an optimiser over the whole local model. The trainer drives it::

    sync = DataParallelSync(model.params, model.grads, model.layout, mesh.dp_group,
                            OptimizerSpec("adamw", lr=1e-3), bucket_mb=1.0)
    pipe.on_stage_backward_done.append(lambda i, names: sync.mark_ready(names))
    ... the pipeline's backward: buckets start on the background thread meanwhile
    stats = sync.finish()                    # the gradients now hold the dp mean
    norm = sync.clip_grad_norm(1.0)
    sync.step(lr)
    stats.total_s, stats.exposed_s           # background vs main-thread wait time

Timing (``TimedCollectives``, shared with ZeRO's parameter all-gather): ``total_s`` is the
time the background thread spent inside this step's collectives (bracketed by clock reads
queued on the same worker just before and after each collective: the worker runs its queue
strictly in order, so the pair encloses exactly that collective); ``exposed_s`` is the time
the main thread spent blocked waiting for them. ``exposed_s / total_s`` is the fraction of
communication not hidden by backward.

Compression (``compress``, a ``comm.compress`` spec): how a bucket's mean is made is one
object chosen at construction, a bucket reducer. ``none`` is ``AllreduceMean``, the
all-reduce above (``iallreduce(op="avg")``), unchanged. A lossy scheme is
``CompressedMean``: the bucket's copy and the compressor's whole ``allreduce_mean`` (its
scale all-reduce, all-gathers and error feedback, keyed by bucket index, so each bucket keeps
its own residual from step to step) are queued as one job on the same background thread, in
the same bucket order, between the same two clock reads; the bytes a bucket adds to
``CommStats.bytes`` are the compressor's count of what that call handed to collectives
(``last_bytes``), read once the call is done, not the bucket's uncompressed size. A group of
one sends nothing and compresses nothing: its gradient is the mean.

The wire dtype (``reduce_dtype``, ``REDUCE_DTYPES``): a bucket travels in the gradients' own
dtype ("grad": 16 bits under mixed precision, half the bytes of fp32), or is cast to float32
for the collective ("fp32") and the mean rounded back into the 16-bit gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpipar import backend, trace
from mpipar.comm.compress import GradientCompressor, make_compressor
from mpipar.optim import OptimizerSpec, norm_of, scale_to, squares

# the data-parallel reduction's dtype: the gradients' own ("grad"), or float32
REDUCE_DTYPES = {"grad": None, "fp32": "float32"}


# -- partition ---------------------------------------------------------------------------------
@dataclass
class Bucket:
    """Tensors ``names`` occupying ``[start, end)`` of the flat buffer; ``shapes``: theirs in
    buffer order (ascending offset, so end to end they are the bucket's slice; ``names`` is
    in the reverse order, backward's), what a compressor of matrices needs."""

    index: int
    start: int
    end: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...] = ()

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
        buckets.append(Bucket(i, start, end, tuple(k for k, _ in g),
                              tuple(tuple(layout.shapes[k]) for k, _ in reversed(g))))
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
    key: Any
    handle: Any
    t0: Any           # handle of a clock read queued just before the collective
    t1: Any           # ... and just after it
    nbytes: int | Callable[[Any], int]   # or, counted as it runs: f(handle) once waited


class TimedCollectives:
    """Non-blocking collectives in flight, each timed on the background worker.

        timed.start(lambda: group.iallreduce(x, op="avg"), x.nbytes, key=bucket)
        for bucket, result in timed.drain(stats):     # waits in start order
            ...                                        # stats: counts, bytes, total, exposed
    """

    def __init__(self, group: Any) -> None:
        # group: the Communicator whose non-blocking collectives these are; its clock is wall
        # time under MPI and virtual time in the simulator, so both report the same way
        self._clock = group.clock
        self._background = group.background()
        self._group = group.name
        self._inflight: list[_InFlight] = []

    def start(self, begin: Callable[[], Any], nbytes: int | Callable[[Any], int], key: Any) -> None:
        """Queue ``begin()`` (which starts one collective and returns its handle) between two
        clock reads on the worker. ``begin`` copies or takes its input: the caller's buffer
        may be reused at once. ``nbytes``: the bytes it hands over, or a function of the
        handle giving them once its wait has returned (a compressor counts as it runs)."""
        w = self._background
        t0 = w.submit(self._clock)
        handle = begin()
        self._inflight.append(_InFlight(key, handle, t0, w.submit(self._clock), nbytes))

    def drain(self, stats: CommStats) -> Iterator[tuple[Any, Any]]:
        """Wait for every collective in start order, yielding ``(key, result)``; adds each
        one's times and bytes to ``stats`` (the wait, not what the caller does with the
        result, is exposed time)."""
        inflight, self._inflight = self._inflight, []
        for f in inflight:
            tw = self._clock()
            result = f.handle.wait()
            t1 = f.t1.wait()
            tr = self._clock()
            nbytes = f.nbytes(f.handle) if callable(f.nbytes) else f.nbytes
            stats.exposed_s += tr - tw
            trace.recorder().add("wait", tw, tr, "wait", group=self._group, bytes=nbytes)
            stats.total_s += t1 - f.t0.wait()
            stats.collectives += 1
            stats.bytes += nbytes
            yield f.key, result

    def __len__(self) -> int:
        return len(self._inflight)


# -- how one bucket's mean is made ---------------------------------------------------------------
class AllreduceMean:
    """A bucket's mean by the group's non-blocking all-reduce (``compress="none"``)."""

    compressor: GradientCompressor | None = None

    def __init__(self, algorithm: str | None, options: Mapping[str, Any]) -> None:
        self.algorithm, self.options = algorithm, dict(options)

    def begin(self, group: Any, b: Bucket, x: Any) -> Any:
        """Start the mean of ``x`` (bucket ``b``'s gradients; ``iallreduce`` copies it)."""
        return group.iallreduce(x, op="avg", algorithm=self.algorithm, **self.options)

    def nbytes(self, size: int) -> int | Callable[[Any], int]:
        """Bytes a bucket of ``size`` bytes hands over: all of it."""
        return size


class _CountedJob:
    """A compressed bucket queued on the background thread, and the bytes its call sent."""

    def __init__(self) -> None:
        self.handle: Any = None
        self.sent = 0

    def wait(self) -> Any:
        return self.handle.wait()


class CompressedMean:
    """A bucket's mean by ``compressor.allreduce_mean`` queued whole on the group's
    background thread (its collectives run there, in bucket order), keyed by bucket index."""

    def __init__(self, compressor: GradientCompressor, algorithm: str | None,
                 options: Mapping[str, Any]) -> None:
        if options:
            raise ValueError(f"compression {compressor.spec} passes no per-call algorithm "
                             f"options ({', '.join(sorted(options))}): give them to the "
                             f"communicator instead")
        self.compressor, self.algorithm = compressor, algorithm

    def begin(self, group: Any, b: Bucket, x: Any) -> _CountedJob:
        """Queue the compressed mean of a copy of ``x`` (bucket ``b``'s gradients)."""
        job = _CountedJob()
        job.handle = group.background().submit(self._mean, group, b, x.copy(), job)
        return job

    def _mean(self, group: Any, b: Bucket, x: Any, job: _CountedJob) -> Any:
        """On the background thread: the call (the bucket's tensor shapes with it, for
        PowerSGD's matrices), and its count read before the next runs."""
        out = self.compressor.allreduce_mean(group, f"bucket{b.index}", x, self.algorithm, b.shapes)
        job.sent = self.compressor.last_bytes
        return out

    def nbytes(self, size: int) -> int | Callable[[Any], int]:
        """What the compressor handed to collectives for the bucket: read from its job."""
        return _sent


def _sent(job: _CountedJob) -> int:
    return job.sent


def bucket_reducer(compress: str, algorithm: str | None,
                   options: Mapping[str, Any]) -> AllreduceMean | CompressedMean:
    """The reducer of ``compress`` (a ``comm.compress`` spec; ValueError naming what is
    wrong otherwise): the plain all-reduce for ``none``, else the compressor's mean."""
    compressor = make_compressor(compress)
    if compressor.spec == "none":
        return AllreduceMean(algorithm, options)
    return CompressedMean(compressor, algorithm, options)


# -- the bucketed gradient all-reduce ----------------------------------------------------------
class GradBuckets:
    """Average ``grad_buffer`` over ``dp_group`` in buckets, overlapping backward.

    ``grad_buffer`` is a flat 1-D array laid out by ``layout`` (a FlatLayout: ``offsets[name]
    = (start, end)``); any model that has one (the single-process GPT, a tensor- or
    pipeline-parallel local model) works. ``algorithm`` is passed to every all-reduce (None:
    the group's default, e.g. as set per group by ``make_mesh(algorithms=...)``); ``options``
    reach the algorithms that take them (``servers=`` for ps, ``ranks_per_node=`` for hier).
    ``compress``: how each bucket's mean travels (module docstring, Compression; ``none``:
    the plain all-reduce).

    Per step: ``mark_ready(names)`` any number of times, then ``finish()``. Names may be
    marked in any order and more than once; a step with no marks at all is fine (finish()
    starts every bucket then: correct, but without overlap).
    """

    def __init__(self, grad_buffer: Any, layout: Any, dp_group: Any, bucket_mb: float | None = 1.0,
                 algorithm: str | None = None, compress: str = "none",
                 reduce_dtype: str = "grad", **options: Any) -> None:
        if reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(f"gradient reduce dtype {reduce_dtype!r} is not one of "
                             f"{', '.join(REDUCE_DTYPES)}")
        if grad_buffer.ndim != 1 or grad_buffer.shape[0] != layout.numel:
            raise ValueError(f"grad_buffer must be 1-D of length {layout.numel}, got {grad_buffer.shape}")
        self.grad_buffer = grad_buffer
        self.itemsize = grad_buffer.itemsize
        wire = REDUCE_DTYPES[reduce_dtype]
        self.wire = np.dtype(wire) if wire is not None else grad_buffer.dtype   # on the wire
        self.layout = layout
        self.group = dp_group
        self.algorithm = algorithm
        self.options = options
        self.bucket_mb = bucket_mb
        self.reducer = bucket_reducer(compress, algorithm, options)
        self.buckets = partition_buckets(layout, grad_buffer.itemsize, bucket_mb)
        self._bucket_of = {name: b.index for b in self.buckets for name in b.names}
        self.totals = CommStats()      # every finish() since construction
        self.last = CommStats()        # the latest finish()
        self._reset()

    # -- per step --------------------------------------------------------------------------
    def _reset(self) -> None:
        self._waiting = [set(b.names) for b in self.buckets]   # names not yet marked
        self._next = 0                                         # next bucket to start
        self._timed = TimedCollectives(self.group)

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
        self._timed.start(lambda: self._start(b), self.reducer.nbytes(b.numel * self.wire.itemsize),
                          b)

    def finish(self) -> CommStats:
        """Start what is left, wait for every bucket and store the results; returns this
        step's statistics (also in ``last``, and added to ``totals``)."""
        while self._next < len(self.buckets):
            self._start_next()
        stats = CommStats()
        for b, result in self._timed.drain(stats):
            self._store(b, result)
        self._reset()
        self.last = stats
        self.totals += stats
        return stats

    # -- what a bucket does (ZeRO overrides these) -----------------------------------------
    def _on_wire(self, x: Any) -> Any:
        """``x`` in the wire dtype (itself when it is already)."""
        return x if x.dtype == self.wire else x.astype(self.wire)

    def _start(self, b: Bucket) -> Any:
        return self.reducer.begin(self.group, b, self._on_wire(self.grad_buffer[b.start:b.end]))

    def _store(self, b: Bucket, result: Any) -> None:
        self.grad_buffer[b.start:b.end] = result

    def _store_single(self, b: Bucket) -> None:
        """A group of one: nothing to communicate, the gradient is already in place."""

    def __repr__(self) -> str:
        sizes = [b.numel * self.itemsize / 2**20 for b in self.buckets]
        return (f"GradBuckets({len(self.buckets)} buckets, {min(sizes):.3f}..{max(sizes):.3f} MiB, "
                f"dp={self.group.size}, algorithm={self.algorithm or self.group.algorithm})")


# -- the GradSyncs ------------------------------------------------------------------------------
class BucketedSync:
    """What both GradSyncs (``DataParallelSync``, ``zero.ZeroSync``) share: gradients reduced
    over the dp group in ``buckets`` as backward marks them ready, and the global norm of the
    keys of ``grads`` in ``count``, added over ``norm_groups``."""

    def __init__(self, grads: Mapping[str, Any], buckets: GradBuckets, count: Collection[str],
                 norm_groups: Sequence[Any]) -> None:
        self.grads, self.buckets = grads, buckets
        self._count, self._norm_groups = count, tuple(norm_groups)

    def mark_ready(self, names: Iterable[str]) -> None:
        self.buckets.mark_ready(names)

    def finish(self) -> CommStats:
        return self.buckets.finish()

    def squares(self) -> list[Any]:
        return squares(self.grads, self._count)

    def clip(self, sums: Sequence[float], max_norm: float) -> float:
        norm = norm_of(sums, self._norm_groups)
        scale_to(self.grads, norm, max_norm)
        return norm

    def clip_grad_norm(self, max_norm: float) -> float:
        return self.clip(backend.host_scalars(self.squares()), max_norm)

    @property
    def compressor(self) -> GradientCompressor | None:
        """The buckets' compressor (None: the plain all-reduce, ZeRO included)."""
        return self.buckets.reducer.compressor

    def compression_state(self) -> dict[str, Any]:
        """This rank's error-feedback residuals (and PowerSGD's Q's) by bucket key, 1-D
        arrays (``GradientCompressor.state_dict``); empty without a lossy compressor. They
        differ per dp rank: a checkpoint holds every rank's."""
        return self.compressor.state_dict() if self.compressor is not None else {}

    def load_compression_state(self, state: Mapping[str, Any]) -> None:
        """Restore ``compression_state()`` (host arrays; moved to the device at first use)."""
        if self.compressor is not None:
            self.compressor.load_state_dict(state, dtype=self.buckets.wire)   # what it compresses
        elif state:
            raise ValueError(f"no gradient compression here to take residuals {sorted(state)}")

    def compression_bytes(self) -> int:
        """Bytes of ``compression_state()``: what a lossy scheme keeps from step to step."""
        return sum(int(a.nbytes) for a in self.compression_state().values())


class DataParallelSync(BucketedSync):
    """Every rank holds the whole local model, its gradients and its optimiser state; the
    gradients are averaged over ``dp_group`` in buckets (``GradBuckets``) as backward makes
    them, then every rank applies the same update. A ``GradSync`` (see ``grad_sync.py``).

    ``compress``: each bucket's mean compressed (``GradBuckets``; ``none``: plain).
    ``counted(name)``: whether this rank's gradient of ``name`` counts in the global norm;
    ``norm_groups``: the groups (tp, pp) over which the norm's partial sums are added. After
    the all-reduce the gradients are the same on every dp rank, so dp is not among them.
    """

    every_micro_batch = False                # reduce once per optimiser step

    def __init__(self, params: Mapping[str, Any], grads: Any, layout: Any, dp_group: Any,
                 optimizer: OptimizerSpec, bucket_mb: float | None = 1.0,
                 algorithm: str | None = None, counted: Callable[[str], bool] | None = None,
                 norm_groups: Sequence[Any] = (), compress: str = "none",
                 reduce_dtype: str = "grad", **options: Any) -> None:
        # grads: the model's GradStore, name -> gradient
        super().__init__(grads, GradBuckets(grads.buffer, layout, dp_group, bucket_mb, algorithm,
                                            compress, reduce_dtype, **options),
                         [n for n in grads if counted is None or counted(n)], norm_groups)
        self.optimizer = optimizer.build(params)
        self.state_names = optimizer.state_names

    @property
    def step_count(self) -> int:
        return self.optimizer.step_count

    def begin_step(self) -> None:
        """Nothing to reset: the model zeroes its own gradients."""

    def step(self, lr: float | None = None) -> CommStats:
        self.optimizer.step(self.grads, lr=lr)
        return CommStats()                   # no parameter communication

    def state_tensors(self) -> dict[str, Mapping[str, Any]]:
        """Per optimiser state buffer, this rank's tensors by parameter name."""
        return {s: self.optimizer.state[s] for s in self.state_names}

    state_replicated = True       # every dp rank holds the same whole state

    def state_pieces(self) -> dict[str, list[tuple[str, tuple[int, int] | None, Any]]]:
        """Per state buffer, this rank's whole tensors: (name, None, tensor)."""
        return {s: [(n, None, a) for n, a in self.optimizer.state[s].items()]
                for s in self.state_names}

    def load_state_tensors(self, tensors: Mapping[str, Mapping[str, Any]], step: int) -> None:
        """The inverse of ``state_tensors`` (host arrays of the local shapes); local."""
        self.optimizer.load_state_dict({"step": int(step)} | {
            f"{s}.{name}": a for s, by_name in tensors.items() for name, a in by_name.items()})

    def memory_report(self) -> dict[str, int]:
        """Bytes on this rank (see ``grad_sync.GradSync.memory_report``): everything whole."""
        params = sum(int(p.nbytes) for p in self.optimizer.params.values())
        grads = int(self.buckets.grad_buffer.nbytes)
        state = sum(int(a.nbytes) for bufs in self.optimizer.state.values() for a in bufs.values())
        return {"params": params, "grads": grads, "grads_kept": grads, "grads_unsharded": grads,
                "optimizer_state": state, "optimizer_state_unsharded": state,
                "compression_state": self.compression_bytes()}
