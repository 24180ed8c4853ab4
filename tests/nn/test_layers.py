"""Every layer's backward against central finite differences (float64), inputs and parameters.

Each check draws a random upstream gradient R, defines f = sum(forward(...) * R), and
compares backward(R) with d f / d input and d f / d parameter, entry by entry.
"""

import numpy as np
import pytest

from mpipar.backend import to_host
from mpipar.nn import attention, block, crossentropy, dropout, embedding, gelu, layernorm, linear, mlp
from mpipar.testing.arrays import arrays_in
from nn_gradcheck import numerical_grad, rel_error

TOL = 1e-6
B, T, C, NH = 2, 5, 8, 2


def rand(xp, rng, *shape, scale=1.0):
    return xp.asarray(rng.standard_normal(shape) * scale)


def check(xp, fwd, bwd, inputs: dict, rng, tol=TOL):
    """``fwd(**inputs) -> (out, cache)``; ``bwd(dout, cache, grads) -> dx`` for input 'x'."""
    out, _ = fwd(**inputs)
    R = rand(xp, rng, *out.shape)
    grads = {k: xp.zeros_like(v) for k, v in inputs.items() if k != "x"}
    _, cache = fwd(**inputs)
    dx = bwd(R, cache, grads)

    def f():
        o, _ = fwd(**inputs)
        return float((o * R).sum())

    analytic = dict(grads, x=dx)
    for name, arr in inputs.items():
        if analytic.get(name) is None:
            continue
        num = numerical_grad(f, arr)
        err = rel_error(analytic[name], num)
        assert err < tol, f"{name}: relative error {err:.2e}"


def test_linear(xp):
    rng = np.random.default_rng(0)
    inputs = dict(x=rand(xp, rng, B, T, C), w=rand(xp, rng, 3, C), b=rand(xp, rng, 3))
    check(xp, lambda x, w, b: linear.forward(x, w, b),
          lambda d, c, g: linear.backward(d, c, g["w"], g["b"]), inputs, rng)


def test_linear_no_bias_and_accumulates(xp):
    rng = np.random.default_rng(1)
    x, w = rand(xp, rng, B, T, C), rand(xp, rng, 4, C)
    out, cache = linear.forward(x, w)
    dw = xp.zeros_like(w)
    dout = rand(xp, rng, *out.shape)
    linear.backward(dout, cache, dw)
    once = dw.copy()
    linear.backward(dout, cache, dw)
    assert np.allclose(to_host(dw), 2 * to_host(once))


def test_layernorm(xp):
    rng = np.random.default_rng(2)
    inputs = dict(x=rand(xp, rng, B, T, C, scale=2.0) + 0.5, w=rand(xp, rng, C), b=rand(xp, rng, C))
    check(xp, lambda x, w, b: layernorm.forward(x, w, b),
          lambda d, c, g: layernorm.backward(d, c, g["w"], g["b"]), inputs, rng)


def test_layernorm_normalises(xp):
    rng = np.random.default_rng(3)
    x = rand(xp, rng, B, T, C) * 3 + 1
    out, (_, mean, rstd, _) = layernorm.forward(x, xp.ones(C), xp.zeros(C))
    out = to_host(out)
    assert np.allclose(out.mean(-1), 0, atol=1e-12) and np.allclose(out.var(-1), 1, atol=1e-4)
    assert mean.shape == (B, T, 1) and rstd.shape == (B, T, 1)


def test_gelu(xp):
    rng = np.random.default_rng(4)
    inputs = dict(x=rand(xp, rng, B, T, C, scale=2.0))
    check(xp, lambda x: gelu.forward(x), lambda d, c, g: gelu.backward(d, c), inputs, rng)


def test_gelu_values():
    x = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    ref = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    out, _ = gelu.forward(x)
    assert np.allclose(out, ref, rtol=1e-14, atol=0)


def attn_inputs(xp, rng, nh=NH, c=C, bias=True):
    H = c  # NH * hs
    return dict(x=rand(xp, rng, B, T, c), wa=rand(xp, rng, 3 * H, c, scale=0.5),
                ba=rand(xp, rng, 3 * H, scale=0.5) if bias else None,
                wp=rand(xp, rng, c, H, scale=0.5), bp=rand(xp, rng, c) if bias else None)


@pytest.mark.parametrize("bias", [True, False])
def test_attention(xp, bias):
    rng = np.random.default_rng(5)
    inputs = {k: v for k, v in attn_inputs(xp, rng, bias=bias).items() if v is not None}
    check(xp, lambda x, wa, wp, ba=None, bp=None: attention.forward(x, wa, ba, wp, bp, NH),
          lambda d, c, g: attention.backward(d, c, g["wa"], g.get("ba"), g["wp"], g.get("bp")),
          inputs, rng)


