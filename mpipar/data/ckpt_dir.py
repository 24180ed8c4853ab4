"""Sharded checkpoint directories: the on-disk format and its safe writing, pure IO, no MPI.

A checkpoint root (``--ckpt-dir``) holds complete checkpoints, one directory each, and a
file naming the newest::

    DIR/latest                    "step-400\\n": the newest complete checkpoint
    DIR/step-400/manifest.json    written last (by rank 0): what the step directory holds
    DIR/step-400/rank-00000.safetensors   what world rank 0 owns (no file if it owns nothing)
    DIR/step-300/                 the previous one, kept (``keep``)
    DIR/.tmp-step-500-<random>/   a save in progress, or one that crashed

The manifest (JSON; ``FORMAT``, ``VERSION``)::

    {"format": "mpipar-sharded-checkpoint", "version": 1, "step": 400, "optim_step": 400,
     "run": {the run's identity: model, optimizer, schedule, seed, data, batch_size, ...},
     "layout": {"dp": 2, "tp": 2, "pp": 1, "zero": 1, ...},       (recorded, never compared)
     "tensors": {"model.<name>" | "optim.<state>.<name>": {"shape": [...], "dtype": "float64"},
                 "compress.rank<R>.<bucket key>": {...}},  (a rank's error-feedback residuals)
     "compression": {"scheme": "topk:0.01", "world": 2, "dp": 2, ...} or null (none),
     "files": {"rank-00001.safetensors": {"sha256": "...", "bytes": 123,
               "pieces": [{"key": ..., "tensor": ..., "axis": 0, "ranges": [[0, 64], ...],
                           "flat": [lo, hi], "sha256": "..."}]}}}

A piece is one array of a file (``key``) holding part of a global tensor: ``ranges`` (or
null: all of it) lists the index ranges along ``axis`` it covers (a tensor-parallel shard;
c_attn's is three, its q, k and v rows), and ``flat`` (or null) the element range [lo, hi)
of that shard, flattened, that it holds (a ZeRO shard's piece); its ``sha256`` (of the
array's bytes) names the tensor a corrupt file's damage hit. Files are safetensors when
the package is installed, else ``.npz`` without pickle (``checkpoint.encode_arrays``).

Writing (``parallel/checkpoint.py`` drives it over the ranks): ``create_temp_dir`` makes
``DIR/.tmp-step-N-<random>`` with ``os.mkdir``, which never follows or reuses an existing
path or symlink; each file is created with O_CREAT | O_EXCL | O_NOFOLLOW and fsynced;
``commit`` writes the manifest the same way, fsyncs the directory, renames it to
``step-N``, fsyncs the root, and points ``latest`` at it (a file written under an exclusive
temporary name and renamed over ``latest``, so a symlink planted as ``latest`` is replaced,
not followed). The previous complete checkpoint is untouched until then; ``prune`` deletes
the oldest beyond ``keep`` afterwards. ``clean_temporaries`` removes what a crashed save left
(symlinks are unlinked, never followed).

Reading: ``open_checkpoint`` takes a root (its ``latest``), a step directory or a single
file of ``checkpoint.py``'s format. A directory is verified first (``verify``: every file's
size and SHA-256, every piece's dtype and shape against the manifest, every value finite,
every tensor covered), and a corrupt ``latest`` names the previous checkpoint that verifies.
``ShardedCheckpoint.model`` / ``.optim`` are mappings that assemble one full tensor at a
time, on access, from the files holding its pieces, so a rank that takes its slices
(``parallel.model.local_pieces``) reads only what it needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from mpipar.data.checkpoint import (CheckpointError, TrainingCheckpoint, array_sha256,
                                    check_resumable, default_format, encode_arrays,
                                    load_training_checkpoint)

FORMAT, VERSION = "mpipar-sharded-checkpoint", 1
MANIFEST, LATEST, TMP_PREFIX = "manifest.json", "latest", ".tmp-"
_STEP_DIR = re.compile(r"step-(\d+)")
_FILE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_MANIFEST_KEYS = ("format", "version", "step", "optim_step", "run", "tensors", "files")
_EXCLUSIVE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


# ---------------------------------------------------------------------------- writing
def _random_suffix() -> str:
    """The unpredictable part of a temporary name (a function, so a test can plant a path
    where the next temporary would go)."""
    return secrets.token_hex(8)


def create_temp_dir(root: str, step: int) -> str:
    """A new, empty ``root/.tmp-step-<step>-<random>`` (mode 0700). ``os.mkdir`` fails on
    any existing path, a symlink included, so nothing planted is followed or reused: such a
    name is skipped and another drawn."""
    for _ in range(8):
        path = os.path.join(root, f"{TMP_PREFIX}step-{step}-{_random_suffix()}")
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue
    raise CheckpointError(f"{root}: could not create a new temporary directory for step {step} "
                          f"(every name tried exists)")


def write_exclusive(path: str, data: bytes) -> None:
    """Create ``path`` (O_EXCL | O_NOFOLLOW: never an existing file or symlink), write
    ``data`` and fsync it."""
    fd = os.open(path, _EXCLUSIVE, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_file_name(world_rank: int) -> str:
    """The file of ``world_rank`` in a step directory, in this installation's format."""
    ext = "safetensors" if default_format("") == "safetensors" else "npz"
    return f"rank-{world_rank:05d}.{ext}"


