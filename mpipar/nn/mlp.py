"""Transformer MLP: column-parallel-ready ``c_fc``, GELU, row-parallel-ready ``c_proj``.

Math (x: (B, T, C), hidden width F, 4C in GPT-2)::

    h   = x Wfc^T + bfc          (B, T, F)
    a   = gelu(h)                (B, T, F)
    out = a Wproj^T (+ bproj)    (B, T, OC)

Tensor parallelism (Megatron-LM): a rank passes its rows of ``c_fc`` (a slice of F), the
matching columns of ``c_proj`` and ``c_proj_b=None``; ``out`` and ``dx`` are then partial
sums that the caller all-reduces (and the caller adds the bias after the reduce).

The cache keeps x, h, GELU's tanh and a (a is needed for dWproj; recomputing it would cost
three passes).
"""

from __future__ import annotations

from typing import Any

from mpipar.nn import gelu, linear


def forward(x: Any, c_fc_w: Any, c_fc_b: Any, c_proj_w: Any, c_proj_b: Any) -> tuple[Any, tuple]:
    h, fc_cache = linear.forward(x, c_fc_w, c_fc_b)        # (B, T, F)
    a, gelu_cache = gelu.forward(h)                        # (B, T, F)
    out, proj_cache = linear.forward(a, c_proj_w, c_proj_b)  # (B, T, OC)
    return out, (fc_cache, gelu_cache, proj_cache)


def backward(dout: Any, cache: tuple, dc_fc_w: Any, dc_fc_b: Any, dc_proj_w: Any,
             dc_proj_b: Any) -> Any:
    """Accumulate the weight gradients (None for absent biases); return dx (B, T, C)."""
    fc_cache, gelu_cache, proj_cache = cache
    da = linear.backward(dout, proj_cache, dc_proj_w, dc_proj_b)  # (B, T, F)
    dh = gelu.backward(da, gelu_cache)                            # (B, T, F)
    return linear.backward(dh, fc_cache, dc_fc_w, dc_fc_b)        # (B, T, C)
