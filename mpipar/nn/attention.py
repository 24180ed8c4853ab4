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

Mixed precision (16-bit x and weights): every product is ``backend.matmul`` (16-bit inputs,
float32 accumulation, rounded once), the softmax and its backward run block by block in
float32 (``blocking.for_each_block_of``), and what is kept is 16-bit.

The cache keeps the input x, qkv and y, and what ``probabilities`` keeps of the softmax
(the pre-softmax scores are never kept: softmax backward needs only its output):

* ``KEEP`` (recompute "none"): the probabilities and, with attention dropout, its mask
  (B, NH, T, T); on the CPU the probabilities' causal tiles only (``causal_blocks``), and
  views of the mask over the same tiles (the mask itself is drawn, and so kept, whole);
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
from mpipar.backend import array_module, matmul
from mpipar.nn import dropout as dropout_op
from mpipar.nn import linear
from mpipar.nn.blocking import for_each_block_of


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


# ---- causal tiles: on the CPU, work above the diagonal is skipped -----------------------------
# A causal head's scores, probabilities and their gradients are zero (or -inf) above the
# diagonal. On NumPy the positions are cut into query blocks of QUERY_BLOCK, and query block
# [r0, r1) keeps its scores over keys [0, r1) only, as its own contiguous array
# (B, NH, r1 - r0, r1): at T = 256 and blocks of 64, 10 of the 16 tiles of 64 x 64. Every
# T x T step of a layer works on those arrays alone: the scores, the softmax (which masks
# only the diagonal tile), att v, and backward's d att, softmax backward and the three
# products, so about 5/8 of the dense work and of the probabilities' memory (torch's CPU
# flash attention skips the same tiles). Each array is a whole matrix per head, so its
# products are plain GEMMs writing contiguous rows. Anything else (CuPy, the simulator's
# symbolic arrays) is one block [0, T): one square array, each step one kernel.
QUERY_BLOCK = 64


def causal_blocks(xp: Any, T: int) -> list[tuple[int, int]]:
    """The query blocks ``[(r0, r1), ...]`` covering ``[0, T)`` (one block off NumPy)."""
    step = T if xp is not np else QUERY_BLOCK
    return [(r0, min(r0 + step, T)) for r0 in range(0, T, step)]


def _softmax_(att: Any, mask: Any, xp: Any) -> None:
    """In place: att (B, NH, n, L) = softmax(att + mask) over the last axis, where the rows
    are the last n of L positions and ``mask`` (n, n) is added to the last n columns; cache
    blocks of whole (n, L) slabs at a time."""
    B, NH, n, L = att.shape
    a3 = att.reshape(B * NH, n, L)              # (B*NH, n, L) view
    def block(a: Any) -> None:
        a[:, :, L - n:] += mask
        a -= a.max(axis=-1, keepdims=True)      # stable: the row max is on the diagonal or left
        xp.exp(a, out=a)
        a *= 1.0 / a.sum(axis=-1, keepdims=True)

    for_each_block_of(xp, (a3,), (0,), block)   # 16-bit: each block in float32


@kernels.twin(kernels.softmax_backward_)   # a GPU: one fused kernel
def _softmax_backward_(datt: Any, att: Any, xp: Any) -> None:
    """In place: datt = att * (datt - rowsum(datt * att)) over the last axis; masked entries
    have att = 0."""
    *lead, L = att.shape
    rows = math.prod(lead)
    d2, a2 = datt.reshape(rows, L), att.reshape(rows, L)
    def block(d: Any, a: Any) -> None:
        d -= (d * a).sum(axis=-1, keepdims=True)  # (n, 1) broadcast
        d *= a

    for_each_block_of(xp, (d2, a2), (0,), block)


@kernels.twin(kernels.causal_softmax_)     # a GPU: one fused kernel, no mask array
def causal_softmax_(att: Any) -> None:
    """In place: att (B, NH, n, L) = softmax(att + causal mask) over the last axis, its n
    rows being the last n of L positions (n = L: the whole square (T, T) scores; the fused
    GPU kernel takes the square only, which is all a GPU is given)."""
    xp = array_module(att)
    _softmax_(att, causal_mask(att.shape[-2], att.dtype, xp), xp)


