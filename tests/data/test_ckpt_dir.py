"""The sharded checkpoint directory format (mpipar.data.ckpt_dir) and the single file's safe
writing (mpipar.data.checkpoint.save_checkpoint): pure IO, no MPI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mpipar.data import checkpoint, ckpt_dir
from mpipar.data.checkpoint import CheckpointError


def make_step(root, step, tensors=None, files=None):
    """A complete step directory: ``tensors`` key -> full array, written as one file per
    entry of ``files`` (file name -> [(tensor key, piece descriptor extras, array)])."""
    tensors = tensors or {"model.w": np.arange(12.0).reshape(3, 4)}
    if files is None:
        files = {"rank-00000.npz": [(k, {}, v) for k, v in tensors.items()]}
    tmp = ckpt_dir.create_temp_dir(str(root), step)
    table = {k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in tensors.items()}
    recorded = {}
    for fname, entries in files.items():
        pieces, arrays = [], {}
        for i, (key, extra, arr) in enumerate(entries):
            p = {"key": f"a{i}", "tensor": key, "axis": None, "ranges": None, "flat": None,
                 "sha256": checkpoint.array_sha256(arr), **extra}
            pieces.append(p)
            arrays[p["key"]] = arr
        info = ckpt_dir.write_shard_file(os.path.join(tmp, fname), arrays)
        recorded[fname] = {**info, "pieces": pieces}
    manifest = {"format": ckpt_dir.FORMAT, "version": ckpt_dir.VERSION, "step": step,
                "optim_step": step, "run": {}, "layout": {}, "tensors": table, "files": recorded}
    return ckpt_dir.commit(tmp, str(root), step, manifest)


def test_pieces_of_a_tensor_are_assembled_from_several_files(tmp_path):
    """A tp shard (rows 0 and 2 of axis 0: two ranges) in one file, the other row split into
    two flat ZeRO pieces in two more: the full tensor comes back, and a gap is named."""
    w = np.arange(12.0).reshape(3, 4)
    files = {"rank-00000.npz": [("model.w", {"axis": 0, "ranges": [[0, 1], [2, 3]]}, w[[0, 2]])],
             "rank-00001.npz": [("model.w", {"axis": 0, "ranges": [[1, 2]], "flat": [0, 3]}, w[1, :3])],
             "rank-00002.npz": [("model.w", {"axis": 0, "ranges": [[1, 2]], "flat": [3, 4]}, w[1, 3:])]}
    step = make_step(tmp_path, 3, {"model.w": w}, files)
    ck = ckpt_dir.open_checkpoint(str(tmp_path))
    assert ck.path == step and ck.step == 3 and list(ck.model) == ["w"]
    np.testing.assert_array_equal(ck.model["w"], w)
    assert ck.optim["step"] == 3
    ck.close()
    del files["rank-00002.npz"]
    (tmp_path / "gap").mkdir()
    make_step(tmp_path / "gap", 1, {"model.w": w}, files)
    with pytest.raises(CheckpointError, match=r"tensor model.w: the files hold 11 of its 12 elements"):
        ckpt_dir.open_checkpoint(str(tmp_path / "gap"))


def _only_file(step_dir):
    return os.path.join(step_dir, "rank-00000.npz")


@pytest.mark.parametrize("damage,message", [
    ("flip", "SHA-256 mismatch against the manifest"),
    ("truncate", "bytes, the manifest says"),
    ("remove", "shard file missing"),
])
def test_damaged_files_are_refused_by_name(tmp_path, damage, message):
    step = make_step(tmp_path, 2)
    path = _only_file(step)
    data = bytearray(open(path, "rb").read())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        open(path, "wb").write(bytes(data))
    elif damage == "truncate":
        open(path, "wb").write(bytes(data[:-100]))
    else:
        os.unlink(path)
    with pytest.raises(CheckpointError) as e:
        ckpt_dir.open_checkpoint(step)
    assert message in str(e.value) and path in str(e.value) and "model.w" in str(e.value)


def _rewrite(step_dir, arrays):
    """Replace the step's file with ``arrays`` and re-record its hash and size, so that only
    the content check can find what is wrong."""
    path = _only_file(step_dir)
    os.unlink(path)
    info = ckpt_dir.write_shard_file(path, arrays)
    mpath = os.path.join(step_dir, ckpt_dir.MANIFEST)
    m = json.load(open(mpath))
    m["files"]["rank-00000.npz"].update(info)
    open(mpath, "w").write(json.dumps(m))


@pytest.mark.parametrize("bad,message", [
    (np.full((3, 4), np.nan), "tensor model.w holds non-finite values"),
    (np.zeros((3, 4), np.float32), "tensor model.w is float32, the manifest says float64"),
    (np.zeros((4, 3)), r"tensor model.w has shape \(4, 3\), the manifest says \(3, 4\)"),
])
def test_bad_content_is_refused_by_tensor(tmp_path, bad, message):
    step = make_step(tmp_path, 2)
    _rewrite(step, {"a0": bad})
    with pytest.raises(CheckpointError, match=message):
        ckpt_dir.open_checkpoint(step)


@pytest.mark.parametrize("text,message", [
    (None, "no manifest.json"),
    ("{not json", "not a readable manifest"),
    (json.dumps({"format": ckpt_dir.FORMAT, "version": 99}), "manifest version 99"),
    (json.dumps({"format": "something-else"}), "not an mpipar checkpoint manifest"),
])
def test_bad_manifests_are_refused(tmp_path, text, message):
    step = make_step(tmp_path, 2)
    mpath = os.path.join(step, ckpt_dir.MANIFEST)
    os.unlink(mpath)
    if text is not None:
        open(mpath, "w").write(text)
    with pytest.raises(CheckpointError, match=message):
        ckpt_dir.open_checkpoint(step)


def test_a_corrupt_latest_names_the_previous_good_checkpoint(tmp_path):
    good = make_step(tmp_path, 2)
    bad = make_step(tmp_path, 4)
    assert open(tmp_path / "latest").read() == "step-4\n"
    with open(_only_file(bad), "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError) as e:
        ckpt_dir.open_checkpoint(str(tmp_path))
    text = str(e.value)
    assert "SHA-256 mismatch" in text and _only_file(bad) in text
    assert f"previous complete checkpoint {good} verifies" in text
    ckpt_dir.open_checkpoint(good).close()               # still usable, by name


def test_keep_and_latest(tmp_path):
    for step in (1, 2, 3, 4):
        make_step(tmp_path, step)
        ckpt_dir.prune(str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-3", "step-4"]
    assert ckpt_dir.open_checkpoint(str(tmp_path)).step == 4


def test_a_planted_symlink_at_the_temporary_directory_is_not_followed(tmp_path, monkeypatch):
    """The next temporary name is made predictable and a symlink to a victim directory
    planted there: the save draws another name, the victim and the link are untouched."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    root = tmp_path / "ck"
    root.mkdir()
    names = iter(["planted", "fresh"])
    monkeypatch.setattr(ckpt_dir, "_random_suffix", lambda: next(names))
    os.symlink(victim, root / ".tmp-step-5-planted")
    tmp = ckpt_dir.create_temp_dir(str(root), 5)
    assert tmp == str(root / ".tmp-step-5-fresh") and not os.path.islink(tmp)
    assert os.listdir(victim) == ["precious"] and (victim / "precious").read_text() == "keep me"


