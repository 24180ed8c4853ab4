"""Checkpoint files: named arrays plus a small JSON header, never pickle.

The format is safetensors when that package is installed, else NumPy's ``.npz`` (the JSON
header then rides along as a uint8 array named ``__meta__``). Loading recognises either by
its first bytes, whatever the file is called.

A save writes a temporary file that ``tempfile.mkstemp`` creates exclusively, under an
unpredictable name, in the same directory, flushes it to disk and renames it over the target
(``os.replace`` is atomic on POSIX), so a crash mid-save leaves the previous checkpoint
intact and a planted symlink is never followed.

A training checkpoint (``save_training_checkpoint`` / ``load_training_checkpoint``) holds
what one process would save, whatever layout wrote it: the full model tensors under
nanoGPT names (``model.<name>``), the optimiser's state as ``Optimizer.state_dict()`` keeps
it (``optim.<state>.<name>``; its step in the header as ``optim_step``), and a header::

    {"format": "mpipar-checkpoint", "version": 1, "step": 400, "model": "small",
     "config": {GPTConfig fields}, "optimizer": "adamw", "optim_step": 400,
     "dtype": "float32", "seed": 0, "run": {the run's identity}, "sha256": {key: hex}}

Loading refuses, naming the tensor, one whose bytes lost their SHA-256, of another dtype
than the header's, or not finite (``check_arrays``). ``TrainingCheckpoint.check`` compares
the header with the run about to resume, before anything is built: a different model or
optimiser, or a missing or misshapen tensor, is a ``CheckpointError`` naming it
(``check_resumable``, shared with the sharded format of ``ckpt_dir.py``), and
``run_differences`` names what else differs (seed, data, schedule, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_META_KEY = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not an mpipar checkpoint."""


def _have_safetensors() -> bool:
    try:
        import safetensors.numpy  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def default_format(path: str) -> str:
    if path.endswith(".npz"):
        return "npz"
    if path.endswith(".safetensors"):
        if not _have_safetensors():
            raise CheckpointError("a .safetensors checkpoint needs `pip install safetensors`")
        return "safetensors"
    return "safetensors" if _have_safetensors() else "npz"


