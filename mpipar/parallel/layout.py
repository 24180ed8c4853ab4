"""How one training step is split over ranks, and the one check that it fits.

    layout = Layout(dp=2, tp=2, pp=2, micro_batches=4, schedule="1f1b", zero=1)
    layout.check(world_size=8, config=PRESETS["tiny"], batch_size=16)   # LayoutError or None
    layout, why = choose_layout(8, PRESETS["tiny"], batch_size=16)       # when none is given
    layouts(8)                                                           # every dp x tp x pp
    Layout(pp=2, micro_batches=4, virtual_stages=2).schedule_for(pp_rank=0)  # interleaved 1F1B

A ``Layout`` is data: the data-parallel, tensor-parallel and pipeline degrees, how the
global batch is cut (``grad_accum`` accumulation steps of ``micro_batches`` pipeline
micro-batches on each of the ``dp`` replicas), the pipeline schedule and split of the
blocks (over ``virtual_stages`` model chunks per pipeline rank), ZeRO's stage and the
data-parallel gradient buckets and algorithm.

``Layout.check`` is the only place that decides whether a layout fits the world, the model
and the batch: the command line, the trainer, the benchmark and ``choose_layout`` all call
it, before any collective, and every rank reaches the same verdict from the same numbers.
It raises ``LayoutError``, whose message names the quantities ("tensor-parallel degree 3
does not divide the 8 attention heads") and whose ``field`` says which part of the layout is
at fault, so a command line can name its own flag.

What fits:

* ``dp``, ``tp``, ``pp`` positive, ``dp * tp * pp`` equal to the world size;
* ``tp`` divides the attention heads (attention is split by heads) and so the MLP width
  4 n_embd, and is at most the vocabulary (whose rows are split unevenly: it need not
  divide);
* ``pp`` at most the number of blocks; ``stage_layers`` (blocks per stage), when given,
  ``pp`` positive counts summing to ``n_layer``;
* ``virtual_stages`` v a positive integer; v > 1 (interleaved 1F1B, Narayanan et al. 2021:
  rank r runs virtual stages r, P + r, ..., (v-1) P + r of P v) needs ``schedule="1f1b"``,
  ``pp`` > 1, micro-batches a multiple of ``pp`` (the schedule's own rule:
  ``schedules.interleaved_1f1b`` is asked) and a block per virtual stage (pp v <= n_layer);
  ``stage_layers`` then has pp v counts, one per virtual stage;
* ``recompute`` one of ``nn.block.RECOMPUTE``: ``none``, ``selective`` (attention's
  softmax recomputed in backward), ``full`` (each block's forward rerun in backward);
* ``sequence_parallel`` (Korthikanti et al. 2022) needs tp > 1 and tp dividing the block
  size;
* the global batch splits into ``dp x grad_accum x micro_batches`` equal parts;
* ``schedule`` one of ``gpipe``, ``1f1b``; ``zero`` 0, 1 or 2; ``bucket_mb`` a finite
  positive number of MiB (None: one bucket); ``allreduce`` an algorithm of ``mpipar.comm``
  (None: the communicator's own), and with ``auto`` its tuned table, if there is one,
  readable;
* ``compress`` a gradient-compression spec of ``comm.compress`` (``none``, ``fp16``,
  ``bf16``, ``int8``, ``topk:RATIO``, ``powersgd:RANK``) for the data-parallel all-reduce:
  anything but ``none`` needs ``zero`` 0 (ZeRO reduce-scatters its buckets, it does not
  all-reduce them), and ``bf16``, ``int8`` and ``topk`` an ``allreduce`` algorithm with an
  all-gather (native, ring, rhd, nccl, auto; not ps, tree, dbtree, hier); ``fp16`` and
  ``powersgd`` only all-reduce (any algorithm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

from mpipar.comm import auto
from mpipar.comm.algorithms import algorithm_names, get_algorithm
from mpipar.comm.compress import make_compressor
from mpipar.nn.block import RECOMPUTE
from mpipar.parallel.partition import balanced_layers, gpt_stage_costs
from mpipar.parallel.schedules import (Forward, Instruction, RecvActivation, SendActivation,
                                       make_schedule)

SCHEDULE_NAMES = ("gpipe", "1f1b")
ZERO_STAGES = (0, 1, 2)


class LayoutError(ValueError):
    """A parallel layout that does not fit the world, the model or the batch. ``field`` is the
    part of the layout at fault: a ``Layout`` field name (``"virtual_stages"`` included),
    ``"batch_size"``, or ``"grid"`` (dp x tp x pp against the world size)."""

    def __init__(self, message: str, field: str = "grid") -> None:
        super().__init__(message)
        self.field = field


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    micro_batches: int = 1                       # pipeline micro-batches per accumulation step
    grad_accum: int = 1                          # accumulation steps per optimiser step
    schedule: str = "1f1b"
    stage_layers: tuple[int, ...] | None = None  # blocks per (virtual) stage (None: balanced)
    zero: int = 0                                # ZeRO stage: 0 none, 1 optimiser state, 2 + grads
    bucket_mb: float | None = 1.0                # data-parallel gradient bucket size (None: one)
    allreduce: str | None = None                 # the dp group's algorithm (None: its default)
    virtual_stages: int = 1                      # model chunks per pipeline rank (> 1: interleaved)
    recompute: str = "none"                      # activation recompute: none, selective, full
    sequence_parallel: bool = False              # split what lies between tp regions along T
    compress: str = "none"                       # dp gradient compression (comm.compress spec)

    @property
    def compressed(self) -> bool:
        """Whether the data-parallel all-reduce is compressed: ``compress`` names a scheme
        other than ``none`` (as ``comm.compress`` parses it; the spec must parse)."""
        return make_compressor(self.compress).spec != "none"

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def parts(self) -> int:
        """Equal parts the global batch is cut into: dp x grad_accum x micro_batches."""
        return self.dp * self.grad_accum * self.micro_batches

    @property
    def num_virtual_stages(self) -> int:
        """Virtual pipeline stages: pp x virtual_stages (pp when not interleaved)."""
        return self.pp * self.virtual_stages

    def replace(self, **changes: Any) -> "Layout":
        return replace(self, **changes)

    # -- the check ------------------------------------------------------------------------
    def check(self, world_size: int, config: Any = None, batch_size: int | None = None) -> None:
        """Raise ``LayoutError`` unless this layout fits ``world_size`` ranks, the model
        ``config`` (a GPTConfig; None: not checked) and a global batch of ``batch_size``
        sequences (None: not checked). Local and deterministic: no communication."""
        self._check_grid(world_size)
        self._check_options()
        if config is not None:
            self._check_model(config)
        if batch_size is not None:
            self.check_batch(batch_size)

    def fits(self, world_size: int, config: Any = None, batch_size: int | None = None) -> bool:
        try:
            self.check(world_size, config, batch_size)
        except LayoutError:
            return False
        return True

    def _check_grid(self, world_size: int) -> None:
        for field, what in (("dp", "data-parallel"), ("tp", "tensor-parallel"), ("pp", "pipeline")):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LayoutError(f"the {what} degree must be a positive integer, got {v!r}", field)
        if self.world_size != world_size:
            raise LayoutError(f"dp {self.dp} x tp {self.tp} x pp {self.pp} = {self.world_size} ranks "
                              f"does not match the world of {world_size} ranks", "grid")

    def _check_options(self) -> None:
        for field, what in (("micro_batches", "pipeline micro-batches"),
                            ("grad_accum", "gradient-accumulation steps")):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LayoutError(f"the number of {what} must be a positive integer, got {v!r}",
                                  field)
        if self.schedule not in SCHEDULE_NAMES:
            raise LayoutError(f"pipeline schedule {self.schedule!r} is not one of "
                              f"{', '.join(SCHEDULE_NAMES)}", "schedule")
        self._check_virtual_stages()
        if self.recompute not in RECOMPUTE:
            raise LayoutError(f"activation recompute {self.recompute!r} is not one of "
                              f"{', '.join(RECOMPUTE)}", "recompute")
        if not isinstance(self.sequence_parallel, bool):
            raise LayoutError(f"sequence_parallel must be True or False, got "
                              f"{self.sequence_parallel!r}", "sequence_parallel")
        if self.sequence_parallel and self.tp < 2:
            raise LayoutError(f"sequence parallelism splits the sequence over the tensor-parallel "
                              f"group: it needs tp > 1, got tp {self.tp}", "sequence_parallel")
        if self.zero not in ZERO_STAGES:
            raise LayoutError(f"ZeRO stage {self.zero!r} is not one of 0, 1, 2", "zero")
        b = self.bucket_mb
        if b is not None and not (isinstance(b, (int, float)) and math.isfinite(b) and b > 0):
            raise LayoutError(f"a gradient bucket of {b!r} MiB: the size must be a finite "
                              f"positive number", "bucket_mb")
        self._check_algorithm()
        self._check_compress()

    def _check_virtual_stages(self) -> None:
        v = self.virtual_stages
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LayoutError(f"the number of virtual pipeline stages per rank must be a "
                              f"positive integer, got {v!r}", "virtual_stages")
        if v == 1:
            return
        if self.schedule != "1f1b":
            raise LayoutError(f"{v} virtual stages per rank need the 1f1b schedule (interleaved "
                              f"1F1B); {self.schedule!r} runs one model chunk per rank",
                              "virtual_stages")
        try:                     # the schedule library's own rules (pp > 1, M a multiple of pp)
            self.schedule_for(0)
        except ValueError as e:
            raise LayoutError(f"{v} virtual stages per rank with pp {self.pp} and "
                              f"{self.micro_batches} micro-batches: {e}", "virtual_stages") from e

    def _check_algorithm(self) -> None:
        name = self.allreduce
        if name is None:
            return
        known = algorithm_names()
        if name != "auto" and name not in known:
            raise LayoutError(f"collective algorithm {name!r} is not one of "
                              f"{', '.join(known + ['auto'])}", "allreduce")
        if name == "auto":
            try:        # read now, on every rank alike, not inside the first all-reduce
                auto.table_for(self.dp)
            except (OSError, ValueError) as e:
                raise LayoutError(f"the tuned table for algorithm 'auto' cannot be used: {e}",
                                  "allreduce") from e

    def _check_compress(self) -> None:
        """The spec parses (the library's own message), the layout all-reduces (no ZeRO), and
        an explicit ``allreduce`` algorithm has every collective the scheme uses (int8 and
        topk all-gather)."""
        try:
            compressor = make_compressor(self.compress)
        except ValueError as e:
            raise LayoutError(str(e), "compress") from e
        if compressor.spec == "none":
            return
        if self.zero:
            raise LayoutError(f"gradient compression needs zero 0, got zero {self.zero} (ZeRO "
                              f"reduce-scatters each bucket into a shard; {self.compress} "
                              f"compresses an all-reduce's mean)", "compress")
        name = self.allreduce
        if name in (None, "auto"):      # the group's default, or auto: native where it lacks one
            return
        lacks = [c for c in compressor.collectives if not get_algorithm(name).supports(c)]
        if lacks:
            raise LayoutError(f"compression {self.compress} uses {' and '.join(compressor.collectives)}; "
                              f"all-reduce algorithm {name!r} has no {', '.join(lacks)} (choose "
                              f"native, ring or rhd, or compression fp16 or powersgd)", "compress")

    def _check_model(self, config: Any) -> None:
        tp, pp, NH = self.tp, self.pp, config.n_head
        # n_head divides n_embd (GPTConfig), so a tp dividing the heads divides the MLP width
        if NH % tp:
            raise LayoutError(f"tensor-parallel degree {tp} does not divide the {NH} attention "
                              f"heads (attention is split by heads; degrees that do: "
                              f"{', '.join(map(str, _divisors(NH)))})", "tp")
        if tp > config.vocab_size:
            raise LayoutError(f"tensor-parallel degree {tp} exceeds the vocabulary of "
                              f"{config.vocab_size} rows", "tp")
        if pp > config.n_layer:
            raise LayoutError(f"{pp} pipeline stages for {config.n_layer} blocks: every stage "
                              f"needs at least one block", "pp")
        if self.sequence_parallel and config.block_size % tp:
            raise LayoutError(f"sequence parallelism over tp {tp}: tp does not divide the block "
                              f"size {config.block_size} (each rank holds block/tp positions)",
                              "sequence_parallel")
        stages = self.num_virtual_stages
        if stages > config.n_layer:
            raise LayoutError(f"pp {pp} x {self.virtual_stages} virtual stages = {stages} virtual "
                              f"stages for {config.n_layer} blocks: every virtual stage needs at "
                              f"least one block", "virtual_stages")
        if self.stage_layers is not None:
            counts = list(self.stage_layers)
            if len(counts) != stages:
                what = "the pipeline has" if self.virtual_stages == 1 else \
                    f"pp {pp} x {self.virtual_stages} virtual stages per rank make"
                raise LayoutError(f"blocks per stage {_counts(counts)} name {len(counts)} stages, "
                                  f"{what} {stages}", "stage_layers")
            if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
                raise LayoutError(f"blocks per stage {_counts(counts)}: every stage needs at "
                                  f"least one block", "stage_layers")
            if sum(counts) != config.n_layer:
                raise LayoutError(f"blocks per stage {_counts(counts)} add up to {sum(counts)}, "
                                  f"the model has {config.n_layer}", "stage_layers")

    def check_batch(self, batch_size: int) -> None:
        """LayoutError unless a global batch of ``batch_size`` sequences splits into
        dp x grad_accum x micro_batches equal parts."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 \
                or batch_size % self.parts:
            raise LayoutError(f"a global batch of {batch_size} sequences does not split into "
                              f"dp {self.dp} x grad-accum {self.grad_accum} x micro-batches "
                              f"{self.micro_batches} = {self.parts} equal parts", "batch_size")

    # -- derived --------------------------------------------------------------------------
    def stage_ranges(self, config: Any) -> list[range]:
        """The blocks of each (virtual) pipeline stage, ``pp x virtual_stages`` of them in
        model order: ``stage_layers`` as contiguous ranges, or a split balanced by estimated
        FLOPs (``partition.balanced_layers``; the first virtual stage is charged the
        embedding, the last the head, which is where they run)."""
        if self.stage_layers is None:
            return balanced_layers(config.n_layer, self.num_virtual_stages,
                                   gpt_stage_costs(config, config.block_size))
        out, start = [], 0
        for c in self.stage_layers:
            out.append(range(start, start + c))
            start += c
        return out

    def chunk_ranges(self, config: Any, pp_rank: int) -> list[range]:
        """The blocks of each model chunk of pipeline rank ``pp_rank``: chunk c is virtual
        stage ``c * pp + pp_rank`` (the executor's and the schedules' numbering)."""
        ranges = self.stage_ranges(config)
        return [ranges[c * self.pp + pp_rank] for c in range(self.virtual_stages)]

    def schedule_for(self, pp_rank: int, micro_batches: int | None = None,
                     sync: bool = True) -> list[Instruction]:
        """The instruction list of pipeline rank ``pp_rank`` (``schedules.make_schedule``):
        ``schedule`` with one chunk, or ``interleaved_1f1b`` over ``virtual_stages`` chunks
        when there are several; ``micro_batches`` defaults to the layout's."""
        M = self.micro_batches if micro_batches is None else micro_batches
        if self.virtual_stages > 1:
            return make_schedule("interleaved", self.pp, pp_rank, M, self.virtual_stages, sync)
        return make_schedule(self.schedule, self.pp, pp_rank, M, sync=sync)

    def evaluation_schedule_for(self, pp_rank: int, micro_batches: int | None = None
                                ) -> list[Instruction]:
        """Forward-only instructions (evaluation): the training schedule's receives,
        forwards and sends in its order, the forwards keeping no cache. Every rank runs its
        forward units in the training order, which the schedule library checks deadlock-free
        with any number of chunks; with one chunk this is ``schedules.forward_only``."""
        keep = (RecvActivation, Forward, SendActivation)
        return [replace(i, keep_cache=False) if isinstance(i, Forward) else i
                for i in self.schedule_for(pp_rank, micro_batches, sync=False)
                if isinstance(i, keep)]

    def __str__(self) -> str:
        s = f"dp={self.dp} x tp={self.tp} x pp={self.pp}"
        return s + (f" (v={self.virtual_stages})" if self.virtual_stages > 1 else "")


def _counts(counts: Sequence[Any]) -> str:
    return ",".join(str(c) for c in counts)


def layouts(world_size: int) -> list[tuple[int, int, int]]:
    """Every (dp, tp, pp) with dp * tp * pp == world_size."""
    out = []
    for tp in _divisors(world_size):
        for pp in _divisors(world_size // tp):
            out.append((world_size // tp // pp, tp, pp))
    return sorted(out)


def choose_layout(world_size: int, config: Any, batch_size: int,
                  base: Layout = Layout()) -> tuple[Layout, str]:
    """A layout of ``world_size`` ranks for ``config`` and the global batch when none is
    given (``base`` supplies everything but dp, tp, pp), and why it was chosen.

    Data parallelism first (on CPUs and small models it moves the least data per step: one
    gradient all-reduce, overlapped with backward), as far as the batch allows; then tensor
    parallelism over adjacent ranks, the largest degree that fits the model; then pipeline
    stages for what is left. Every candidate is judged by ``Layout.check``.
    """
    base.replace(dp=world_size).check(world_size)          # micro-batches, schedule, ZeRO ...
    per = base.grad_accum * base.micro_batches
    dp = max((d for d in _divisors(world_size) if batch_size % (d * per) == 0), default=1)
    rest = world_size // dp
    for tp in reversed(_divisors(rest)):
        layout = base.replace(dp=dp, tp=tp, pp=rest // tp)
        if layout.fits(world_size, config, batch_size):
            break
    else:
        try:                                                 # tp 1 failed too: say why
            base.replace(dp=dp, tp=1, pp=rest).check(world_size, config, batch_size)
        except LayoutError as e:
            if e.field not in ("grid", "tp", "pp"):          # not the shape: say it as it is
                raise
            raise LayoutError(f"no layout of {world_size} ranks fits: {e}", "grid") from e
        raise AssertionError("unreachable: tp 1 fits but was not chosen")
    why = (f"dp={dp} (the largest data-parallel degree that divides the batch of {batch_size} "
           f"into {per} micro-step(s) per rank)")
    if layout.tp > 1:
        why += (f", tp={layout.tp} (divides {config.n_head} heads and the MLP width "
                f"{4 * config.n_embd})")
    if layout.pp > 1:
        why += f", pp={layout.pp} (the rest, as pipeline stages)"
    return layout, why
