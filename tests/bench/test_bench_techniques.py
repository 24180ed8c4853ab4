"""``python -m mpipar.bench training-techniques``: every part runs on its ranks of the world
and its rows, baseline first, reach the one JSON file; a part that needs more ranks than the
world has is skipped and said so."""

from __future__ import annotations

import argparse
import json

import pytest

from mpipar.bench import techniques


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    techniques.add_arguments(p)
    return p.parse_args(argv)


def test_parts_parse_and_a_part_gets_its_own_defaults(tmp_path):
    assert techniques.parse_parts(" ps,precision ") == ["ps", "precision"]
    with pytest.raises(ValueError, match="a comma-separated list of precision, compression, ps"):
        techniques.parse_parts("precision,fp8")
    a = techniques.part_arguments("compression", _args(["--steps", "7"]), "x.json")
    assert (a.steps, a.json, a.schemes.split(",")[0]) == (7, "x.json", "none")


@pytest.mark.mpi(min_size=1)
def test_every_part_reports_beside_its_baseline(comm, capsys, tmp_path):
    path = str(tmp_path / "tt.json")              # only rank 0 writes (and reads) it
    assert techniques.main(_args(["--model", "tiny", "--steps", "2", "--json", path]), comm) == 0
    out = capsys.readouterr().out
    if comm.rank != 0:
        assert out == ""
        return
    got = json.load(open(path))
    assert got["world"] == comm.size
    parts = got["parts"]
    assert [r["precision"] for r in parts["precision"]["rows"]] == ["fp32", "bf16", "fp16"]
    assert parts["precision"]["dp"] == parts["compression"]["dp"] == min(2, comm.size)
    assert parts["compression"]["rows"][0]["scheme"] == "none"
    if comm.size >= 3:
        assert "== ps on 3 of" in out
        assert [r["name"] for r in parts["ps"]["results"]][:2] == ["all-reduce dp=2", "ps sync"]
    else:
        assert "ps" not in parts and "== ps: skipped (needs 3 ranks" in out
