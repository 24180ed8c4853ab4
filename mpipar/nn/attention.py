"""Causal multi-head self-attention (Vaswani et al. 2017; GPT-2 layout), maths only.

Math, for x: (B, T, C), NH heads of size hs (the heads given, not necessarily all)::

    qkv  = x Wa^T + ba                           (B, T, 3 NH hs)  laid out [q | k | v]
    att  = softmax(q k^T / sqrt(hs) + mask)      (B, NH, T, T)    mask: -inf above diagonal
    y    = att v                                 (B, NH, T, hs) -> (B, T, NH hs)
    out  = y Wp^T (+ bp)                         (B, T, OC)

Backward (softmax: d pre = att * (d att - sum_j d att * att))::

    dv   = att^T dy          d att = dy v^T
    dpre = att * (d att - rowsum(d att * att))
    dq   = dpre k / sqrt(hs) dk = dpre^T q / sqrt(hs)

Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): a rank holding heads h0..h1 passes
the rows of ``c_attn`` for those heads (``qkv_rows``), the matching columns of ``c_proj``
and ``c_proj_b=None``; its ``out`` is a partial sum that the caller all-reduces before
adding the bias, and its ``dx`` is a partial gradient that the caller all-reduces. No
communication happens here.

The cache keeps the input x, qkv and y, and what ``probabilities`` keeps of the softmax
(the pre-softmax scores are never kept: softmax backward needs only its output):

* ``KEEP`` (recompute "none"): the probabilities (B, NH, T, T) and, with attention dropout,
  its mask (B, NH, T, T);
* ``RECOMPUTE`` (recompute "selective", Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", section 4.3): nothing of size T x T, only the
  dropout generator's state (``dropout.snapshot``). Backward recomputes the scores and the
  softmax from the cached q and k, and redraws the dropout mask, with the very operations of
  forward, so gradients are bitwise those of ``KEEP``, for one extra (B, NH, T, T) matmul
  and softmax per backward.
"""

from __future__ import annotations

import functools
import math
import threading
import weakref
from typing import Any

import numpy as np

from mpipar import kernels
from mpipar.backend import array_module
from mpipar.nn import dropout as dropout_op
from mpipar.nn import linear
from mpipar.nn.blocking import for_each_block


@functools.lru_cache(maxsize=32)
def _host_mask(T: int, dtype: str) -> np.ndarray:
    m = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)  # (T, T)
    m.flags.writeable = False                   # shared by every thread of the process
    return m


_thread_masks = threading.local()               # .masks: {module: {(T, dtype): array}}


def causal_mask(T: int, dtype: Any, xp: Any = np) -> Any:
    """Additive causal mask (T, T): 0 on and below the diagonal, -inf above.

    NumPy's is built once per (T, dtype) for the process, read-only. Another array module's
    (the simulator's namespace; a GPU module, whose fused softmax needs none) is copied once
    per thread, on that thread: a copy made on one thread's stream and device is never read
    from another's."""
    host = _host_mask(int(T), np.dtype(dtype).name)
    if xp is np:
        return host
    masks = _thread_masks.__dict__.setdefault("masks", weakref.WeakKeyDictionary())
    per_module = masks.setdefault(xp, {})
    key = host.shape[0], host.dtype.name
    if key not in per_module:
        per_module[key] = xp.asarray(host)
    return per_module[key]


def qkv_rows(C: int, NH: int, h0: int, h1: int) -> np.ndarray:
    """Row indices of the full c_attn weight (3C, C) / bias (3C,) for heads h0..h1-1.

    The full layout is [q heads 0..NH-1 | k heads | v heads]; a shard of heads takes the
    same head range from each third, so its own layout is again [q | k | v].
    """
    hs = C // NH
    idx = [np.arange(part * C + h0 * hs, part * C + h1 * hs) for part in range(3)]
    return np.concatenate(idx)


# ---- causal blocks: on the CPU, products over the zeros above the diagonal are skipped --------
# The probabilities of a causal head, and their gradient after the softmax backward, are zero
# above the diagonal. On NumPy the products that take them as the left operand skip those
# zeros: with the positions cut into blocks of QUERY_BLOCK, query block [r0, r1) of
# ``att @ v`` (and of dq) sums over keys [0, r1) only, and key block [c0, c1) of
# ``att^T @ dy`` (and of dk) over queries [c0, T) only: 10 of 16 tiles at T = 256 and blocks
# of 64, for four of the six (B, NH, T, T) products of a step. The scores, d att and the two
# softmax passes stay whole: cut the same way they were slower here (the smaller products
# write strided tiles; the softmax becomes 4x the NumPy calls on quarter-size rows), measured
# on the shakespeare model (docs/results/cpu-speed.md). Anything else (CuPy, the simulator's
# symbolic arrays) is one block [0, T): the whole product, as one kernel.
QUERY_BLOCK = 64


