"""Global-norm gradient clipping (Pascanu et al., 2013), as torch.nn.utils.clip_grad_norm_."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def global_norm(grads: Mapping[str, Any]) -> float:
    """sqrt of the sum of squares of every gradient, accumulated in float64 on the host."""
    total = 0.0
    for g in grads.values():
        flat = g.reshape(-1)
        total += float(flat @ flat)                # one BLAS dot per tensor
    return math.sqrt(total)


def clip_grad_norm(grads: Mapping[str, Any], max_norm: float) -> float:
    """Scale ``grads`` in place so their global norm is at most ``max_norm``.

    Returns the norm before clipping (for logging). ``max_norm <= 0`` disables clipping.
    After data-parallel averaging every rank holds the same gradients, so every rank computes
    the same norm and clips identically without further communication.
    """
    norm = global_norm(grads)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= scale
    return norm
