"""Inverted dropout (Srivastava et al. 2014).

Math, with keep probability 1 - p and a Bernoulli mask m::

    out = x * m / (1 - p)        dx = dout * m / (1 - p)

The cache is the scaled mask ``m / (1 - p)`` in x's dtype (None when p == 0, a no-op).
``rng`` is any generator with ``random(shape, dtype=...)`` of the array's module, e.g.
``xp.random.default_rng(seed)``.
"""

from __future__ import annotations

from typing import Any


def forward(x: Any, p: float, rng: Any) -> tuple[Any, Any]:
    """``(out, mask)``; with ``p == 0`` returns ``(x, None)`` untouched."""
    if p <= 0.0:
        return x, None
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if rng is None:
        raise ValueError("dropout with p > 0 needs an rng")
    mask = (rng.random(x.shape, dtype=x.dtype) >= p).astype(x.dtype)  # (..,) 0/1
    mask *= 1.0 / (1.0 - float(p))
    return x * mask, mask


def forward_with(x: Any, mask: Any) -> Any:
    """Apply a mask from an earlier ``forward`` (used to recompute instead of caching)."""
    return x if mask is None else x * mask


def backward(dout: Any, mask: Any) -> Any:
    return dout if mask is None else dout * mask
