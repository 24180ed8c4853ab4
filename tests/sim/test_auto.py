"""``auto``: tuned tables win when present (nearest size), the cost model otherwise."""

from __future__ import annotations

import json

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
    auto.table_for.cache_clear()
    try:
        names = __import__("mpipar.comm.algorithms", fromlist=["x"]).algorithm_names()
        want = "ring" if "ring" in names else "native"
        assert auto.choose("allreduce", 1 << 21, 8) == want
        assert auto.choose("allreduce", 1 << 21, 8, table=str(path)) == want
    finally:
        auto.table_for.cache_clear()


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


# -- corrupt tables: one ValueError naming the file and what is wrong -------------------------
def _entry(**over):
    e = {"bytes": 1024, "best": "ring", "time_us": {"ring": 5.0, "native": 7.0}}
    e.update(over)
    return {k: v for k, v in e.items() if v is not _DROP}


_DROP = object()


def _with(collectives=None, **top):
    t = {"format": auto.TABLE_FORMAT, "host": "h", "ranks": 8,
         "collectives": {"allreduce": [_entry()]} if collectives is None else collectives}
    t.update(top)
    return t


CORRUPT = {
    "not JSON": ("{\"format\": \"mpipar-tune/1\", ", "not JSON"),
    "binary": (b"\xff\xfe\x00garbage", "not JSON"),
    "a list": ([1, 2], "a JSON list, not an object"),
    "a string": ('"tune"', "a JSON str, not an object"),
    "wrong format": (_with(format="mpipar-tune/0"), "format='mpipar-tune/0'"),
    "no format": ({"collectives": {}}, "format=None"),
    "ranks not a number": (_with(ranks="eight"), "'ranks' must be a number"),
    "ranks a list": (_with(ranks=[8]), "'ranks' must be a number"),
    "collectives a list": (_with(collectives=[{"bytes": 1}]), "'collectives' must map"),
    "collectives a string": (_with(collectives="allreduce"), "'collectives' must map"),
    "unknown collective": (_with(collectives={"allreduc": [_entry()]}), "unknown collective 'allreduc'"),
    "entries an object": (_with(collectives={"allreduce": _entry()}), "allreduce must be a list"),
    "entry a number": (_with(collectives={"allreduce": [3]}), "entry 3 is not an object"),
    "entry a list": (_with(collectives={"allreduce": [[1024, "ring"]]}), "is not an object"),
    "entry unknown key": (_with(collectives={"allreduce": [_entry(byte=4)]}), "unknown keys ['byte']"),
    "no bytes": (_with(collectives={"allreduce": [_entry(bytes=_DROP)]}), "needs 'bytes'"),
    "no best nor times": (_with(collectives={"allreduce": [_entry(best=_DROP, time_us=_DROP)]}),
                          "needs 'bytes' and 'best' or 'time_us'"),
    "best null, no times": (_with(collectives={"allreduce": [_entry(best=None, time_us=_DROP)]}),
                            "needs 'bytes' and 'best' or 'time_us'"),
    "bytes a string": (_with(collectives={"allreduce": [_entry(bytes="4K")]}), "'bytes' must be a size"),
    "bytes negative": (_with(collectives={"allreduce": [_entry(bytes=-1)]}), "'bytes' must be a size"),
    "bytes true": (_with(collectives={"allreduce": [_entry(bytes=True)]}), "'bytes' must be a size"),
    "bytes NaN": (_with(collectives={"allreduce": [_entry(bytes=float("nan"))]}), "'bytes' must be a size"),
    "best a number": (_with(collectives={"allreduce": [_entry(best=3)]}), "'best' must be an algorithm"),
    "times a list": (_with(collectives={"allreduce": [_entry(best=_DROP, time_us=[5.0])]}),
                     "'time_us' must map"),
    "times not numbers": (_with(collectives={"allreduce": [_entry(best=_DROP, time_us={"ring": "fast"})]}),
                          "'time_us' must map"),
}


def _write(tmp_path, content):
    """bytes and str are written as they are (not JSON-encoded), anything else as JSON."""
    path = tmp_path / "tune.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    return path


@pytest.mark.parametrize("case", list(CORRUPT))
def test_a_corrupt_table_is_one_clear_value_error(tmp_path, case):
    content, what = CORRUPT[case]
    path = _write(tmp_path, content)
    with pytest.raises(ValueError) as info:
        auto.load_table(path)
    assert type(info.value) is ValueError  # not a JSONDecodeError or UnicodeDecodeError subclass
    assert str(info.value).startswith(f"{path}: ") and what in str(info.value)


@pytest.mark.parametrize("case", list(CORRUPT))
def test_table_for_a_corrupt_env_table_raises_before_any_collective(tmp_path, monkeypatch, case):
    """What the layout check calls before the first collective of ``--allreduce auto``: the
    same ValueError, every time (a failure is not cached), and choose() says the same."""
    path = _write(tmp_path, CORRUPT[case][0])
    monkeypatch.setenv(auto.ENV_TABLE, str(path))
    auto.table_for.cache_clear()
    try:
        for _ in range(2):
            with pytest.raises(ValueError, match="tune.json: "):
                auto.table_for(8)
        with pytest.raises(ValueError, match="tune.json: "):
            auto.choose("allreduce", 1 << 20, 8, table=str(path))
    finally:
        auto.table_for.cache_clear()


def test_table_for_reads_a_good_table_once_and_none_without_one(tmp_path, monkeypatch):
    path = _write(tmp_path, _with(collectives={"allreduce": [_entry(best=None)],
                                               "allgather": [_entry(bytes=4096, time_us=_DROP)]},
                                  dtype="float32", date="2026-11-23T03:00:00Z"))
    monkeypatch.setenv(auto.ENV_TABLE, str(path))
    auto.table_for.cache_clear()
    try:
        table = auto.table_for(8)
        assert table is not None and table["ranks"] == 8
        assert auto.table_for(8) is table  # read once per process
        assert auto.lookup(table, "allreduce", 1000) == "ring"  # best null: least time_us
        monkeypatch.setenv(auto.ENV_TABLE, str(tmp_path / "absent.json"))
        auto.table_for.cache_clear()
        assert auto.table_for(8) is None
    finally:
        auto.table_for.cache_clear()
