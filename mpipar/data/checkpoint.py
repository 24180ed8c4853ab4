"""Checkpoint files: named arrays plus a small JSON header, never pickle.

The format is safetensors when that package is installed, else NumPy's ``.npz`` (the JSON
header then rides along as a uint8 array named ``__meta__``). Loading recognises either by
its first bytes, whatever the file is called.

A save writes a temporary file in the same directory, flushes it to disk and renames it over
the target (``os.replace`` is atomic on POSIX), so a crash mid-save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
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
    if not isinstance(meta, dict) or meta.get("format") != "mpipar-checkpoint":
        raise CheckpointError(f"{path!r} is not an mpipar checkpoint (no mpipar header)")
    return arrays, meta