def test_a_planted_symlink_at_latests_temporary_is_not_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    root = tmp_path / "ck"
    root.mkdir()
    monkeypatch.setattr(ckpt_dir, "_random_suffix", lambda: "planted")
    os.symlink(victim, root / ".tmp-latest-planted")
    with pytest.raises(FileExistsError):
        ckpt_dir.set_latest(str(root), "step-1")
    assert victim.read_text() == "keep me" and not (root / "latest").exists()
    # a symlink planted AS latest is replaced by the rename, not written through
    monkeypatch.setattr(ckpt_dir, "_random_suffix", lambda: "other")
    os.symlink(victim, root / "latest")
    ckpt_dir.set_latest(str(root), "step-1")
    assert victim.read_text() == "keep me" and not os.path.islink(root / "latest")
    assert (root / "latest").read_text() == "step-1\n"


def test_crash_temporaries_are_cleaned_without_following_links(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    root = tmp_path / "ck"
    root.mkdir()
    crashed = ckpt_dir.create_temp_dir(str(root), 7)
    (open(os.path.join(crashed, "rank-00000.npz"), "wb")).close()
    os.symlink(victim, root / ".tmp-step-8-link")
    (root / ".tmp-latest-abc").write_text("step-7\n")
    good = make_step(root, 3)
    removed = ckpt_dir.clean_temporaries(str(root))
    assert removed == sorted([os.path.basename(crashed), ".tmp-step-8-link", ".tmp-latest-abc"])
    assert sorted(os.listdir(root)) == ["latest", "step-3"] and os.path.isdir(good)
    assert os.listdir(victim) == ["precious"]


def test_single_file_save_uses_an_exclusive_unpredictable_temporary(tmp_path, monkeypatch):
    """The old predictable temporary name (``.NAME.tmp-PID``) planted as a symlink is not
    followed; a failed save leaves no temporary and the previous file intact."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "ck.npz"
    os.symlink(victim, tmp_path / f".ck.npz.tmp-{os.getpid()}")
    checkpoint.save_checkpoint(str(target), {"x": np.ones(3)}, {"format": checkpoint.FORMAT})
    assert victim.read_text() == "keep me"
    before = target.read_bytes()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_checkpoint(str(target), {"x": np.zeros(3)}, {"format": checkpoint.FORMAT})
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == sorted(["victim.txt", "ck.npz", f".ck.npz.tmp-{os.getpid()}"])


@pytest.mark.parametrize("damage,message", [
    ("flip", "tensor model.w: SHA-256 mismatch against the header"),
    ("nan", "tensor optim.exp_avg.w holds non-finite values"),
    ("dtype", "tensor model.w is float32, the header says float64"),
])
def test_single_file_damage_is_refused_by_tensor(tmp_path, damage, message):
    """The single-file format (--export) records each tensor's SHA-256 in its header: a
    flipped byte in a tensor's data, a NaN, a tensor of another dtype are refused by name."""
    # safetensors where installed: .npz is a zip, whose own CRC-32 finds a flipped byte first
    fmt = checkpoint.default_format("")
    path = str(tmp_path / f"ck.{fmt}")
    w, m = np.arange(12.0).reshape(3, 4), np.ones((3, 4))
    if damage == "flip" and fmt == "npz":
        message = "Bad CRC-32 for file 'model.w.npy'"
    meta = checkpoint.training_meta(step=1, model="tiny", config={}, optimizer="adamw",
                                    dtype="float64", seed=0)
    if damage == "flip":
        checkpoint.save_training_checkpoint(path, {"w": w}, {"step": 1, "exp_avg.w": m}, meta)
        data = bytearray(open(path, "rb").read())
        at = bytes(data).index(w.tobytes())               # stored as they are
        data[at + 17] ^= 0x04
        open(path, "wb").write(bytes(data))
    else:
        if damage == "nan":
            m = m.copy()
            m[2, 2] = np.nan
        else:
            w = w.astype(np.float32)
        arrays = {"model.w": w, "optim.exp_avg.w": m}
        checkpoint.save_checkpoint(path, arrays, {**meta, "optim_step": 1, "sha256": {
            k: checkpoint.array_sha256(v) for k, v in arrays.items()}})
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load_training_checkpoint(path)
