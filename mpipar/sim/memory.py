"""Bytes one rank holds for one training step: the closed-form memory model of mpipar's trainer.

    est = estimate(spec)                  # the most loaded rank (pipeline stage, tp rank 0, dp rank 0)
    est = estimate(spec, stage=3, tp_rank=1, dp_rank=2)
    est.params, est.grads, est.optimizer, est.activations, est.transient, est.peak
    fits(spec, 80 * 2**30)                # the planner's pruning test

It describes mpipar's own trainer (``parallel/trainer.py``), not a generic transformer: every
buffer is sized from the functions the trainer builds it with, so a change there changes
the estimate with it.

Parameters, gradients, optimiser state (``ParallelTrainer.memory_report``, byte for byte)
------------------------------------------------------------------------------------------
* The rank's tensors are ``parallel/model.local_shards`` (tp shard, pp stage: the first stage
  holds wte and wpe, the last ln_f and, with pp > 1, its own copy of the tied wte; the
  vocabulary splits unevenly, the first V % tp ranks one row more) laid out by
  ``shard_layout``; the blocks of each stage are ``Layout.stage_ranges``.
* Plain data parallelism (``DataParallelSync``): the whole local gradient buffer, and the
  optimiser's state tensors (``OptimizerSpec.state_names``: AdamW 2, SGD 1) over it.
* ZeRO (``ZeroSync``): the buckets of ``data_parallel.partition_buckets`` are each split by
  ``split_counts`` over dp, dp rank r owns block r of every bucket (rank 0 the most); the
  optimiser state covers only the shard. Gradients: the shard plus, stage 1, the full
  buffer; stage 2, the most per-tensor gradient storage ``GradStore`` holds at once, which
  depends on when backward writes a tensor and when its bucket is handed over: traced here
  from the executor's order (stages backward in reverse; a block's gradients all created
  when its backward starts; each stage's names marked ready after it, the tied wte at the
  end with pp > 1; buckets handed over in index order once all their names are marked).
  With pp > 1 and more than one micro-batch, a stage's buckets fill over all micro-batches,
  so all its gradients are held at once.

Precision: bytes per parameter of a rank's local model (AdamW, without ZeRO)
----------------------------------------------------------------------------
::

                     params   grads   optimiser                 total
    fp32 (today)     4        4       4 + 4 (exp_avg, _sq)      16
    bf16 / fp16      2        2       4 master + 4 + 4          16
    Megatron-LM      2        4 / 2+4 4 master + 4 + 4          18 (bf16) / 20 (fp16)

``params`` is what compute reads (16-bit under mixed precision), ``grads`` the gradient the
backward accumulates (16-bit), ``optimizer`` the fp32 master copy and moments (sharded by
ZeRO). Megatron-LM keeps fp32 gradients (``main_grad``, accumulated and all-reduced in fp32:
18 B with bf16) or, with fp16, 16-bit gradients plus an fp32 copy for the optimiser (20 B)
(Megatron-LM docs, "Distributed Optimizer" table; Rajbhandari et al. 2020 count 16 B with
fp16 gradients, as here). mpipar's mixed precision (``--precision``, ``optim/mixed.py``) keeps
16-bit gradients: 2 B less per parameter than Megatron's bf16, and accumulation over
micro-batches in 16 bits; the trainer's ``memory_report`` equals this table in every layout
(tests/parallel/test_trainer_mixed_precision.py). Activations: layer norm keeps its mean and rstd in
fp32 there, counted below at e bytes (4 s b elements a block: 0.2% of a block's cache at
h = 128, the activation test's 1% bound).

Activations: what each layer keeps in its cache, per micro-batch in flight
--------------------------------------------------------------------------
s sequence, b micro-batch, h width, a heads, t tp, e the activation dtype's bytes (4 in
fp32, 2 under mixed precision; dropout masks are in that dtype too, not 1-byte bool).
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
section 4, eq. 1-2, Table 2) count 16-bit tensors and 1-byte masks. One block (``nn/block.py``)::

    cached tensor (file)                           elements        Korthikanti (bytes)
    ln_1 input x (layernorm)                       s b h           LN input 2sbh
    ln_1 mean, rstd (layernorm)                    2 s b           -
    ln_1 output = c_attn input (linear)            s b h           QKV input 2sbh
    qkv (attention; q, k, v are views of it)       3 s b h / t     Q, K 4sbh; V 2sbh
    attention probabilities (attention)            a s^2 b / t     softmax output 2as^2b
    attention dropout mask (dropout > 0)           a s^2 b / t     mask as^2b; dropout out 2as^2b
    y = attn c_proj input (linear)                 s b h / t       proj input 2sbh
    attention-branch dropout mask (dropout > 0)    s b h           mask sbh
    x1 = ln_2 input                                s b h           LN input 2sbh
    ln_2 mean, rstd                                2 s b           -
    ln_2 output = c_fc input                       s b h           MLP input 2sbh
    c_fc output = GELU input (gelu)                4 s b h / t     GELU input 8sbh
    GELU tanh (gelu: kept, not recomputed)         4 s b h / t     -
    GELU output = mlp c_proj input                 4 s b h / t     GELU output 8sbh
    MLP-branch dropout mask (dropout > 0)          s b h           mask sbh

So, in elements, ``s b h (4 + 16/t) + 4 s b + a s^2 b / t`` without dropout and ``s b h (6 +
16/t) + 4 s b + 2 a s^2 b / t`` with it; times e bytes. Korthikanti's ``s b h (10 + 24/t +
5 a s / (h t))`` bytes at e = 2 reads ``s b h (12 + 32/t) + 4 a s^2 b / t`` for mpipar with
dropout: GELU's tanh is kept (+4 elements / t), masks are e bytes (+2 s b h), the dropped
probabilities are recomputed from the mask in backward rather than kept (-2 a s^2 b bytes),
and layer norm keeps its mean and rstd (4 s b).

The knobs (the trainer implements them with exactly this meaning):

* ``recompute="selective"``: attention keeps no (B, NH, T, T) tensor (neither the
  probabilities nor the attention dropout mask, regenerated from the generator's state) and
  recomputes them in backward: the ``a s^2 b`` terms drop out (Korthikanti's 5as/h term).
* ``recompute="full"``: each block keeps only its input, ``s b h`` (Korthikanti's 2sbh);
  its forward reruns in backward, holding one block's full cache for one micro-batch
  (counted in ``transient``).
* ``sequence_parallel``: outside the tp regions (layer norms, dropout, residuals) a rank
  holds s/t positions: the ``s b h`` terms of the replicated tensors and the 2 s b of the
  layer norms divide by t. The LN output that enters a column-parallel layer is kept as the
  rank's shard and all-gathered again in backward (as Megatron-LM does); keeping the gathered
  copy would add 2 s b h (1 - 1/t) elements per block.

The embedding (first stage) keeps the token ids (8-byte integers; vocabulary-parallel: the
local ids and the 1-byte "mine" mask) and, with dropout, its mask; its output is the first
block's input. The head (last stage) keeps the ln_f input and output, mean and rstd, the
softmax probabilities that overwrite the logits, ``s b V_r`` with ``V_r`` this rank's
vocabulary rows, and the targets (vocabulary-parallel: local target column, 8 bytes, and
the "mine" mask). A stage's last block output is sent, not cached.

Micro-batches in flight on pipeline rank r: the peak number of forwards awaiting their
backward in the rank's own instruction list (``schedules.make_schedule``): GPipe M,
1F1B min(P - r, M), interleaved 1F1B (v chunks) Narayanan et al.'s count, min(2(P - r - 1) +
(v - 1) P + 1, v M) chunk units, each weighted by its chunk's layers.

``transient``: the largest buffer that lives only inside one backward, on top of the
caches: the softmax gradient (B, NH/t, T, T) of an attention backward (twice with dropout:
the re-masked probabilities), the logits' gradient ``s b V_r`` in the head's, one block's
whole cache under full recompute; plus, on a pipeline, the receive buffers posted ahead
(``PipelineExecutor.lookahead`` = 2 of (B, T, C)). ``peak`` = params + grads + optimizer +
activations + transient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from mpipar.comm.communicator import split_counts
from mpipar.nn.flat import FlatLayout
from mpipar.nn.gpt import param_shapes
from mpipar.optim import OptimizerSpec
from mpipar.parallel.data_parallel import Bucket, partition_buckets
from mpipar.parallel.model import WPE, WTE, local_shards, shard_layout
from mpipar.parallel.partition import balanced_layers, gpt_stage_costs
from mpipar.parallel.schedules import Backward, Forward, make_schedule
from mpipar.parallel.tensor_parallel import vocab_counts
from mpipar.sim.spec import TrainSpec

ID_BYTES = 8          # token ids and target columns: int64
MASK_BYTES = 1        # the vocabulary-parallel "mine" masks: bool
LOOKAHEAD = 2         # PipelineExecutor's default receives posted ahead
MASTER_BYTES = 4      # fp32 master weights and optimiser state under mixed precision


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one rank (pipeline ``stage``, ``tp_rank``, ``dp_rank``) during one step."""

    stage: int
    params: int
    grads: int                    # at their peak in the step (ZeRO: + the shard)
    optimizer: int                # master weights (mixed precision) + optimiser state
    activations: int              # caches of the micro-batches in flight, at their peak
    transient: int                # the largest buffer living inside one backward
    in_flight: float              # micro-batches in flight at the activation peak
    breakdown: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def peak(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.transient

    @property
    def model_state(self) -> int:
        """What ``ParallelTrainer.memory_report`` covers: params + grads + optimizer."""
        return self.params + self.grads + self.optimizer


def estimate(spec: TrainSpec, stage: int | None = None, *, tp_rank: int = 0,
             dp_rank: int = 0) -> MemoryEstimate:
    """The memory of pipeline stage ``stage`` (None: the stage whose peak is largest) at
    ``tp_rank``, ``dp_rank`` (0: the most loaded: uneven vocabulary rows and ZeRO blocks go to
    the lowest ranks first)."""
    spec.check()
    _check_rank("pipeline stage", stage, spec.pp)
    _check_rank("tensor-parallel rank", tp_rank, spec.tp)
    _check_rank("data-parallel rank", dp_rank, spec.dp)
    spec.layout.check(spec.gpus, spec.gpt_config)
    if stage is not None:
        return _estimate_stage(spec, stage, tp_rank, dp_rank)
    return max((_estimate_stage(spec, s, tp_rank, dp_rank) for s in range(spec.pp)),
               key=lambda e: e.peak)


def fits(spec: TrainSpec, gpu_bytes: float) -> bool:
    """Whether the most loaded rank's peak fits in ``gpu_bytes``."""
    return estimate(spec).peak <= gpu_bytes


def _check_rank(what: str, r: int | None, size: int) -> None:
    if r is not None and not (isinstance(r, int) and 0 <= r < size):
        raise ValueError(f"{what} {r!r} is not in 0..{size - 1}")


# ---- parameters, gradients, optimiser state ----------------------------------------------------

def param_bytes(spec: TrainSpec) -> int:
    """Bytes of one element of the parameters compute reads (and of the gradients)."""
    return 2 if spec.mixed_precision else 4


def rank_layout(spec: TrainSpec, stage: int, tp_rank: int) -> FlatLayout:
    """The local model's flat layout on pipeline stage ``stage``, tp rank ``tp_rank``
    (``LocalModel.layout``, without building the model)."""
    config = spec.gpt_config
    ranges = spec.layout.stage_ranges(config)
    shards = local_shards(config, spec.tp, tp_rank, stage == 0, stage == spec.pp - 1,
                          ranges[stage])
    return shard_layout(_full_layout(spec), shards)


def _full_layout(spec: TrainSpec) -> FlatLayout:
    return FlatLayout(param_shapes(spec.gpt_config).items())


def _model_state(spec: TrainSpec, stage: int, tp_rank: int, dp_rank: int
                 ) -> tuple[int, int, int, FlatLayout]:
    layout = rank_layout(spec, stage, tp_rank)
    item = param_bytes(spec)
    states = len(OptimizerSpec(spec.optimizer).state_names)
    state_item = MASTER_BYTES
    master = 1 if spec.mixed_precision else 0            # fp32 copy per optimised element
    n = layout.numel
    params = n * item
    if not spec.zero:
        return params, n * item, (states + master) * n * state_item, layout
    buckets = partition_buckets(layout, item, spec.bucket_mb)
    shard = sum(split_counts(b.numel, spec.dp)[dp_rank] for b in buckets)
    if spec.zero == 1:
        model_grads = n * item
    else:
        model_grads = _zero2_grad_peak(spec, stage, layout, buckets) * item
    return params, model_grads + shard * item, (states + master) * shard * state_item, layout


def _stage_names(spec: TrainSpec, stage: int, layout: FlatLayout) -> list[tuple[list[str], list[str]]]:
    """Per model stage of this rank, in forward order: (gradients its backward writes, names
    it reports final right after), as the executor and the stages do."""
    names = list(layout.shapes)
    first, last = stage == 0, stage == spec.pp - 1
    tied = spec.pp > 1
    out: list[tuple[list[str], list[str]]] = []
    if first:
        touched = [WTE, WPE]
        out.append((touched, [WPE] if tied else touched))
    blocks: dict[int, list[str]] = {}
    for n in names:
        if n.startswith("transformer.h."):
            blocks.setdefault(int(n.split(".")[2]), []).append(n)
    for i in sorted(blocks):
        out.append((blocks[i], blocks[i]))
    if last:
        ln_f = [n for n in names if n.startswith("transformer.ln_f.")]
        out.append(([WTE] + ln_f, ln_f))
    return out


def _zero2_grad_peak(spec: TrainSpec, stage: int, layout: FlatLayout, buckets: list[Bucket]) -> int:
    """Most gradient elements ZeRO-2's per-tensor storage (``GradStore``) holds at once."""
    if spec.pp > 1 and spec.micro_batches > 1:
        return layout.numel        # every stage's buckets fill over all the micro-batches
    size = {n: e - s for n, (s, e) in layout.offsets.items()}
    waiting = [set(b.names) for b in buckets]
    bucket_of = {n: b.index for b in buckets for n in b.names}
    held: set[str] = set()
    cur = peak = nxt = 0

    def mark(names: Sequence[str]) -> None:
        nonlocal cur, nxt
        for n in names:
            waiting[bucket_of[n]].discard(n)
        while nxt < len(buckets) and not waiting[nxt]:
            for n in buckets[nxt].names:
                if n in held:
                    held.discard(n)
                    cur -= size[n]
            nxt += 1

    for touched, ready in reversed(_stage_names(spec, stage, layout)):
        for n in touched:
            if n not in held:
                held.add(n)
                cur += size[n]
                peak = max(peak, cur)
        mark(ready)
    if spec.pp > 1:
        mark([WTE] if WTE in size else [])   # the tied embedding, after its all-reduce
    return peak


# ---- activations ---------------------------------------------------------------------------

def activation_bytes(spec: TrainSpec) -> int:
    """Bytes of one activation element (and of a dropout mask)."""
    return 2 if spec.mixed_precision else 4


def block_cache(spec: TrainSpec) -> dict[str, float]:
    """Elements one block's cache holds for one micro-batch, by tensor (module docstring)."""
    s, b, h, a, t = spec.block_size, spec.micro_batch, spec.n_embd, spec.n_head, spec.tp
    r = t if spec.sequence_parallel else 1           # replicated parts: 1/t of the sequence
    sbh = s * b * h
    if spec.recompute == "full":
        return {"block input": sbh / r}
    drop = spec.dropout > 0
    out = {
        "ln_1 input": sbh / r, "ln_1 mean, rstd": 2 * s * b / r, "ln_1 output": sbh / r,
        "qkv": 3 * sbh / t,
        "attention probabilities": a * s * s * b / t,
        "attention dropout mask": a * s * s * b / t if drop else 0,
        "attention c_proj input": sbh / t,
        "attention dropout mask (branch)": sbh / r if drop else 0,
        "ln_2 input": sbh / r, "ln_2 mean, rstd": 2 * s * b / r, "ln_2 output": sbh / r,
        "c_fc output": 4 * sbh / t, "GELU tanh": 4 * sbh / t, "GELU output": 4 * sbh / t,
        "MLP dropout mask (branch)": sbh / r if drop else 0,
    }
    if spec.recompute == "selective":
        out["attention probabilities"] = out["attention dropout mask"] = 0
    return {k: v for k, v in out.items() if v}


def _vocab_rows(spec: TrainSpec, tp_rank: int) -> int:
    return vocab_counts(spec.vocab_size, spec.tp)[tp_rank]


def embedding_cache_bytes(spec: TrainSpec) -> float:
    """Bytes the embedding stage keeps per micro-batch (its output is block 0's input)."""
    sb = spec.block_size * spec.micro_batch
    ids = sb * (ID_BYTES + (MASK_BYTES if spec.tp > 1 else 0))
    r = spec.tp if spec.sequence_parallel else 1
    mask = sb * spec.n_embd / r * activation_bytes(spec) if spec.dropout > 0 else 0
    return ids + mask


def head_cache_bytes(spec: TrainSpec, tp_rank: int = 0) -> float:
    """Bytes the head stage keeps per micro-batch: ln_f input and output, mean and rstd, the
    probabilities (s b V_r) and the targets."""
    s, b, h = spec.block_size, spec.micro_batch, spec.n_embd
    r = spec.tp if spec.sequence_parallel else 1
    e = activation_bytes(spec)
    acts = (2 * s * b * h / r + 2 * s * b / r + s * b * _vocab_rows(spec, tp_rank)) * e
    targets = s * b * (ID_BYTES + (MASK_BYTES if spec.tp > 1 else 0))
    return acts + targets


def _chunk_layers(spec: TrainSpec) -> list[range]:
    """Blocks of each virtual stage (chunk c of rank r is virtual stage c P + r)."""
    v = spec.virtual_stages
    if v == 1:
        return spec.layout.stage_ranges(spec.gpt_config)
    return balanced_layers(spec.n_layer, spec.pp * v, gpt_stage_costs(spec.gpt_config))


def _chunk_bytes(spec: TrainSpec, stage: int, tp_rank: int) -> list[float]:
    """Cache bytes of one micro-batch through each of this rank's chunks."""
    v, P = spec.virtual_stages, spec.pp
    layers = _chunk_layers(spec)
    per_block = sum(block_cache(spec).values()) * activation_bytes(spec)
    out = []
    for c in range(v):
        vs = c * P + stage
        x = len(layers[vs]) * per_block
        if vs == 0:
            x += embedding_cache_bytes(spec)
        if vs == P * v - 1:
            x += head_cache_bytes(spec, tp_rank)
        out.append(x)
    return out


def in_flight_peak(spec: TrainSpec, stage: int, weights: Sequence[float]) -> tuple[float, float]:
    """(peak of the summed ``weights[chunk]`` of forwards awaiting backward, micro-batches in
    flight at that peak) on pipeline rank ``stage``, from its own instruction list."""
    name = "interleaved" if spec.virtual_stages > 1 else spec.schedule
    ins = make_schedule(name, spec.pp, stage, spec.micro_batches, chunks=spec.virtual_stages)
    live = peak = 0.0
    count = at_peak = 0
    for i in ins:
        if isinstance(i, Forward):
            live += weights[i.chunk]
            count += 1
            if live > peak:
                peak, at_peak = live, count
        elif isinstance(i, Backward):
            live -= weights[i.chunk]
            count -= 1
    return peak, at_peak / spec.virtual_stages


def _transient(spec: TrainSpec, stage: int, tp_rank: int) -> tuple[int, dict[str, int]]:
    s, b, h, a, t = spec.block_size, spec.micro_batch, spec.n_embd, spec.n_head, spec.tp
    e = activation_bytes(spec)
    cands: dict[str, float] = {}
    softmax_grads = 2 if spec.dropout > 0 else 1
    cands["attention softmax gradient"] = softmax_grads * a * s * s * b / t * e
    if spec.recompute == "full":
        full = spec.with_(recompute="none")
        cands["recomputed block cache"] = sum(block_cache(full).values()) * e \
            + cands["attention softmax gradient"]
    if stage == spec.pp - 1:
        cands["logits gradient"] = s * b * _vocab_rows(spec, tp_rank) * e
    name = max(cands, key=cands.get)
    out = {name: int(cands[name])}
    if spec.pp > 1:
        out["pipeline receives posted ahead"] = LOOKAHEAD * s * b * h * e
    return sum(out.values()), out


def _estimate_stage(spec: TrainSpec, stage: int, tp_rank: int, dp_rank: int) -> MemoryEstimate:
    params, grads, optimizer, _ = _model_state(spec, stage, tp_rank, dp_rank)
    acts, in_flight = in_flight_peak(spec, stage, _chunk_bytes(spec, stage, tp_rank))
    transient, named = _transient(spec, stage, tp_rank)
    return MemoryEstimate(stage, params, grads, optimizer, int(math.ceil(acts)), transient,
                          in_flight, breakdown=named)
