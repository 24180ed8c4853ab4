"""Softmax cross-entropy, fused and numerically stable, mean over all positions.

Math (logits: (N, V) with N = B*T, targets: (N,))::

    m     = max_j logits[:, j]
    p     = exp(logits - m) / sum_j exp(logits - m)      softmax
    loss  = mean_n (log sum_j exp(logits[n] - m[n]) - (logits[n, t_n] - m[n]))
    dlogits = dloss * (p - onehot(t)) / N

The cache holds the probabilities p (N, V) and the targets. ``forward`` overwrites the
logits it is given with p (saves a (N, V) array); pass a copy if you still need them.
16-bit logits (mixed precision): the softmax and the loss are computed in float32 (the
loss is a float32 number) and p is stored rounded to the logits' dtype.
"""

from __future__ import annotations

from typing import Any

from mpipar.backend import array_module, as_compute


def forward(logits: Any, targets: Any) -> tuple[Any, tuple]:
    """Returns ``(loss, cache)``; loss is a 0-d array of the logits' compute dtype."""
    xp = array_module(logits)
    V = logits.shape[-1]
    p = logits.reshape(-1, V)                   # (N, V) view, becomes p in place
    t = targets.reshape(-1)                     # (N,)
    z = as_compute(p)                           # (N, V), float32 for 16-bit logits
    N = z.shape[0]
    z -= z.max(axis=-1, keepdims=True)          # (N, V) shifted logits
    zt = z[xp.arange(N), t]                     # (N,) shifted target logits
    xp.exp(z, out=z)
    s = z.sum(axis=-1, keepdims=True)           # (N, 1)
    loss = (xp.log(s[:, 0]) - zt).mean()        # ()
    z *= 1.0 / s                                # (N, V) probabilities
    if z is not p:
        p[...] = z                              # rounded to 16 bits
    return loss, (p, t)


def backward(dloss: Any, cache: tuple) -> Any:
    """dlogits (N, V) for an upstream gradient ``dloss`` of the mean loss (usually 1)."""
    p, t = cache
    xp = array_module(p)
    N = p.shape[0]
    dlogits = p * (float(dloss) / N)            # (N, V)
    dlogits[xp.arange(N), t] -= float(dloss) / N
    return dlogits
