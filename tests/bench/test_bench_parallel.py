"""``python -m mpipar.bench parallel``: layouts, the activation meter, and a short real run."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from mpipar.bench import parallel as bench
from mpipar.nn.gpt import GPT, PRESETS


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(argv)


def test_parse_layouts_and_configurations():
    assert bench.parse_layouts("2x1x1, 1x1x2", 2) == [(2, 1, 1), (1, 1, 2)]
    with pytest.raises(SystemExit):
        bench.parse_layouts("2x2x1", 2)
    with pytest.raises(SystemExit):
        bench.parse_layouts("2by1", 2)
    args = _args(["--layouts", "2x1x1,1x1x2", "--micro-batches", "1,4", "--zero", "0,2"])
    cfgs = bench.configurations(args, PRESETS["small"], 2)
    names = [c.name for c in cfgs]
    # zero only where dp > 1; schedules and M only where pp > 1
    assert names == ["2x1x1 - M=1 zero=0", "2x1x1 - M=1 zero=2",
                     "1x1x2 gpipe M=1 zero=0", "1x1x2 gpipe M=4 zero=0",
                     "1x1x2 1f1b M=1 zero=0", "1x1x2 1f1b M=4 zero=0"]
    # default: every layout that fits (small: 4 heads, so tp=8 does not)
    default = {c.layout for c in bench.configurations(_args([]), PRESETS["small"], 8)}
    assert "1x8x1" not in default and "8x1x1" in default and "2x2x2" in default


def test_activation_meter_counts_live_caches():
    cfg = PRESETS["tiny"].replace(block_size=8)
    m = GPT(cfg, seed=0, dtype="float32")
    stages = list(m.stages)
    meter = bench.ActivationMeter(stages, [m.param_buffer, m.grad_buffer])
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (2, 8))
    y = rng.integers(0, cfg.vocab_size, (2, 8))
    h, caches = x, []
    for st in stages[:-1]:
        h, c = st.forward(h)
        caches.append(c)
    _, loss, c = stages[-1].forward(h, y)
    caches.append(c)
    peak = meter.peak
    # at least the head's softmax (B, T, V) and each block's input (B, T, C)
    assert peak >= 2 * 8 * cfg.vocab_size * 4 + cfg.n_layer * 2 * 8 * cfg.n_embd * 4
    assert peak < 100 * 2**20
    dx = stages[-1].backward(1.0, caches[-1])
    for st, c in zip(reversed(stages[:-1]), reversed(caches[:-1])):
        dx = st.backward(dx, c)
    assert meter.live == 0 and not meter._caches
    meter.remove()
    assert "forward" not in vars(stages[0])


@pytest.mark.mpi(min_size=2)
def test_bench_parallel_runs(comm, capsys, tmp_path):
    n = comm.size
    layouts = [f"{n}x1x1", f"1x1x{n}"]          # tiny has 8 layers: pp up to 8
    path = str(tmp_path / "parallel.json")          # only rank 0 writes (and reads) it
    args = _args(["--model", "tiny", "--block-size", "8", "--batch-size", str(4 * n),
                  "--layouts", ",".join(layouts), "--micro-batches", "2", "--schedules", "1f1b",
                  "--zero", "0,1,2", "--steps", "1", "--warmup", "1", "--bucket-mb", "0.05",
                  "--json", path])
    assert bench.main(args, comm=comm) == 0
    out = capsys.readouterr().out
    if comm.rank != 0:
        return
    for col in ("layout", "step ms", "tok/s", "ar ms", "exp ms", "exp%", "bubble", "theory", "d pp",
                "params", "grads", "opt", "act", "MPI thread level"):
        assert col in out, col
    assert "goal" in out and "overlap" in out and "bubble 1f1b M=2" in out and "ZeRO-1" in out
    rows = {(r["layout"], r["zero"]): r for r in json.load(open(path))["rows"]}
    assert set(rows) == {(f"{n}x1x1", 0), (f"{n}x1x1", 1), (f"{n}x1x1", 2), (f"1x1x{n}", 0)}
    for r in rows.values():
        assert "skipped" not in r
        assert 0 < r["step_s"] < 60 and r["tokens_per_s"] > 0
        assert 0 <= r["bubble"] < 1 and r["memory_max"]["activations"] > 0
    z0, z1, z2 = (rows[(f"{n}x1x1", z)] for z in (0, 1, 2))
    assert z0["comm_total_s"] > 0 and 0 <= z0["exposed_fraction"] <= 1.0 + 1e-9
    assert z1["memory_max"]["optimizer_state"] < z0["memory_max"]["optimizer_state"]
    assert abs(z1["zero_opt_ratio"] - 1 / n) < 0.05
    assert z2["memory_max"]["grads"] < z0["memory_max"]["grads"] < z1["memory_max"]["grads"]
    assert abs(z2["zero_grad_kept_ratio"] - 1 / n) < 0.05
    # the peak adds the buckets backward is filling: here the tied wte and one block, 16%
    assert 1 / n < z2["zero_grad_ratio"] < 1 / n + 0.25
    pipe = rows[(f"1x1x{n}", 0)]
    assert pipe["bubble_theory"] == pytest.approx((n - 1) / (2 + n - 1))
    assert pipe["exposed_fraction"] is None and pipe["act_in_flight_sched"] == min(n, 2)
