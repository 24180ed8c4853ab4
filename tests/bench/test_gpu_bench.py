"""``python -m mpipar.bench gpu`` on the strict CuPy double with the tiny model: every table is
made, the step's host synchronisations come from the double's counters, --json holds what
was printed. (Timings on the double mean nothing and are not asserted.)"""

import argparse
import json

import pytest

from mpipar.bench import gpu
from mpipar.bench.__main__ import main as bench_main

FAST = ["--model", "tiny", "--batch-size", "2", "--steps", "2", "--warmup", "1",
        "--matmul-n", "16", "--transfer-mb", "0.01", "--no-torch"]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    gpu.add_arguments(p)
    return p.parse_args(argv)


def test_every_table_on_the_double(strict_cupy, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu.main(parse(FAST + ["--json", str(out)]), count_syncs=strict_cupy.counting) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert [m["dtype"] for m in r["matmul"]] == ["float32", "float16", "bfloat16", "tf32"]
    assert r["matmul"][0]["tflops"] > 0 and "CuPy has no bfloat16" in text
    assert r["train"][0]["library"] == "mpipar" and r["train"][0]["tokens_per_s"] > 0
    assert "float32 and float64 only today" in text          # 16-bit: said, not measured
    assert [x["copy"] for x in r["transfers"]][3] == "staged: device -> pinned -> device"
    syncs = r["host_syncs"]
    assert syncs["per_step"] >= 1 and sum(syncs["by_site"].values()) == syncs["per_step"]
    assert f"host synchronisations per mpipar step: {syncs['per_step']} (counted by the GPU module" in text
    assert r["parameters"] > 0 and r["batch"] == [2, gpu.MODELS["tiny"].block_size]


def test_the_command_line_without_a_counter_says_why(strict_cupy, capsys):
    assert bench_main(["gpu"] + FAST) == 0
    text = capsys.readouterr().out
    assert "host synchronisations per mpipar step: - (not counted: CuPy's synchronising calls are C" in text


def test_without_a_gpu_it_stops_with_one_line(monkeypatch):
    monkeypatch.setenv("MPIPAR_DISABLE_CUPY", "1")
    gpu.backend._cupy.cache_clear()
    with pytest.raises(SystemExit, match="bench gpu: GPU requested but CuPy"):
        gpu.main(parse(FAST))
    gpu.backend._cupy.cache_clear()