def write_shard_file(path: str, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Write host ``arrays`` to the new file ``path`` (exclusively, fsynced); returns its
    ``{"sha256", "bytes"}`` for the manifest."""
    fmt = "npz" if path.endswith(".npz") else "safetensors"
    data = encode_arrays(arrays, {"format": FORMAT + "-shard"}, fmt)
    write_exclusive(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def remove_path(path: str) -> None:
    """Remove a directory tree, or unlink a file or symlink (never following it)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def set_latest(root: str, name: str) -> None:
    """Point ``root/latest`` at the step directory ``name``, atomically: a new file under an
    exclusive temporary name, fsynced, renamed over ``latest`` (a rename replaces a symlink
    there instead of following it)."""
    tmp = os.path.join(root, f"{TMP_PREFIX}latest-{_random_suffix()}")
    try:
        write_exclusive(tmp, (name + "\n").encode())
        os.replace(tmp, os.path.join(root, LATEST))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(root)


def commit(tmp: str, root: str, step: int, manifest: Mapping[str, Any]) -> str:
    """Finish a save: the manifest into ``tmp`` (exclusively, fsynced), ``tmp`` fsynced and
    renamed to ``root/step-<step>``, the root fsynced, ``latest`` pointed at it. Returns the
    step directory. An older ``step-<step>`` (of an earlier run into this root) is moved
    aside first and removed once the new one is in place."""
    write_exclusive(os.path.join(tmp, MANIFEST),
                    json.dumps(dict(manifest), indent=1, sort_keys=True).encode())
    fsync_dir(tmp)
    name = f"step-{step}"
    final = os.path.join(root, name)
    old = None
    if os.path.lexists(final):
        old = os.path.join(root, f"{TMP_PREFIX}old-{name}-{_random_suffix()}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(root)
    set_latest(root, name)
    if old is not None:
        remove_path(old)
    return final


def step_dirs(root: str) -> list[tuple[int, str]]:
    """(step, path) of every ``step-N`` directory in ``root`` (not symlinks), newest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for entry in os.scandir(root):
        m = _STEP_DIR.fullmatch(entry.name)
        if m and entry.is_dir(follow_symlinks=False):
            found.append((int(m.group(1)), entry.path))
    return sorted(found, reverse=True)


def prune(root: str, keep: int) -> list[str]:
    """Delete the oldest complete checkpoints (step directories with a manifest) beyond the
    newest ``keep``, never the one ``latest`` names; returns what was deleted."""
    latest = _latest_name(root)
    complete = [p for _, p in step_dirs(root) if os.path.isfile(os.path.join(p, MANIFEST))]
    gone = [p for p in complete[keep:] if os.path.basename(p) != latest]
    for p in gone:
        remove_path(p)
    return gone


def clean_temporaries(root: str) -> list[str]:
    """Remove what crashed saves left in ``root`` (``.tmp-*``: directories, files, symlinks,
    the links themselves, never their targets); returns the names removed."""
    if not os.path.isdir(root):
        return []
    removed = []
    for entry in os.scandir(root):
        if entry.name.startswith(TMP_PREFIX):
            remove_path(entry.path)
            removed.append(entry.name)
    return sorted(removed)


def estimate_bytes(numel: int, itemsize: int, state_names: int, files: int) -> int:
    """About the size of one checkpoint: every parameter once and each optimiser state buffer
    once, at ``itemsize`` bytes, plus headers (64 KiB per file and for the manifest)."""
    return numel * itemsize * (1 + state_names) + 65536 * (files + 1)


# ---------------------------------------------------------------------------- reading
def _latest_name(root: str) -> str | None:
    try:
        with open(os.path.join(root, LATEST)) as f:
            return f.read().strip()
    except OSError:
        return None


def read_manifest(step_dir: str) -> dict[str, Any]:
    """The manifest of a step directory; CheckpointError if it is missing, unparseable,
    incomplete or of another format or version."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(f"{step_dir}: no {MANIFEST} (an incomplete save, or not an mpipar "
                              f"checkpoint directory)")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable manifest ({type(e).__name__}: {e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an mpipar checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: manifest version {manifest.get('version')!r}, this "
                              f"mpipar reads version {VERSION}")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise CheckpointError(f"{path}: the manifest lacks {', '.join(missing)}")
    for name in manifest["files"]:
        if not _FILE_NAME.fullmatch(name) or name in (".", ".."):
            raise CheckpointError(f"{path}: file name {name!r} is not a plain name")
    return manifest


def _piece_shape(piece: Mapping[str, Any], full: tuple[int, ...]) -> tuple[int, ...]:
    if piece["flat"] is not None:
        lo, hi = piece["flat"]
        return (hi - lo,)
    if piece["ranges"] is None:
        return full
    shape = list(full)
    shape[piece["axis"]] = sum(hi - lo for lo, hi in piece["ranges"])
    return tuple(shape)


def _index(ranges: list[list[int]]) -> np.ndarray:
    return np.concatenate([np.arange(lo, hi) for lo, hi in ranges])


def _sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Reader:
    """One shard file opened for reading arrays by key, one at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            self._npz = f.read(2) == b"PK"
        if self._npz:
            self._file: Any = np.load(path, allow_pickle=False)
        else:
            from safetensors import safe_open  # noqa: PLC0415

            self._file = safe_open(path, framework="np")

    def keys(self) -> list[str]:
        return list(self._file.files if self._npz else self._file.keys())

    def get(self, key: str) -> np.ndarray:
        return self._file[key] if self._npz else self._file.get_tensor(key)

    def close(self) -> None:
        if self._npz:
            self._file.close()


class ShardedCheckpoint:
    """A step directory opened for resuming: ``model`` (nanoGPT name -> full tensor) and
    ``optim`` ("step", "<state>.<name>" -> full tensor, and the manifest's ``optim_scalars``:
    fp16's loss scale and its counter) are mappings that assemble a tensor from its pieces
    when asked for it, reading only the files that hold them. ``close()`` when done."""

    def __init__(self, path: str, manifest: dict[str, Any]) -> None:
        self.path, self.manifest = path, manifest
        self.meta = manifest
        self._pieces: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for fname, info in manifest["files"].items():
            for piece in info["pieces"]:
                self._pieces.setdefault(piece["tensor"], []).append((fname, piece))
        self._readers: dict[str, _Reader] = {}
        self.model = _Tensors(self, "model.", {})
        self.optim = _Tensors(self, "optim.", {"step": int(manifest["optim_step"]),
                                               **manifest.get("optim_scalars", {})})
        # each rank's gradient-compression state, "rank<R>.<key>" (parallel/checkpoint.py)
        self.compression = _Tensors(self, "compress.", {})

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def run(self) -> dict[str, Any]:
        return self.manifest["run"]

    def check(self, config: Mapping[str, Any], optimizer: str, shapes: Mapping[str, tuple],
              state_names: Sequence[str]) -> None:
        """``checkpoint.check_resumable`` against the manifest (no file is read)."""
        tensors = self.manifest["tensors"]
        run = self.manifest["run"]
        check_resumable(self.path, run["model"]["config"], run["optimizer"]["name"],
                        lambda key: tuple(tensors[key]["shape"]) if key in tensors else None,
                        config, optimizer, shapes, state_names)

    def _reader(self, fname: str) -> _Reader:
        if fname not in self._readers:
            self._readers[fname] = _Reader(os.path.join(self.path, fname))
        return self._readers[fname]

    def tensor(self, key: str) -> np.ndarray:
        """The full tensor ``key`` (``model.<name>``, ``optim.<state>.<name>``), put
        together from its pieces; CheckpointError naming it if they do not cover it."""
        info = self.manifest["tensors"][key]
        shape, dtype = tuple(info["shape"]), np.dtype(info["dtype"])
        pieces = self._pieces.get(key, [])
        if len(pieces) == 1 and pieces[0][1]["ranges"] is None and pieces[0][1]["flat"] is None:
            return np.asarray(self._reader(pieces[0][0]).get(pieces[0][1]["key"]))
        full = np.empty(shape, dtype=dtype)
        covered = np.zeros(full.size, dtype=bool)
        positions = np.arange(full.size).reshape(shape)
        for fname, piece in pieces:
            pos = positions if piece["ranges"] is None else np.take(
                positions, _index(piece["ranges"]), axis=piece["axis"])
            pos = pos.reshape(-1)
            if piece["flat"] is not None:
                pos = pos[piece["flat"][0]:piece["flat"][1]]
            full.reshape(-1)[pos] = self._reader(fname).get(piece["key"]).reshape(-1)
            covered[pos] = True
        if not covered.all():
            raise CheckpointError(f"{self.path}: tensor {key}: the files hold {int(covered.sum())} "
                                  f"of its {full.size} elements")
        return full

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


class _Tensors(Mapping):
    """``ShardedCheckpoint``'s tensors under ``prefix``, assembled on access."""

    def __init__(self, ckpt: ShardedCheckpoint, prefix: str, extra: dict[str, Any]) -> None:
        self._ckpt, self._prefix, self._extra = ckpt, prefix, extra
        self._keys = [k[len(prefix):] for k in ckpt.manifest["tensors"] if k.startswith(prefix)]

    def __getitem__(self, key: str) -> Any:
        if key in self._extra:
            return self._extra[key]
        if key not in self._keys:
            raise KeyError(key)
        return self._ckpt.tensor(self._prefix + key)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._extra) + self._keys)

    def __len__(self) -> int:
        return len(self._extra) + len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._extra or key in self._keys


def _corrupt_part(path: str, pieces: list[dict[str, Any]], held: str) -> str:
    """Which tensor of a file whose hash is wrong was hit: the first piece whose bytes no
    longer have their recorded SHA-256, else the file's header."""
    try:
        reader = _Reader(path)
    except Exception:
        return f"its header is damaged; it holds {held}"
    try:
        for piece in pieces:
            try:
                arr = reader.get(piece["key"])
            except Exception:
                return f"tensor {piece['tensor']} is unreadable"
            if "sha256" in piece and array_sha256(arr) != piece["sha256"]:
                return f"in tensor {piece['tensor']}"
    finally:
        reader.close()
    return f"outside the tensors' data; it holds {held}"


def verify(step_dir: str, manifest: Mapping[str, Any]) -> None:
    """CheckpointError naming the file and tensor unless every file of ``manifest`` is
    there, of its recorded size and SHA-256, every piece has the dtype and shape the
    manifest gives its tensor, holds only finite values, and every tensor is covered.
    Reads every file (once for the hash, then one array at a time)."""
    tensors = manifest["tensors"]
    covered = dict.fromkeys(tensors, 0)
    for fname, info in manifest["files"].items():
        path = os.path.join(step_dir, fname)
        held = ", ".join(p["tensor"] for p in info["pieces"][:3]) + (
            f" and {len(info['pieces']) - 3} more" if len(info["pieces"]) > 3 else "")
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: shard file missing (it holds {held})")
        size = os.path.getsize(path)
        if size != info["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {info['bytes']} "
                                  f"(truncated or overwritten; it holds {held})")
        if _sha256_of(path) != info["sha256"]:
            raise CheckpointError(f"{path}: SHA-256 mismatch against the manifest: the file is "
                                  f"corrupt ({_corrupt_part(path, info['pieces'], held)})")
        try:
            reader = _Reader(path)
        except Exception as e:
            raise CheckpointError(f"{path}: not readable ({type(e).__name__}: {e})") from e
        try:
            present = set(reader.keys())
            for piece in info["pieces"]:
                key, name = piece["key"], piece["tensor"]
                if name not in tensors:
                    raise CheckpointError(f"{path}: holds a piece of {name}, which the manifest "
                                          f"does not list")
                if key not in present:
                    raise CheckpointError(f"{path}: tensor {name} (key {key}) is missing")
                arr = reader.get(key)
                want_shape = _piece_shape(piece, tuple(tensors[name]["shape"]))
                want_dtype = np.dtype(tensors[name]["dtype"])
                if arr.dtype != want_dtype:
                    raise CheckpointError(f"{path}: tensor {name} is {arr.dtype.name}, the "
                                          f"manifest says {want_dtype.name}")
                if tuple(arr.shape) != want_shape:
                    raise CheckpointError(f"{path}: tensor {name} has shape {tuple(arr.shape)}, "
                                          f"the manifest says {want_shape}")
                if not np.isfinite(arr).all():
                    raise CheckpointError(f"{path}: tensor {name} holds non-finite values")
                covered[name] += arr.size
        finally:
            reader.close()
    for name, n in covered.items():
        total = int(np.prod(tensors[name]["shape"]))
        if n != total:
            raise CheckpointError(f"{step_dir}: tensor {name}: the files hold {n} of its "
                                  f"{total} elements")


def open_step_dir(step_dir: str) -> ShardedCheckpoint:
    """A verified step directory (``read_manifest`` and ``verify``)."""
    manifest = read_manifest(step_dir)
    verify(step_dir, manifest)
    return ShardedCheckpoint(step_dir, manifest)


def newest_complete(root: str) -> str | None:
    """``root`` when it holds a checkpoint (a ``latest`` or a step directory: what
    ``open_checkpoint`` then resolves, or refuses if it is corrupt), None when it holds none
    (a fresh start)."""
    if _latest_name(root) is None and not step_dirs(root):
        return None
    return root


def open_checkpoint(path: str) -> TrainingCheckpoint | ShardedCheckpoint:
    """The checkpoint at ``path``: a root (its ``latest``), a step directory, or a single
    file (``checkpoint.load_training_checkpoint``). A directory is verified (``verify``);
    if ``latest`` names a corrupt one, the error names the newest older one that verifies.
    CheckpointError otherwise."""
    if not os.path.isdir(path):
        return load_training_checkpoint(path)
    name = _latest_name(path)
    if os.path.exists(os.path.join(path, MANIFEST)):
        return open_step_dir(path)
    if name is None:
        if step_dirs(path):
            raise CheckpointError(f"{path}: no {LATEST} file naming the newest checkpoint; give "
                                  f"one of its step directories ({step_dirs(path)[0][1]} ...)")
        return open_step_dir(path)                   # says: no manifest
    m = _STEP_DIR.fullmatch(name or "")
    if m is None:
        raise CheckpointError(f"{os.path.join(path, LATEST)}: names {name!r}, not a step directory")
    step_dir = os.path.join(path, name)
    try:
        return open_step_dir(step_dir)
    except CheckpointError as e:
        for step, older in step_dirs(path):
            if step >= int(m.group(1)):
                continue
            try:
                open_step_dir(older).close()
            except CheckpointError:
                continue
            raise CheckpointError(f"{e}. {path}/{LATEST} names this corrupt checkpoint; the "
                                  f"previous complete checkpoint {older} verifies and can be "
                                  f"resumed from") from e
        raise CheckpointError(f"{e}. {path}/{LATEST} names this corrupt checkpoint, and no "
                              f"older one in {path} verifies") from e