def _tiles(a: Any, blocks: list[tuple[int, int]]) -> list[Any]:
    """Views of a (B, NH, T, T) array over the causal tiles: [a[..., r0:r1, :r1], ...]."""
    return [a[:, :, r0:r1, :r1] for r0, r1 in blocks]


def _probabilities(q: Any, k: Any, p: float, rng: Any) -> tuple[list, list | None]:
    """``(att, mask)``: per query block [r0, r1) of ``causal_blocks``, softmax(q k^T / sqrt(hs)
    + causal mask) over keys [0, r1), (B, NH, r1 - r0, r1), and the dropout mask's view of
    the same tile (the mask is drawn whole, (B, NH, T, T), from ``rng``, so it is the same
    draw however the positions are cut; None when p == 0). Forward and recompute both call
    this."""
    xp = array_module(q)
    T, hs = q.shape[-2], q.shape[-1]
    blocks = causal_blocks(xp, T)
    scale = 1.0 / math.sqrt(hs)                 # a Python float: keeps float32 float32
    qs, kt = q * scale, k.transpose(0, 1, 3, 2)  # (B, NH, T, hs), (B, NH, hs, T)
    att = []
    for r0, r1 in blocks:
        a = matmul(qs[:, :, r0:r1], kt[:, :, :, :r1])  # (B, NH, r1 - r0, r1) scores
        causal_softmax_(a)                      # probabilities
        att.append(a)
    drop = None
    if p > 0.0:
        drop = _tiles(dropout_op.mask(q.shape[:2] + (T, T), q.dtype, p, rng), blocks)
    return att, drop


def _dropped(att: list, drop: list | None) -> list:
    """The probabilities after dropout, tile by tile (``att`` itself without dropout)."""
    return att if drop is None else [dropout_op.forward_with(a, m) for a, m in zip(att, drop)]


def _accumulate_matmul(a: Any, b: Any, out: Any, first: bool, xp: Any) -> None:
    """``out = a @ b`` when ``first``, else ``out += a @ b`` (a product summed over tiles)."""
    if first:
        matmul(a, b, out=out)
    else:
        out += matmul(a, b)


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
    att, drop, kept = probabilities.keep(q, k, attn_dropout, rng)  # tiles (B, NH, n, r1)
    y = xp.empty((B, T, NH, hs), dtype=x.dtype)  # (B, T, NH, hs): heads side by side
    yh = y.transpose(0, 2, 1, 3)                # (B, NH, T, hs) view of y
    for (r0, r1), a in zip(causal_blocks(xp, T), _dropped(att, drop)):
        matmul(a, v[:, :, :r1], out=yh[:, :, r0:r1])  # query block: keys [0, r1) only
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
    att, drop = probabilities.restore(kept, q, k)  # tiles (B, NH, n, r1), their masks
    att_used = _dropped(att, drop)              # recomputed from att and the mask, not cached
    # the products are written straight into their slots of dqkv (no transpose copies); dk
    # and dv sum over query blocks, the last (which spans every key) first, written not added
    dqkv = xp.empty((B, T, 3, NH, hs), dtype=qkv.dtype)  # (B, T, 3, NH, hs)
    dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, NH, T, hs)
    qs, ks = q * scale, k * scale               # scaling q, k costs less than scaling d att
    vt = v.transpose(0, 1, 3, 2)                # (B, NH, hs, T)
    blocks = causal_blocks(xp, T)
    for i in reversed(range(len(blocks))):
        r0, r1 = blocks[i]
        first = i == len(blocks) - 1
        dyb = dy[:, :, r0:r1]                   # (B, NH, n, hs)
        _accumulate_matmul(att_used[i].transpose(0, 1, 3, 2), dyb, dv[:, :, :r1], first, xp)
        datt = matmul(dyb, vt[:, :, :, :r1])    # (B, NH, n, r1)
        if drop is not None:
            datt = dropout_op.backward(datt, drop[i])
        _softmax_backward_(datt, att[i], xp)    # d scores / scale
        matmul(datt, ks[:, :, :r1], out=dq[:, :, r0:r1])
        _accumulate_matmul(datt.transpose(0, 1, 3, 2), qs[:, :, r0:r1], dk[:, :, :r1], first,
                           xp)
    return linear.backward(dqkv.reshape(B, T, H3), lin1, dc_attn_w, dc_attn_b)  # (B, T, C)
