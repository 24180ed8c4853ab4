"""``python -m mpipar.bench compression``: its defaults are mpipar.train's, its schemes
parse as --compress does, and a short real run at dp = the world counts what the library
counts (none: the whole gradient buffer; fp16: half) and trains the lossless ones
(topk:1.0, full-rank PowerSGD) to none's validation loss."""

from __future__ import annotations

import argparse
import json

import pytest

from mpipar import train
from mpipar.bench import compression as bench
from mpipar.nn.gpt import GPT, PRESETS


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(argv)


def test_defaults_are_mpipar_trains():
    assert bench.TRAIN_DEFAULTS == {k: train.DEFAULTS[k] for k in bench.TRAIN_DEFAULTS}
    args = _args([])
    assert (args.model, args.batch_size, args.eval_batches) == \
        (train.DEFAULTS["model"], train.DEFAULTS["batch_size"], train.DEFAULTS["eval_batches"])


def test_schemes_parse_as_compress_does():
    assert bench._schemes("int8, topk:0.010,none,int8") == ["none", "int8", "topk:0.01"]
    assert bench._schemes(",".join(bench.SCHEMES)) == list(bench.SCHEMES)
    with pytest.raises(ValueError, match="powersgd rank 0 is not >= 1"):
        bench._schemes("powersgd:0")


@pytest.mark.mpi(min_size=2)
def test_bench_compression_runs(comm, capsys, tmp_path):
    path = str(tmp_path / "compression.json")      # only rank 0 writes (and reads) it
    args = _args(["--model", "tiny", "--block-size", "8", "--batch-size", "24", "--steps", "3",
                  "--eval-batches", "1", "--bucket-mb", "0.05", "--json", path,
                  "--schemes", "fp16,topk:1.0,powersgd:10000,topk:0.01"])
    assert bench.main(args, comm=comm) == 0
    out = capsys.readouterr().out
    if comm.rank != 0:
        return
    assert "| scheme | bytes/step (counted) |" in out and "`powersgd:10000`" in out
    rows = {r["scheme"]: r for r in json.load(open(path))["rows"]}
    assert list(rows) == ["none", "fp16", "topk:1", "powersgd:10000", "topk:0.01"]
    grads = GPT(PRESETS["tiny"].replace(block_size=8)).layout.numel * 4     # float32
    assert rows["none"]["bytes_per_step"] == grads and rows["none"]["residual_bytes"] == 0
    assert rows["fp16"]["bytes_per_step"] * 2 == grads and rows["fp16"]["residual_bytes"] == grads
    assert rows["topk:0.01"]["bytes_fraction"] < 0.05 and rows["topk:0.01"]["goal"] in (True, False)
    for lossless in ("topk:1", "powersgd:10000"):   # float32: the mean's rounding only
        assert rows[lossless]["val_loss"] == pytest.approx(rows["none"]["val_loss"], rel=1e-5)
    assert all(r["step_ms"] > 0 for r in rows.values())
    # after uncompressed training's time: none has taken all its steps
    assert (rows["none"]["steps_in_budget"], rows["none"]["val_loss_in_budget"]) == \
        (3, rows["none"]["val_loss"])
    assert all(r["val_loss_in_budget"] == r["evals"][str(r["steps_in_budget"])]
               for r in rows.values())
