"""The closed-form step time against its own closed forms, with a stand-in compute model
(a fixed FLOP rate and bandwidth) so every part can be computed by hand."""

from __future__ import annotations

import pytest

from mpipar.comm.cost_model import predict
from mpipar.comm.network import load_profile
from mpipar.sim import analytic
from mpipar.sim.analytic import RateCompute
from mpipar.sim.spec import TrainSpec

RATE, BW = 100e12, 1e12
COMPUTE = RateCompute(lambda dtype: RATE, BW)
PROFILE = load_profile("dgx-h100")
SPEC = TrainSpec(n_layer=8, n_embd=512, n_head=8, block_size=256, vocab_size=1000,
                 global_batch=16, micro_batch=2)


def test_flop_counts():
    s, b, h, l, V = SPEC.block_size, SPEC.micro_batch, SPEC.n_embd, SPEC.n_layer, SPEC.vocab_size
    B = SPEC.global_batch
    # no recompute: 3x forward, 24 N h^2 + 4 b s^2 h per layer and 2 N V h for the head
    per_mb = 3 * (l * (24 * s * b * h * h + 4 * b * s * s * h) + 2 * s * b * V * h)
    assert analytic.mpipar_flops_per_step(SPEC) == pytest.approx(per_mb * B / b, rel=1e-12)
    assert analytic.model_flops_per_step(SPEC) == pytest.approx(per_mb * B / b, rel=1e-12)
    # full recompute: Narayanan eq. 3 exactly; tp shards add up to the same count
    for t in (1, 2, 4):
        full = SPEC.with_(recompute="full", tp=t)
        assert analytic.mpipar_flops_per_step(full) == pytest.approx(
            analytic.megatron_flops_per_step(full), rel=1e-12)
    # selective: mpipar reruns 4 b s^2 h per layer; Megatron's eq. 8 counts 12
    sel = SPEC.with_(recompute="selective")
    assert analytic.mpipar_flops_per_step(sel) - analytic.model_flops_per_step(sel) == \
        pytest.approx(4 * B * s * s * h * l, rel=1e-9)
    assert analytic.megatron_flops_per_step(sel) - analytic.model_flops_per_step(sel) == \
        pytest.approx(12 * B * s * s * h * l, rel=1e-9)


def test_one_process_is_compute_plus_optimizer():
    t = analytic.step_time(SPEC, PROFILE, COMPUTE)
    assert t.compute == pytest.approx(analytic.mpipar_flops_per_step(SPEC) / RATE, rel=1e-12)
    assert t.tp_comm == t.pp_comm == t.dp_comm_exposed == t.bubble == t.recompute == 0
    from mpipar.nn.gpt import count_parameters
    n = count_parameters(SPEC.gpt_config)
    assert t.optimizer == pytest.approx(7 * 4 * n / BW)      # AdamW: 7 fp32 passes
    assert t.total == pytest.approx(t.compute + t.optimizer)


def test_recompute_adds_the_rerun_forward():
    for mode in ("full", "selective"):
        spec = SPEC.with_(recompute=mode)
        t = analytic.step_time(spec, PROFILE, COMPUTE)
        extra = analytic.mpipar_flops_per_step(spec) - analytic.mpipar_flops_per_step(SPEC)
        assert t.recompute == pytest.approx(extra / RATE, rel=1e-12)


@pytest.mark.parametrize("recompute,n", [("none", 4), ("full", 6)])
def test_tensor_parallel_all_reduces(recompute, n):
    spec = SPEC.with_(tp=4, recompute=recompute)
    t = analytic.step_time(spec, PROFILE, COMPUTE)
    act = spec.block_size * spec.micro_batch * spec.n_embd * 4
    one = predict("ring", "allreduce", 4, act, PROFILE, ranks_per_node=8)
    assert t.tp_comm == pytest.approx(spec.micro_batches * spec.n_layer * n * one)
    sp = analytic.step_time(spec.with_(sequence_parallel=True), PROFILE, COMPUTE)
    rs_ag = predict("ring", "reduce_scatter", 4, act, PROFILE, ranks_per_node=8) + \
        predict("ring", "allgather", 4, act, PROFILE, ranks_per_node=8)
    assert sp.tp_comm == pytest.approx(spec.micro_batches * spec.n_layer * n * rs_ag)


@pytest.mark.parametrize("P,M", [(2, 4), (4, 8), (4, 16)])
def test_bubble_is_p_minus_1_over_m_of_the_busy_time(P, M):
    spec = SPEC.with_(pp=P, global_batch=M * SPEC.micro_batch, n_embd=256, vocab_size=64)
    t = analytic.step_time(spec, PROFILE, COMPUTE)
    busy = t.compute + t.recompute + t.tp_comm + t.pp_comm
    assert t.bubble == pytest.approx(busy * (P - 1) / M, rel=1e-12)
    assert t.pp_comm > 0


def test_data_parallel_exposed_time():
    spec = SPEC.with_(dp=4, global_batch=8)
    t = analytic.step_time(spec, PROFILE, COMPUTE)
    assert t.dp_comm_exposed > 0
    # a slower compute hides more of the all-reduce under the last backward, never all of
    # the last bucket
    slow = analytic.step_time(spec, PROFILE, RateCompute(lambda d: RATE / 1000, BW))
    assert 0 < slow.dp_comm_exposed <= t.dp_comm_exposed


def test_mfu():
    t = 2.0
    assert analytic.mfu(SPEC, t, 1e14) == pytest.approx(
        analytic.model_flops_per_step(SPEC) / (t * 1 * 1e14))
    with pytest.raises(ValueError, match="step time 0"):
        analytic.mfu(SPEC, 0, 1e14)
