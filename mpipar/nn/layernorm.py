"""Layer normalisation over the last axis (Ba, Kiros, Hinton 2016).

Math (x: (B, T, C), per position, eps = 1e-5 as in GPT-2)::

    mean = sum(x) / C
    rstd = 1 / sqrt(sum((x - mean)^2) / C + eps)
    n    = (x - mean) * rstd                         normalised input
    out  = n * w + b
    dw  += sum_{B,T} dout * n
    db  += sum_{B,T} dout
    dn   = dout * w
    dx   = rstd * (dn - mean(dn) - n * mean(dn * n))

The cache holds the input, ``mean`` and ``rstd`` (B, T, 1) only; ``n`` is recomputed in
backward (one elementwise pass) instead of being stored.
"""

from __future__ import annotations

from typing import Any

from mpipar import kernels
from mpipar.backend import array_module, fused

EPS = 1e-5


@kernels.twin(kernels.layernorm_forward)  # a GPU: one fused kernel
def forward(x: Any, w: Any, b: Any = None, eps: float = EPS) -> tuple[Any, tuple]:
    with fused(array_module(x)):                # one kernel on a GPU (fused layer norm)
        mean = x.mean(axis=-1, keepdims=True)       # (B, T, 1)
        xc = x - mean                               # (B, T, C)
        var = (xc * xc).mean(axis=-1, keepdims=True)  # (B, T, 1)
        rstd = 1.0 / (var + eps) ** 0.5             # (B, T, 1)
        xc *= rstd                                  # (B, T, C) normalised, in place
        xc *= w
        if b is not None:
            xc += b
    return xc, (x, mean, rstd, w)


@kernels.twin(kernels.layernorm_backward)  # a GPU: two fused kernels
def backward(dout: Any, cache: tuple, dw: Any, db: Any = None) -> Any:
    with fused(array_module(dout)):             # a GPU: one kernel for dx, one pass for dw, db
        return _backward(dout, cache, dw, db)


def _backward(dout: Any, cache: tuple, dw: Any, db: Any) -> Any:
    x, mean, rstd, w = cache
    C = x.shape[-1]
    n = x - mean                                # (B, T, C) recomputed to save memory
    n *= rstd
    lead = tuple(range(x.ndim - 1))
    dw += (dout * n).sum(axis=lead)             # (C,)
    if db is not None:
        db += dout.sum(axis=lead)               # (C,)
    dn = dout * w                               # (B, T, C)
    dn_mean = dn.mean(axis=-1, keepdims=True)   # (B, T, 1)
    dnn_mean = (dn * n).sum(axis=-1, keepdims=True) / C  # (B, T, 1)
    dn -= dn_mean
    n *= dnn_mean
    dn -= n
    dn *= rstd                                  # (B, T, C) = dx
    return dn
