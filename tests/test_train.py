"""python -m mpipar.train, run in-process through ``train.main(argv)`` (the CLI's own path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mpipar import train
from mpipar.sim.plan import describe, plan
from mpipar.sim.spec import TrainSpec
from mpipar.testing.launch import JobResult, run_mpi

# tiny preset, short context, small batch: a step takes tens of milliseconds
FAST = ["--model", "tiny", "--block-size", "16", "--batch-size", "4", "--threads", "1",
        "--eval-batches", "1", "--eval-interval", "0", "--warmup", "2", "--lr", "3e-3"]


def train_ranks(n: int, *argv: str) -> JobResult:
    """``mpiexec -n n python -m mpipar.train argv`` through the suite's launcher: its MPI
    settings for an oversubscribed machine, and the whole job killed after 120 s (a bare
    ``subprocess.run(timeout=300)`` could outlive pytest's own 300 s timeout, which ends the
    whole serial run uncounted)."""
    path = os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")
    return run_mpi(n, [sys.executable, "-m", "mpipar.train", *argv], timeout=120, env={"PYTHONPATH": path})


def read_log(path) -> tuple[list[dict], list[dict]]:
    entries = [json.loads(line) for line in open(path)]
    return [e for e in entries if "loss" in e], [e for e in entries if "val_loss" in e]


def test_loss_falls_and_log_format(tmp_path, capsys):
    log = tmp_path / "run.jsonl"
    assert train.main(FAST + ["--steps", "20", "--dtype", "float64", "--log", str(log),
                              "--eval-interval", "10"]) == 0
    steps, evals = read_log(log)
    assert [e["step"] for e in steps] == list(range(20))
    for e in steps:
        assert set(e) >= {"step", "loss", "lr", "tokens_per_s", "time"}
        assert e["tokens_per_s"] > 0 and np.isfinite(e["loss"])
    assert [e["step"] for e in evals] == [0, 10, 20]
    first, last = np.mean([e["loss"] for e in steps[:3]]), np.mean([e["loss"] for e in steps[-3:]])
    assert last < first - 0.3, (first, last)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    out = capsys.readouterr().out
    assert "parameters" in out and "tokens/step" in out and "bits/byte" in out


def test_micro_batches_give_the_same_training(tmp_path):
    logs = []
    for m in ("1", "2"):
        logs.append(tmp_path / f"m{m}.jsonl")
        assert train.main(FAST + ["--steps", "3", "--dtype", "float64", "--micro-batches", m,
                                  "--log", str(logs[-1])]) == 0
    a, b = (np.array([e["loss"] for e in read_log(p)[0]]) for p in logs)
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_checkpoint_resume_continues_identically(tmp_path):
    ck = tmp_path / "ck.safetensors"
    full, part, resumed = (tmp_path / n for n in ("full.jsonl", "part.jsonl", "res.jsonl"))
    common = FAST + ["--lr-decay-steps", "8"]
    assert train.main(common + ["--steps", "8", "--log", str(full)]) == 0
    assert train.main(common + ["--steps", "5", "--save", str(ck), "--log", str(part)]) == 0
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]        # temp file renamed
    assert train.main(common + ["--steps", "8", "--resume", str(ck), "--log", str(resumed)]) == 0
    want = [e["loss"] for e in read_log(full)[0]]
    got = [e["loss"] for e in read_log(resumed)[0]]
    assert [e["step"] for e in read_log(resumed)[0]] == [5, 6, 7]
    assert got == want[5:]                                             # bitwise identical
    assert [e["loss"] for e in read_log(part)[0]] == want[:5]


def test_npz_checkpoint_round_trip(tmp_path):
    ck = tmp_path / "ck.npz"
    assert train.main(FAST + ["--steps", "2", "--optimizer", "sgd", "--save", str(ck)]) == 0
    assert ck.read_bytes()[:2] == b"PK"
    assert train.main(FAST + ["--steps", "3", "--optimizer", "sgd", "--resume", str(ck)]) == 0


def test_missing_and_corrupt_checkpoint_fail_before_training(tmp_path, capsys):
    log = tmp_path / "never.jsonl"
    assert train.main(FAST + ["--resume", str(tmp_path / "nope.safetensors"),
                              "--log", str(log)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert train.main(FAST + ["--resume", str(bad), "--log", str(log)]) == 2
    assert "not a readable mpipar checkpoint" in capsys.readouterr().err
    assert not log.exists()                                            # no step was run


def test_resume_rejects_a_different_model(tmp_path, capsys):
    ck = tmp_path / "ck.npz"
    assert train.main(FAST + ["--steps", "1", "--save", str(ck)]) == 0
    assert train.main(FAST + ["--steps", "2", "--block-size", "8", "--resume", str(ck)]) == 2
    assert "config" in capsys.readouterr().err


def test_layout_flags_on_one_process_train_exactly_as_none(tmp_path):
    """One process is the layout 1 x 1 x 1 of the same runner: --dp 1, --pp 1, --zero 1 (and
    --zero 2, --tp 1) give the losses of no layout flags at all, to the bit."""
    logs = {}
    for flags in ([], ["--dp", "1"], ["--pp", "1"], ["--tp", "1"], ["--zero", "1"], ["--zero", "2"]):
        path = tmp_path / f"{'_'.join(flags) or 'none'}.jsonl"
        assert train.main(FAST + ["--steps", "5", "--log", str(path)] + flags) == 0
        logs[" ".join(flags)] = [e["loss"] for e in read_log(path)[0]]
    want = logs.pop("")
    assert len(want) == 5
    for flags, got in logs.items():
        assert got == want, flags


def test_custom_text_data_and_sample(tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text("to be or not to be, that is the question. " * 40, encoding="utf-8")
    assert train.main(FAST + ["--steps", "2", "--data", str(data), "--sample", "20"]) == 0
    out = capsys.readouterr().out
    assert "--- sample ---" in out


def test_token_file_with_larger_vocabulary(tmp_path, capsys):
    data = tmp_path / "tokens.npy"
    np.save(data, (np.arange(2000) * 7 % 300).astype(np.uint16))        # ids up to 299
    assert train.main(FAST + ["--steps", "2", "--data", str(data), "--sample", "3"]) == 0
    assert "vocab 300" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("mpiexec", path=os.path.dirname(sys.executable)) is None,
                    reason="no mpiexec beside the interpreter")
def test_two_ranks_train_like_one(tmp_path):
    """Data parallel over 2 ranks trains on the same global batches as 1 process."""
    args = FAST + ["--steps", "3", "--dtype", "float64"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert train.main(args + ["--log", str(one)]) == 0
    res = train_ranks(2, *args, "--log", str(two))
    assert res.returncode == 0, res.output[-2000:]
    a, b = (np.array([e["loss"] for e in read_log(p)[0]]) for p in (one, two))
    np.testing.assert_allclose(a, b, rtol=1e-10)
    # the layout given explicitly: a batch of 4 cannot split over 3 data-parallel ranks
    res = train_ranks(3, *args, "--dp", "3")
    assert res.returncode == 2 and "does not split into dp 3" in res.output, res.output[-2000:]


def test_bench_train_runs_beside_torch(capsys):
    """``python -m mpipar.bench train``: a table with both sides starting from the same loss."""
    from mpipar.bench.__main__ import main as bench_main

    argv = ["train", "--model", "tiny", "--batch-size", "2", "--block-size", "16", "--steps", "1",
            "--warmup", "0", "--threads", "1"]
    try:
        import torch  # noqa: F401
    except ImportError:
        argv.append("--no-torch")
    assert bench_main(argv) == 0
    out = capsys.readouterr().out
    assert "mpipar" in out and "tokens/s" in out and "threads 1" in out
    if "--no-torch" not in argv:
        rows = [line.split() for line in out.splitlines() if line.startswith(("mpipar ", "torch"))]
        losses = [float(r[-1]) for r in rows]
        assert len(losses) == 2 and abs(losses[0] - losses[1]) < 1e-4    # same model, same batch
        assert "ratio mpipar/torch" in out


@pytest.mark.skipif(shutil.which("mpiexec", path=os.path.dirname(sys.executable)) is None,
                    reason="no mpiexec beside the interpreter")
def test_checkpoints_move_between_layouts(tmp_path):
    """A checkpoint holds full tensors whatever wrote it: 2 pipeline stages save, one process
    resumes; one process saves, 2 ZeRO-2 ranks resume. Both continue the uninterrupted
    single-process run (float64, within 1e-10: the layouts sum in other orders)."""
    common = FAST + ["--dtype", "float64", "--lr-decay-steps", "8"]

    def two_ranks(*argv):
        res = train_ranks(2, *common, *argv)
        assert res.returncode == 0, res.output[-2000:]

    full, pp_ck, one_ck = tmp_path / "full.jsonl", tmp_path / "pp.safetensors", tmp_path / "one.npz"
    assert train.main(common + ["--steps", "8", "--log", str(full)]) == 0
    want = [e["loss"] for e in read_log(full)[0]]
    two_ranks("--pp", "2", "--steps", "5", "--save", str(pp_ck))
    assert train.main(common + ["--steps", "8", "--resume", str(pp_ck), "--log", str(tmp_path / "a.jsonl")]) == 0
    assert train.main(common + ["--steps", "5", "--save", str(one_ck)]) == 0
    two_ranks("--dp", "2", "--zero", "2", "--steps", "8", "--resume", str(one_ck), "--log", str(tmp_path / "b.jsonl"))
    for name in ("a.jsonl", "b.jsonl"):
        steps = read_log(tmp_path / name)[0]
        assert [e["step"] for e in steps] == [5, 6, 7], name
        np.testing.assert_allclose([e["loss"] for e in steps], want[5:], rtol=1e-10, err_msg=name)


def test_plan_trains_the_planners_first_choice(tmp_path):
    """``--plan`` on 2 ranks: the layout is the planner's first choice for this machine, said
    on rank 0, and the run trains what one process trains."""
    args = FAST + ["--steps", "2", "--dtype", "float64"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert train.main(args + ["--log", str(one)]) == 0
    res = train_ranks(2, *args, "--plan", "--log", str(two))
    assert res.returncode == 0, res.output[-2000:]
    c = train.PRESETS["tiny"].replace(block_size=16)
    base = TrainSpec(n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head, block_size=16,
                     vocab_size=256, global_batch=4, bucket_mb=1.0)
    first = plan(base, "local", 2, top=1)[0]
    assert res.output.count(f"planned: {describe(first.spec)}") == 1, res.output[-2000:]
    a, b = (np.array([e["loss"] for e in read_log(p)[0]]) for p in (one, two))
    np.testing.assert_allclose(a, b, rtol=1e-10)
    bad = train_ranks(2, *args, "--plan", "--dp", "2")
    assert bad.returncode == 2 and "--plan chooses the layout" in bad.output, bad.output[-2000:]


def test_plan_with_compression_plans_among_zero_0_layouts(tmp_path):
    """``--plan --compress powersgd:1000`` on 2 ranks: compression needs zero 0, so the plan
    is the planner's first choice among zero-0 layouts (its overall first here is ZeRO-1);
    full-rank PowerSGD trains what one process trains (within 1e-10 in float64)."""
    args = FAST + ["--steps", "2", "--dtype", "float64"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert train.main(args + ["--log", str(one)]) == 0
    res = train_ranks(2, *args, "--plan", "--compress", "powersgd:1000", "--log", str(two))
    assert res.returncode == 0, res.output[-2000:]
    c = train.PRESETS["tiny"].replace(block_size=16)
    base = TrainSpec(n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head, block_size=16,
                     vocab_size=256, global_batch=4, bucket_mb=1.0)
    first = plan(base, "local", 2, top=1, zero=(0,))[0]
    assert first.spec.zero == 0
    assert res.output.count(f"planned: {describe(first.spec)}") == 1, res.output[-2000:]
    if first.spec.dp > 1:
        assert "compression powersgd:1000" in res.output, res.output[-2000:]
    a, b = (np.array([e["loss"] for e in read_log(p)[0]]) for p in (one, two))
    np.testing.assert_allclose(a, b, rtol=1e-10)


def test_compressed_dp_trains_and_says_so(tmp_path):
    """``--compress topk:1.0`` at dp 2 is the uncompressed run (every entry sent), through
    the command line; ``int8`` runs and the header names it."""
    args = FAST + ["--steps", "3", "--dtype", "float64"]
    plain, topk = tmp_path / "plain.jsonl", tmp_path / "topk.jsonl"
    for log, extra in ((plain, []), (topk, ["--compress", "topk:1.0"])):
        res = train_ranks(2, *args, *extra, "--log", str(log))
        assert res.returncode == 0, res.output[-2000:]
    a, b = (np.array([e["loss"] for e in read_log(p)[0]]) for p in (plain, topk))
    np.testing.assert_allclose(a, b, rtol=1e-10)
    res = train_ranks(2, *args, "--compress", "int8")
    assert res.returncode == 0 and "compression int8" in res.output, res.output[-2000:]
