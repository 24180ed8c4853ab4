"""mpipar.trace and ``python -m mpipar.train --trace``: the Trace Event Format of real runs.

The writer and the recorder on their own first (the format, names, tracks by thread, the
bound on memory, the recorder that records nothing). Then real runs of two ranks, the tiny
model: ``--dp 2`` and ``--pp 2 --micro-batches 4 --schedule 1f1b``, each traced and not.
Asserted of each trace: the format (every complete event has ts, dur, pid, tid; a process
per rank named with its coordinates, threads main and comm), the events of every traced step
(M forwards and M backwards per stage, in the order ``schedules.one_f_one_b`` gives; every
send paired with the receive of its peer, no receive ending before its send began beyond
the clocks' stated bound; the data-parallel buckets on the comm thread, with the algorithm,
the group size and together exactly the gradient's bytes; clipping and the optimiser step
once per step), events of one thread nested or in sequence, never overlapping; and the
losses of the traced run equal the untraced run's, bit for bit.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
import pytest

from mpipar import trace, train
from mpipar.trace import Span, Timeline, chrome_trace
from mpipar.data import load_tokens, vocab_size_of
from mpipar.nn.gpt import PRESETS, count_parameters
from mpipar.parallel.schedules import Backward, Forward, make_schedule
from mpipar.testing.launch import run_mpi

FAST = ["--model", "tiny", "--block-size", "16", "--batch-size", "4", "--threads", "1",
        "--eval-batches", "1", "--eval-interval", "2", "--steps", "4"]
TRACED = (1, 3)                          # --trace-steps 1:3
M = 4


# ---------------------------------------------------------------------------- the writer, the recorder
def test_chrome_trace_names_every_rank_and_thread_and_converts_to_microseconds():
    spans = [trace.Span("main", "forward mb0 s1", 1.0, 1.5, {"mb": 0}),
             trace.Span("comm", "dp allreduce", 1.25, 1.75, {"bytes": 8}, cat="collective")]
    doc = json.loads(json.dumps(trace.chrome_trace([trace.Timeline(3, (1, 0, 1), spans)],
                                                   {"steps": [1, 2]})))
    meta = {(e["name"], e["tid"]): e["args"] for e in doc["traceEvents"] if e["ph"] == "M"}
    assert meta[("process_name", 0)] == {"name": "rank 3 (dp 1, tp 0, pp 1)"}
    assert meta[("thread_name", 0)] == {"name": "main"} and meta[("thread_name", 1)] == {"name": "comm"}
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert [(e["pid"], e["tid"], e["ts"], e["dur"], e["cat"]) for e in xs] == [
        (3, 0, 1e6, 5e5, "forward"), (3, 1, 1.25e6, 5e5, "collective")]
    assert doc["otherData"] == {"steps": [1, 2]}


def test_span_names_carry_group_step_micro_batch_and_stage():
    assert trace.span_name("forward", {"mb": 2, "stage": 1}) == "forward mb2 s1"
    assert trace.span_name("allreduce", {"group": "dp", "bytes": 4}) == "dp allreduce"
    assert trace.span_name("allreduce", {"group": ""}) == "allreduce"
    assert trace.span_name("step", {"step": 5}) == "step 5"


def test_the_default_recorder_records_nothing_and_reads_no_clock():
    assert type(trace.recorder()) is trace.Recorder
    assert trace.recorder().now() == 0.0
    trace.recorder().add("forward", 1.0, 2.0, "compute", mb=0)   # accepted, kept nowhere


def test_span_recorder_tracks_threads_and_bounds_memory():
    rec = trace.SpanRecorder(limit=3)
    before = trace.install(rec)
    try:
        assert trace.recorder() is rec
        t0 = rec.now()
        rec.add("forward", t0, rec.now(), "compute", mb=1, stage=0)
        worker = threading.Thread(target=lambda: trace.recorder().add("allreduce", 0.0, 1.0,
                                                                        group="dp"))
        worker.start()
        worker.join()
        for _ in range(3):
            rec.add("send act", 0.0, 0.0, "p2p", mb=0)
    finally:
        assert trace.install(before) is rec
    assert trace.recorder() is before
    assert [(s.track, s.name, s.cat) for s in rec.spans] == [
        ("main", "forward mb1 s0", "compute"), ("comm", "dp allreduce", ""), ("main", "send act mb0", "p2p")]
    assert rec.dropped == 2 and rec.spans[0].t1 >= rec.spans[0].t0 > 0


# ---------------------------------------------------------------------------- real runs
def _run(tmp_path, name: str, flags: list[str], traced: bool):
    log = tmp_path / f"{name}.jsonl"
    out = tmp_path / f"{name}.trace.json"
    argv = FAST + flags + ["--log", str(log), "--dtype", "float64"]
    if traced:
        argv += ["--trace", str(out), "--trace-steps", f"{TRACED[0]}:{TRACED[1]}"]
    job = run_mpi(2, [sys.executable, "-m", "mpipar.train", *argv], timeout=180)
    assert job.returncode == 0 and not job.timed_out, job.output[-3000:]
    losses = [e["loss"] for e in map(json.loads, log.read_text().splitlines()) if "loss" in e]
    return losses, (json.loads(out.read_text()) if traced else None), job.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("trace")
    out = {}
    for name, flags in (("dp", ["--dp", "2", "--bucket-mb", "0.2"]),
                        ("pp", ["--pp", "2", "--micro-batches", str(M), "--schedule", "1f1b"])):
        plain, _, _ = _run(d, name + "-plain", flags, traced=False)
        losses, doc, output = _run(d, name, flags, traced=True)
        out[name] = dict(plain=plain, losses=losses, doc=doc, output=output)
    return out


def complete_events(doc: dict) -> list[dict]:
    return [e for e in doc["traceEvents"] if e["ph"] == "X"]


def check_format(doc: dict, world: int) -> None:
    meta = [e for e in doc["traceEvents"] if e["ph"] == "M"]
    for r in range(world):
        names = {(e["name"], e["tid"]): e["args"]["name"] for e in meta
                 if e["pid"] == r and e["name"] in ("process_name", "thread_name")}
        assert names[("thread_name", 0)] == "main" and names[("thread_name", 1)] == "comm"
        assert names[("process_name", 0)].startswith(f"rank {r} (dp ")
    for e in complete_events(doc):
        assert {"name", "ts", "dur", "pid", "tid"} <= set(e), e
        assert e["dur"] >= 0 and e["tid"] in (0, 1) and 0 <= e["pid"] < world, e


def check_nesting(doc: dict) -> None:
    """Per thread, two events are nested or in sequence (1 ns of rounding allowed)."""
    rows: dict[tuple, list[dict]] = {}
    for e in complete_events(doc):
        rows.setdefault((e["pid"], e["tid"]), []).append(e)
    for row, evs in rows.items():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict] = []
        for e in evs:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"] + 1e-3:
                stack.pop()
            if stack:
                top = stack[-1]
                assert e["ts"] + e["dur"] <= top["ts"] + top["dur"] + 1e-3, (row, top, e)
            stack.append(e)


def test_the_nesting_check_finds_overlapping_events():
    def doc(*spans):
        return {"traceEvents": [{"ph": "X", "name": n, "pid": 0, "tid": 0, "ts": ts, "dur": d}
                                for n, ts, d in spans]}
    check_nesting(doc(("step 1", 0, 10), ("forward", 1, 3), ("backward", 4, 6), ("step 2", 10, 5)))
    with pytest.raises(AssertionError):
        check_nesting(doc(("step 1", 0, 10), ("forward", 8, 3)))


def steps_of(doc: dict, pid: int) -> dict[int, list[dict]]:
    """Per traced step, the main-thread events of rank ``pid`` inside its ``step N`` span."""
    evs = [e for e in complete_events(doc) if e["pid"] == pid and e["tid"] == 0]
    out = {}
    for s in (e for e in evs if e["name"].startswith("step ")):
        inside = [e for e in evs if e is not s and s["ts"] <= e["ts"]
                  and e["ts"] + e["dur"] <= s["ts"] + s["dur"] + 1e-3]
        out[int(s["name"].split()[1])] = sorted(inside, key=lambda e: e["ts"])
    return out


def test_traced_losses_equal_untraced_bitwise(runs):
    for name, r in runs.items():
        assert len(r["losses"]) == 4 and r["losses"] == r["plain"], name


def test_dp_trace_format_buckets_on_the_comm_thread_and_optimiser(runs):
    doc = runs["dp"]["doc"]
    check_format(doc, 2)
    check_nesting(doc)
    assert f"trace of steps {TRACED[0]}:{TRACED[1]} written" in runs["dp"]["output"]
    assert doc["otherData"]["steps"] == list(TRACED)
    config = PRESETS["tiny"].replace(block_size=16, vocab_size=vocab_size_of(load_tokens(None)))
    grad_bytes = count_parameters(config) * 8                    # float64
    events = complete_events(doc)
    for pid in (0, 1):
        steps = steps_of(doc, pid)
        assert sorted(steps) == list(range(*TRACED))
        for step, inside in steps.items():
            names = [e["name"] for e in inside]
            assert names.count("forward mb0 s0") == 1 and names.count("backward mb0 s0") == 1
            assert names.count("clip") == 1 and names.count("optimizer") == 1
            assert "dp wait" in names
            s = next(e for e in events if e["pid"] == pid and e["name"] == f"step {step}")
            buckets = [e for e in events if e["pid"] == pid and e["tid"] == 1
                       and s["ts"] <= e["ts"] <= s["ts"] + s["dur"]]
            assert buckets and all(e["name"] == "dp allreduce" and e["args"]["algorithm"] == "native"
                                   and e["args"]["size"] == 2 for e in buckets)
            assert sum(e["args"]["bytes"] for e in buckets) == grad_bytes
        assert any(e["pid"] == pid and e["name"] == "evaluate" for e in events)


def test_pp_trace_has_every_micro_batch_in_1f1b_order_and_paired_messages(runs):
    doc = runs["pp"]["doc"]
    check_format(doc, 2)
    check_nesting(doc)
    bound = {int(k): v for k, v in doc["otherData"]["clock"]["bound_us"].items()}
    per_rank = {pid: steps_of(doc, pid) for pid in (0, 1)}
    for pid, steps in per_rank.items():
        assert sorted(steps) == list(range(*TRACED))
        want = [("forward" if isinstance(i, Forward) else "backward", i.mb)
                for i in make_schedule("1f1b", 2, pid, M) if isinstance(i, (Forward, Backward))]
        for step, inside in steps.items():
            got = [(e["name"].split()[0], e["args"]["mb"]) for e in inside
                   if e["name"].startswith(("forward", "backward"))]
            assert got == want, (pid, step)
            assert all(e["args"]["stage"] == pid for e in inside if "stage" in e["args"])
            assert [e["name"] for e in inside].count("optimizer") == 1
    for step in range(*TRACED):
        msgs = {pid: [e for e in per_rank[pid][step] if e["name"].startswith(("send", "recv"))]
                for pid in (0, 1)}
        # rank 0 sends activations and receives gradients; rank 1 the reverse
        for pid, kind_out, kind_in in ((0, "act", "grad"), (1, "grad", "act")):
            sends = [e for e in msgs[pid] if e["name"].startswith(f"send {kind_out}")]
            recvs = [e for e in msgs[1 - pid] if e["name"].startswith(f"recv {kind_out}")]
            assert sorted(e["args"]["mb"] for e in sends) == list(range(M))
            assert sorted(e["args"]["mb"] for e in recvs) == list(range(M))
            assert not [e for e in msgs[pid] if e["name"].startswith(f"send {kind_in}")]
            for snd in sends:
                rcv = next(e for e in recvs if e["args"]["mb"] == snd["args"]["mb"])
                assert snd["args"]["peer"] == 1 - pid and rcv["args"]["peer"] == pid
                assert snd["args"]["bytes"] == rcv["args"]["bytes"] == 4 * 16 * 64 * 8 // M
                # a receive cannot end before its send began, up to the clocks' bound
                assert rcv["ts"] + rcv["dur"] + bound[1 - pid] + bound[pid] >= snd["ts"]
    loss = [e for e in complete_events(doc) if e["name"] == "pp broadcast"]
    assert loss and all(e["args"]["bytes"] == 8 and e["args"]["size"] == 2 for e in loss)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, message", [
    (["--trace-steps", "1:2"], "--trace-steps needs --trace"),
    (["--trace", "{d}/t.json", "--trace-steps", "3:9"], "--trace-steps 3:9 is not within the run's steps 0:4"),
    (["--trace", "{d}/t.json", "--trace-steps", "2:2"], "needs 0 <= A < B"),
    (["--trace", "{d}/t.json", "--trace-steps", "x"], "expected A:B"),
    (["--trace", "{d}/no/such/dir/t.json"], "--trace {d}/no/such/dir/t.json: directory"),
    (["--trace", "{d}"], "is a directory"),
])
def test_bad_trace_flags_stop_before_training(tmp_path, capsys, argv, message):
    argv = [a.format(d=tmp_path) for a in argv]
    log = tmp_path / "never.jsonl"
    assert train.main(FAST + argv + ["--log", str(log)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpipar.train: error: "), err
    assert message.format(d=tmp_path) in err[0]
    assert not log.exists()                                      # no step ran


# ---------------------------------------------------------------------------- gathering, under MPI
@pytest.mark.mpi(min_size=1)
def test_gather_brings_every_ranks_spans_to_rank_0_on_its_clock(comm):
    """Each rank reads its clock just before and just after one barrier. No rank can leave a
    barrier before every rank has entered it, so on rank 0's clock, after alignment, every
    "after" is later than every "before", up to the two ranks' stated bounds."""
    before = time.perf_counter()
    comm.barrier()
    after = time.perf_counter()
    mine = [trace.Span("main", "before", before, before, {"rank": comm.rank}),
            trace.Span("comm", "after", after, after + 1e-3, {})]
    got = trace.gather_timelines(comm, comm.rank, (comm.rank, 0, 0), mine, dropped=comm.rank)
    if comm.rank != 0:
        assert got is None
        return
    timelines, other = got
    assert [t.rank for t in timelines] == list(range(comm.size))
    assert all(t.coords == (t.rank, 0, 0) and [(s.track, s.name) for s in t.spans]
               == [("main", "before"), ("comm", "after")] for t in timelines)
    assert other["dropped"] == {r: r for r in range(comm.size)}
    bound = {r: b * 1e-6 for r, b in other["clock"]["bound_us"].items()}
    assert bound[0] == 0.0 and all(b >= 0 for b in bound.values())
    assert min(s.t0 for t in timelines for s in t.spans) == 0.0   # one axis, from the earliest
    for a in timelines:
        assert a.spans[1].t1 - a.spans[1].t0 == pytest.approx(1e-3)
        for b in timelines:
            assert a.spans[1].t0 + bound[a.rank] + bound[b.rank] >= b.spans[0].t0, (a.rank, b.rank)


def test_spans_that_meet_still_meet_after_rounding_to_the_nanosecond():
    """clip ends where optimizer begins: their events must not overlap by a rounding (one
    CI run drew ts + dur = 43047.275 against the next ts 43047.274 when ts and dur were
    rounded apart)."""
    rng = np.random.default_rng(0)
    for t0, d1, d2 in zip(rng.uniform(0, 100, 2000), rng.uniform(0, 0.01, 2000), rng.uniform(0, 0.01, 2000)):
        spans = [Span("main", "clip", t0, t0 + d1, {}), Span("main", "optimizer", t0 + d1, t0 + d1 + d2, {})]
        a, b = [e for e in chrome_trace([Timeline(0, (0, 0, 0), spans)])["traceEvents"] if e["ph"] == "X"]
        assert a["ts"] + a["dur"] <= b["ts"] + 1e-6, (a, b)
