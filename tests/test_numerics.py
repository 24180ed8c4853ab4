"""The numerics guard of ``python -m mpipar.train``: a loss or gradient that is not finite stops
the run before the update with exit status 3 and one line naming the step, the first tensor
(nanoGPT order, over all ranks) and its rank; parameters that are not finite are never saved.
On one process (in-process) and on 2 ranks as data and as pipeline parallelism.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from mpipar import train
from mpipar.data.checkpoint import load_training_checkpoint
from mpipar.testing.launch import run_mpi

FAST = ["--model", "tiny", "--block-size", "16", "--batch-size", "4", "--threads", "1",
        "--eval-batches", "1", "--eval-interval", "0", "--warmup", "0", "--min-lr", "0",
        "--steps", "6"]
# lr 1e30: step 0's update makes the weights ~1e30 (finite), step 1's forward overflows and
# every gradient is NaN: the first in nanoGPT order is the embedding
OVERFLOW = "stopped: step 1: non-finite gradient in transformer.wte.weight (rank 0)"
# lr 1e39 is inf in float32: step 0's update itself makes the weights infinite
INFINITE = ("stopped: step 1: non-finite parameter in transformer.wte.weight (rank 0); the "
            "checkpoint of step 1 is not written")


def stopped_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("mpipar.train: stopped: ")]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_one_process_stops_naming_step_and_tensor_and_saves_nothing_non_finite(tmp_path, capsys):
    ck = tmp_path / "ck.safetensors"
    assert train.main(FAST + ["--lr", "1e30", "--save", str(ck), "--save-interval", "1"]) == 3
    assert stopped_lines(capsys.readouterr().err) == ["mpipar.train: " + OVERFLOW]
    saved = load_training_checkpoint(str(ck))                  # step 1's, before the bad step
    assert saved.step == 1 and all(np.isfinite(v).all() for v in saved.model.values())

    ck2 = tmp_path / "inf.safetensors"
    assert train.main(FAST + ["--lr", "1e39", "--save", str(ck2), "--save-interval", "1"]) == 3
    assert stopped_lines(capsys.readouterr().err) == ["mpipar.train: " + INFINITE]
    assert not ck2.exists()


@pytest.mark.parametrize("layout", [["--dp", "2"], ["--pp", "2"]], ids=["dp2", "pp2"])
def test_two_ranks_stop_with_one_line_and_status_3(tmp_path, layout):
    for lr, line in (("1e30", OVERFLOW), ("1e39", INFINITE)):
        ck = tmp_path / f"{lr}.safetensors"
        job = run_mpi(2, [sys.executable, "-W", "ignore", "-m", "mpipar.train", *FAST, *layout,
                          "--lr", lr, "--save", str(ck), "--save-interval", "1"], timeout=120)
        assert job.returncode == 3, job.output
        assert stopped_lines(job.output) == ["mpipar.train: " + line], job.output   # rank 0 only
        assert "Traceback" not in job.output and "aborting" not in job.output, job.output
        if lr == "1e39":
            assert not ck.exists()
