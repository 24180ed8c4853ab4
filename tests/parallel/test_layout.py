"""``Layout.check``: the one decision whether a layout fits the world, the model and the batch,
with messages that name quantities and a ``field`` that names the part at fault; and
``choose_layout``, which judges its candidates by the same check."""

from __future__ import annotations

import json

import pytest

from mpipar.comm import auto
from mpipar.nn.gpt import PRESETS
from mpipar.parallel.layout import Layout, LayoutError, choose_layout, layouts

TINY = PRESETS["tiny"]                          # 8 heads, 8 blocks, C = 64, V = 256


@pytest.mark.parametrize("layout,world,config,batch,field,match", [
    (Layout(dp=3), 2, None, None, "grid", "3 ranks does not match the world of 2 ranks"),
    (Layout(tp=3), 3, TINY, None, "tp", "tensor-parallel degree 3 does not divide the 8 attention heads"),
    (Layout(tp=16), 16, TINY, None, "tp", "degree 16 does not divide the 8 attention heads"),
    (Layout(tp=8), 8, TINY.replace(vocab_size=5), None, "tp", "exceeds the vocabulary of 5 rows"),
    (Layout(pp=4), 4, TINY.replace(n_layer=2), None, "pp", "4 pipeline stages for 2 blocks"),
    (Layout(pp=2, stage_layers=(9, 0)), 2, TINY, None, "stage_layers", "at least one block"),
    (Layout(pp=4, stage_layers=(9, 0, 0, 0)), 4, TINY, None, "stage_layers", "at least one block"),
    (Layout(pp=2, stage_layers=(4, 4, 0)), 2, TINY, None, "stage_layers", "name 3 stages"),
    (Layout(pp=2, stage_layers=(3, 3)), 2, TINY, None, "stage_layers", "add up to 6, the model has 8"),
    (Layout(dp=4), 4, TINY, 10, "batch_size", "10 sequences does not split into dp 4"),
    (Layout(dp=2, grad_accum=2, micro_batches=3), 2, TINY, 8, "batch_size", "= 12 equal parts"),
    (Layout(micro_batches=0), 1, None, None, "micro_batches", "positive integer"),
    (Layout(grad_accum=-1), 1, None, None, "grad_accum", "positive integer"),
    (Layout(schedule="zb"), 1, None, None, "schedule", "'zb' is not one of gpipe, 1f1b"),
    (Layout(zero=3), 1, None, None, "zero", "ZeRO stage 3"),
    (Layout(bucket_mb=0), 1, None, None, "bucket_mb", "finite positive"),
    (Layout(bucket_mb=-1.0), 1, None, None, "bucket_mb", "finite positive"),
    (Layout(bucket_mb=float("inf")), 1, None, None, "bucket_mb", "finite positive"),
    (Layout(bucket_mb=float("nan")), 1, None, None, "bucket_mb", "finite positive"),
    (Layout(allreduce="bogus"), 1, None, None, "allreduce", "'bogus' is not one of native"),
    (Layout(virtual_stages=0), 1, None, None, "virtual_stages", "positive integer, got 0"),
    (Layout(pp=2, micro_batches=2, virtual_stages=2, schedule="gpipe"), 2, None, None,
     "virtual_stages", "2 virtual stages per rank need the 1f1b schedule"),
    (Layout(virtual_stages=2, micro_batches=2), 1, None, None, "virtual_stages",
     "pp 1 .* at least 2 pipeline stages"),
    (Layout(pp=2, micro_batches=3, virtual_stages=2), 2, None, None, "virtual_stages",
     r"micro_batches \(3\) to be a multiple of the number of pipeline stages \(2\)"),
    (Layout(pp=4, micro_batches=4, virtual_stages=3), 4, TINY, None, "virtual_stages",
     "pp 4 x 3 virtual stages = 12 virtual stages for 8 blocks"),
    (Layout(pp=2, micro_batches=2, virtual_stages=2, stage_layers=(4, 4)), 2, TINY, None,
     "stage_layers", "name 2 stages, pp 2 x 2 virtual stages per rank make 4"),
    (Layout(recompute="some"), 1, None, None, "recompute",
     "recompute 'some' is not one of none, selective, full"),
    (Layout(sequence_parallel=True), 1, None, None, "sequence_parallel", "needs tp > 1, got tp 1"),
    (Layout(tp=2, sequence_parallel=1), 2, None, None, "sequence_parallel", "True or False, got 1"),
    (Layout(tp=2, sequence_parallel=True), 2, TINY.replace(block_size=9), None,
     "sequence_parallel", "tp 2: tp does not divide the block size 9"),
    # gradient compression: the library's own words for a bad spec, then what composes
    (Layout(compress="bogus"), 1, None, None, "compress", "unknown compression 'bogus'"),
    (Layout(compress="topk"), 1, None, None, "compress", "topk needs a ratio"),
    (Layout(compress="topk:2"), 1, None, None, "compress", r"topk ratio 2 is not in \(0, 1\]"),
    (Layout(compress="int8:3"), 1, None, None, "compress", "int8 takes no argument"),
    (Layout(compress=None), 1, None, None, "compress", "must be a string"),
    (Layout(dp=2, zero=2, compress="int8"), 2, None, None, "compress",
     "gradient compression needs zero 0, got zero 2"),
    (Layout(dp=2, zero=1, compress="fp16"), 2, None, None, "compress",
     "gradient compression needs zero 0, got zero 1"),
    *[(Layout(dp=2, allreduce=a, compress=c), 2, None, None, "compress",
       f"compression {c} uses .*allgather; all-reduce algorithm .{a}. has no allgather")
      for a in ("ps", "tree", "dbtree", "hier") for c in ("int8", "topk:0.01", "bf16")],
])
def test_what_does_not_fit_and_why(layout, world, config, batch, field, match):
    with pytest.raises(LayoutError, match=match) as e:
        layout.check(world, config, batch)
    assert e.value.field == field
    assert not layout.fits(world, config, batch)


