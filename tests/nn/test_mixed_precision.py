"""Each layer's 16-bit forward against its fp32 forward (mixed precision, optim/mixed.py).

The inputs are drawn, rounded to the 16-bit type and handed to both: the fp32 run sees the
very same numbers as float32. A layer that computes in float32 and rounds its output once
(linear: 16-bit inputs, float32 accumulation; layer norm, GELU: the chain in float32)
then differs from the fp32 result by the output's rounding only: at most half a unit in
the last place, eps / 2 relative, with eps = 2^-7 (bfloat16) or 2^-10 (float16); the bound
asserted is eps relative (one rounding, and float32's own differences of summation order,
~1e-7, far below). Attention rounds four intermediate tensors (qkv, the probabilities, y
before the output projection, the output): its bound is 8 eps of the output's scale. A
layer that accumulated in 16 bits would miss these bounds by far (a 64-term bfloat16 dot
product carries ~8 eps). The loss is computed in float32 from the same logits: equal to
float32 rounding (1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest

from mpipar import backend
from mpipar.nn import attention, crossentropy, embedding, gelu, layernorm, linear

HALF = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}     # eps: the spacing of [1, 2)


def _draw(rng, shape, dtype, scale=1.0):
    """(16-bit array, the same values as float32)."""
    h = (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)
    return h, h.astype(np.float32)


def _close(got, want, eps, k=1.0, scale=None):
    got = np.asarray(got).astype(np.float32)
    bound = k * eps * (np.abs(want) if scale is None else scale) + 1e-6
    err = np.abs(got - want)
    assert (err <= bound).all(), float((err / bound).max())


@pytest.mark.parametrize("dtype", list(HALF))
def test_linear_rounds_once(dtype):
    rng, eps = np.random.default_rng(0), HALF[dtype]
    x, x32 = _draw(rng, (4, 8, 64), dtype)
    w, w32 = _draw(rng, (48, 64), dtype, 0.1)
    out, _ = linear.forward(x, w)
    want, _ = linear.forward(x32, w32)
    assert out.dtype == np.dtype(dtype)
    _close(out, want, eps)
    # backward: dx rounded once too; dw accumulates the rounded product into zeros
    d, d32 = _draw(rng, (4, 8, 48), dtype)
    dw, dw32 = np.zeros((48, 64), dtype), np.zeros((48, 64), np.float32)
    _close(linear.backward(d, (x, w), dw), linear.backward(d32, (x32, w32), dw32), eps)
    _close(dw, dw32, eps)


@pytest.mark.parametrize("dtype", list(HALF))
def test_layernorm_and_gelu_compute_in_float32(dtype):
    rng, eps = np.random.default_rng(1), HALF[dtype]
    x, x32 = _draw(rng, (4, 8, 64), dtype, 3.0)
    w, w32 = _draw(rng, (64,), dtype)
    b, b32 = _draw(rng, (64,), dtype)
    out, cache = layernorm.forward(x, w, b)
    want, _ = layernorm.forward(x32, w32, b32)
    assert out.dtype == np.dtype(dtype) and cache[1].dtype == np.float32   # mean, rstd: fp32
    _close(out, want, eps)
    g, gcache = gelu.forward(x)
    gwant, _ = gelu.forward(x32)
    assert g.dtype == gcache[1].dtype == np.dtype(dtype)                  # output and tanh kept
    _close(g, gwant, eps)


@pytest.mark.parametrize("dtype", list(HALF))
def test_attention_within_its_roundings(dtype):
    rng, eps = np.random.default_rng(2), HALF[dtype]
    B, T, C, NH = 2, 96, 32, 4                     # T > QUERY_BLOCK: several causal tiles
    x, x32 = _draw(rng, (B, T, C), dtype)
    wa, wa32 = _draw(rng, (3 * C, C), dtype, 0.2)
    ba, ba32 = _draw(rng, (3 * C,), dtype, 0.1)
    wp, wp32 = _draw(rng, (C, C), dtype, 0.2)
    bp, bp32 = _draw(rng, (C,), dtype, 0.1)
    out, _ = attention.forward(x, wa, ba, wp, bp, NH)
    want, _ = attention.forward(x32, wa32, ba32, wp32, bp32, NH)
    assert out.dtype == np.dtype(dtype)
    _close(out, want, eps, k=8, scale=np.abs(want).max())


@pytest.mark.parametrize("dtype", list(HALF))
def test_cross_entropy_loss_is_float32(dtype):
    rng = np.random.default_rng(3)
    logits, l32 = _draw(rng, (64, 97), dtype, 4.0)
    t = rng.integers(0, 97, 64)
    loss, (p, _) = crossentropy.forward(logits, t)
    want, (p32, _) = crossentropy.forward(l32, t)
    assert np.asarray(loss).dtype == np.float32 and p.dtype == np.dtype(dtype)
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    _close(p, p32, HALF[dtype])


@pytest.mark.parametrize("dtype", list(HALF))
def test_embedding_sums_positions_in_float32(dtype):
    rng, eps = np.random.default_rng(4), HALF[dtype]
    wte, wte32 = _draw(rng, (50, 16), dtype)
    wpe, wpe32 = _draw(rng, (8, 16), dtype)
    idx = rng.integers(0, 50, (3, 8))
    out, cache = embedding.forward(idx, wte, wpe)
    want, _ = embedding.forward(idx, wte32, wpe32)
    _close(out, want, eps)                         # one addition, rounded once
    d, d32 = _draw(rng, (3, 8, 16), dtype)
    dwpe, dwpe32 = np.zeros((8, 16), dtype), np.zeros((8, 16), np.float32)
    embedding.backward(d, cache, np.zeros((50, 16), dtype), dwpe)
    embedding.backward(d32, cache, np.zeros((50, 16), np.float32), dwpe32)
    _close(dwpe, dwpe32, eps)                      # summed over the batch in fp32, rounded once


def test_matmul_of_wider_types_is_numpys_own():
    rng = np.random.default_rng(5)
    for dt in (np.float32, np.float64):
        a, b = rng.standard_normal((5, 7)).astype(dt), rng.standard_normal((7, 3)).astype(dt)
        assert np.array_equal(backend.matmul(a, b), a @ b)
        out = np.empty((5, 3), dt)
        backend.matmul(a, b, out=out)
        assert np.array_equal(out, a @ b)
