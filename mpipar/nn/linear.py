"""Linear layer: ``out = x @ w.T + b`` with PyTorch's weight layout ``w: (OC, C)``.

Math (x: (..., C), w: (OC, C), b: (OC,))::

    out  = x w^T + b                 (..., OC)
    dx   = dout w                    (..., C)
    dw  += dout^T x                  (OC, C)    summed over all leading positions
    db  += sum(dout)                 (OC,)

All leading dimensions are folded into one so every product is a single 2-D GEMM.
16-bit inputs (mixed precision) are multiplied in float32 and rounded once
(``backend.matmul``); the bias and the accumulation into ``dw``, ``db`` are in the tensors'
own dtype. The same functions serve a column-parallel shard (rows of ``w``) or a row-parallel one
(columns of ``w``, with ``b=None`` and the bias added after the all-reduce).
"""

from __future__ import annotations

from typing import Any

from mpipar.backend import compute_dtype, matmul


def forward(x: Any, w: Any, b: Any = None) -> tuple[Any, tuple]:
    """``out (..., OC)``; the cache is ``(x, w)`` (inputs are kept, not copied)."""
    OC, C = w.shape
    x2 = x.reshape(-1, C)                       # (N, C)
    out = matmul(x2, w.T)                       # (N, OC)
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], OC), (x, w)


def backward(dout: Any, cache: tuple, dw: Any, db: Any = None, need_dx: bool = True) -> Any:
    """Accumulate ``dw`` (and ``db``); return ``dx`` (None when ``need_dx`` is False)."""
    x, w = cache
    OC, C = w.shape
    dout2 = dout.reshape(-1, OC)                # (N, OC)
    dw += matmul(dout2.T, x.reshape(-1, C))     # (OC, C)
    if db is not None:
        db += dout2.sum(axis=0, dtype=compute_dtype(dout2.dtype))  # (OC,), 16-bit: in fp32
    if not need_dx:
        return None
    return matmul(dout2, w).reshape(x.shape)    # (..., C)
