"""The published runs are transcribed consistently: layouts add up, shapes give the papers'
parameter counts, and the papers' own FLOP formulas reproduce their derived columns."""

from __future__ import annotations

import pytest

from mpipar.nn.gpt import count_parameters
from mpipar.sim import published
from mpipar.sim.published import A100_PEAK_FLOPS, RUNS, narayanan_eq3_flops


def test_names_are_unique_and_every_spec_is_a_training_step():
    assert len({r.name for r in RUNS}) == len(RUNS)
    for r in RUNS:
        r.spec.check()
        assert r.gpus == r.spec.gpus == r.spec.dp * r.spec.tp * r.spec.pp, r.name
        assert r.spec.layout.fits(r.gpus, r.spec.gpt_config), r.name
        assert r.source and r.measured, r.name


def test_counts_from_the_shapes_match_the_parameters_column():
    """mpipar's GPT (learned positions, biases, tied head) has exactly Narayanan et al.'s eq. 2,
    12lh^2 + 13lh + (V+s)h, plus ln_f's 2h; that is within 1% of the printed column, or within
    its rounding to one decimal (1.65 is printed 1.7)."""
    checked = 0
    for r in RUNS:
        if r.parameters_billion is None:
            continue
        sp = r.spec
        l, h, V, s = sp.n_layer, sp.n_embd, sp.vocab_size, sp.block_size
        n = count_parameters(sp.gpt_config)
        assert n == 12 * l * h * h + 13 * l * h + (V + s) * h + 2 * h, r.name
        assert abs(n / 1e9 - r.parameters_billion) <= max(0.01 * r.parameters_billion, 0.05), r.name
        checked += 1
    assert checked == 16


def test_table1_aggregate_and_peak_follow_from_the_per_gpu_column():
    for r in RUNS:
        m = r.measured
        if "aggregate_pflops" not in m:
            continue
        # TFLOP/s per GPU is printed to the unit: +-0.5 of it, times the GPUs
        assert abs(m["aggregate_pflops"] - m["tflops_per_gpu"] * r.gpus / 1e3) \
            <= 0.5 * r.gpus / 1e3 + 0.05, r.name
        assert abs(100 * m["tflops_per_gpu"] * 1e12 / A100_PEAK_FLOPS - m["percent_of_peak"]) \
            <= 0.5 + 100 * 0.5e12 / A100_PEAK_FLOPS, r.name


def test_interleaving_needs_micro_batches_a_multiple_of_the_pipeline():
    for r in RUNS:
        if r.spec.pp > 1:
            assert r.spec.micro_batches % r.spec.pp == 0, r.name


def test_table2_training_days_follow_from_eq3():
    """Days for 300B tokens = (300e9 / (B s)) iterations x eq. 3 FLOPs / (n X): the paper's
    estimate, within the rounding of X (to the unit) and of the days."""
    checked = 0
    for r in RUNS:
        days = r.measured.get("training_days_300B_tokens_estimated")
        if days is None:
            continue
        X = r.measured["tflops_per_gpu"]
        iters = 300e9 / (r.spec.global_batch * r.spec.block_size)
        pred = iters * narayanan_eq3_flops(r.spec) / (r.gpus * X * 1e12) / 86400
        assert abs(pred - days) <= days * 0.5 / X + 0.5, r.name
        checked += 1
    assert checked == 6


def _korthikanti_flops(spec, extra_attention: bool) -> float:
    """Korthikanti et al. eq. 7 (model FLOPs, 72 B l s h^2 (1 + s/6h + V/12hl)) and eq. 8
    (selective recompute: s/3h)."""
    B, s, l, h, V = spec.global_batch, spec.block_size, spec.n_layer, spec.n_embd, spec.vocab_size
    att = s / (3 * h) if extra_attention else s / (6 * h)
    return 72 * B * l * s * h * h * (1 + att + V / (12 * h * l))


def test_table5_mfu_and_hfu_follow_from_the_iteration_times():
    """MFU = eq. 7 / (t n peak), HFU = eq. 8 / (t n peak): the printed iteration times
    (to 10 ms) give the printed MFU and HFU (to 0.1 point)."""
    checked = 0
    for r in RUNS:
        if "hfu_percent" not in r.measured:
            continue
        t = r.measured["iteration_s"]
        slack = 100 * 0.005 / t          # +-5 ms of the printed time, relative, in points
        for extra, key in ((False, "mfu_percent"), (True, "hfu_percent")):
            pct = 100 * _korthikanti_flops(r.spec, extra) / (t * r.gpus * A100_PEAK_FLOPS)
            assert abs(pct - r.measured[key]) <= 0.05 + slack * r.measured[key] / 100, \
                (r.name, key, pct)
        checked += 1
    assert checked == 4


def test_full_recompute_is_slower_by_the_printed_throughput_increase():
    """Table 5 prints 29.0%, 31.8%, 29.7%, 32.1% more throughput for present work."""
    for name, inc in (("22B", 29.0), ("175B", 31.8), ("530B", 29.7), ("1T", 32.1)):
        full = published.run(f"korthikanti22-{name}-full-recompute").iteration_s
        present = published.run(f"korthikanti22-{name}-selective-sp").iteration_s
        assert 100 * (full / present - 1) == pytest.approx(inc, abs=0.6), name


def test_unknown_run_names_the_known_ones():
    with pytest.raises(KeyError, match="narayanan21-t1-1008B"):
        published.run("gpt-5")
