"""Learning-rate schedule: linear warm-up then cosine decay (Loshchilov & Hutter, SGDR, 2017)."""

from __future__ import annotations

import math


def cosine_lr(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate for 0-based ``step``.

    - ``step < warmup``: linear ramp ``lr * (step + 1) / warmup`` (reaches ``lr`` at
      ``warmup - 1``, never 0, so the first step already moves);
    - ``warmup <= step <= total``: cosine from ``lr`` at ``warmup`` to ``min_lr`` at ``total``;
    - ``step > total``: ``min_lr``.

    E.g. lr=1, min_lr=0.1, warmup=10, total=110: step 0 -> 0.1, 9 -> 1.0, 10 -> 1.0,
    60 -> 0.55, 110 -> 0.1.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= total or total <= warmup:
        return min_lr
    ratio = (step - warmup) / (total - warmup)      # 0 .. 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)
