"""The memory model against the trainer: byte-for-byte model state, measured activations.

The MPI tests build the real ``ParallelTrainer`` for every dp x tp x pp layout of the world
(ZeRO 0/1/2, uneven vocabulary rows and stage splits), run one step and compare
``memory_report()`` with ``estimate`` for the same rank: equal. The activation test runs the
benchmark's ``ActivationMeter`` (the peak bytes of live stage caches) over one step and
compares it with ``estimate(...).activations``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpipar.bench.parallel import ActivationMeter
from mpipar.nn.attention import causal_mask
from mpipar.nn.gpt import count_parameters
from mpipar.optim import OptimizerSpec
from mpipar.parallel.layout import layouts
from mpipar.parallel.trainer import ParallelTrainer
from mpipar.sim import memory
from mpipar.sim.spec import TrainSpec

# 251 rows split unevenly over tp 2 and 4; 8 blocks split unevenly over 3 stages
BASE = TrainSpec(n_layer=8, n_embd=64, n_head=8, block_size=16, vocab_size=251,
                 global_batch=8, micro_batch=1, bucket_mb=0.01)
# the activation comparison: wide enough that the caches dominate the token ids
ACT = TrainSpec(n_layer=4, n_embd=128, n_head=4, block_size=64, vocab_size=256,
                global_batch=8, micro_batch=2)
# ActivationMeter counts the token-id and target arrays once, as the whole step's batch they
# are views of (8-byte ids, B x T each), where the estimate counts one micro-batch's ids per
# micro-batch in flight: the difference is at most 2 B T x 8 bytes, 0.3% of these caches.
# Everything else is the same tensors; 1% bounds it with room.
ACT_TOL = 0.01


def _step(world, spec: TrainSpec, meter: bool = False):
    tr = ParallelTrainer(world, spec.gpt_config, spec.layout, OptimizerSpec(spec.optimizer),
                         dtype="float32")
    rng = np.random.default_rng(0)
    rows = spec.global_batch // spec.dp
    x = rng.integers(0, spec.vocab_size, (rows, spec.block_size))
    y = rng.integers(0, spec.vocab_size, (rows, spec.block_size))
    m = None
    if meter:
        local = tr.local
        m = ActivationMeter(list(tr.pipe.stages), [
            local.param_buffer, local.grad_buffer,
            causal_mask(spec.block_size, local.param_buffer.dtype, np)])
    tr.step(x, y)
    if m is not None:
        m.remove()
    return tr, m


# ---- against the trainer --------------------------------------------------------------------

@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("zero", [0, 1, 2])
@pytest.mark.parametrize("gb_per_dp,micro", [(4, 1), (2, 2), (1, 1)])
def test_model_state_equals_the_trainers_report(comm, zero, gb_per_dp, micro):
    for dp, tp, pp in layouts(comm.size):
        if BASE.n_head % tp or pp > BASE.n_layer:
            continue
        spec = BASE.with_(dp=dp, tp=tp, pp=pp, zero=zero, global_batch=gb_per_dp * dp,
                          micro_batch=micro)
        tr, _ = _step(comm, spec)
        rep, mesh = tr.memory_report(), tr.mesh
        est = memory.estimate(spec, stage=mesh.pp_rank, tp_rank=mesh.tp_rank, dp_rank=mesh.dp_rank)
        assert (est.params, est.grads, est.optimizer) == \
            (rep["params"], rep["grads"], rep["optimizer_state"]), (dp, tp, pp, zero)


@pytest.mark.mpi(min_size=1)
def test_given_stage_split_equals_the_trainers_report(comm):
    pp = min(comm.size, 4)
    if comm.size % pp:
        pytest.skip("needs a world divisible by the pipeline")
    counts = [1] * (pp - 1) + [BASE.n_layer - (pp - 1)]
    spec = BASE.with_(dp=comm.size // pp, pp=pp, stage_layers=tuple(counts),
                      global_batch=4 * (comm.size // pp), zero=2 if comm.size > pp else 0)
    tr, _ = _step(comm, spec)
    rep, mesh = tr.memory_report(), tr.mesh
    est = memory.estimate(spec, stage=mesh.pp_rank, dp_rank=mesh.dp_rank)
    assert (est.params, est.grads, est.optimizer) == \
        (rep["params"], rep["grads"], rep["optimizer_state"])


def _activation_cases(size: int) -> list[dict]:
    if size == 1:
        return [dict(), dict(dropout=0.1)]
    if size == 2:
        return [dict(tp=2), dict(tp=2, dropout=0.1), dict(dp=2),
                dict(pp=2, schedule="gpipe"), dict(pp=2, schedule="1f1b")]
    return []


@pytest.mark.mpi(min_size=1)
def test_activations_match_the_activation_meter(comm):
    cases = _activation_cases(comm.size)
    if not cases:
        pytest.skip("activation layouts are written for 1 and 2 ranks")
    for case in cases:
        spec = ACT.with_(**case)                  # global batch 8, micro-batch 2: M = 4 / dp
        tr, meter = _step(comm, spec, meter=True)
        mesh = tr.mesh
        est = memory.estimate(spec, stage=mesh.pp_rank, tp_rank=mesh.tp_rank,
                              dp_rank=mesh.dp_rank)
        assert est.activations == pytest.approx(meter.peak, rel=ACT_TOL), case
        assert est.activations <= meter.peak, case     # the ids counted per micro-batch only


# ---- closed forms ---------------------------------------------------------------------------

def _per_block(spec: TrainSpec) -> float:
    return sum(memory.block_cache(spec).values())


@pytest.mark.parametrize("t", [1, 2, 4])
def test_block_cache_closed_forms(t):
    spec = BASE.with_(tp=t, micro_batch=2)
    s, b, h, a = spec.block_size, spec.micro_batch, spec.n_embd, spec.n_head
    sbh = s * b * h
    assert _per_block(spec) == pytest.approx(sbh * (4 + 16 / t) + 4 * s * b + a * s * s * b / t)
    assert _per_block(spec.with_(dropout=0.1)) == pytest.approx(
        sbh * (6 + 16 / t) + 4 * s * b + 2 * a * s * s * b / t)
    assert _per_block(spec.with_(recompute="selective")) == pytest.approx(
        sbh * (4 + 16 / t) + 4 * s * b)
    assert _per_block(spec.with_(recompute="full")) == sbh
    # sequence parallelism: everything outside the tp regions holds 1/t of the sequence, so
    # with tp the whole block is 1/t of the single process's (Korthikanti's sbh/t (34 + 5as/h))
    sp = spec.with_(sequence_parallel=True, dropout=0.1)
    assert _per_block(sp) == pytest.approx(_per_block(sp.with_(tp=1, sequence_parallel=False)) / t)
    assert _per_block(spec.with_(sequence_parallel=True, recompute="full")) == sbh / t


def test_mixed_precision_bytes_per_parameter():
    one = BASE.with_(global_batch=1)
    n = count_parameters(one.gpt_config)
    for precision, (p, g, o) in {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}.items():
        e = memory.estimate(one.with_(precision=precision))
        assert (e.params, e.grads, e.optimizer) == (p * n, g * n, o * n), precision
    # activations halve with the element size (ids and targets stay 8-byte integers)
    e32, e16 = memory.estimate(one), memory.estimate(one.with_(precision="bf16"))
    ids = 2 * one.block_size * 8
    assert e16.activations - ids / 2 == pytest.approx((e32.activations - ids) / 2 + ids / 2, abs=1)


def test_zero_shards_the_optimizer_state():
    spec = BASE.with_(dp=4, global_batch=4)
    plain = memory.estimate(spec)
    for zero in (1, 2):
        z = memory.estimate(spec.with_(zero=zero))
        assert z.params == plain.params
        # rank 0 owns ceil-blocks of every bucket: at most one element per bucket above 1/4
        assert plain.optimizer / 4 <= z.optimizer < plain.optimizer / 4 + 8 * 2 * 10**4
    z1, z2 = memory.estimate(spec.with_(zero=1)), memory.estimate(spec.with_(zero=2))
    assert z2.grads < z1.grads                       # stage 2 never holds the full gradient


def _units(spec: TrainSpec, stage: int) -> float:
    return memory.in_flight_peak(spec, stage, [1.0] * spec.virtual_stages)[0]


@pytest.mark.parametrize("P,M", [(1, 1), (2, 4), (4, 4), (4, 2), (8, 16)])
def test_micro_batches_in_flight(P, M):
    spec = BASE.with_(pp=P, global_batch=M)
    for s in range(P):
        assert _units(spec.with_(schedule="gpipe"), s) == M
        assert _units(spec.with_(schedule="1f1b"), s) == min(P - s, M)


@pytest.mark.parametrize("P,v,M", [(2, 2, 4), (4, 2, 8), (4, 4, 8)])
def test_interleaved_in_flight_is_narayanans_count(P, v, M):
    spec = BASE.with_(n_layer=P * v, pp=P, virtual_stages=v, global_batch=M)
    for s in range(P):
        assert _units(spec, s) == min(2 * (P - s - 1) + (v - 1) * P + 1, v * M)
    # the first stage: L (1 + (P-1)/(P v)) layers' worth, Korthikanti et al. section 4.2.3
    # (each unit is one chunk of L / (P v) layers; non-interleaved 1F1B holds P x L / P = L)
    assert _units(spec, 0) / (P * v) == pytest.approx(1 + (P - 1) / (P * v))


def test_most_loaded_stage_and_fits():
    spec = BASE.with_(pp=4, global_batch=8)
    est = memory.estimate(spec)
    assert est.peak == max(memory.estimate(spec, stage=s).peak for s in range(4))
    assert memory.fits(spec, est.peak) and not memory.fits(spec, est.peak - 1)
    first, last = memory.estimate(spec, stage=0), memory.estimate(spec, stage=3)
    assert first.in_flight == 4 and last.in_flight == 1
    assert "logits gradient" in last.breakdown or "attention softmax gradient" in last.breakdown


def test_errors_name_the_quantities():
    with pytest.raises(ValueError, match="pipeline stage 4"):
        memory.estimate(BASE.with_(pp=4), stage=4)
    with pytest.raises(ValueError, match="tensor-parallel degree 3"):
        memory.estimate(BASE.with_(tp=3))
    with pytest.raises(ValueError, match="dropout"):
        memory.estimate(BASE.with_(dropout=1.5))


def test_a_trillion_parameters_is_cheap_to_estimate():
    """The planner calls this per candidate: no buffer of the model's size is made."""
    spec = TrainSpec(n_layer=128, n_embd=25600, n_head=160, block_size=2048, vocab_size=51200,
                     global_batch=3072, dp=6, tp=8, pp=64, precision="fp16", recompute="full")
    est = memory.estimate(spec, stage=0)
    assert math.isfinite(est.peak) and est.params > 0
