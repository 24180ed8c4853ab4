"""Token plus position embedding.

Math (idx: (B, T) ints, wte: (V, C), wpe: (maxT, C))::

    out[b, t]       = wte[idx[b, t]] + wpe[t]        (B, T, C)
    dwte[idx[b, t]] += dout[b, t]                     scatter-add (repeated tokens add up)
    dwpe[t]         += sum_b dout[b, t]

The cache is ``idx`` only. The scatter-add is ``xp.add.at`` (CuPy has ``ufunc.at`` since v12).
"""

from __future__ import annotations

from typing import Any

from mpipar.backend import array_module


def forward(idx: Any, wte: Any, wpe: Any) -> tuple[Any, tuple]:
    B, T = idx.shape
    if T > wpe.shape[0]:
        raise ValueError(f"sequence length {T} exceeds block_size {wpe.shape[0]}")
    out = wte[idx]                              # (B, T, C) gather
    out += wpe[:T]
    return out, (idx,)


def backward(dout: Any, cache: tuple, dwte: Any, dwpe: Any) -> None:
    """Accumulate into ``dwte`` and ``dwpe``; there is no input gradient."""
    (idx,) = cache
    xp = array_module(dout)
    B, T, C = dout.shape
    xp.add.at(dwte, idx.reshape(-1), dout.reshape(-1, C))  # (V, C) scatter-add
    dwpe[:T] += dout.sum(axis=0)                # (T, C)