def encode_arrays(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], fmt: str) -> bytes:
    """The bytes of one checkpoint file of format ``fmt`` ("safetensors" or "npz"): host
    ``arrays`` and the JSON-able ``meta``. Never pickle."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    header = json.dumps(dict(meta), sort_keys=True)
    if fmt == "safetensors":
        from safetensors.numpy import save  # noqa: PLC0415

        return save(arrays, metadata={"mpipar": header})
    buf = io.BytesIO()  # a file object, so numpy does not append ".npz" to the name
    np.savez(buf, **arrays, **{_META_KEY: np.frombuffer(header.encode(), np.uint8)})
    return buf.getvalue()


def save_checkpoint(path: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> str:
    """Write ``arrays`` (host arrays) and ``meta`` (JSON-able) to ``path``; returns the format.

    The bytes go to a temporary file that ``tempfile.mkstemp`` creates exclusively under an
    unpredictable name in the target's directory (so a planted symlink is never followed),
    are fsynced, and the file is renamed over ``path``; on any failure the temporary is
    removed and ``path`` is untouched."""
    fmt = default_format(path)
    data = encode_arrays(arrays, meta, fmt)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return fmt


def decode_arrays(data: bytes, path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) from the bytes of a file ``encode_arrays`` wrote (either format,
    recognised by its first bytes); CheckpointError naming ``path`` otherwise."""
    try:
        if data[:2] == b"PK":
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            header = arrays.pop(_META_KEY).tobytes().decode()
        else:
            if not _have_safetensors():
                raise CheckpointError(f"{path!r} is not an .npz checkpoint and safetensors is "
                                      f"not installed to read it otherwise")
            from safetensors.numpy import load  # noqa: PLC0415

            arrays = load(data)
            header = _safetensors_metadata(data)["mpipar"]
        meta = json.loads(header)
    except CheckpointError:
        raise
    except Exception as e:  # zip, safetensors, JSON and key errors alike: one clear message
        raise CheckpointError(f"{path!r} is not a readable mpipar checkpoint "
                              f"({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path!r} is not an mpipar checkpoint (no mpipar header)")
    return arrays, meta


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's JSON header (8-byte length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def load_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) from a file written by ``save_checkpoint``; CheckpointError otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path!r}")
    with open(path, "rb") as f:
        data = f.read()
    arrays, meta = decode_arrays(data, path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an mpipar checkpoint (no mpipar header)")
    return arrays, meta


# ---- training checkpoints ---------------------------------------------------------------------
FORMAT, VERSION = "mpipar-checkpoint", 1
_HEADER_KEYS = ("format", "version", "step", "config", "optimizer", "optim_step")


def training_meta(*, step: int, model: str, config: Mapping[str, Any], optimizer: str,
                  dtype: str, seed: int, run: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The header of a training checkpoint (``optim_step`` is added at save); ``run``: the
    run's identity (``run_differences``), which a resume compares with its own."""
    meta = {"format": FORMAT, "version": VERSION, "step": int(step), "model": model,
            "config": dict(config), "optimizer": optimizer, "dtype": dtype, "seed": int(seed)}
    if run is not None:
        meta["run"] = dict(run)
    return meta


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


INFORMATIONAL = frozenset({"data.path"})
"""Run-identity fields recorded but not compared: the data is identified by its content."""


def run_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                    allowed: Collection[str] = ()) -> dict[str, str]:
    """What differs between a checkpoint's run identity ``saved`` and this run's
    ``current`` (nested JSON-able mappings: seed, data, batch_size, dtype, optimizer,
    schedule, ...): dotted field ("schedule.warmup") -> a phrase ("the checkpoint's seed 0
    differs from this run's 1"), leaving out the top-level groups in ``allowed``.
    ``current`` is compared after a JSON round trip, as ``saved`` was stored (tuples become
    lists)."""
    a, b = _flatten(saved), _flatten(json.loads(json.dumps(dict(current))))
    out = {}
    for key in sorted(set(a) | set(b)):
        if key in INFORMATIONAL or key.split(".")[0] in allowed or a.get(key) == b.get(key):
            continue
        out[key] = f"the checkpoint's {key} {_show(a, key)} differs from this run's {_show(b, key)}"
    return out


def _show(d: Mapping[str, Any], key: str) -> str:
    return "(absent)" if key not in d else json.dumps(d[key]).strip('"')


def check_resumable(path: str, saved_config: Mapping[str, Any], saved_optimizer: str,
                    tensor_shape: Callable[[str], tuple | None], config: Mapping[str, Any],
                    optimizer: str, shapes: Mapping[str, tuple], state_names: Sequence[str]) -> None:
    """CheckpointError unless the checkpoint at ``path`` (its model ``saved_config``, its
    ``saved_optimizer``, and ``tensor_shape(key)``: the full shape of its tensor ``key``,
    ``model.<name>`` or ``optim.<state>.<name>``, None if absent) can resume a run of the
    model ``config`` (GPTConfig fields) with ``optimizer``, whose parameters have ``shapes``
    (nanoGPT names) and whose optimiser keeps ``state_names`` per parameter. Both formats
    (one file, a sharded directory) are checked here."""
    if dict(saved_config) != dict(config):
        diff = ", ".join(f"{k} {saved_config.get(k)!r} (saved) vs {config.get(k)!r} (this run)"
                         for k in sorted(set(saved_config) | set(config))
                         if saved_config.get(k) != config.get(k))
        raise CheckpointError(f"{path!r} holds another model config: {diff}")
    if saved_optimizer != optimizer:
        raise CheckpointError(f"{path!r} was trained with optimiser {saved_optimizer!r}, this "
                              f"run uses {optimizer!r}")
    wanted = [("model", name, f"model.{name}", shape) for name, shape in shapes.items()]
    wanted += [("optimiser state", f"{s}.{name}", f"optim.{s}.{name}", shape)
               for s in state_names for name, shape in shapes.items()]
    for what, name, key, shape in wanted:
        held = tensor_shape(key)
        if held is None:
            raise CheckpointError(f"{path!r}: {what} tensor {name} is missing")
        if tuple(held) != tuple(shape):
            raise CheckpointError(f"{path!r}: {what} tensor {name} has shape {tuple(held)}, "
                                  f"the model needs {tuple(shape)}")


def array_sha256(arr: np.ndarray) -> str:
    """The SHA-256 of an array's bytes (C order): recorded per tensor, so that damage to a
    file is traced to the tensor it hit."""
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def save_training_checkpoint(path: str, model_sd: Mapping[str, np.ndarray],
                             optim_sd: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """One checkpoint: ``model_sd`` (full tensors under nanoGPT names, host arrays) and
    ``optim_sd`` (``Optimizer.state_dict()``: ``step`` and ``<state>.<name>`` arrays). The
    header records each tensor's SHA-256 (``check_arrays``)."""
    arrays = {f"model.{k}": np.asarray(v) for k, v in model_sd.items()}
    arrays.update({f"optim.{k}": np.asarray(v) for k, v in optim_sd.items() if k != "step"})
    save_checkpoint(path, arrays, {**meta, "optim_step": int(optim_sd["step"]),
                                   "sha256": {k: array_sha256(v) for k, v in arrays.items()}})


def check_arrays(path: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """CheckpointError naming the tensor unless every array of a training checkpoint has the
    header's dtype, holds only finite values and, where the header records it (files since
    sharded checkpoints), still has its SHA-256 (a flipped byte)."""
    hashes = meta.get("sha256") or {}
    for key, arr in arrays.items():
        if meta.get("dtype") and arr.dtype != np.dtype(meta["dtype"]):
            raise CheckpointError(f"{path!r}: tensor {key} is {arr.dtype.name}, the header says "
                                  f"{meta['dtype']}")
        if key in hashes and array_sha256(arr) != hashes[key]:
            raise CheckpointError(f"{path!r}: tensor {key}: SHA-256 mismatch against the header: "
                                  f"the file is corrupt")
        if not np.isfinite(arr).all():
            raise CheckpointError(f"{path!r}: tensor {key} holds non-finite values")


@dataclass
class TrainingCheckpoint:
    """A single-file checkpoint, loaded whole (``model``, ``optim``: full tensors)."""

    path: str
    model: dict[str, np.ndarray]          # nanoGPT name -> full tensor
    optim: dict[str, Any]                 # as Optimizer.state_dict(): "step", "<state>.<name>"
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def run(self) -> dict[str, Any] | None:
        """The saving run's identity (None in files of mpipar before it was recorded)."""
        return self.meta.get("run")

    def check(self, config: Mapping[str, Any], optimizer: str, shapes: Mapping[str, tuple],
              state_names: Sequence[str]) -> None:
        """``check_resumable`` for this file."""
        held = {f"model.{k}": v for k, v in self.model.items()}
        held.update({f"optim.{k}": v for k, v in self.optim.items() if k != "step"})
        check_resumable(self.path, self.meta["config"], self.meta["optimizer"],
                        lambda key: tuple(np.shape(held[key])) if key in held else None,
                        config, optimizer, shapes, state_names)

    def close(self) -> None:
        """Nothing held open (the interface of a sharded checkpoint's reader)."""


def load_training_checkpoint(path: str) -> TrainingCheckpoint:
    """A training checkpoint written by ``save_training_checkpoint``; CheckpointError for a
    missing or unreadable file or an incomplete header."""
    arrays, meta = load_checkpoint(path)
    missing = [k for k in _HEADER_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path!r}: the checkpoint header lacks {', '.join(missing)}")
    if meta["version"] != VERSION:
        raise CheckpointError(f"{path!r}: checkpoint format version {meta['version']!r}, this "
                              f"mpipar reads version {VERSION}")
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"{path!r}: the checkpoint header's config is not a mapping")
    for key in ("step", "optim_step"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < 0:
            raise CheckpointError(f"{path!r}: the checkpoint header's {key} is {meta[key]!r}, "
                                  f"not a step number")
    check_arrays(path, arrays, meta)
    model = {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}
    optim: dict[str, Any] = {k[len("optim."):]: v for k, v in arrays.items() if k.startswith("optim.")}
    optim["step"] = int(meta["optim_step"])
    return TrainingCheckpoint(path, model, optim, meta)
