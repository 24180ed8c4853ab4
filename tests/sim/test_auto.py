"""``auto``: tuned tables win when present (nearest size), the cost model otherwise."""

from __future__ import annotations

import pytest

from mpipar.comm import auto
from mpipar.comm.network import Profile, load_profile

from simhelpers import available


def _table(p=8):
    return {"format": auto.TABLE_FORMAT, "host": "h", "ranks": p, "collectives": {"allreduce": [
        {"bytes": 1024, "best": "rhd"},
        {"bytes": 65536, "time_us": {"ring": 50.0, "tree": 40.0, "native": 45.0}},
        {"bytes": 1 << 20, "best": "ring"}]}}


def test_nearest_size_lookup():
    t = _table()
    assert auto.lookup(t, "allreduce", 100) == "rhd"
    assert auto.lookup(t, "allreduce", 4096) == "rhd"  # 2^12: nearest 2^10
    assert auto.lookup(t, "allreduce", 8192) == "tree"  # 2^13: a tie goes to the larger size
    assert auto.lookup(t, "allreduce", 40000) == "tree"  # least time_us
    assert auto.lookup(t, "allreduce", 1 << 30) == "ring"
    assert auto.lookup(t, "allgather", 1024) is None


def test_table_round_trip_and_env(tmp_path, monkeypatch):
    if available("ring") is None or available("rhd") is None:
        pytest.skip("ring/rhd not registered yet")
    path = tmp_path / "t.json"
    auto.save_table(_table(), path)
    assert auto.load_table(path)["collectives"]["allreduce"][0]["bytes"] == 1024
    monkeypatch.setenv(auto.ENV_TABLE, str(path))
    auto._table_for.cache_clear()
    try:
        names = __import__("mpipar.comm.algorithms", fromlist=["x"]).algorithm_names()
        want = "ring" if "ring" in names else "native"
        assert auto.choose("allreduce", 1 << 21, 8) == want
        assert auto.choose("allreduce", 1 << 21, 8, table=str(path)) == want
    finally:
        auto._table_for.cache_clear()


def test_table_for_another_size_is_ignored(tmp_path):
    assert auto.choose("allreduce", 4, 1) == "native"
    t = _table(p=4)
    assert auto.lookup(t, "allreduce", 1 << 20) == "ring"
    # p=8 does not match the table's 4 ranks: the cost model decides
    assert auto.choose("allreduce", 1 << 20, 8, table=t) in {"native", *auto_names()}


def auto_names():
    from mpipar.comm.cost_model import ALGORITHMS

    return set(ALGORITHMS)


def test_cost_model_choices_are_sensible():
    flat = Profile.simple(5e-6, 1e-10, 1e-11)
    small = auto.model_choice("allreduce", 256, 64, flat)
    large = auto.model_choice("allreduce", 256 << 20, 64, flat)
    assert small in ("rhd", "tree")  # latency-bound: log p steps
    assert large in ("ring", "rhd")  # bandwidth-bound: 2 (p-1)/p n beta
    for p in (4, 64, 1024):
        for n in (1024, 1 << 20, 1 << 26):
            assert auto.model_choice("allreduce", n, p, flat) != "ps"
    dgx = load_profile("dgx-h100")
    assert auto.model_choice("allreduce", 1 << 26, 1024, dgx) in ("hier", "ring", "rhd")
    assert auto.model_choice("alltoall", 1024, 8) == "native"
    assert auto.model_choice("allreduce", 1 << 20, 8) in auto_names()  # default profile
