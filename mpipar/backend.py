"""Array backend: the one module that decides between NumPy (CPU) and CuPy (GPU).

Every numeric function in mpipar takes and returns arrays of one array module ``xp``.
``xp`` is chosen once, from ``--device cpu|gpu|auto``::

    from mpipar import backend
    xp = backend.get_xp("auto")          # cupy where a GPU is usable, else numpy
    x = xp.zeros((4, 4), dtype=backend.resolve_dtype("float32"))
    backend.synchronize(xp)               # wait for queued GPU work (no-op on numpy)
    host = backend.to_host(x)             # numpy.ndarray, copied off the GPU if needed

No other module imports cupy: they ask this one (``array_module``, ``is_device_array``,
``pinned_empty``), so a machine without CuPy never pays for it and the GPU path is a
different ``xp``, not a different copy of the code.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Any

import numpy as np

DEVICES = ("cpu", "gpu", "auto")

# dtypes that collectives and layers accept; names are numpy's.
SUPPORTED_DTYPES = ("float16", "float32", "float64", "int32", "int64")
FLOAT_DTYPES = ("float16", "float32", "float64")


@functools.lru_cache(maxsize=1)
def _cupy() -> ModuleType | None:
    """CuPy if it imports and sees at least one GPU, else None (checked once)."""
    if os.environ.get("MPIPAR_DISABLE_CUPY"):
        return None
    try:
        import cupy  # noqa: PLC0415  (the only cupy import in mpipar)

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # ImportError, or CUDA driver/runtime missing
        return None


def cupy_available() -> bool:
    """True when CuPy imports and a GPU is visible."""
    return _cupy() is not None


def cupy_module() -> ModuleType:
    """The cupy module; raises a clear error where there is none."""
    cp = _cupy()
    if cp is None:
        raise RuntimeError("GPU requested but CuPy with a visible GPU is not available "
                           "(pip install 'mpipar[gpu]' on a machine with CUDA)")
    return cp


def get_xp(device: str = "cpu") -> ModuleType:
    """The array module for ``device`` in ``cpu|gpu|auto``."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return np
    if device == "gpu":
        return cupy_module()
    return _cupy() or np


def device_name(xp: ModuleType) -> str:
    return "gpu" if xp is not np else "cpu"


def is_device_array(x: Any) -> bool:
    """True for a CuPy array (memory on the GPU)."""
    cp = _cupy()
    return cp is not None and isinstance(x, cp.ndarray)


def array_module(x: Any) -> ModuleType:
    """numpy or cupy, whichever ``x`` belongs to."""
    return cupy_module() if is_device_array(x) else np


def resolve_dtype(dtype: Any) -> np.dtype:
    """np.dtype from a name or dtype; rejects what mpipar does not support."""
    dt = np.dtype(dtype)
    if dt.name not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {dt.name}; supported: {', '.join(SUPPORTED_DTYPES)}")
    return dt


def to_host(x: Any) -> np.ndarray:
    """A NumPy array with the contents of ``x`` (a copy when ``x`` is on the GPU)."""
    if is_device_array(x):
        return x.get()
    return np.asarray(x)


def to_device(x: Any, xp: ModuleType) -> Any:
    """``x`` as an array of module ``xp`` (no copy when it already is one)."""
    if xp is np:
        return to_host(x)
    return xp.asarray(x)


def synchronize(x_or_xp: Any = None) -> None:
    """Block until all queued GPU work has finished; a no-op for NumPy.

    MPI reads device memory behind CUDA's back, so every transport calls this before
    handing a device buffer (or its staged host copy) to MPI.
    """
    cp = _cupy()
    if cp is None:
        return
    if x_or_xp is cp or is_device_array(x_or_xp) or x_or_xp is None:
        cp.cuda.get_current_stream().synchronize()


def pinned_empty(count: int, dtype: Any) -> np.ndarray:
    """A 1-D host array in page-locked memory when CuPy is present (faster GPU copies),
    ordinary NumPy memory otherwise."""
    dt = np.dtype(dtype)
    cp = _cupy()
    if cp is None or count == 0:
        return np.empty(count, dtype=dt)
    mem = cp.cuda.alloc_pinned_memory(count * dt.itemsize)
    return np.frombuffer(mem, dtype=dt, count=count)
