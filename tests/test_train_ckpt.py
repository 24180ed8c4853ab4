"""python -m mpipar.train with sharded checkpoints (--ckpt-dir, --resume, --export):
resumed runs continue the uninterrupted run (bitwise on the same layout, within 1e-10 in
float64 across layouts), a damaged checkpoint or a changed run is refused before anything
trains, and the checkpoint directory is checked before step 0."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from mpipar import train
from mpipar.data import ckpt_dir
from mpipar.data.checkpoint import decode_arrays, load_training_checkpoint, save_checkpoint
from mpipar.testing.launch import run_mpi

FAST = ["--model", "tiny", "--block-size", "16", "--batch-size", "4", "--threads", "1",
        "--eval-batches", "1", "--eval-interval", "0", "--warmup", "2", "--lr", "3e-3"]
F64 = FAST + ["--dtype", "float64"]


def losses(path) -> list[float]:
    return [e["loss"] for e in map(json.loads, open(path)) if "loss" in e]


def steps_of(path) -> list[int]:
    return [e["step"] for e in map(json.loads, open(path)) if "loss" in e]


def mpi_train(n: int, *argv: str, timeout: float = 180):
    job = run_mpi(n, [sys.executable, "-m", "mpipar.train", *argv], timeout=timeout)
    assert not job.timed_out and job.returncode == 0, job.output[-3000:]
    return job


def test_two_leg_recipe_gives_the_straight_runs_schedule_and_losses(tmp_path, capsys):
    """The documented recipe: ``--steps 4 --lr-decay-steps 8 --ckpt-dir D``, then ``--steps 8
    --resume D`` without --lr-decay-steps: the saved horizon is used, so the learning rates
    and losses are one straight ``--steps 8`` run's, to the bit."""
    d, straight, leg1, leg2 = (tmp_path / n for n in ("ck", "s.jsonl", "1.jsonl", "2.jsonl"))
    assert train.main(FAST + ["--steps", "8", "--log", str(straight)]) == 0
    assert train.main(FAST + ["--steps", "4", "--lr-decay-steps", "8", "--ckpt-dir", str(d),
                              "--log", str(leg1)]) == 0
    capsys.readouterr()
    assert train.main(FAST + ["--steps", "8", "--resume", str(d), "--log", str(leg2)]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {d}/step-4 at step 4 (its learning-rate horizon: cosine to step 8)" in out
    assert "cosine to step 8" in out
    want = [json.loads(line) for line in open(straight) if '"loss"' in line]
    got = [json.loads(line) for line in open(leg2) if '"loss"' in line]
    assert [e["step"] for e in got] == [4, 5, 6, 7]
    assert [e["lr"] for e in got] == [e["lr"] for e in want[4:]]
    assert [e["loss"] for e in got] == [e["loss"] for e in want[4:]]          # bitwise
    assert losses(leg1) == [e["loss"] for e in want[:4]]


def test_keep_export_auto_and_crash_temporaries(tmp_path, capsys):
    """--keep 2 leaves the two newest; --export writes the single-file format with the
    same tensors; --resume auto starts fresh in an empty directory (and says so), then
    resumes the newest; temporaries of a crashed save are removed at the next start (and
    said so), a symlink among them unlinked, not followed."""
    d, export = tmp_path / "ck", tmp_path / "gpt.npz"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    assert train.main(FAST + ["--steps", "4", "--ckpt-dir", str(d), "--ckpt-every", "1",
                              "--keep", "2", "--resume", "auto", "--export", str(export)]) == 0
    out = capsys.readouterr().out
    assert f"--resume auto: no checkpoint in {d}, starting at step 0" in out
    assert "keeping 2, about" in out and "MiB each" in out
    assert sorted(os.listdir(d)) == ["latest", "step-3", "step-4"]
    single = load_training_checkpoint(str(export))
    sharded = ckpt_dir.open_checkpoint(str(d))
    assert single.step == sharded.step == 4
    for name, full in single.model.items():
        np.testing.assert_array_equal(sharded.model[name], full, err_msg=name)
    for key, full in single.optim.items():
        np.testing.assert_array_equal(sharded.optim[key], full, err_msg=key)
    sharded.close()
    # a fresh run into a root holding another run's checkpoints would mix the two: refused
    assert train.main(FAST + ["--steps", "4", "--ckpt-dir", str(d)]) == 2
    assert f"--ckpt-dir {d} holds checkpoints of another run (up to step 4)" in capsys.readouterr().err
    os.mkdir(d / ".tmp-step-5-0123456789abcdef")
    (d / ".tmp-step-5-0123456789abcdef" / "rank-00000.npz").write_bytes(b"half a file")
    os.symlink(victim, d / ".tmp-step-6-link")
    assert train.main(FAST + ["--steps", "6", "--ckpt-dir", str(d), "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert f"--resume auto: the newest checkpoint in {d}" in out and "at step 4" in out
    assert (f"removed what crashed saves left in {d}: .tmp-step-5-0123456789abcdef, "
            f".tmp-step-6-link") in out
    assert sorted(os.listdir(d)) == ["latest", "step-4", "step-6"]
    assert os.listdir(victim) == ["precious"]
    # the exported file resumes too (today's format keeps loading)
    assert train.main(FAST + ["--steps", "5", "--resume", str(export)]) == 0


@pytest.fixture
def saved(tmp_path):
    """A root with two complete checkpoints (steps 2 and 3) of one process."""
    d = tmp_path / "ck"
    assert train.main(F64 + ["--steps", "3", "--ckpt-dir", str(d), "--ckpt-every", "2"]) == 0
    return d


def _refused(capsys, argv, *texts):
    log = os.path.join(os.path.dirname(argv[argv.index("--resume") + 1]), "never.jsonl")
    assert train.main(F64 + argv + ["--log", log]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpipar.train: error: --resume: "), err
    for t in texts:
        assert t in err[0], (t, err[0])
    assert not os.path.exists(log)                       # nothing trained
    return err[0]


def _shard(step_dir):
    (name,) = [f for f in os.listdir(step_dir) if f.startswith("rank-")]
    return os.path.join(step_dir, name)


def test_a_flipped_byte_is_refused_naming_the_file_and_the_previous_checkpoint(saved, capsys):
    shard = _shard(saved / "step-3")
    data = bytearray(open(shard, "rb").read())
    before, _ = decode_arrays(bytes(data), shard)
    data[-8] ^= 0x10                                          # inside the last tensor's data
    open(shard, "wb").write(bytes(data))
    after, _ = decode_arrays(bytes(data), shard)
    (hit,) = [k for k in before if not np.array_equal(before[k], after[k], equal_nan=True)]
    capsys.readouterr()
    err = _refused(capsys, ["--steps", "5", "--resume", str(saved)], shard, "SHA-256 mismatch",
                   f"in tensor {hit}", f"previous complete checkpoint {saved}/step-2")
    assert "latest names this corrupt checkpoint" in err
    _refused(capsys, ["--steps", "5", "--resume", str(saved / "step-3")], shard, "SHA-256")
    assert train.main(F64 + ["--steps", "4", "--resume", str(saved / "step-2")]) == 0


def test_a_truncated_shard_is_refused(saved, capsys):
    shard = _shard(saved / "step-3")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[:len(data) // 2])
    capsys.readouterr()
    _refused(capsys, ["--steps", "5", "--resume", str(saved / "step-3")], shard,
             f"{len(data) // 2} bytes, the manifest says {len(data)}", "truncated")


def test_a_nan_tensor_is_refused_by_name(saved, capsys):
    """NaN written into one tensor and the file's hash and size re-recorded, so that only
    the content check can find it."""
    step = saved / "step-3"
    shard = _shard(step)
    arrays, _ = decode_arrays(open(shard, "rb").read(), shard)
    key = "optim.exp_avg.transformer.h.2.attn.c_proj.weight"
    arrays[key] = arrays[key].copy()
    arrays[key][1, 1] = np.nan
    os.unlink(shard)
    info = ckpt_dir.write_shard_file(shard, arrays)
    manifest = json.load(open(step / "manifest.json"))
    manifest["files"][os.path.basename(shard)].update(info)
    (step / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    _refused(capsys, ["--steps", "5", "--resume", str(step)], shard,
             f"tensor {key} holds non-finite values")


def test_a_changed_run_is_refused_with_the_difference_unless_overridden(saved, tmp_path, capsys):
    data = tmp_path / "other.txt"
    data.write_text("some other text entirely. " * 200)
    capsys.readouterr()
    r = ["--steps", "5", "--resume", str(saved)]
    _refused(capsys, r + ["--seed", "1"], "the checkpoint's seed 0 differs from this run's 1",
             "--resume-override seed allows it")
    _refused(capsys, r + ["--batch-size", "8"], "the checkpoint's batch_size 4 differs from this run's 8")
    _refused(capsys, r + ["--data", str(data)], "the checkpoint's data.sha256 ", "data.tokens")
    _refused(capsys, r + ["--warmup", "3"], "the checkpoint's schedule.warmup 2 differs from this run's 3")
    _refused(capsys, r + ["--lr-decay-steps", "9"], "schedule.decay_steps 3 differs from this run's 9")
    _refused(capsys, r + ["--weight-decay", "0.2"], "optimizer.weight_decay 0.1 differs from this run's 0.2")
    _refused(capsys, r[:2] + ["--dtype", "float32", "--resume", str(saved)],
             "the checkpoint's dtype float64 differs from this run's float32")
    assert train.main(F64 + r + ["--seed", "1", "--lr-decay-steps", "9",
                                 "--resume-override", "seed,schedule"]) == 0


def test_checkpoint_directory_preflight(tmp_path, capsys, monkeypatch):
    """Before step 0: a directory without room for one checkpoint is refused with the
    numbers; --ckpt-every without --ckpt-dir and --resume auto without it are refused."""
    d = tmp_path / "ck"
    real = os.statvfs

    class Full:
        def __init__(self, st):
            self.f_frsize, self.f_bavail = st.f_frsize, 10

    monkeypatch.setattr(os, "statvfs", lambda p: Full(real(p)))
    log = tmp_path / "never.jsonl"
    assert train.main(FAST + ["--steps", "2", "--ckpt-dir", str(d), "--log", str(log)]) == 2
    err = capsys.readouterr().err
    assert f"--ckpt-dir {d}:" in err and "MiB free, one checkpoint needs about" in err
    assert not log.exists()
    monkeypatch.undo()
    for argv, text in ((["--ckpt-every", "2"], "--ckpt-every needs --ckpt-dir"),
                       (["--resume", "auto"], "--resume auto needs --ckpt-dir"),
                       (["--export", str(tmp_path / "no" / "f.npz")], "--export"),
                       (["--resume-override", "colour"], "expected a comma-separated list")):
        assert train.main(FAST + ["--steps", "2"] + argv) == 2
        assert text in capsys.readouterr().err, text


def _read_only_dir(tmp_path) -> str:
    """A directory this process cannot write: mode 0555, or where that does not stop it
    (root), a read-only file system's."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if not os.access(d, os.W_OK):
        return str(d)
    for cand in ("/proc/sys", "/sys"):
        if os.path.isdir(cand) and not os.access(cand, os.W_OK):
            return cand
    pytest.skip("no directory this process cannot write (root, and no read-only file system)")


def test_a_read_only_checkpoint_directory_is_refused_before_step_0(tmp_path):
    """Under mpiexec -n 2: one error line from rank 0, exit code 2, no run header."""
    ro = _read_only_dir(tmp_path)
    job = run_mpi(2, [sys.executable, "-m", "mpipar.train", *FAST, "--steps", "2",
                      "--ckpt-dir", ro], timeout=120)
    assert not job.timed_out and job.returncode == 2, job.output
    errors = [line for line in job.output.splitlines() if line.startswith("mpipar.train: error:")]
    assert errors == [f"mpipar.train: error: --ckpt-dir {ro}: not writable"], job.output
    assert "mpipar.train |" not in job.output and "Traceback" not in job.output


def test_same_layout_resume_under_zero_is_bitwise(tmp_path):
    """Saved as --dp 2 --zero 1 at step 5 (every dp rank writes its optimiser shard),
    resumed as the same layout: the losses are the uninterrupted run's, to the bit."""
    d, full, res = tmp_path / "ck", tmp_path / "full.jsonl", tmp_path / "res.jsonl"
    lay = ["--dp", "2", "--zero", "1", "--lr-decay-steps", "8"]
    mpi_train(2, *F64, *lay, "--steps", "8", "--log", str(full))
    mpi_train(2, *F64, *lay, "--steps", "5", "--ckpt-dir", str(d))
    manifest = json.load(open(d / "step-5" / "manifest.json"))
    assert len(manifest["files"]) == 2                   # both dp ranks wrote their shards
    mpi_train(2, *F64, *lay, "--steps", "8", "--resume", str(d), "--log", str(res))
    assert steps_of(res) == [5, 6, 7]
    assert losses(res) == losses(full)[5:]


def test_resume_across_layouts(tmp_path):
    """Saved as --tp 2 --pp 2 (4 ranks, no gather), resumed as --dp 4 --zero 2 and as one
    process: both continue the uninterrupted single-process run within 1e-10 (float64)."""
    d, full = tmp_path / "ck", tmp_path / "full.jsonl"
    common = F64 + ["--lr-decay-steps", "8"]
    assert train.main(common + ["--steps", "8", "--log", str(full)]) == 0
    mpi_train(4, *common, "--tp", "2", "--pp", "2", "--steps", "5", "--ckpt-dir", str(d))
    manifest = json.load(open(d / "step-5" / "manifest.json"))
    assert manifest["layout"]["tp"] == 2 and manifest["layout"]["pp"] == 2
    assert len(manifest["files"]) == 4                   # each (tp, pp) position its own
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    mpi_train(4, *common, "--dp", "4", "--zero", "2", "--steps", "8", "--resume", str(d),
              "--log", str(a))
    assert train.main(common + ["--steps", "8", "--resume", str(d), "--log", str(b)]) == 0
    for log in (a, b):
        assert steps_of(log) == [5, 6, 7]
        np.testing.assert_allclose(losses(log), losses(full)[5:], rtol=1e-10, atol=0)


def test_non_finite_state_is_never_written(tmp_path, capsys, monkeypatch):
    """An optimiser moment turned NaN just before the step-4 save: the save is refused naming
    the tensor, the run ends with exit code 1 and one error line, and step 2 stays the
    newest complete checkpoint, with no temporary left."""
    d = tmp_path / "ck"
    save = train.Runner.save_checkpoint
    key = "transformer.h.3.mlp.c_fc.bias"

    def poisoned(self, step):
        if step == 4:
            self.trainer.sync.state_tensors()["exp_avg"][key][0] = np.nan
        return save(self, step)

    monkeypatch.setattr(train.Runner, "save_checkpoint", poisoned)
    assert train.main(FAST + ["--steps", "6", "--ckpt-dir", str(d), "--ckpt-every", "2"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mpipar.train: stopped: step 4: non-finite optimiser state exp_avg in {key} "
                   f"(rank 0); the checkpoint of step 4 is not written"], err
    assert sorted(os.listdir(d)) == ["latest", "step-2"]
    assert ckpt_dir.open_checkpoint(str(d)).step == 2


def test_a_file_from_before_sharded_checkpoints_still_resumes(tmp_path, capsys):
    """A single file without the run's identity or hashes (what mpipar wrote before): it
    resumes, the horizon being --lr-decay-steps as then, and continues bitwise."""
    new, old = tmp_path / "new.npz", tmp_path / "old.npz"
    full, res = tmp_path / "full.jsonl", tmp_path / "res.jsonl"
    common = FAST + ["--lr-decay-steps", "6"]
    assert train.main(common + ["--steps", "6", "--log", str(full)]) == 0
    assert train.main(common + ["--steps", "3", "--export", str(new)]) == 0
    arrays, meta = decode_arrays(new.read_bytes(), str(new))
    assert set(meta) > {"run", "sha256"}
    save_checkpoint(str(old), arrays, {k: v for k, v in meta.items() if k not in ("run", "sha256")})
    capsys.readouterr()
    assert train.main(common + ["--steps", "6", "--resume", str(old), "--log", str(res)]) == 0
    assert f"resuming from {old} at step 3\n" in capsys.readouterr().out
    assert losses(res) == losses(full)[3:]


def test_fp16_two_leg_run_keeps_its_loss_scale(tmp_path, capsys):
    """--precision fp16: the sharded checkpoint's manifest and the exported file hold the loss
    scale and its clean-step count (4 clean steps at step 4), the parameters as float32, and
    both resume to the straight run's losses to the bit."""
    d, export, straight, leg2, leg3 = (tmp_path / n for n in ("ck", "e.npz", "s.jsonl",
                                                              "2.jsonl", "3.jsonl"))
    mp = FAST + ["--precision", "fp16", "--lr-decay-steps", "8"]
    assert train.main(mp + ["--steps", "8", "--log", str(straight)]) == 0
    assert train.main(mp + ["--steps", "4", "--ckpt-dir", str(d), "--export", str(export)]) == 0
    manifest = json.load(open(d / "step-4" / "manifest.json"))
    assert manifest["optim_scalars"] == {"loss_scale": 65536.0, "loss_scale_good_steps": 4}
    assert {t["dtype"] for t in manifest["tensors"].values()} == {"float32"}
    assert any(k.startswith("optim.master.") for k in manifest["tensors"])
    ck = load_training_checkpoint(str(export))
    assert list(ck.optim["loss_scale"]) == [65536.0] and list(ck.optim["loss_scale_good_steps"]) == [4]
    assert train.main(mp + ["--steps", "8", "--resume", str(d), "--log", str(leg2)]) == 0
    assert train.main(mp + ["--steps", "8", "--resume", str(export), "--log", str(leg3)]) == 0
    assert losses(leg2) == losses(straight)[4:] == losses(leg3)


def test_compression_residuals_resume_only_as_saved(saved, tmp_path, capsys):
    """A checkpoint holds no residuals for a scheme it was not saved with: a resume whose
    scheme differs is refused with one line naming it, and ``--resume-override
    compression`` starts the residuals at zero (said in the header)."""
    capsys.readouterr()
    r = ["--steps", "5", "--resume", str(saved)]
    _refused(capsys, r + ["--compress", "topk:0.01"],
             "the checkpoint holds no gradient-compression residuals for --compress topk:0.01",
             "(--resume-override compression starts them at zero)")
    assert train.main(F64 + r + ["--compress", "topk:0.01", "--resume-override", "compression"]) == 0
    assert "error-feedback residuals: from zero" in capsys.readouterr().out
    d = tmp_path / "ck_topk"
    assert train.main(F64 + ["--steps", "2", "--ckpt-dir", str(d), "--compress", "topk:0.5"]) == 0
    capsys.readouterr()
    r = ["--steps", "3", "--resume", str(d)]
    _refused(capsys, r + ["--compress", "int8"],
             "residuals are not this run's: its scheme topk:0.5 differs from this run's int8")
    _refused(capsys, r, "holds error-feedback residuals of topk:0.5 that --compress none would drop")
    _refused(capsys, r + ["--compress", "topk:0.5", "--bucket-mb", "0.5"],
             "its bucket_mb 1.0 differs from this run's 0.5")
    assert train.main(F64 + r + ["--compress", "topk:0.5"]) == 0
    assert "error-feedback residuals: restored" in capsys.readouterr().out


def test_powersgd_resume_at_dp_2_is_bitwise_and_at_another_dp_refused(tmp_path, capsys):
    """PowerSGD's residuals and warm-start Q's saved by both dp ranks at step 5: the resumed
    run's losses are the uninterrupted run's, to the bit; one process resuming them is told
    the world and dp differ."""
    d, full, res = tmp_path / "ck", tmp_path / "full.jsonl", tmp_path / "res.jsonl"
    lay = ["--dp", "2", "--lr-decay-steps", "8", "--compress", "powersgd:2"]
    mpi_train(2, *F64, *lay, "--steps", "8", "--log", str(full))
    mpi_train(2, *F64, *lay, "--steps", "5", "--ckpt-dir", str(d))
    manifest = json.load(open(d / "step-5" / "manifest.json"))
    held = [k for k in manifest["tensors"] if k.startswith("compress.")]
    assert {k.split(".")[1] for k in held} == {"rank0", "rank1"} and any(k.endswith(".Q") for k in held)
    mpi_train(2, *F64, *lay, "--steps", "8", "--resume", str(d), "--log", str(res))
    assert steps_of(res) == [5, 6, 7]
    assert losses(res) == losses(full)[5:]
    capsys.readouterr()
    _refused(capsys, ["--steps", "8", "--resume", str(d), "--compress", "powersgd:2"],
             "its world 2 differs from this run's 1; its dp 2 differs from this run's 1")


@pytest.mark.parametrize("precision,scheme", [("bf16", "powersgd:2"), ("fp16", "topk:0.1")])
def test_a_mixed_precision_compressed_resume_at_dp_2_is_bitwise(tmp_path, precision, scheme):
    """16-bit buckets' residuals are stored widened to float32 (as every 16-bit tensor is)
    and rounded back exactly on resume, beside the loss scale and the fp32 masters: the
    resumed run's losses are the uninterrupted run's, to the bit."""
    d, full, res = tmp_path / "ck", tmp_path / "full.jsonl", tmp_path / "res.jsonl"
    lay = ["--dp", "2", "--lr-decay-steps", "6", "--precision", precision, "--compress", scheme]
    mpi_train(2, *FAST, *lay, "--steps", "6", "--log", str(full))
    mpi_train(2, *FAST, *lay, "--steps", "4", "--ckpt-dir", str(d))
    job = mpi_train(2, *FAST, *lay, "--steps", "6", "--resume", str(d), "--log", str(res))
    assert "error-feedback residuals: restored" in job.output
    assert steps_of(res) == [4, 5]
    assert losses(res) == losses(full)[4:]


def test_the_loss_scale_flags_set_fp16s_dynamic_scale(tmp_path):
    """--loss-scale 8 --loss-scale-interval 2: four clean steps double the scale twice (8 ->
    16 -> 32), as the checkpoint's manifest records it."""
    d = tmp_path / "ck"
    assert train.main(FAST + ["--precision", "fp16", "--loss-scale", "8", "--loss-scale-interval",
                              "2", "--steps", "4", "--ckpt-dir", str(d)]) == 0
    manifest = json.load(open(d / "step-4" / "manifest.json"))
    assert manifest["optim_scalars"] == {"loss_scale": 32.0, "loss_scale_good_steps": 0}
