"""GELU, tanh approximation (Hendrycks & Gimpel 2016), as GPT-2 uses it.

Math, with k = sqrt(2/pi), a = 0.044715::

    u    = k (x + a x^3) = x (k + k a x^2)
    t    = tanh(u)
    out  = 0.5 x (1 + t)
    dx   = dout * (0.5 (1 + t) + (1 - t^2) (0.5 k x + 1.5 k a x^3))

The cache is the input x and t = tanh(u). Keeping t costs one (B, T, 4C) array per layer
but saves recomputing the transcendental in backward (about half of the backward time).

NumPy has no fused elementwise kernels, so the cost is the number of passes over memory;
the passes run block by block over rows (``blocking.row_blocks``), so a block stays in
cache from the first pass to the last. 16-bit arrays (mixed precision): each block computed
in float32, ``out``, ``t`` and ``dx`` stored in 16 bits (``blocking.for_each_block_of``).
"""

from __future__ import annotations

import math
from typing import Any

from mpipar import kernels
from mpipar.backend import array_module
from mpipar.nn.blocking import for_each_block_of

K = math.sqrt(2.0 / math.pi)
A = 0.044715


def _forward_block(x: Any, t: Any, out: Any, xp: Any) -> None:
    xp.multiply(x, x, out=t)                    # x^2
    t *= K * A
    t += K
    t *= x                                      # u
    xp.tanh(t, out=t)                           # t = tanh(u)
    xp.add(t, 1.0, out=out)
    out *= x
    out *= 0.5                                  # 0.5 x (1 + t)


def _backward_block(dout: Any, x: Any, t: Any, dx: Any, w: Any, xp: Any) -> None:
    xp.multiply(x, x, out=w)                    # x^2
    w *= 1.5 * K * A
    w += 0.5 * K
    w *= x                                      # 0.5 k x + 1.5 k a x^3
    xp.multiply(t, t, out=dx)
    xp.subtract(1.0, dx, out=dx)                # 1 - t^2
    dx *= w
    xp.multiply(t, 0.5, out=w)                  # reuse w: 0.5 t
    w += 0.5
    dx += w                                     # d out / d x
    dx *= dout


@kernels.twin(kernels.gelu_forward)      # a GPU: one fused kernel
def forward(x: Any) -> tuple[Any, tuple]:
    xp = array_module(x)
    x2 = x.reshape(-1, x.shape[-1])             # (N, F)
    t, out = xp.empty_like(x2), xp.empty_like(x2)
    for_each_block_of(xp, (x2, t, out), (1, 2), lambda x, ts, o: _forward_block(x, ts, o, xp))
    return out.reshape(x.shape), (x2, t)


@kernels.twin(kernels.gelu_backward)
def backward(dout: Any, cache: tuple) -> Any:
    x2, t = cache
    xp = array_module(t)
    d2 = dout.reshape(x2.shape)                 # (N, F)
    dx = xp.empty_like(x2)
    for_each_block_of(xp, (d2, x2, t, dx), (3,),  # each block gets its own scratch
                      lambda d, x, ts, g: _backward_block(d, x, ts, g, xp.empty_like(ts), xp))
    return dx.reshape(dout.shape)