def causal_blocks(xp: Any, T: int) -> list[tuple[int, int]]:
    """The query blocks ``[(r0, r1), ...]`` covering ``[0, T)`` (one block off NumPy)."""
    step = T if xp is not np else QUERY_BLOCK
    return [(r0, min(r0 + step, T)) for r0 in range(0, T, step)]


def _causal_matmul(a: Any, b: Any, out: Any, xp: Any) -> None:
    """``out = a @ b`` for a causal (B, NH, T, T) ``a`` (zero above the diagonal) and
    (B, NH, T, hs) ``b``: query block [r0, r1) sums over keys [0, r1) only."""
    for r0, r1 in causal_blocks(xp, a.shape[-1]):
        xp.matmul(a[:, :, r0:r1, :r1], b[:, :, :r1, :], out=out[:, :, r0:r1, :])


def _causal_matmul_t(a: Any, b: Any, out: Any, xp: Any) -> None:
    """``out = a^T @ b`` (transposing the last two axes of ``a``) for a causal ``a``: key
    block [c0, c1) of the result sums over queries [c0, T) only."""
    for c0, c1 in causal_blocks(xp, a.shape[-1]):
        xp.matmul(a[:, :, c0:, c0:c1].transpose(0, 1, 3, 2), b[:, :, c0:, :],
                  out=out[:, :, c0:c1, :])


def _softmax_(att: Any, mask: Any, xp: Any) -> None:
    """In place: att = softmax(att + mask) over the last axis, (T, T) slab blocks at a time."""
    B, NH, T, _ = att.shape
    a3 = att.reshape(B * NH, T, T)              # (B*NH, T, T) view
    def block(s: slice) -> None:
        a = a3[s]
        a += mask
        a -= a.max(axis=-1, keepdims=True)      # stable: the row max is on the diagonal or left
        xp.exp(a, out=a)
        a *= 1.0 / a.sum(axis=-1, keepdims=True)

    for_each_block(xp, B * NH, T * T, block)


@kernels.twin(kernels.softmax_backward_)   # a GPU: one fused kernel
def _softmax_backward_(datt: Any, att: Any, xp: Any) -> None:
    """In place: datt = att * (datt - rowsum(datt * att)); masked entries have att = 0."""
    B, NH, T, _ = att.shape
    d3, a3 = datt.reshape(B * NH, T, T), att.reshape(B * NH, T, T)
    def block(s: slice) -> None:
        d, a = d3[s], a3[s]
        d -= (d * a).sum(axis=-1, keepdims=True)  # (n, T, 1) broadcast
        d *= a

    for_each_block(xp, B * NH, T * T, block)


@kernels.twin(kernels.causal_softmax_)     # a GPU: one fused kernel, no mask array
def causal_softmax_(att: Any) -> None:
    """In place: att (B, NH, T, T) = softmax(att + causal mask) over the last axis."""
    xp = array_module(att)
    _softmax_(att, causal_mask(att.shape[-1], att.dtype, xp), xp)


def _probabilities(q: Any, k: Any, p: float, rng: Any) -> tuple[Any, Any]:
    """``(att, mask)``: softmax(q k^T / sqrt(hs) + causal mask) (B, NH, T, T) and the dropout
    mask drawn from ``rng`` (None when p == 0). Forward and recompute both call this."""
    xp = array_module(q)
    T, hs = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(hs)                 # a Python float: keeps float32 float32
    att = (q * scale) @ k.transpose(0, 1, 3, 2)  # (B, NH, T, T) scores
    causal_softmax_(att)                        # (B, NH, T, T) probabilities
    drop = dropout_op.mask(att.shape, att.dtype, p, rng) if p > 0.0 else None
    return att, drop


class KeepProbabilities:
    """Recompute "none": the cache keeps the probabilities and the dropout mask."""

    def keep(self, q: Any, k: Any, p: float, rng: Any) -> tuple[Any, Any, Any]:
        """``(att, mask, kept)``: forward's probabilities and mask, and what the cache keeps."""
        att, drop = _probabilities(q, k, p, rng)
        return att, drop, (att, drop)

    def restore(self, kept: Any, q: Any, k: Any) -> tuple[Any, Any]:
        """``(att, mask)`` for backward, from ``kept`` (and q, k)."""
        return kept


class RecomputeProbabilities(KeepProbabilities):
    """Recompute "selective": the cache keeps the dropout generator's state only; backward
    recomputes the probabilities from q, k and redraws the mask."""

    def keep(self, q: Any, k: Any, p: float, rng: Any) -> tuple[Any, Any, Any]:
        saved = dropout_op.snapshot(rng) if p > 0.0 else None   # before forward draws
        att, drop = _probabilities(q, k, p, rng)
        return att, drop, (p, saved)

    def restore(self, kept: Any, q: Any, k: Any) -> tuple[Any, Any]:
        p, saved = kept
        return _probabilities(q, k, p, saved)


