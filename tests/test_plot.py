"""python -m mpipar.plot: each kind of input becomes a PNG; bad input is one line and exit 2.

The inputs are the real thing: run logs written by ``train --log``, a benchmark JSON written
by ``bench collectives --json`` under mpiexec, and traces written by the simulator (through
the one writer, ``mpipar.trace``) and by ``train --trace``. A PNG is checked by its signature,
its header's size and its file size (a figure with content compresses to kilobytes).
"""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from mpipar import plot, train, trace
from mpipar.sim.spec import TrainSpec
from mpipar.sim.train import simulate_train
from mpipar.testing.launch import run_mpi

FAST = ["--model", "tiny", "--block-size", "16", "--batch-size", "4", "--threads", "1",
        "--eval-batches", "1", "--eval-interval", "3", "--steps", "6"]
PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature and that it has content."""
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR", data[:16]
    assert len(data) > 10_000, len(data)
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    d = tmp_path_factory.mktemp("logs")
    out = []
    for name, flags in (("adamw", []), ("sgd", ["--optimizer", "sgd"])):
        out.append(d / f"{name}.jsonl")
        assert train.main(FAST + flags + ["--log", str(out[-1])]) == 0
    return out


def test_a_run_log_and_overlaid_logs(logs, tmp_path, capsys):
    one = tmp_path / "one.png"
    assert plot.main([str(logs[0]), "-o", str(one)]) == 0
    assert f"log -> {one}" in capsys.readouterr().out
    w, h = png_size(one)
    assert w > 600 and h > 300
    both = tmp_path / "both.png"
    assert plot.main([str(logs[0]), str(logs[1]), "--labels", "adamw,sgd", "-o", str(both)]) == 0
    assert png_size(both) == (w, h) and both.read_bytes() != one.read_bytes()


def test_default_output_is_the_input_with_png(logs, tmp_path):
    log = tmp_path / "run.jsonl"
    log.write_bytes(logs[0].read_bytes())
    assert plot.main([str(log)]) == 0
    png_size(tmp_path / "run.png")


def test_a_benchmark_json(tmp_path):
    js = tmp_path / "coll.json"
    job = run_mpi(2, [sys.executable, "-m", "mpipar.bench", "collectives", "--algorithms", "ring",
                      "--sizes", "1K,16K,256K", "--iters", "3", "--min-seconds", "0",
                      "--max-seconds", "0.05", "--json", str(js)], timeout=120)
    assert job.returncode == 0, job.output[-2000:]
    out = tmp_path / "busbw.png"
    assert plot.main([str(js), "-o", str(out)]) == 0
    png_size(out)


def test_a_simulated_trace(tmp_path):
    spec = TrainSpec(n_layer=4, n_embd=64, n_head=4, block_size=32, vocab_size=256,
                     global_batch=8, micro_batch=2, dp=1, tp=1, pp=2)
    path = tmp_path / "sim.trace.json"
    trace.write_trace(path, simulate_train(spec, "local").ranks)
    out = tmp_path / "sim.png"
    assert plot.main([str(path), "-o", str(out)]) == 0
    png_size(out)


def test_a_real_trace_through_the_command_line(tmp_path):
    path = tmp_path / "run.trace.json"
    assert train.main(FAST + ["--trace", str(path)]) == 0
    out = tmp_path / "timeline.png"
    res = subprocess.run([sys.executable, "-m", "mpipar.plot", str(path), "-o", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"mpipar.plot: trace -> {out}"
    png_size(out)


def test_events_are_coloured_by_kind():
    assert plot.kind_of({"name": "forward mb0 s1", "cat": "compute"}) == "compute"
    assert plot.kind_of({"name": "forward mb0", "cat": "forward"}) == "compute"      # the simulator's
    assert plot.kind_of({"name": "dp allreduce", "cat": "dp"}) == "collective"
    assert plot.kind_of({"name": "recv_wait mb1", "cat": "recv_wait"}) == "p2p"
    assert plot.kind_of({"name": "clip", "cat": "clip"}) == "optimizer"


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpipar.plot: error: "), err
    return err[0]


def test_bad_input_is_one_line_and_exit_2(tmp_path, logs, capsys):
    cases = {"missing": (["{d}/nope.jsonl"], "{d}/nope.jsonl: no such file"),
             "directory": (["{d}"], "is a directory"),
             "empty": (["{d}/empty.jsonl"], "empty"),
             "other json": (["{d}/other.json"], "not a run log"),
             "not json": (["{d}/text.txt"], "text.txt line 1: not a run log"),
             "mixed": (["{log}", "{d}/t.json"], "inputs of different kinds"),
             "two traces": (["{d}/t.json", "{d}/t.json"], "one trace at a time"),
             "labels": (["{log}", "--labels", "a,b"], "--labels gives 2 label(s) for 1 input(s)"),
             "output dir": (["{log}", "-o", "{d}/no/x.png"], "--output {d}/no/x.png: directory"),
             "flag": (["--bogus", "{log}"], "unrecognized arguments: --bogus")}
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "other.json").write_text('{"spec": {}, "step_time_s": 1.0}')
    (tmp_path / "text.txt").write_text("hello\n")
    trace.write_trace(tmp_path / "t.json", [trace.Timeline(0, (0, 0, 0), [trace.Span("main", "x", 0, 1)])])
    for name, (argv, message) in cases.items():
        fill = {"d": tmp_path, "log": logs[0]}
        assert plot.main([a.format(**fill) for a in argv]) == 2, name
        assert message.format(**fill) in _one_error(capsys), name
    res = subprocess.run([sys.executable, "-m", "mpipar.plot", str(tmp_path / "nope.json")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines() == [f"mpipar.plot: error: {tmp_path}/nope.json: no such file"]


def test_without_matplotlib_a_clear_error(logs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)        # import matplotlib -> ImportError
    assert plot.main([str(logs[0]), "-o", str(tmp_path / "x.png")]) == 2
    assert "matplotlib is not installed: pip install 'mpipar[plot]'" in _one_error(capsys)
    assert not (tmp_path / "x.png").exists()
