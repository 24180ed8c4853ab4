"""The CPU's blocked forms give the dense maths: attention's causal blocks (several blocks,
a partial last one) against a dense reference, and layer norm and the optimisers block by
block (several blocks, two threads) bitwise equal to one block."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpipar import backend
from mpipar.nn import attention, blocking, layernorm
from mpipar.optim import SGD, AdamW

B, T, C, NH = 2, 21, 12, 3            # T = 21 with blocks of 8: 8 + 8 + 5 query rows


def dense_attention(x, wa, ba, wp, NH):
    """softmax(q k^T / sqrt(hs) + mask) v over whole (T, T) products, then c_proj."""
    Bx, Tx, Cx = x.shape
    hs = Cx // NH
    q, k, v = np.split(x @ wa.T + ba, 3, axis=-1)
    q, k, v = (a.reshape(Bx, Tx, NH, hs).transpose(0, 2, 1, 3) for a in (q, k, v))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)
    s = s + np.triu(np.full((Tx, Tx), -np.inf), k=1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = (p @ v).transpose(0, 2, 1, 3).reshape(Bx, Tx, Cx)
    return y @ wp.T, p


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(attention, "QUERY_BLOCK", 8)
    monkeypatch.setattr(blocking, "BLOCK", 40)    # a few rows (or elements) per block


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, T, C)), rng.standard_normal((3 * C, C)) * 0.3,
            rng.standard_normal(3 * C) * 0.1, rng.standard_normal((C, C)) * 0.3)


def test_causal_blocks_cover_the_sequence(small_blocks):
    assert attention.causal_blocks(np, 21) == [(0, 8), (8, 16), (16, 21)]
    assert attention.causal_blocks(object(), 21) == [(0, 21)]   # off NumPy: one block


@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_attention_is_the_dense_maths(small_blocks, threads):
    x, wa, ba, wp = inputs()
    backend.set_cpu_threads(threads)
    try:
        out, cache = attention.forward(x, wa, ba, wp, None, NH)
        ref, p = dense_attention(x, wa, ba, wp, NH)
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
        tiles = cache[3][0]                        # KEEP: the probabilities' causal tiles
        assert [a.shape[2:] for a in tiles] == [(8, 8), (8, 16), (5, 21)]
        att = np.zeros((B, NH, T, T))
        for (r0, r1), a in zip(attention.causal_blocks(np, T), tiles):
            att[:, :, r0:r1, :r1] = a
        np.testing.assert_allclose(att, p, rtol=1e-12, atol=1e-15)
        # backward against the dense model's finite differences of sum(out * R)
        R = np.random.default_rng(1).standard_normal(out.shape)
        g = [np.zeros_like(a) for a in (wa, ba, wp)]
        dx = attention.backward(R, cache, g[0], g[1], g[2], None)
        eps = 1e-6
        for arr, grad in ((x, dx), (wa, g[0]), (wp, g[2])):
            for idx in [(0,) * arr.ndim, tuple(s - 1 for s in arr.shape),
                        tuple(s // 2 for s in arr.shape)]:
                old = arr[idx]
                arr[idx] = old + eps
                up = (dense_attention(x, wa, ba, wp, NH)[0] * R).sum()
                arr[idx] = old - eps
                down = (dense_attention(x, wa, ba, wp, NH)[0] * R).sum()
                arr[idx] = old
                assert abs((up - down) / (2 * eps) - grad[idx]) < 1e-6 * max(1, abs(grad[idx]))
    finally:
        backend.set_cpu_threads(1)


def test_blocked_recompute_with_dropout_is_bitwise_keep(small_blocks):
    """Selective recompute reruns the blocked scores and softmax: the same bits as keeping."""
    x, wa, ba, wp = inputs()
    R = np.random.default_rng(1).standard_normal((B, T, C))
    grads = {}
    for mode in (attention.KEEP, attention.RECOMPUTE):
        out, cache = attention.forward(x, wa, ba, wp, None, NH, 0.2,
                                       np.random.default_rng(5), mode)
        g = [np.zeros_like(a) for a in (wa, ba, wp)]
        dx = attention.backward(R, cache, g[0], g[1], g[2], None)
        grads[mode] = (out, dx, *g)
    for a, b in zip(grads[attention.KEEP], grads[attention.RECOMPUTE]):
        assert np.array_equal(a, b)


def test_tiles_with_dropout_are_the_one_block_maths(monkeypatch):
    """With attention dropout, the tiles use the same draw of the whole mask as one square
    block (a GPU's form): outputs and gradients agree to rounding (sums in another order)."""
    x, wa, ba, wp = inputs()
    R = np.random.default_rng(1).standard_normal((B, T, C))
    runs = []
    for block in (8, T):                           # three tiles; one square block
        monkeypatch.setattr(attention, "QUERY_BLOCK", block)
        out, cache = attention.forward(x, wa, ba, wp, None, NH, 0.3, np.random.default_rng(5))
        g = [np.zeros_like(a) for a in (wa, ba, wp)]
        dx = attention.backward(R, cache, g[0], g[1], g[2], None)
        runs.append((out, dx, *g))
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def _layernorm(x, w, b, d):
    out, cache = layernorm.forward(x, w, b)
    dw, db = np.zeros_like(w), np.zeros_like(b)
    dx = layernorm.backward(d, cache, dw, db)
    return out, dx, dw, db, cache[1], cache[2]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_layernorm_blocks_are_bitwise_one_block(monkeypatch, dtype):
    rng = np.random.default_rng(2)
    x, d = (rng.standard_normal((3, 7, 10)).astype(dtype) for _ in range(2))
    w, b = (rng.standard_normal(10).astype(dtype) for _ in range(2))
    whole = _layernorm(x, w, b, d)
    monkeypatch.setattr(blocking, "BLOCK", 25)     # 2 rows per block, on 2 threads
    backend.set_cpu_threads(2)
    try:
        blocked = _layernorm(x, w, b, d)
    finally:
        backend.set_cpu_threads(1)
    for a, c in zip(whole, blocked):
        assert a.dtype == np.dtype(dtype) and np.array_equal(a, c)


@pytest.mark.parametrize("make", [lambda p: AdamW(p, lr=1e-2, weight_decay=0.1),
                                  lambda p: SGD(p, lr=1e-2, momentum=0.9, nesterov=True,
                                                weight_decay=0.1)], ids=["adamw", "sgd"])
def test_optimiser_blocks_are_bitwise_one_block(monkeypatch, make):
    """Three steps over a contiguous matrix, a vector and a non-contiguous (transposed) view:
    blocks of 7 elements on two threads give the bits of the whole-tensor update."""
    rng = np.random.default_rng(3)
    shapes = {"w": (9, 5), "b": (5,), "t": (4, 6)}

    def run():
        p = {k: rng_p[k].copy() for k in shapes}
        p["t"] = rng_p["t"].copy().T.copy().T       # same values, Fortran order
        assert not p["t"].flags.c_contiguous
        opt = make(p)
        for s in range(3):
            opt.step({k: rng_g[s][k] for k in shapes})
        return p

    rng_p = {k: rng.standard_normal(s) for k, s in shapes.items()}
    rng_g = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(3)]
    whole = run()
    monkeypatch.setattr(blocking, "BLOCK", 7)
    backend.set_cpu_threads(2)
    try:
        blocked = run()
    finally:
        backend.set_cpu_threads(1)
    for k in shapes:
        assert np.array_equal(whole[k], blocked[k]), k