KEEP = KeepProbabilities()
RECOMPUTE = RecomputeProbabilities()


def forward(x: Any, c_attn_w: Any, c_attn_b: Any, c_proj_w: Any, c_proj_b: Any, NH: int,
            attn_dropout: float = 0.0, rng: Any = None,
            probabilities: KeepProbabilities = KEEP) -> tuple[Any, tuple]:
    """Attention over the NH heads whose weights are given; returns ``(out, cache)``.

    ``c_attn_w`` (3 NH hs, C), ``c_attn_b`` (3 NH hs,) or None, ``c_proj_w`` (OC, NH hs),
    ``c_proj_b`` (OC,) or None. ``attn_dropout`` > 0 drops attention probabilities (needs ``rng``).
    ``probabilities``: ``KEEP`` or ``RECOMPUTE`` (what the cache keeps of the softmax).
    """
    xp = array_module(x)
    B, T, C = x.shape
    H = c_attn_w.shape[0] // 3                  # NH * hs of this shard
    hs = H // NH
    qkv, lin1 = linear.forward(x, c_attn_w, c_attn_b)  # (B, T, 3H)
    qkv5 = qkv.reshape(B, T, 3, NH, hs)
    q = qkv5[:, :, 0].transpose(0, 2, 1, 3)     # (B, NH, T, hs) strided view
    k = qkv5[:, :, 1].transpose(0, 2, 1, 3)     # (B, NH, T, hs)
    v = qkv5[:, :, 2].transpose(0, 2, 1, 3)     # (B, NH, T, hs)
    att, drop, kept = probabilities.keep(q, k, attn_dropout, rng)  # (B, NH, T, T)
    att_used = dropout_op.forward_with(att, drop)
    y = xp.empty((B, T, NH, hs), dtype=x.dtype)  # (B, T, NH, hs): heads side by side
    _causal_matmul(att_used, v, y.transpose(0, 2, 1, 3), xp)  # (B, NH, T, hs) view of y
    y = y.reshape(B, T, H)                      # (B, T, H)
    out, lin2 = linear.forward(y, c_proj_w, c_proj_b)  # (B, T, OC)
    return out, (lin1, qkv, probabilities, kept, lin2, NH)


def backward(dout: Any, cache: tuple, dc_attn_w: Any, dc_attn_b: Any, dc_proj_w: Any,
             dc_proj_b: Any) -> Any:
    """Accumulate the four weight gradients (None for absent biases); return dx (B, T, C)."""
    lin1, qkv, probabilities, kept, lin2, NH = cache
    xp = array_module(qkv)
    B, T, H3 = qkv.shape
    H = H3 // 3
    hs = H // NH
    scale = 1.0 / math.sqrt(hs)                 # a Python float: keeps float32 float32
    dy = linear.backward(dout, lin2, dc_proj_w, dc_proj_b)  # (B, T, H)
    dy = dy.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)  # (B, NH, T, hs)
    qkv5 = qkv.reshape(B, T, 3, NH, hs)
    q = qkv5[:, :, 0].transpose(0, 2, 1, 3)     # (B, NH, T, hs)
    k = qkv5[:, :, 1].transpose(0, 2, 1, 3)
    v = qkv5[:, :, 2].transpose(0, 2, 1, 3)
    att, drop = probabilities.restore(kept, q, k)  # (B, NH, T, T) and its dropout mask
    # dropped probabilities are recomputed from att and the mask rather than cached
    att_used = att if drop is None else dropout_op.forward_with(att, drop)
    # the products are written straight into their slots of dqkv (no transpose copies)
    dqkv = xp.empty((B, T, 3, NH, hs), dtype=qkv.dtype)  # (B, T, 3, NH, hs)
    slot = lambda i: dqkv[:, :, i].transpose(0, 2, 1, 3)  # noqa: E731  (B, NH, T, hs)
    _causal_matmul_t(att_used, dy, slot(2), xp)  # dv
    datt = dy @ v.transpose(0, 1, 3, 2)         # (B, NH, T, T)
    if drop is not None:
        datt = dropout_op.backward(datt, drop)
    _softmax_backward_(datt, att, xp)           # (B, NH, T, T) d scores / scale
    _causal_matmul(datt, k * scale, slot(0), xp)  # dq; scaling k costs less than scaling datt
    _causal_matmul_t(datt, q * scale, slot(1), xp)  # dk
    return linear.backward(dqkv.reshape(B, T, H3), lin1, dc_attn_w, dc_attn_b)  # (B, T, C)
