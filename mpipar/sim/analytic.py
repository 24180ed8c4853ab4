"""Closed-form time of one training step, for the planner's pruning (the simulator runs the
real code; this is its cheap first guess).

    t = step_time(spec, "dgx-h100", compute)      # compute: gemm_time(m, n, k, batch, dtype)
    t.total, t.compute, t.bubble, t.tp_comm, t.dp_comm_exposed
    mfu(spec, t.total, 989e12)

``compute`` is any object with ``gemm_time(m, n, k, batch, dtype) -> s`` and
``memory_time(nbytes) -> s`` (``sim/compute.ComputeModel``); ``RateCompute(rate, bandwidth)``
makes one from a ``rate(dtype) -> FLOP/s`` callable.

Per micro-batch on one pipeline stage (tokens N = b s, tp t):

* compute: every GEMM mpipar's layers run, at its own shape (``gemms``): per block qkv (N,
  3h/t, h), scores and att @ v (batched over b a/t heads, full T x T: mpipar computes the
  masked half too), projection (N, h, h/t), MLP (N, 4h/t, h) and (N, h, 4h/t); the head's
  logits (N, V/t, h). Backward runs two GEMMs of each forward one's FLOPs (dX and dW;
  attention's four), so forward + backward = 3x forward. Full recompute adds one forward of
  the blocks, selective the attention scores and att @ v (``recompute``). The elementwise
  passes are not counted (they are the simulator's business).
* tp: 4 all-reduces of s b h activations per block (2 forward, 2 backward; +2 with full
  recompute, whose forward rerun all-reduces again); with sequence parallelism each is a
  reduce-scatter plus an all-gather. Priced by ``comm.cost_model.predict`` (ring: NCCL's
  large-message all-reduce; "native" has no formula), exposed (not overlapped).
* pp: one send of s b h per micro-batch per boundary each way, a single message m(b).
* bubble: ``schedules.bubble_fraction_theory(P, M, v)`` is the idle share of the step, f; the
  idle time is f / (1 - f) of the busy time, (P - 1) / (v M) of it.
* dp: the gradient all-reduce (ZeRO: reduce-scatter, + the parameter all-gather after the
  step) of the stage's gradient bytes, started as backward produces buckets (PyTorch DDP
  style): what exceeds the last micro-batch's backward is exposed, plus the last bucket.
* optimizer: memory-bound passes over the rank's optimiser-owned elements: AdamW reads p, g,
  m, v and writes p, m, v (7 x 4 bytes per element in fp32; + a 16-bit param copy under
  mixed precision); SGD 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from mpipar.comm.cost_model import Net, predict
from mpipar.comm.network import load_profile
from mpipar.parallel.schedules import bubble_fraction_theory
from mpipar.sim import memory
from mpipar.sim.spec import TrainSpec


class Compute(Protocol):
    def gemm_time(self, m: int, n: int, k: int, batch: int, dtype: str) -> float: ...

    def memory_time(self, nbytes: float) -> float: ...


@dataclass(frozen=True)
class RateCompute:
    """A compute model from a rate: ``2 m n k batch / rate(dtype)`` per GEMM and
    ``nbytes / bandwidth`` per memory pass."""

    rate: Callable[[str], float]
    bandwidth: float

    def gemm_time(self, m: int, n: int, k: int, batch: int, dtype: str) -> float:
        return 2.0 * m * n * k * batch / self.rate(dtype)

    def memory_time(self, nbytes: float) -> float:
        return nbytes / self.bandwidth


@dataclass(frozen=True)
class AnalyticTime:
    """Seconds of one optimiser step on the slowest pipeline stage, by part."""

    total: float
    compute: float            # forward + backward GEMMs of all micro-batches
    recompute: float          # the extra forward work of recompute
    tp_comm: float
    pp_comm: float
    dp_comm_exposed: float
    bubble: float
    optimizer: float


# (m, n, k, batch) per GEMM of one forward, one micro-batch
Gemm = tuple[int, int, int, int]


def block_gemms(spec: TrainSpec) -> list[Gemm]:
    """The GEMMs one block's forward runs on one tp rank for one micro-batch."""
    s, b, h, a, t = spec.block_size, spec.micro_batch, spec.n_embd, spec.n_head, spec.tp
    N, hs, heads = s * b, h // a, b * (a // t)
    return [(N, 3 * h // t, h, 1), (s, s, hs, heads), (s, hs, s, heads),
            (N, h, h // t, 1), (N, 4 * h // t, h, 1), (N, h, 4 * h // t, 1)]


def attention_gemms(spec: TrainSpec) -> list[Gemm]:
    """What selective recompute reruns: the scores and att @ v."""
    return block_gemms(spec)[1:3]


def head_gemms(spec: TrainSpec, tp_rank: int = 0) -> list[Gemm]:
    N = spec.block_size * spec.micro_batch
    return [(N, memory._vocab_rows(spec, tp_rank), spec.n_embd, 1)]


def _flops(gemms: list[Gemm]) -> float:
    return sum(2.0 * m * n * k * bt for m, n, k, bt in gemms)


def mpipar_flops_per_step(spec: TrainSpec) -> float:
    """FLOPs mpipar's layers run in one step over all GPUs, recompute included: 3x the
    forward GEMMs (attention over the full T x T, masked half included), + the blocks'
    forward again (full) or the scores and att @ v again (selective)."""
    N = spec.block_size * spec.micro_batch
    block = _flops(block_gemms(spec)) * spec.tp          # the tp shards add up to the block
    head = 2.0 * N * spec.vocab_size * spec.n_embd
    extra = {"none": 0.0, "full": block, "selective": _flops(attention_gemms(spec)) * spec.tp}
    per_mb = 3 * (spec.n_layer * block + head) + spec.n_layer * extra[spec.recompute]
    return per_mb * spec.micro_batches * spec.dp


def megatron_flops_per_step(spec: TrainSpec) -> float:
    """Megatron's count of the FLOPs run (Narayanan et al. 2021 eq. 3 with full recompute:
    96 B s l h^2 (1 + s/6h + V/16lh); Korthikanti et al. 2022 eq. 8 with selective: 72 ...
    (1 + s/3h + V/12hl); without recompute, the model FLOPs)."""
    B, s, l, h, V = spec.global_batch, spec.block_size, spec.n_layer, spec.n_embd, spec.vocab_size
    if spec.recompute == "full":
        return 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    if spec.recompute == "selective":
        return 72 * B * s * l * h * h * (1 + s / (3 * h) + V / (12 * l * h))
    return model_flops_per_step(spec)


def model_flops_per_step(spec: TrainSpec) -> float:
    """Model FLOPs (no recompute): Narayanan et al. 2021 eq. 3 without its extra forward pass,
    = Korthikanti et al. 2022 eq. 7: ``72 B s l h^2 (1 + s/(6h) + V/(12 l h))``.

    mpipar's own count (``mpipar_flops_per_step``) is the same without recompute and with
    full recompute (= eq. 3 exactly: the head is not rerun, eq. 3's V/16lh term is its three
    passes). They differ under selective recompute: mpipar reruns the scores and att @ v,
    4 b s^2 h per layer, while Megatron's eq. 8 counts 12 b s^2 h (its s/(3h) term)."""
    B, s, l, h, V = spec.global_batch, spec.block_size, spec.n_layer, spec.n_embd, spec.vocab_size
    return 72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))


def mfu(spec: TrainSpec, step_time: float, peak_flops_per_gpu: float) -> float:
    """Model FLOPs utilisation: model FLOPs / (step time x GPUs x peak)."""
    if step_time <= 0 or peak_flops_per_gpu <= 0:
        raise ValueError(f"step time {step_time} s and peak {peak_flops_per_gpu} FLOP/s must be > 0")
    return model_flops_per_step(spec) / (step_time * spec.gpus * peak_flops_per_gpu)


def _gemm_time(compute: Compute, gemms: list[Gemm], dtype: str) -> float:
    return sum(compute.gemm_time(m, n, k, bt, dtype) for m, n, k, bt in gemms)


def _fwd_bwd(compute: Compute, gemms: list[Gemm], dtype: str) -> tuple[float, float]:
    """(forward, backward) seconds: backward runs dX (m, k, n) and dW (n, k, m) per GEMM."""
    fwd = _gemm_time(compute, gemms, dtype)
    bwd = _gemm_time(compute, [(m, k, n, bt) for m, n, k, bt in gemms], dtype) + \
        _gemm_time(compute, [(n, k, m, bt) for m, n, k, bt in gemms], dtype)
    return fwd, bwd


def _algorithm(name: str | None) -> str:
    return name if name in ("ring", "rhd", "tree", "dbtree", "ps", "hier") else "ring"


def step_time(spec: TrainSpec, profile: Any, compute: Compute) -> AnalyticTime:
    """The closed-form step time (module docstring) of ``spec`` on the network ``profile``
    (a Profile, name or path) with ``compute``; the slowest stage's."""
    spec.check()
    prof = profile if hasattr(profile, "levels") else load_profile(profile)
    rpn = prof.ranks_per_node or 1
    dtype, e = spec.compute_dtype, memory.activation_bytes(spec)
    P, M, v, t = spec.pp, spec.micro_batches, spec.virtual_stages, spec.tp
    layers = memory._chunk_layers(spec)
    block_f, block_b = _fwd_bwd(compute, block_gemms(spec), dtype)
    head_f, head_b = _fwd_bwd(compute, head_gemms(spec), dtype)
    extra = {"none": 0.0, "full": block_f,
             "selective": _gemm_time(compute, attention_gemms(spec), dtype)}[spec.recompute]
    act = spec.block_size * spec.micro_batch * spec.n_embd * e
    if t > 1:
        opts = {"ranks_per_node": rpn} if rpn > 1 else {}
        if spec.sequence_parallel:
            one = predict("ring", "reduce_scatter", t, act, prof, **opts) + \
                predict("ring", "allgather", t, act, prof, **opts)
        else:
            one = predict("ring", "allreduce", t, act, prof, **opts)
        tp_per_block = one * (6 if spec.recompute == "full" else 4)
    else:
        tp_per_block = 0.0
    net = Net.from_profile(prof, rpn if rpn > 1 else None)
    hop = net.m_dist(act, spec.tp * spec.dp) if P > 1 else 0.0

    worst: AnalyticTime | None = None
    for stage in range(P):
        nblocks = sum(len(layers[c * P + stage]) for c in range(v))
        last = stage == P - 1
        fwd = nblocks * block_f + (head_f if last else 0.0)
        bwd = nblocks * block_b + (head_b if last else 0.0)
        compute_s = M * (fwd + bwd)
        recompute_s = M * nblocks * extra
        tp_s = M * nblocks * tp_per_block
        sends = (stage > 0) + (stage < P - 1)
        pp_s = M * v * sends * hop
        busy = compute_s + recompute_s + tp_s + pp_s
        f = bubble_fraction_theory(P, M, v)
        bubble = busy * f / (1 - f)
        est = memory.estimate(spec, stage=stage)
        dp_s = _dp_exposed(spec, prof, rpn, est, bwd + extra * nblocks + tp_s / M)
        opt = _optimizer_time(spec, compute, est)
        total = busy + bubble + dp_s + opt
        cand = AnalyticTime(total, compute_s, recompute_s, tp_s, pp_s, dp_s, bubble, opt)
        if worst is None or cand.total > worst.total:
            worst = cand
    assert worst is not None
    return worst


def _dp_exposed(spec: TrainSpec, prof: Any, rpn: int, est: memory.MemoryEstimate,
                last_backward: float) -> float:
    """The data-parallel reduction not hidden under the last micro-batch's backward, plus
    ZeRO's parameter all-gather after the step (never hidden)."""
    d = spec.dp
    if d == 1:
        return 0.0
    grad_bytes = est.params                          # the local gradients: the params' size
    per_node = max(1, rpn // spec.tp)                # dp ranks sharing a node
    opts = {"ranks_per_node": per_node} if per_node > 1 else {}
    alg = _algorithm(spec.allreduce)
    if spec.zero:
        comm = predict("ring", "reduce_scatter", d, grad_bytes, prof, **opts)
        gather = predict("ring", "allgather", d, grad_bytes, prof, **opts)
    else:
        comm = predict(alg, "allreduce", d, grad_bytes, prof, **opts)
        gather = 0.0
    bucket = min(grad_bytes, (spec.bucket_mb or float("inf")) * 2**20)
    tail = comm * bucket / grad_bytes if grad_bytes else 0.0
    return max(comm - last_backward, tail) + gather


def _optimizer_time(spec: TrainSpec, compute: Compute, est: memory.MemoryEstimate) -> float:
    """Memory-bound passes: AdamW reads param, grad and two moments, writes param and two
    moments (SGD: param, grad, momentum read; param, momentum written), over the elements the
    rank's optimiser owns (ZeRO: its shard)."""
    passes = 7 if spec.optimizer == "adamw" else 5
    master = 4
    states = 2 if spec.optimizer == "adamw" else 1
    owned = est.optimizer / (master * (states + (1 if spec.mixed_precision else 0)))
    nbytes = owned * passes * master
    if spec.mixed_precision:
        nbytes += owned * 2                          # the 16-bit copy compute reads
    return compute.memory_time(nbytes)
