"""python -m mpipar.bench precision: one small run of every precision, and its defaults."""

from __future__ import annotations

import json

from mpipar import train
from mpipar.bench import __main__ as bench
from mpipar.bench import precision


def test_defaults_are_mpipar_trains():
    assert all(train.DEFAULTS[k] == v for k, v in precision.DEFAULTS.items()), precision.DEFAULTS


def test_a_short_run_reports_every_precision_against_fp32(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert bench.main(["precision", "--model", "tiny", "--block-size", "16", "--batch-size", "4",
                       "--steps", "3", "--eval-batches", "1", "--eval-every", "1",
                       "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "goals bf16:" in text and "goals fp16:" in text
    rows = {r["precision"]: r for r in json.load(open(out))["rows"]}
    assert list(rows) == ["fp32", "bf16", "fp16"]
    for p in ("bf16", "fp16"):             # 16-bit gradients and parameters, fp32 masters
        assert rows[p]["bytes_per_step"] * 2 == rows["fp32"]["bytes_per_step"]
        assert rows[p]["params"] * 2 == rows["fp32"]["params"]
        assert rows[p]["optimizer"] == rows["fp32"]["optimizer"] * 3 // 2
        assert rows[p]["activations"] < rows["fp32"]["activations"]
    # after fp32's training time: fp32 has taken all its steps; every evaluation is recorded
    assert (rows["fp32"]["steps_in_budget"], rows["fp32"]["val_loss_in_budget"]) == \
        (3, rows["fp32"]["val_loss"])
    for r in rows.values():
        assert sorted(map(int, r["evals"])) == [0, 1, 2, 3] and 0 <= r["steps_in_budget"] <= 3
        assert r["val_loss_in_budget"] == r["evals"][str(r["steps_in_budget"])]
