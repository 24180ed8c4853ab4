"""Central finite differences for the nn tests (float64)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from mpipar.backend import to_host


def rel_error(a, b) -> float:
    a, b = to_host(a).astype(np.float64), to_host(b).astype(np.float64)
    scale = max(np.abs(a).max(), np.abs(b).max(), 1e-12)
    return float(np.abs(a - b).max() / scale)


def numerical_grad(f: Callable[[], float], arr, eps: float = 1e-6, entries=None) -> np.ndarray:
    """d f / d arr by central differences, perturbing ``arr`` in place.

    ``entries``: flat indices to check (all when None); the result has arr's size, with
    unchecked entries left 0.
    """
    flat = arr.reshape(-1)
    assert arr.flags.c_contiguous, "perturbing in place needs a contiguous array"
    grad = np.zeros(flat.size, dtype=np.float64)
    for i in (range(flat.size) if entries is None else entries):
        old = float(flat[i])
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        grad[i] = (fp - fm) / (2 * eps)
    return grad.reshape(arr.shape)
