"""``python -m mpipar.bench collectives`` and ``tune``: the table, the JSON, validation, and
the table ``auto`` reads back; ``choose_best``'s rule."""

from __future__ import annotations

import argparse
import json

import pytest

from mpipar.bench import collectives as coll_bench
from mpipar.bench import tune
from mpipar.bench.report import shuffled
from mpipar.sim.report import busbw_factor


def _args(module, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


def test_choose_best_keeps_a_clear_winner_and_smooths_ties():
    """The fastest wins unless another algorithm within 5% of it is better over the
    neighbouring sizes; an algorithm more than 5% slower is never chosen."""
    entries = [
        {"bytes": 1024, "time_us": {"ring": 10.0, "rhd": 10.4, "native": 30.0}},
        {"bytes": 2048, "time_us": {"ring": 10.3, "rhd": 10.0, "native": 30.0}},   # rhd by 3%: a tie
        {"bytes": 4096, "time_us": {"ring": 9.0, "rhd": 10.0, "native": 30.0}},
        {"bytes": 8192, "time_us": {"ring": 12.0, "rhd": 10.0, "native": 30.0}},   # rhd by 20%: clear
    ]
    tune.choose_best(entries)
    assert [e["best"] for e in entries] == ["ring", "ring", "ring", "rhd"]
    one = [{"bytes": 8, "time_us": {"native": 5.0, "ring": 5.1}}]
    tune.choose_best(one)
    assert one[0]["best"] == "native"


@pytest.mark.mpi(min_size=2)
def test_collectives_and_tune_run_validate_and_save(comm, tmp_path, capsys):
    """A small real run: every row validated (no wrong elements), native beside each
    algorithm, busbw = algbw x the nccl-tests factor, the header names library, thread level
    and ranks; tune writes a table whose entries auto can use."""
    from mpipar.comm.auto import choose, load_table

    p = comm.size
    path = tmp_path / "bench.json"  # rank 0 writes
    args = _args(coll_bench, ["--algorithms", "ring,rhd,auto", "--sizes", "64,4K", "--iters", "4", "--min-seconds", "0",
                              "--block", "2", "--warmup", "1", "--collectives", "allreduce,allgather",
                              "--json", str(path)])
    assert coll_bench.main(args, comm=comm) == 0
    out = capsys.readouterr().out
    table_path = tmp_path / "tune.json"
    targs = _args(tune, ["--collectives", "allreduce", "--algorithms", "ring,rhd", "--sizes", "64,4K",
                         "--iters", "3", "--min-seconds", "0", "--block", "1", "--warmup", "1", "--out", str(table_path)])
    assert tune.main(targs, comm=comm) == 0
    if comm.rank != 0:
        return
    assert "all results correct" in out and "thread level" in out and f"{p} ranks" in out
    rows = json.loads(path.read_text())["rows"]
    got = {(r["collective"], r["algorithm"], r["size"]) for r in rows}
    for coll in ("allreduce", "allgather"):
        for alg in ("native", "ring", "rhd", "auto"):
            assert (coll, alg, 64) in got and (coll, alg, 4096) in got
    for r in rows:
        assert r["wrong"] == 0 and r["calls"] >= 4 and len(r["times_us"]) == r["calls"]
        assert r["busbw"] == pytest.approx(r["algbw"] * busbw_factor(r["collective"], p))
    table = load_table(table_path)
    assert table["ranks"] == p
    for e in table["collectives"]["allreduce"]:
        assert e["best"] in e["time_us"] and set(e["time_us"]) == {"native", "ring", "rhd"}
        assert choose("allreduce", e["bytes"], p, table=table) == e["best"]


def test_shuffled_is_a_permutation_fixed_by_its_seed():
    """Every rank draws the same order for the same round, and the rounds differ."""
    items = ["native", "ring", "rhd", "tree", "dbtree", "ps", "hier"]
    orders = [shuffled(items, seed) for seed in range(20)]
    for seed, order in enumerate(orders):
        assert sorted(order) == sorted(items)
        assert shuffled(items, seed) == order
    assert len({tuple(o) for o in orders}) > 10
    # each algorithm is sometimes first: no fixed predecessor
    assert {o[0] for o in orders} == set(items)
    assert items == ["native", "ring", "rhd", "tree", "dbtree", "ps", "hier"]  # not shuffled in place
