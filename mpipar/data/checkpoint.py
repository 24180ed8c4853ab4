"""Checkpoint files: named arrays plus a small JSON header, never pickle.

The format is safetensors when that package is installed, else NumPy's ``.npz`` (the JSON
header then rides along as a uint8 array named ``__meta__``). Loading recognises either by
its first bytes, whatever the file is called.

A save writes a temporary file in the same directory, flushes it to disk and renames it over
the target (``os.replace`` is atomic on POSIX), so a crash mid-save leaves the previous
checkpoint intact.

A training checkpoint (``save_training_checkpoint`` / ``load_training_checkpoint``) holds
what one process would save, whatever layout wrote it: the full model tensors under
nanoGPT names (``model.<name>``), the optimiser's state as ``Optimizer.state_dict()`` keeps
it (``optim.<state>.<name>``; its step in the header as ``optim_step``), and a header::

    {"format": "mpipar-checkpoint", "version": 1, "step": 400, "model": "small",
     "config": {GPTConfig fields}, "optimizer": "adamw", "optim_step": 400,
     "dtype": "float32", "seed": 0}

``TrainingCheckpoint.check`` compares it with the run about to resume, before anything is
built: a different model or optimiser, or a missing or misshapen tensor, is a
``CheckpointError`` naming it.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
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


def save_checkpoint(path: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> str:
    """Write ``arrays`` (host arrays) and ``meta`` (JSON-able) to ``path``; returns the format."""
    fmt = default_format(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    header = json.dumps(dict(meta), sort_keys=True)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        if fmt == "safetensors":
            from safetensors.numpy import save  # noqa: PLC0415

            data = save(arrays, metadata={"mpipar": header})
        else:
            buf = io.BytesIO()  # a file object, so numpy does not append ".npz" to the name
            np.savez(buf, **arrays, **{_META_KEY: np.frombuffer(header.encode(), np.uint8)})
            data = buf.getvalue()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return fmt


def load_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) from a file written by ``save_checkpoint``; CheckpointError otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path!r}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        if data[:2] == b"PK":
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            header = arrays.pop(_META_KEY).tobytes().decode()
        else:
            if not _have_safetensors():
                raise CheckpointError(f"{path!r} is not an .npz checkpoint and safetensors is "
                                      f"not installed to read it otherwise")
            from safetensors import safe_open  # noqa: PLC0415
            from safetensors.numpy import load  # noqa: PLC0415

            arrays = load(data)
            with safe_open(path, framework="np") as f:
                header = (f.metadata() or {})["mpipar"]
        meta = json.loads(header)
    except CheckpointError:
        raise
    except Exception as e:  # zip, safetensors, JSON and key errors alike: one clear message
        raise CheckpointError(f"{path!r} is not a readable mpipar checkpoint "
                              f"({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an mpipar checkpoint (no mpipar header)")
    return arrays, meta


# ---- training checkpoints ---------------------------------------------------------------------
FORMAT, VERSION = "mpipar-checkpoint", 1
_HEADER_KEYS = ("format", "version", "step", "config", "optimizer", "optim_step")


def training_meta(*, step: int, model: str, config: Mapping[str, Any], optimizer: str,
                  dtype: str, seed: int) -> dict[str, Any]:
    """The header of a training checkpoint (``optim_step`` is added at save)."""
    return {"format": FORMAT, "version": VERSION, "step": int(step), "model": model,
            "config": dict(config), "optimizer": optimizer, "dtype": dtype, "seed": int(seed)}


def save_training_checkpoint(path: str, model_sd: Mapping[str, np.ndarray],
                             optim_sd: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """One checkpoint: ``model_sd`` (full tensors under nanoGPT names, host arrays) and
    ``optim_sd`` (``Optimizer.state_dict()``: ``step`` and ``<state>.<name>`` arrays)."""
    arrays = {f"model.{k}": np.asarray(v) for k, v in model_sd.items()}
    arrays.update({f"optim.{k}": np.asarray(v) for k, v in optim_sd.items() if k != "step"})
    save_checkpoint(path, arrays, {**meta, "optim_step": int(optim_sd["step"])})


@dataclass
class TrainingCheckpoint:
    path: str
    model: dict[str, np.ndarray]          # nanoGPT name -> full tensor
    optim: dict[str, Any]                 # as Optimizer.state_dict(): "step", "<state>.<name>"
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def check(self, config: Mapping[str, Any], optimizer: str, shapes: Mapping[str, tuple],
              state_names: Sequence[str]) -> None:
        """CheckpointError unless this checkpoint can resume a run of the model ``config``
        (GPTConfig fields) with ``optimizer``, whose parameters have ``shapes`` (nanoGPT
        names) and whose optimiser keeps ``state_names`` per parameter."""
        saved = self.meta["config"]
        if saved != dict(config):
            diff = ", ".join(f"{k} {saved.get(k)!r} (saved) vs {config.get(k)!r} (this run)"
                             for k in sorted(set(saved) | set(config)) if saved.get(k) != config.get(k))
            raise CheckpointError(f"{self.path!r} holds another model config: {diff}")
        if self.meta["optimizer"] != optimizer:
            raise CheckpointError(f"{self.path!r} was trained with optimiser "
                                  f"{self.meta['optimizer']!r}, this run uses {optimizer!r}")
        wanted = [("model", name, shape, self.model) for name, shape in shapes.items()]
        wanted += [("optimiser state", f"{s}.{name}", shape, self.optim)
                   for s in state_names for name, shape in shapes.items()]
        for what, key, shape, held in wanted:
            if key not in held:
                raise CheckpointError(f"{self.path!r}: {what} tensor {key} is missing")
            if tuple(np.shape(held[key])) != tuple(shape):
                raise CheckpointError(f"{self.path!r}: {what} tensor {key} has shape "
                                      f"{tuple(np.shape(held[key]))}, the model needs {tuple(shape)}")


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
    model = {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}
    optim: dict[str, Any] = {k[len("optim."):]: v for k, v in arrays.items() if k.startswith("optim.")}
    optim["step"] = int(meta["optim_step"])
    return TrainingCheckpoint(path, model, optim, meta)
