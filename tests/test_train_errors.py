"""Bad input to ``python -m mpipar.train``: one ``mpipar.train: error: ...`` line from rank 0,
exit code 2, no traceback, and MPI never started (so no collective ran).

Every case runs as a new user would run it, under ``mpiexec -n 2`` (the input reaches both
ranks); the output of both ranks is merged, so "one line" means rank 1 said nothing.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from mpipar.data.checkpoint import save_checkpoint
from mpipar.testing.launch import run_mpi

FAST = ["--model", "tiny", "--block-size", "16", "--batch-size", "4", "--threads", "1",
        "--eval-batches", "1", "--eval-interval", "0", "--steps", "2"]

# the command line, and then whether MPI was started: a bad input must stop before it
PROBE = ("import sys, mpipar.train as t; rc = t.main(sys.argv[1:]); "
         "m = sys.modules.get('mpi4py.MPI'); "
         "sys.stderr.write('probe: MPI started\\n' if m is not None and m.Is_initialized() else ''); "
         "sys.exit(rc)")


def run_train(argv: list[str], ranks: int = 2, env: dict | None = None):
    return run_mpi(ranks, [sys.executable, "-c", PROBE, *argv], timeout=120, env=env)


def assert_one_clean_error(job, *expected: str) -> str:
    assert not job.timed_out, job.output
    assert job.returncode == 2, job.output
    errors = [line for line in job.output.splitlines() if line.startswith("mpipar.train: error: ")]
    assert len(errors) == 1, job.output                  # once: rank 0 only
    for text in expected:
        assert text in errors[0], (text, job.output)
    assert "Traceback" not in job.output and "[mpipar] rank" not in job.output, job.output
    assert "probe: MPI started" not in job.output, job.output
    assert "mpipar.train |" not in job.output, job.output   # no run began
    return errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-input")
    huge = d / "huge.npy"
    np.save(huge, np.array([1, 2, 3, 1 << 40], dtype=np.int64))
    negative = d / "negative.npy"
    np.save(negative, np.array([1, -2, 3, 4] * 100, dtype=np.int64))
    headless = d / "headless.npz"                        # an mpipar checkpoint without a step
    save_checkpoint(str(headless), {"model.x": np.zeros(2)}, {"format": "mpipar-checkpoint",
                                                              "version": 1, "config": {}})
    table = d / "tune.json"
    table.write_text("{ this is not JSON")
    return {"dir": str(d), "huge": str(huge), "negative": str(negative),
            "headless": str(headless), "table": str(table)}


CASES = [
    # flags argparse refuses: once, not from every rank
    (["--bogus-flag"], ["unrecognized arguments: --bogus-flag"]),
    (["--lr", "abc"], ["argument --lr", "'abc' is not a number"]),
    (["--steps", "0"], ["argument --steps", "> 0"]),
    (["--device", "tpu"], ["argument --device", "invalid choice"]),
    # non-finite and non-positive numbers
    (["--grad-clip", "nan"], ["argument --grad-clip", "finite"]),
    (["--lr", "inf"], ["argument --lr", "finite"]),
    (["--weight-decay", "nan"], ["argument --weight-decay", "finite"]),
    (["--bucket-mb", "0"], ["argument --bucket-mb", "> 0"]),
    (["--bucket-mb", "-1"], ["argument --bucket-mb", "> 0"]),
    (["--min-lr", "1e-2", "--lr", "1e-3"], ["--min-lr 0.01 is above --lr 0.001"]),
    (["--model", "huge"], ["--model 'huge' is not a preset"]),
    # layouts: the library names the quantity, the command line the flag
    (["--pp", "2", "--stage-layers", "a,b"], ["argument --stage-layers", "comma-separated integers"]),
    (["--pp", "2", "--stage-layers", "9,0"], ["--stage-layers:", "at least one block"]),
    (["--pp", "2", "--stage-layers", "9,0,0,0"], ["--stage-layers:", "name 4 stages, the pipeline has 2"]),
    (["--allreduce", "bogus"], ["--allreduce:", "'bogus' is not one of"]),
    (["--allreduce", "nccl"], ["--allreduce nccl reduces GPU memory", "needs --device gpu"]),
    (["--dp", "3"], ["--dp/--tp/--pp:", "3 ranks does not match the world of 2 ranks"]),
    (["--pp", "2", "--micro-batches", "3"], ["--batch-size:", "micro-batches 3 = 3 equal parts"]),
    (["--dp", "2", "--batch-size", "5"], ["--batch-size:", "5 sequences does not split into dp 2"]),
    (["--zero", "3"], ["argument --zero", "invalid choice"]),
    # gradient compression: the library's words for a bad spec, Layout.check's for what does
    # not compose (a resume's residuals: tests/test_train_ckpt.py)
    (["--compress", "bogus"], ["--compress:", "unknown compression 'bogus'"]),
    (["--compress", "topk:0"], ["--compress:", "topk ratio 0 is not in (0, 1]"]),
    (["--zero", "2", "--compress", "int8"], ["--compress:", "gradient compression needs zero 0, got zero 2"]),
    (["--allreduce", "tree", "--compress", "topk:0.01"],
     ["--compress:", "algorithm 'tree' has no allgather"]),
    # mixed precision: float32 masters only, and fp32 reduction of 16-bit gradients only
    (["--precision", "bf32"], ["argument --precision", "invalid choice"]),
    (["--precision", "bf16", "--dtype", "float64"],
     ["--precision bf16: precision bf16 keeps float32 master weights; dtype float64 is for "
      "precision fp32 only"]),
    (["--precision", "fp16", "--dtype", "float64"], ["--precision fp16:", "dtype float64"]),
    (["--grad-reduce-dtype", "fp32"], ["--grad-reduce-dtype fp32", "needs --precision bf16 or fp16"]),
    (["--grad-reduce-dtype", "fp8"], ["argument --grad-reduce-dtype", "invalid choice"]),
    # fp16's loss scale: the library's checks, named by the flags given
    (["--precision", "fp16", "--loss-scale", "0"],
     ["--loss-scale 0:", "the initial loss scale must be a finite number > 0, got 0"]),
    (["--precision", "fp16", "--loss-scale-interval", "0"],
     ["--loss-scale-interval 0:", "growth interval must be >= 1 step, got 0"]),
    (["--precision", "fp16", "--loss-scale-backoff", "1"],
     ["--loss-scale-backoff 1:", "backoff 1.0 in (0, 1)"]),
    (["--precision", "bf16", "--loss-scale", "1024"],
     ["--loss-scale 1024:", "precision bf16 has no loss scale"]),
    (["--loss-scale", "nan"], ["--loss-scale nan:", "precision fp32 has no loss scale"]),
    (["--plan", "--precision", "bf16"],     # the planner's times need the dtype's compute
     ["--plan with --precision bf16:", "compute profile 'local' has no peak for bfloat16"]),
    (["--compress", "powersgd:0"], ["--compress:", "powersgd rank 0 is not >= 1"]),
    (["--allreduce", "ps", "--compress", "bf16"], ["--compress:", "algorithm 'ps' has no allgather"]),
    # parameter servers (param_server.check_ps names the quantity; 2 ranks here)
    (["--ps-servers", "2"], ["--ps-servers:", "2 parameter servers in a world of 2 ranks"]),
    (["--ps-servers", "-1"], ["argument --ps-servers"]),
    (["--ps-servers", "1", "--ps-mode", "bsp"], ["--ps-mode:", "'bsp' is not one of sync, async, ssp:S"]),
    (["--ps-servers", "1", "--ps-mode", "ssp:-1"], ["--ps-mode:", "'ssp:-1' is not one of"]),
    (["--ps-servers", "1", "--tp", "2"], ["--tp:", "tp degree 2 with parameter servers"]),
    (["--ps-servers", "1", "--zero", "1"], ["--zero:", "ZeRO stage 1 with parameter servers"]),
    (["--ps-servers", "1", "--compress", "fp16"], ["--compress:", "'fp16' with parameter servers"]),
    (["--ps-servers", "1", "--precision", "bf16"], ["--precision:", "precision bf16 with parameter servers"]),
    (["--ps-servers", "1", "--slow-rank", "1"], ["--slow-rank:", "rank 1 is not a worker"]),
    (["--ps-servers", "1", "--slow-rank", "0", "--slow-factor", "0.5"],
     ["--slow-factor:", "slow factor 0.5 must be a finite number >= 1"]),
    (["--slow-rank", "0"], ["--slow-rank/--slow-factor is for parameter-server training"]),
    (["--ps-mode", "async"], ["--ps-mode is for parameter-server training: give --ps-servers K"]),
    (["--ps-servers", "1", "--plan"], ["--plan chooses an all-reduce layout: not with --ps-servers"]),
    (["--ps-servers", "1", "--dp", "2"], ["--dp 2: with --ps-servers 1 of 2 ranks"]),
    (["--ps-servers", "1", "--micro-batches", "3"], ["--batch-size:", "does not split into 1 workers"]),
    # the GPU each rank uses (mpi_env.select_gpu)
    (["--gpu-id", "gpu2"], ["argument --gpu-id", "'gpu2' is not a GPU choice"]),
    (["--gpu-id", "0"], ["--gpu-id 0: no GPU in use (--device cpu)"]),
]


@pytest.mark.parametrize("argv,expected", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_flags_are_one_clean_error(argv, expected):
    assert_one_clean_error(run_train(FAST + argv), *expected)


def test_bad_files_are_one_clean_error_naming_the_file(files, tmp_path):
    cases = [
        (["--data", files["dir"]], [f"--data {files['dir']}", "is a directory"]),
        (["--data", files["huge"]], [f"--data {files['huge']}", "1,099,511,627,776",
                                     "beyond the limit of 16,777,216"]),
        (["--data", files["negative"]], [f"--data {files['negative']}", "negative token id"]),
        (["--data", "/nonexistent/corpus.txt"], ["--data /nonexistent/corpus.txt", "not found"]),
        (["--resume", files["headless"]], ["--resume:", "headless.npz", "lacks step"]),
        (["--resume", str(tmp_path / "none.npz")], ["--resume:", "checkpoint not found"]),
    ]
    for argv, expected in cases:
        assert_one_clean_error(run_train(FAST + argv), *expected)


def test_a_corrupt_tune_table_for_auto_is_one_clean_error(files):
    job = run_train(FAST + ["--allreduce", "auto"], env={"MPIPAR_TUNE_TABLE": files["table"]})
    assert_one_clean_error(job, "--allreduce:", files["table"])


def test_resuming_at_or_beyond_the_end_is_refused(tmp_path):
    ck = tmp_path / "ck.npz"
    ok = run_mpi(2, [sys.executable, "-m", "mpipar.train", *FAST, "--steps", "3", "--save", str(ck)],
                 timeout=120)
    assert ok.returncode == 0, ok.output
    for steps in ("3", "2"):
        job = run_train(FAST + ["--steps", steps, "--resume", str(ck)])
        assert_one_clean_error(job, f"--steps {steps} is not beyond the step of --resume", "(3)")


def test_help_is_printed_once():
    job = run_train(["--help"])
    assert job.returncode == 0, job.output
    assert job.output.count("usage: python -m mpipar.train") == 1, job.output


def test_in_process_errors_return_2_with_one_line(capsys, tmp_path):
    """``train.main`` called in-process (as tests and notebooks do) returns 2 instead of
    raising SystemExit, and prints the same single line."""
    from mpipar import train

    for argv, text in ((["--device", "tpu"], "invalid choice"), (["--lr", "nan"], "finite"),
                       (["--data", str(tmp_path)], "is a directory")):
        assert train.main(FAST + argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("mpipar.train: error: ") and text in err[0], err


@pytest.mark.parametrize("strict_cupy", [dict(devices=2)], indirect=True)
def test_a_gpu_choice_is_checked_before_mpi(strict_cupy, capsys, monkeypatch):
    """On the strict CuPy double (2 GPUs): a device number the machine lacks, by flag or by
    MPIPAR_GPU, and a malformed MPIPAR_GPU, are one clean error naming where it came from."""
    from mpipar import train

    gpu = FAST + ["--device", "gpu"]
    cases = [(gpu + ["--gpu-id", "2"], None, "--gpu-id 2: GPU 2 asked for, but this machine shows 2 GPU(s)"),
             (gpu, "5", "MPIPAR_GPU: GPU 5 asked for, but this machine shows 2 GPU(s)"),
             (gpu, "first", "MPIPAR_GPU: 'first' is not a GPU choice: expected auto, shared or a device number")]
    for argv, env, text in cases:
        if env is None:
            monkeypatch.delenv("MPIPAR_GPU", raising=False)
        else:
            monkeypatch.setenv("MPIPAR_GPU", env)
        assert train.main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0] == f"mpipar.train: error: {text}", err


def test_checkpoint_header_check_names_what_is_missing(tmp_path):
    """The library's view of the same: load_training_checkpoint refuses an incomplete
    header with CheckpointError, naming the keys."""
    from mpipar.data.checkpoint import CheckpointError, load_training_checkpoint

    path = tmp_path / "ck.npz"
    save_checkpoint(str(path), {}, {"format": "mpipar-checkpoint", "version": 1, "step": 3})
    with pytest.raises(CheckpointError, match="lacks config, optimizer, optim_step"):
        load_training_checkpoint(str(path))
    save_checkpoint(str(path), {}, {"format": "mpipar-checkpoint", "version": 1, "step": "x",
                                    "config": {}, "optimizer": "sgd", "optim_step": 0})
    with pytest.raises(CheckpointError, match="step is 'x'"):
        load_training_checkpoint(str(path))


def test_an_unwritable_log_is_refused_before_mpi_and_training(tmp_path):
    """``--log`` is checked before MPI starts (cli.check_output_path): a log that cannot be
    written costs no step of training."""
    afile = tmp_path / "a-file"
    afile.write_text("x")
    cases = [(tmp_path / "missing" / "run.jsonl", "does not exist"),
             (tmp_path, "is a directory"),
             (afile / "run.jsonl", "does not exist")]
    if os.geteuid() != 0:                                 # root may write anywhere
        ro = tmp_path / "read-only"
        ro.mkdir(mode=0o555)
        cases.append((ro / "run.jsonl", "not writable"))
    for path, why in cases:
        assert_one_clean_error(run_train(FAST + ["--log", str(path)]), f"--log {path}", why)


def test_compress_from_a_config_file_is_checked_as_the_flag(capsys, tmp_path):
    """``compress = ...`` in a ``--config`` TOML file is the flag's value: a bad one is the
    same single line (in-process: nothing reaches MPI), and the command line overrides it."""
    from mpipar import train

    config = tmp_path / "run.toml"
    config.write_text('compress = "topk:2"\nzero = 1\n')
    assert train.main(FAST + ["--config", str(config)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["mpipar.train: error: --compress: topk ratio 2 is not in (0, 1]"], err
    assert train.main(FAST + ["--config", str(config), "--compress", "fp16"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["mpipar.train: error: --compress: gradient compression needs zero 0, got "
                   "zero 1 (ZeRO reduce-scatters each bucket into a shard; fp16 compresses an "
                   "all-reduce's mean)"], err