def test_what_fits():
    Layout(dp=2, tp=2, pp=2, micro_batches=4, grad_accum=2, zero=1, bucket_mb=0.5,
           allreduce="ring", stage_layers=(5, 3)).check(8, TINY, 2 * 4 * 2 * 3)
    Layout(tp=4, pp=2, micro_batches=2, virtual_stages=2, recompute="selective",
           sequence_parallel=True).check(8, TINY, 4)
    # compression: fp16 and powersgd all-reduce (any algorithm), bf16, int8 and topk all-gather
    for algorithm in ("native", "ring", "rhd", "tree", "dbtree", "ps", "hier", "auto", None):
        for spec in ("fp16", "powersgd:4"):
            Layout(dp=2, tp=2, allreduce=algorithm, compress=spec).check(4, TINY, 4)
    for algorithm in ("native", "ring", "rhd", "nccl", "auto", None):
        for spec in ("int8", "topk:0.01", "topk:1", "bf16", "none"):
            Layout(dp=2, pp=2, allreduce=algorithm, compress=spec).check(4, TINY, 4)
    Layout(dp=2, zero=2, compress="none").check(2)
    # the vocabulary is split unevenly: it need not divide by tp
    Layout(tp=8).check(8, TINY.replace(vocab_size=259))
    assert Layout(pp=2, stage_layers=(5, 3)).stage_ranges(TINY) == [range(0, 5), range(5, 8)]
    assert [len(r) for r in Layout(pp=4).stage_ranges(TINY)] == [2, 2, 2, 2]


def test_virtual_stages_split_the_blocks_and_run_the_interleaved_schedule():
    from mpipar.parallel.schedules import check_schedule, forward_only, make_schedule

    lay = Layout(pp=2, micro_batches=4, virtual_stages=2)
    lay.check(2, TINY, 8)
    assert lay.stage_ranges(TINY) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert lay.chunk_ranges(TINY, 0) == [range(0, 2), range(4, 6)]
    assert lay.chunk_ranges(TINY, 1) == [range(2, 4), range(6, 8)]
    assert lay.replace(stage_layers=(1, 3, 3, 1)).chunk_ranges(TINY, 1) == [range(1, 4), range(7, 8)]
    assert lay.schedule_for(1) == make_schedule("interleaved", 2, 1, 4, chunks=2)
    assert lay.replace(virtual_stages=1).schedule_for(1) == make_schedule("1f1b", 2, 1, 4)
    # evaluation: the training order's forwards; one chunk is the library's forward_only
    for P, v in ((1, 1), (2, 1), (4, 1), (2, 2), (4, 2)):
        ev = [Layout(pp=P, micro_batches=4, virtual_stages=v).evaluation_schedule_for(r)
              for r in range(P)]
        check_schedule(ev)
        if v == 1:
            assert ev == [list(forward_only(P, r, 4)) for r in range(P)]


def test_a_corrupt_tune_table_is_a_layout_error_for_auto(tmp_path, monkeypatch):
    table = tmp_path / "bad.json"
    table.write_text("{not json")
    monkeypatch.setenv("MPIPAR_TUNE_TABLE", str(table))
    auto.table_for.cache_clear()                 # tables are read once per process and size
    try:
        with pytest.raises(LayoutError, match="bad.json") as e:
            Layout(dp=2, allreduce="auto").check(2)
        assert e.value.field == "allreduce"
        table.write_text(json.dumps({"format": "mpipar-tune/1", "ranks": 2, "collectives": {}}))
        Layout(dp=2, allreduce="auto").check(2)
    finally:
        auto.table_for.cache_clear()


def test_choose_layout_prefers_data_parallel():
    assert choose_layout(8, TINY, 16)[0] == Layout(dp=8)
    assert choose_layout(8, TINY, 4)[0] == Layout(dp=4, tp=2)
    layout, why = choose_layout(8, TINY.replace(n_head=2, n_embd=16), 2)
    assert (layout.dp, layout.tp, layout.pp) == (2, 2, 2) and "pp=2" in why
    # the rest of the layout is kept, and the batch split counts micro-batches
    layout, _ = choose_layout(4, TINY, 8, Layout(micro_batches=2, zero=1))
    assert layout == Layout(dp=4, micro_batches=2, zero=1)
    # tp now may leave the vocabulary uneven, as an explicit --tp may
    assert choose_layout(2, TINY.replace(vocab_size=257), 1)[0] == Layout(tp=2)


def test_choose_layout_says_why_nothing_fits():
    with pytest.raises(LayoutError, match="no layout of 16 ranks fits: .*16 pipeline stages"):
        choose_layout(16, TINY.replace(n_head=1, n_embd=8), 1)
    with pytest.raises(LayoutError, match="ZeRO stage 5"):
        choose_layout(2, TINY, 2, Layout(zero=5))


def test_layouts_of_a_world():
    assert len(layouts(8)) == 10 and (2, 2, 2) in layouts(8)
    assert all(d * t * p == 12 for d, t, p in layouts(12))


@pytest.mark.parametrize("spec, compressed", [("none", False), (" none ", False), ("fp16", True),
                                              ("int8", True), ("topk:0.01", True)])
def test_compressed_reads_the_spec_as_the_library_parses_it(spec, compressed):
    """One answer to "is the dp all-reduce compressed" (the trainer's resume refusal and its
    header ask it): the library's parse, so a spec with spaces means what it parses to."""
    assert Layout(compress=spec).compressed is compressed
