"""Bad input to ``python -m mpipar.sim train`` and ``python -m mpipar.plan``: one
``PROG: error: ...`` line naming the flag, exit code 2, no traceback, nothing simulated.

Each case runs the command in a fresh interpreter, as a user would.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

MODEL = ["--n-layer", "8", "--n-embd", "64", "--n-head", "8", "--block-size", "32",
         "--vocab-size", "256"]


def run(module: str, argv: list[str], tmp_path=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


def assert_one_clean_error(res: subprocess.CompletedProcess, prog: str, *expected: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, out
    for text in expected:
        assert text in errors[0], (text, out)
    assert "Traceback" not in out, out
    assert "step_time_s" not in out, out                # nothing was simulated


CASES = [
    # (argv, words the message must contain)
    (["--cluster", "local", "--gpus", "8", "--dp", "2", "--tp", "2", "--pp", "1", *MODEL,
      "--global-batch", "8"], ("--dp 2 x --tp 2 x --pp 1 = 4", "--gpus 8")),
    (["--cluster", "local", "--gpus", "6", "--tp", "3", *MODEL, "--global-batch", "8"],
     ("--tp", "3 does not divide the 8 attention heads")),
    (["--cluster", "no-such-cluster", "--gpus", "2", *MODEL, "--global-batch", "8"],
     ("--cluster", "no-such-cluster")),
    (["--cluster", "local", "--gpus", "2", "--n-layer", "2", "--global-batch", "8"],
     ("--n-embd", "--model NAME")),
    (["--cluster", "local", "--gpus", "4", *MODEL, "--global-batch", "6"],
     ("--global-batch 6 is not a multiple of dp 4",)),
    (["--cluster", "local", "--gpus", "2", "--pp", "16", "--dp", "1", *MODEL, "--global-batch", "8"],
     ("--dp 1 x --tp 1 x --pp 16",)),
    (["--cluster", "local", "--gpus", "0", *MODEL, "--global-batch", "8"], ("--gpus",)),
    (["--cluster", "local", "--gpus", "2", *MODEL, "--global-batch", "8", "--precision", "fp8"],
     ("--precision",)),
]


@pytest.mark.parametrize("argv, expected", CASES, ids=range(len(CASES)))
def test_sim_train_bad_input(argv, expected):
    assert_one_clean_error(run("mpipar.sim", ["train", *argv]), "mpipar.sim", *expected)


def test_sim_train_unwritable_output_is_refused_before_simulating(tmp_path):
    argv = ["train", "--cluster", "local", "--gpus", "2", *MODEL, "--global-batch", "8",
            "--json", str(tmp_path / "missing" / "out.json")]
    assert_one_clean_error(run("mpipar.sim", argv), "mpipar.sim", "--json", "does not exist")
    argv[-1] = str(tmp_path)                            # a directory
    assert_one_clean_error(run("mpipar.sim", argv), "mpipar.sim", "--json", "is a directory")


@pytest.mark.parametrize("argv, expected", [
    (["--cluster", "nope", "--gpus", "2", *MODEL, "--global-batch", "8"], ("--cluster", "nope")),
    (["--cluster", "local", "--gpus", "2", "--global-batch", "8"], ("--n-layer", "--model NAME")),
    (["--cluster", "local", "--gpus", "2", *MODEL, "--global-batch", "8", "--json", "/no/such/dir/x.json"],
     ("--json", "does not exist")),
])
def test_plan_bad_input(argv, expected):
    assert_one_clean_error(run("mpipar.plan", argv), "mpipar.plan", *expected)
