"""Inverted dropout (Srivastava et al. 2014).

Math, with keep probability 1 - p and a Bernoulli mask m::

    out = x * m / (1 - p)        dx = dout * m / (1 - p)

The cache is the scaled mask ``m / (1 - p)`` in x's dtype (None when p == 0, a no-op).
``rng`` is any generator with ``random(shape, dtype=...)`` of the array's module, e.g.
``xp.random.default_rng(seed)``.

Recompute (``nn/block.py``) redraws masks instead of keeping them: ``snapshot(rng)`` is a
copy of the generator in its present state, which draws later exactly the masks ``rng``
draws next (PyTorch's checkpointing saves and restores the RNG state for the same reason).
"""

from __future__ import annotations

import copy
from typing import Any

from mpipar.backend import compute_dtype


def forward(x: Any, p: float, rng: Any) -> tuple[Any, Any]:
    """``(out, mask)``; with ``p == 0`` returns ``(x, None)`` untouched."""
    if p <= 0.0:
        return x, None
    m = mask(x.shape, x.dtype, p, rng)
    return x * m, m


def mask(shape: tuple, dtype: Any, p: float, rng: Any) -> Any:
    """The scaled mask ``m / (1 - p)`` of ``forward``, drawn from ``rng`` (p > 0)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if rng is None:
        raise ValueError("dropout with p > 0 needs an rng")
    # drawn in the compute dtype (float32 for the 16-bit floats, which generators lack)
    m = (rng.random(shape, dtype=compute_dtype(dtype)) >= p).astype(dtype)  # (..,) 0/1
    m *= 1.0 / (1.0 - float(p))
    return m


def forward_with(x: Any, mask: Any) -> Any:
    """Apply a mask from an earlier ``forward`` (used to recompute instead of caching)."""
    return x if mask is None else x * mask


def backward(dout: Any, mask: Any) -> Any:
    return dout if mask is None else dout * mask


def snapshot(rng: Any) -> Any:
    """A copy of ``rng`` in its present state: drawing from the copy later repeats the draws
    ``rng`` makes from now on, so a recomputed forward drops the entries the first one
    dropped. A generator with a ``bit_generator`` (NumPy's, CuPy's) is copied with its state
    (a NumPy PCG64 state is a few hundred bytes); one without (None, or the simulator's
    shape-only generator, whose draws depend on no state) is returned as it is."""
    if rng is None or not hasattr(rng, "bit_generator"):
        return rng
    return copy.deepcopy(rng)