def test_attention_dropout(xp):
    rng = np.random.default_rng(6)
    inputs = attn_inputs(xp, rng)

    def fwd(x, wa, ba, wp, bp):  # same mask every call: a fresh generator with one seed
        return attention.forward(x, wa, ba, wp, bp, NH, attn_dropout=0.3,
                                 rng=xp.random.default_rng(7))

    check(xp, fwd, lambda d, c, g: attention.backward(d, c, g["wa"], g["ba"], g["wp"], g["bp"]),
          inputs, rng)


def test_attention_is_causal(xp):
    rng = np.random.default_rng(8)
    p = attn_inputs(xp, rng)
    out, _ = attention.forward(p["x"], p["wa"], p["ba"], p["wp"], p["bp"], NH)
    x2 = p["x"].copy()
    x2[:, 3:] += 1.0                         # change the future only
    out2, _ = attention.forward(x2, p["wa"], p["ba"], p["wp"], p["bp"], NH)
    assert np.array_equal(to_host(out)[:, :3], to_host(out2)[:, :3])
    assert not np.allclose(to_host(out)[:, 3:], to_host(out2)[:, 3:])


def test_attention_head_shards_sum_to_full(xp):
    """Megatron split: heads per rank, partial outputs and input grads summed, weight grads sliced."""
    rng = np.random.default_rng(9)
    nh, tp = 4, 2
    p = attn_inputs(xp, rng, nh=nh)
    out, cache = attention.forward(p["x"], p["wa"], p["ba"], p["wp"], p["bp"], nh)
    dout = rand(xp, rng, *out.shape)
    g = {k: xp.zeros_like(v) for k, v in p.items() if k != "x"}
    dx = attention.backward(dout, cache, g["wa"], g["ba"], g["wp"], g["bp"])
    hs = C // nh
    out_sum, dx_sum = 0, 0
    for r in range(tp):
        h0, h1 = r * nh // tp, (r + 1) * nh // tp
        rows = xp.asarray(attention.qkv_rows(C, nh, h0, h1))
        cols = slice(h0 * hs, h1 * hs)
        wa, ba = p["wa"][rows].copy(), p["ba"][rows].copy()
        wp = xp.ascontiguousarray(p["wp"][:, cols])
        o, c = attention.forward(p["x"], wa, ba, wp, None, h1 - h0)
        dwa, dba, dwp = xp.zeros_like(wa), xp.zeros_like(ba), xp.zeros_like(wp)
        dxr = attention.backward(dout, c, dwa, dba, dwp, None)
        out_sum, dx_sum = out_sum + o, dx_sum + dxr
        assert rel_error(dwa, g["wa"][rows]) < 1e-12 and rel_error(dba, g["ba"][rows]) < 1e-12
        assert rel_error(dwp, g["wp"][:, cols]) < 1e-12
    assert rel_error(out_sum + p["bp"], out) < 1e-12
    assert rel_error(dx_sum, dx) < 1e-12


def mlp_inputs(xp, rng, F=4 * C, bias=True):
    return dict(x=rand(xp, rng, B, T, C), wf=rand(xp, rng, F, C, scale=0.5),
                bf=rand(xp, rng, F, scale=0.5) if bias else None,
                wp=rand(xp, rng, C, F, scale=0.5), bp=rand(xp, rng, C) if bias else None)


def test_mlp(xp):
    rng = np.random.default_rng(10)
    check(xp, lambda x, wf, bf, wp, bp: mlp.forward(x, wf, bf, wp, bp),
          lambda d, c, g: mlp.backward(d, c, g["wf"], g["bf"], g["wp"], g["bp"]),
          mlp_inputs(xp, rng), rng)


