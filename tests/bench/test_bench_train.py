"""``python -m mpipar.bench train --ranks 2``: mpipar dp=2 beside torch DDP (gloo), under mpiexec."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from mpipar.data import VOCAB_SIZE, BatchSampler, load_tokens, split_train_val
from mpipar.nn.gpt import GPT, PRESETS
from mpipar.testing.launch import run_mpi

ARGS = ["-m", "mpipar.bench", "train", "--ranks", "2", "--model", "tiny", "--block-size", "16",
        "--batch-size", "4", "--steps", "2", "--warmup", "0"]


def _env() -> dict[str, str]:
    return {"PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def test_ranks_2_trains_both_sides_from_the_single_process_loss():
    """Both sides' first loss is the one-process model's loss on the whole global batch."""
    res = run_mpi(2, [sys.executable, *ARGS, *([] if _torch() else ["--no-torch"])],
                  timeout=240, env=_env())
    assert res.returncode == 0, res.output[-3000:]
    assert "bench train --ranks 2" in res.output and "2 ranks x 1 thread(s)" in res.output
    rows = {line.split()[0]: line.split() for line in res.output.splitlines()
            if line.startswith(("mpipar dp=2 ", "torch DDP"))}
    config = PRESETS["tiny"].replace(vocab_size=VOCAB_SIZE, block_size=16)
    train, _ = split_train_val(load_tokens(None))
    x, y = BatchSampler(train, 4, 16, seed=0).batch(0)
    loss, _ = GPT(config, seed=0, dtype="float32").loss_and_grads(x, y)
    assert abs(float(rows["mpipar"][-1]) - loss) < 1e-4, (rows, loss)
    if _torch():
        assert abs(float(rows["torch"][-1]) - loss) < 1e-4, (rows, loss)
        assert "ratio mpipar/torch (tokens/s)" in res.output and "quartiles" in res.output
    else:
        assert set(rows) == {"mpipar"}


def test_ranks_outside_a_job_of_that_size_says_how_to_run_it():
    res = run_mpi(1, [sys.executable, *ARGS, "--no-torch"], timeout=120, env=_env())
    assert res.returncode != 0
    assert ("--ranks 2 runs under mpiexec with 2 ranks (this job has 1): "
            "mpiexec -n 2 python -m mpipar.bench train --ranks 2") in res.output, res.output[-2000:]


@pytest.mark.parametrize("argv, message", [
    (["--ranks", "3", "--batch-size", "4"], "--batch-size 4 does not split over --ranks 3"),
    (["--ranks", "0"], "must be >= 1"),
])
def test_bad_ranks_stop_before_mpi(argv, message, capsys):
    from mpipar.bench.__main__ import main as bench_main

    with pytest.raises(SystemExit) as e:
        bench_main(["train", "--model", "tiny", "--no-torch", *argv])
    assert message in str(e.value)


def test_threads_2_runs_batch_threads_from_the_single_process_loss(capsys):
    """One process on 2 threads: mpipar's rows split over batch threads, the first loss
    still the whole batch's (to float32 rounding), and the header says how it ran."""
    from mpipar import backend
    from mpipar.bench.__main__ import main as bench_main

    try:
        assert bench_main(["train", "--model", "tiny", "--block-size", "16", "--batch-size", "4",
                           "--steps", "1", "--warmup", "0", "--threads", "2", "--no-torch"]) == 0
    finally:
        backend.set_cpu_threads(1)
    out = capsys.readouterr().out
    assert "threads 2" in out and "mpipar: batch threads, BLAS 1 each" in out, out
    row = next(line.split() for line in out.splitlines() if line.startswith("mpipar "))
    config = PRESETS["tiny"].replace(vocab_size=VOCAB_SIZE, block_size=16)
    train, _ = split_train_val(load_tokens(None))
    x, y = BatchSampler(train, 4, 16, seed=0).batch(0)
    loss, _ = GPT(config, seed=0, dtype="float32").loss_and_grads(x, y)
    assert abs(float(row[-1]) - loss) < 1e-4, (row, loss)
