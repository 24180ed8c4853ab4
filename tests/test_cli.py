"""mpipar.cli: config files (``--config FILE.toml``, ``--print-config``) for every command whose
Parser calls ``add_config_arguments`` (train, plan, sim train), and the one-error rule for them."""

from __future__ import annotations

import argparse

import pytest

from mpipar import plan, train
from mpipar.cli import Parser, UsageError
from mpipar.sim import __main__ as sim_main

FAST = ["--model", "tiny", "--block-size", "16", "--batch-size", "4", "--threads", "1",
        "--eval-batches", "1", "--eval-interval", "0", "--warmup", "2", "--lr", "3e-3"]


def printed_config(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv + ["--print-config"])
    assert e.value.code == 0
    return capsys.readouterr().out


def resolved(parser: argparse.ArgumentParser, argv: list[str]) -> dict:
    ns = vars(parser.parse_args(argv))
    return {k: v for k, v in ns.items() if k not in ("config", "print_config")}


def test_print_config_reads_back_to_the_same_values(tmp_path, capsys):
    argv = FAST + ["--pp", "2", "--stage-layers", "5,3", "--zero", "1", "--plan", "--min-lr", "1e-05",
                   "--data", 'odd "name"\\ é.txt', "--steps", "7"]
    text = printed_config(train.main, argv, capsys)
    assert 'stage_layers = "5,3"' in text and "plan = true" in text and "min_lr = 1e-05" in text
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    want = resolved(train.build_parser(), argv)
    assert resolved(train.build_parser(), ["--config", str(path)]) == want
    assert printed_config(train.main, ["--config", str(path)], capsys) == text


def test_the_command_line_overrides_the_file_and_keys_take_dashes_or_underscores(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lr = 0.01\nbatch-size = 6\ngrad_accum = 3\nschedule = "gpipe"\nplan = true\n')
    ns = train.build_parser().parse_args(["--config", str(path), "--lr", "0.02"])
    assert (ns.lr, ns.batch_size, ns.grad_accum, ns.schedule, ns.plan) == (0.02, 6, 3, "gpipe", True)
    ns = train.build_parser().parse_args([f"--config={path}"])
    assert ns.lr == 0.01


@pytest.mark.parametrize("text,message", [
    ("lrr = 0.1\n", "unknown key 'lrr' (did you mean lr"),
    ("batch_sise = 4\nstepz = 3\n", "unknown keys 'batch_sise' (did you mean batch_size"),
    ("config = 'x.toml'\n", "unknown key 'config'"),
    ('batch-size = "x"\n', 'batch-size = "x": \'x\' is not an integer'),
    ("steps = 2.5\n", "steps = 2.5: '2.5' is not an integer"),
    ("lr = -1.0\n", "lr = -1.0: '-1.0': must be a finite number > 0"),
    ("zero = 3\n", "zero = 3: invalid choice: 3"),
    ("plan = 1\n", "plan = 1: expected true or false"),
    ("steps = true\n", "steps = true: not a value for --steps"),
    ("lr = 0.1\nlr = 0.2\n", "not valid TOML"),
    ("min-lr = 0.1\nmin_lr = 0.2\n", "min_lr is given twice"),
    ("[train]\nlr = 0.1\n", "unknown key 'train'"),
], ids=lambda x: x if len(x) < 30 else x[:30])
def test_a_bad_file_is_one_error_naming_file_key_and_value(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert train.main(FAST + ["--config", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"mpipar.train: error: --config {path}: "), err
    assert message in err[0], err


def test_a_missing_file_is_named(tmp_path, capsys):
    assert train.main(["--config", str(tmp_path / "none.toml")]) == 2
    assert f"--config {tmp_path / 'none.toml'}: not found" in capsys.readouterr().err


def test_a_config_file_trains_exactly_what_its_flags_train(tmp_path):
    flags_log, file_log = tmp_path / "flags.jsonl", tmp_path / "file.jsonl"
    argv = FAST + ["--steps", "3"]
    assert train.main(argv + ["--log", str(flags_log)]) == 0
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "tiny"\nblock-size = 16\nbatch-size = 4\nthreads = 1\neval-batches = 1\n'
                   'eval-interval = 0\nwarmup = 2\nlr = 3e-3\nsteps = 3\n')
    assert train.main(["--config", str(cfg), "--log", str(file_log)]) == 0
    assert file_log.read_text().count('"loss"') == 3
    losses = [[line.split('"loss": ')[1].split(",")[0] for line in p.read_text().splitlines()
               if '"loss"' in line] for p in (flags_log, file_log)]
    assert losses[0] == losses[1]


def test_required_flags_may_come_from_the_file_in_sim_train_and_plan(tmp_path, capsys):
    cfg = tmp_path / "sim.toml"
    cfg.write_text('cluster = "local"\ngpus = 2\nmodel = "gpt2"\nglobal-batch = 8\n')
    for main, argv in ((sim_main.main, ["train", "--config", str(cfg)]), (plan.main, ["--config", str(cfg)])):
        text = printed_config(main, argv, capsys)
        assert 'cluster = "local"' in text and "gpus = 2" in text and "global_batch = 8" in text
    assert sim_main.main(["train", "--gpus", "2"]) == 2           # still required without a file
    assert "required" in capsys.readouterr().err


def test_a_parser_without_config_arguments_takes_no_config():
    p = Parser(prog="x")
    p.add_argument("--n", type=int, default=1)
    with pytest.raises(UsageError, match="unrecognized arguments: --config"):
        p.parse_args(["--config", "f.toml"])


def test_a_bad_config_file_under_mpiexec_is_one_line_before_mpi_starts(tmp_path):
    import sys

    from mpipar.testing.launch import run_mpi

    path = tmp_path / "bad.toml"
    path.write_text("batch_size = 4\nmicro_batch = 2\n")
    probe = ("import sys, mpipar.train as t; rc = t.main(sys.argv[1:]); "
             "m = sys.modules.get('mpi4py.MPI'); "
             "sys.stderr.write('probe: MPI started\\n' if m is not None and m.Is_initialized() else ''); "
             "sys.exit(rc)")
    job = run_mpi(2, [sys.executable, "-c", probe, "--config", str(path)], timeout=120)
    assert job.returncode == 2, job.output
    errors = [ln for ln in job.output.splitlines() if ln.startswith("mpipar.train: error: ")]
    assert errors == [f"mpipar.train: error: --config {path}: unknown key 'micro_batch' "
                      f"(did you mean micro_batches, micro-batches?)"], job.output
    assert "probe: MPI started" not in job.output and "Traceback" not in job.output