def test_mlp_column_row_shards_sum_to_full(xp):
    rng = np.random.default_rng(11)
    p = mlp_inputs(xp, rng)
    out, cache = mlp.forward(p["x"], p["wf"], p["bf"], p["wp"], p["bp"])
    dout = rand(xp, rng, *out.shape)
    g = {k: xp.zeros_like(v) for k, v in p.items() if k != "x"}
    dx = mlp.backward(dout, cache, g["wf"], g["bf"], g["wp"], g["bp"])
    out_sum, dx_sum, F, tp = 0, 0, 4 * C, 4
    for r in range(tp):
        s = slice(r * F // tp, (r + 1) * F // tp)
        wf, bf, wp = p["wf"][s].copy(), p["bf"][s].copy(), xp.ascontiguousarray(p["wp"][:, s])
        o, c = mlp.forward(p["x"], wf, bf, wp, None)
        dwf, dbf, dwp = xp.zeros_like(wf), xp.zeros_like(bf), xp.zeros_like(wp)
        dx_sum = dx_sum + mlp.backward(dout, c, dwf, dbf, dwp, None)
        out_sum = out_sum + o
        assert rel_error(dwf, g["wf"][s]) < 1e-12 and rel_error(dwp, g["wp"][:, s]) < 1e-12
    assert rel_error(out_sum + p["bp"], out) < 1e-12 and rel_error(dx_sum, dx) < 1e-12


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p_drop", [0.0, 0.2])
def test_block(xp, bias, p_drop):
    rng = np.random.default_rng(12)
    shapes = block.param_shapes(C, bias=bias)
    params = {k: rand(xp, rng, *s, scale=0.4) for k, s in shapes.items()}
    names = {k: k.replace(".", "_") for k in shapes}
    inputs = dict(x=rand(xp, rng, B, T, C), **{names[k]: v for k, v in params.items()})

    def fwd(x, **kw):
        p = {k: kw[names[k]] for k in shapes}
        return block.forward(x, p, NH, p_drop, xp.random.default_rng(3) if p_drop else None)

    def bwd(d, c, g):
        return block.backward(d, c, {k: g[names[k]] for k in shapes})

    check(xp, fwd, bwd, inputs, rng)


class RecordingRegion:
    """A ParallelRegion that records its calls and returns a new array, as an all-reduce does
    (so the block must use what the hook returns). Where the hooks sit is checked with real
    tp groups in tests/parallel/test_tensor_parallel.py."""

    def __init__(self):
        self.calls = []

    def _pass(self, what, x):
        self.calls.append(what)
        return x * 1.0                                   # a new array, as a real all-reduce

    def copy_forward(self, x):
        return self._pass("f", x)

    def copy_backward(self, dx):
        return self._pass("f'", dx)

    def reduce_forward(self, x):
        return self._pass("g", x)

    def reduce_backward(self, dx):
        return self._pass("g'", dx)


def test_block_calls_its_communication_points_in_megatrons_places(xp):
    """f before each branch and g after it in forward; g' then f' per branch in backward
    (MLP first); identity hooks give the serial block's result to the bit."""
    rng = np.random.default_rng(15)
    p = {k: rand(xp, rng, *s, scale=0.4) for k, s in block.param_shapes(C).items()}
    x, dout = rand(xp, rng, B, T, C), rand(xp, rng, B, T, C)
    region = RecordingRegion()
    out, cache = block.forward(x, p, NH, region=region)
    ref_out, ref_cache = block.forward(x, p, NH)
    assert region.calls == ["f", "g", "f", "g"]
    assert np.array_equal(to_host(out), to_host(ref_out))
    d = {k: xp.zeros_like(v) for k, v in p.items()}
    d_ref = {k: xp.zeros_like(v) for k, v in p.items()}
    dx = block.backward(dout, cache, d, region=region)
    dx_ref = block.backward(dout, ref_cache, d_ref)
    assert region.calls[4:] == ["g'", "f'", "g'", "f'"]
    assert np.array_equal(to_host(dx), to_host(dx_ref))
    assert all(np.array_equal(to_host(d[k]), to_host(d_ref[k])) for k in p)


@pytest.mark.parametrize("mode", ["selective", "full"])
@pytest.mark.parametrize("p_drop", [0.0, 0.2])
def test_block_recompute_gives_the_bits_of_keeping_everything(xp, mode, p_drop):
    """A recompute mode gives recompute "none"'s output, input gradient and weight gradients
    to the bit, with dropout too (the masks are redrawn from the generator's saved state, and
    the generator is left where "none" leaves it); "selective" keeps no (B, NH, T, T) array,
    "full" keeps the block input alone; "full" reruns f and g before backward (Megatron's
    extra all-reduce per branch), "selective" communicates as "none" does."""
    rng = np.random.default_rng(16)
    p = {k: rand(xp, rng, *s, scale=0.4) for k, s in block.param_shapes(C).items()}
    x, dout = rand(xp, rng, B, T, C), rand(xp, rng, B, T, C)
    got = {}
    for m in ("none", mode):
        gen = xp.random.default_rng(3)
        region, policy = RecordingRegion(), block.RECOMPUTE[m]
        out, saved = policy.forward(x, p, NH, p_drop, gen, region)
        next_draw = to_host(gen.random(4))
        d = {k: xp.zeros_like(v) for k, v in p.items()}
        dx = policy.backward(dout, saved, p, d, NH, region)
        got[m] = (out, dx, d, next_draw, region.calls, list(arrays_in(saved)))
    (out0, dx0, d0, draw0, calls0, kept0), (out, dx, d, draw, calls, kept) = got["none"], got[mode]
    assert np.array_equal(to_host(out), to_host(out0)) and np.array_equal(to_host(dx), to_host(dx0))
    assert all(np.array_equal(to_host(d[k]), to_host(d0[k])) for k in p)
    assert np.array_equal(draw, draw0)
    square = [a for a in kept0 if a.shape == (B, NH, T, T)]
    assert len(square) == (2 if p_drop else 1)        # "none": probabilities (and their mask)
    if mode == "selective":
        assert not any(a.shape == (B, NH, T, T) for a in kept)
        assert calls == calls0 == ["f", "g", "f", "g", "g'", "f'", "g'", "f'"]
    else:
        assert len(kept) == 1 and kept[0] is x
        assert calls == ["f", "g", "f", "g"] * 2 + ["g'", "f'", "g'", "f'"]


def _root(a):
    while getattr(a, "base", None) is not None:
        a = a.base
    return a


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("p_drop", [0.0, 0.2])
@pytest.mark.parametrize("t", [1, 2])
def test_block_keeps_the_activation_bytes_its_docstring_states(xp, mode, p_drop, t):
    """The bytes a block's saved state holds (distinct buffers, parameters not counted) are
    the closed form of ``nn/block.py``'s docstring, on a tensor-parallel shard of degree t."""
    rng = np.random.default_rng(17)
    full = {k: rand(xp, rng, *s, scale=0.4) for k, s in block.param_shapes(C).items()}
    H, F, a = C // t, 4 * C // t, NH // t
    rows = attention.qkv_rows(C, NH, 0, a)
    p = dict(full)
    p["attn.c_attn.weight"], p["attn.c_attn.bias"] = full["attn.c_attn.weight"][rows], full["attn.c_attn.bias"][rows]
    p["attn.c_proj.weight"] = full["attn.c_proj.weight"][:, :H]
    p["mlp.c_fc.weight"], p["mlp.c_fc.bias"] = full["mlp.c_fc.weight"][:F], full["mlp.c_fc.bias"][:F]
    p["mlp.c_proj.weight"] = full["mlp.c_proj.weight"][:, :F]
    x = rand(xp, rng, B, T, C)
    _, saved = block.RECOMPUTE[mode].forward(x, p, a, p_drop, xp.random.default_rng(0), block.SERIAL)
    params = {id(_root(v)) for v in list(p.values()) + list(full.values())}
    held = {id(r): r for r in map(_root, arrays_in(saved)) if id(r) not in params}
    elements = sum(r.size for r in held.values())
    drop = p_drop > 0
    want = {"none": B * T * (4 * C + 4 * H + 3 * F + 4 + a * T) + drop * B * T * (2 * C + a * T),
            "selective": B * T * (4 * C + 4 * H + 3 * F + 4) + drop * 2 * B * T * C,
            "full": B * T * C}[mode]
    assert elements == want, (mode, p_drop, t, elements, want)


def test_embedding(xp):
    rng = np.random.default_rng(13)
    V, maxT = 7, 6
    idx = xp.asarray(np.array([[1, 3, 3, 0, 6], [3, 1, 2, 2, 3]]))  # repeated tokens
    wte, wpe = rand(xp, rng, V, C), rand(xp, rng, maxT, C)
    out, cache = embedding.forward(idx, wte, wpe)
    R = rand(xp, rng, *out.shape)
    dwte, dwpe = xp.zeros_like(wte), xp.zeros_like(wpe)
    embedding.backward(R, cache, dwte, dwpe)
    f = lambda: float((embedding.forward(idx, wte, wpe)[0] * R).sum())  # noqa: E731
    assert rel_error(dwte, numerical_grad(f, wte)) < TOL
    assert rel_error(dwpe, numerical_grad(f, wpe)) < TOL
    assert np.all(to_host(dwpe)[T:] == 0)


def _accumulate_case(rng, V=9, N=200, W=5):
    ids = rng.integers(0, V - 1, N)          # row V - 1 never hit
    ids[:30] = 3                             # a long run of one token, and a token at the end
    ids[-1] = 0
    return ids, rng.standard_normal((N, W)), rng.standard_normal((V, W))


def test_accumulate_rows_adds_in_token_order_and_repeats_bitwise(xp):
    """The CPU's bits are add.at's (the serial reference, token order); a GPU's are another
    order of the same sums, the same bits on every call (the double's add.at would not be)."""
    ids, rows, start = _accumulate_case(np.random.default_rng(21))
    ref = start.copy()
    for i, v in enumerate(ids):              # token order, one token at a time
        ref[v] += rows[i]
    got = []
    for _ in range(2):
        target = xp.asarray(start.copy())
        embedding.accumulate_rows(target, xp.asarray(ids), xp.asarray(rows))
        got.append(to_host(target))
    if xp is np:
        np.testing.assert_array_equal(got[0], ref)
    else:                                    # a sum of the same terms in another order
        np.testing.assert_allclose(got[0], ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got[1], got[0])
    np.testing.assert_array_equal(got[0][-1], start[-1])      # a row no token hit: untouched
    empty = xp.asarray(start.copy())
    embedding.accumulate_rows(empty, xp.asarray(ids[:0]), xp.asarray(rows[:0]))
    np.testing.assert_array_equal(to_host(empty), start)


def test_accumulate_rows_on_a_gpu_needs_no_host_synchronisation(strict_cupy):
    cp = strict_cupy.xp
    ids, rows, start = _accumulate_case(np.random.default_rng(22))
    target, ids_d, rows_d = cp.asarray(start), cp.asarray(ids), cp.asarray(rows)
    with strict_cupy.counting() as c:
        embedding.accumulate_rows(target, ids_d, rows_d)
    assert c.total("syncs") == 0 and c.total("d2h") == 0 and c.total("kernels") > 0, c


def test_crossentropy(xp):
    rng = np.random.default_rng(14)
    V = 6
    logits = rand(xp, rng, B, T, V, scale=3.0)
    targets = xp.asarray(rng.integers(0, V, (B, T)))
    loss, cache = crossentropy.forward(logits.copy(), targets)
    ref = to_host(logits).reshape(-1, V)
    ref_loss = np.mean(np.log(np.exp(ref).sum(-1)) - ref[np.arange(B * T), to_host(targets).ravel()])
    assert abs(float(loss) - ref_loss) < 1e-12
    dlogits = crossentropy.backward(2.0, cache)
    f = lambda: 2.0 * float(crossentropy.forward(logits.copy(), targets)[0])  # noqa: E731
    assert rel_error(dlogits.reshape(B, T, V), numerical_grad(f, logits)) < TOL


def test_crossentropy_stable_for_large_logits(xp):
    logits = xp.asarray(np.array([[1000.0, 0.0, -1000.0]], dtype=np.float32))
    loss, _ = crossentropy.forward(logits, xp.asarray(np.array([1])))
    assert np.isfinite(float(loss)) and abs(float(loss) - 1000.0) < 1e-3


def test_dropout(xp):
    rng = np.random.default_rng(15)
    x = rand(xp, rng, 200, 50)
    out, mask = dropout.forward(x, 0.25, xp.random.default_rng(0))
    kept = to_host(mask) != 0
    assert abs(kept.mean() - 0.75) < 0.02
    assert np.allclose(to_host(out)[kept], to_host(x)[kept] / 0.75)
    dx = dropout.backward(xp.ones_like(x), mask)
    assert np.allclose(to_host(dx), to_host(mask))
    same, none = dropout.forward(x, 0.0, None)
    assert same is x and none is None


def test_cache_blocked_paths_match(xp, monkeypatch):
    """GELU and softmax run in cache blocks on the CPU; small ragged blocks give the same
    numbers as one block, and the gradient checks still pass."""
    from mpipar.nn import blocking

    rng = np.random.default_rng(16)
    p = attn_inputs(xp, rng)
    h = rand(xp, rng, B, T, 4 * C)
    ref_a, ca = attention.forward(p["x"], p["wa"], p["ba"], p["wp"], p["bp"], NH)
    ref_g, cg = gelu.forward(h)
    g = [xp.zeros_like(p[k]) for k in ("wa", "ba", "wp", "bp")]
    ref_da = attention.backward(ref_a, ca, *g)
    ref_dg = gelu.backward(ref_g, cg)
    monkeypatch.setattr(blocking, "BLOCK", 12 * C)  # ragged: 3 of 10 rows of 4C, 3 of 4 (T, T) slabs
    a, ca = attention.forward(p["x"], p["wa"], p["ba"], p["wp"], p["bp"], NH)
    gg, cg = gelu.forward(h)
    assert rel_error(a, ref_a) < 1e-14 and rel_error(gg, ref_g) < 1e-14
    assert rel_error(attention.backward(ref_a, ca, *g), ref_da) < 1e-14
    assert rel_error(gelu.backward(ref_g, cg), ref_dg) < 1e-14
    test_gelu(xp)
    test_attention(xp, True)
    test_block(xp, True, 0.2)
