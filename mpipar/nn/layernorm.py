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

Under mixed precision (16-bit x) each block of rows is computed in float32 and ``out``,
``dx`` rounded to 16 bits; ``mean`` and ``rstd`` are kept in float32 (reductions in fp32).
The cache holds the input, ``mean`` and ``rstd`` (B, T, 1) only; ``n`` is recomputed in
backward (one elementwise pass) instead of being stored.
"""

from __future__ import annotations

from typing import Any

from mpipar import kernels
from mpipar.backend import array_module, compute_dtype, fused
from mpipar.nn.blocking import for_each_block_of

EPS = 1e-5

# Both directions run as chains of row-wise passes, block by block over rows
# (``blocking.for_each_block``: in cache on the CPU, on every CPU thread; one block on a GPU),
# writing into arrays made once per call. Each element's arithmetic is the expression in the
# docstring above, in that order, so a row's result does not depend on the block it lies in.


@kernels.twin(kernels.layernorm_forward)  # a GPU: one fused kernel
def forward(x: Any, w: Any, b: Any = None, eps: float = EPS) -> tuple[Any, tuple]:
    xp = array_module(x)
    C = x.shape[-1]
    x2 = x.reshape(-1, C)                           # (N, C)
    out = xp.empty_like(x2)
    mean = xp.empty((x2.shape[0], 1), dtype=compute_dtype(x.dtype))  # (N, 1), float32 if 16-bit
    rstd = xp.empty_like(mean)

    def block(xs: Any, o: Any, m: Any, r: Any) -> None:
        sq = xp.empty_like(xs)
        xp.mean(xs, axis=-1, keepdims=True, out=m)
        xp.subtract(xs, m, out=o)                   # centred
        xp.multiply(o, o, out=sq)
        xp.mean(sq, axis=-1, keepdims=True, out=r)  # var
        r += eps
        r **= 0.5
        xp.divide(1.0, r, out=r)                    # 1 / sqrt(var + eps)
        o *= r                                      # normalised
        o *= w
        if b is not None:
            o += b

    for_each_block_of(xp, (x2, out, mean, rstd), (1,), block)
    lead = x.shape[:-1] + (1,)
    return out.reshape(x.shape), (x, mean.reshape(lead), rstd.reshape(lead), w)


@kernels.twin(kernels.layernorm_backward)  # a GPU: two fused kernels
def backward(dout: Any, cache: tuple, dw: Any, db: Any = None) -> Any:
    with fused(array_module(dout)):             # a GPU: one kernel for dx, one pass for dw, db
        return _backward(dout, cache, dw, db)


def _backward(dout: Any, cache: tuple, dw: Any, db: Any) -> Any:
    x, mean, rstd, w = cache
    xp = array_module(x)
    C = x.shape[-1]
    x2, d2 = x.reshape(-1, C), dout.reshape(-1, C)  # (N, C)
    m2, r2 = mean.reshape(-1, 1), rstd.reshape(-1, 1)  # (N, 1)
    dx = xp.empty_like(x2)
    dwn = xp.empty(x2.shape, dtype=compute_dtype(x.dtype))  # dout * n, summed over rows at the end

    def block(xs: Any, ds: Any, ms: Any, rs: Any, dn: Any, dwns: Any) -> None:
        n = xp.subtract(xs, ms)                     # n recomputed to save memory
        n *= rs
        xp.multiply(ds, n, out=dwns)
        xp.multiply(ds, w, out=dn)                  # dn
        dn_mean = dn.mean(axis=-1, keepdims=True)   # (rows, 1)
        dnn = xp.multiply(dn, n)
        dnn_mean = dnn.sum(axis=-1, keepdims=True) / C  # (rows, 1)
        dn -= dn_mean
        n *= dnn_mean
        dn -= n
        dn *= rs                                    # dx

    for_each_block_of(xp, (x2, d2, m2, r2, dx, dwn), (4,), block)
    dw += dwn.sum(axis=0)                           # (C,)
    if db is not None:
        db += d2.sum(axis=0, dtype=dwn.dtype)       # (C,), summed in float32 if 16-bit
    return dx.reshape(dout.shape)
