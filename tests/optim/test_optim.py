"""Optimisers against a plain NumPy reference of the update formulas and their closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpipar.optim import SGD, AdamW, OptimizerSpec, clip_grad_norm, cosine_lr, global_norm


def make_params(seed: int = 0, dtype=np.float64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"h.0.w.weight": rng.standard_normal((4, 3)).astype(dtype),
            "h.0.w.bias": rng.standard_normal(4).astype(dtype),
            "ln_f.weight": rng.standard_normal(3).astype(dtype),
            "wte.weight": rng.standard_normal((5, 3)).astype(dtype)}


def grads_at(step: int, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + step)
    return {k: rng.standard_normal(p.shape).astype(p.dtype) for k, p in params.items()}


def ref_adamw(params, n_steps, lr, b1, b2, eps, wd):
    """Textbook AdamW, one tensor at a time, written independently of mpipar's in-place code."""
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t in range(1, n_steps + 1):
        g = grads_at(t, params)
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            mhat = m[k] / (1 - b1 ** t)
            vhat = v[k] / (1 - b2 ** t)
            decay = wd if p[k].ndim >= 2 else 0.0
            p[k] = p[k] - lr * decay * p[k] - lr * mhat / (np.sqrt(vhat) + eps)
    return p


def ref_sgd(params, n_steps, lr, mu, nesterov, wd):
    p = {k: v.copy() for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    for t in range(1, n_steps + 1):
        g = grads_at(t, params)
        for k in p:
            gk = g[k] + (wd * p[k] if p[k].ndim >= 2 else 0.0)
            buf[k] = mu * buf[k] + gk
            p[k] = p[k] - lr * (gk + mu * buf[k] if nesterov else buf[k])
    return p


def run(opt_cls, n_steps, **kw):
    params = make_params()
    opt = opt_cls(params, **kw)
    for t in range(1, n_steps + 1):
        opt.step(grads_at(t, params))
    return params, opt


def test_adamw_matches_reference():
    kw = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    got, _ = run(AdamW, 5, **kw)
    want = ref_adamw(make_params(), 5, 0.01, 0.9, 0.95, 1e-8, 0.1)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-14, err_msg=k)


def test_adamw_first_step_closed_form():
    # step 1: m_hat = g, v_hat = g^2, so p1 = p0 (1 - lr wd) - lr g / (|g| + eps)
    lr, wd, eps = 0.1, 0.5, 1e-8
    p0 = make_params()
    got, _ = run(AdamW, 1, lr=lr, weight_decay=wd, eps=eps)
    g = grads_at(1, p0)
    for k in p0:
        decay = wd if p0[k].ndim >= 2 else 0.0
        want = p0[k] * (1 - lr * decay) - lr * g[k] / (np.abs(g[k]) + eps)
        np.testing.assert_allclose(got[k], want, rtol=0, atol=1e-14, err_msg=k)


def test_no_decay_on_biases_and_layernorm():
    opt = AdamW(make_params(), weight_decay=0.1)
    assert opt.decay == {"h.0.w.weight": True, "h.0.w.bias": False, "ln_f.weight": False,
                         "wte.weight": True}


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_reference(nesterov):
    got, _ = run(SGD, 4, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    want = ref_sgd(make_params(), 4, 0.05, 0.9, nesterov, 0.01)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-14, err_msg=k)


def test_sgd_first_step_is_plain_gradient_descent():
    p0 = make_params()
    got, _ = run(SGD, 1, lr=0.5, momentum=0.9)
    g = grads_at(1, p0)
    for k in p0:
        np.testing.assert_allclose(got[k], p0[k] - 0.5 * g[k], rtol=0, atol=1e-15)


def test_grads_not_modified_and_lr_override():
    params = make_params()
    g = grads_at(1, params)
    g_copy = {k: v.copy() for k, v in g.items()}
    p0 = {k: v.copy() for k, v in params.items()}
    SGD(params, lr=123.0, momentum=0.0, weight_decay=0.1).step(g, lr=0.5)
    for k in g:
        np.testing.assert_array_equal(g[k], g_copy[k])
        wd = 0.1 if p0[k].ndim >= 2 else 0.0
        np.testing.assert_allclose(params[k], p0[k] - 0.5 * (g[k] + wd * p0[k]), atol=1e-15)


@pytest.mark.parametrize("opt_cls", [AdamW, SGD])
def test_state_dict_round_trip_continues_identically(opt_cls):
    params, opt = run(opt_cls, 3, lr=0.01)
    sd = opt.state_dict()
    assert sd["step"] == 3 and all(isinstance(v, (int, np.ndarray)) for v in sd.values())
    params2 = {k: v.copy() for k, v in params.items()}
    opt2 = opt_cls(params2, lr=0.01)
    opt2.load_state_dict(sd)
    for t in (4, 5):
        opt.step(grads_at(t, params))
        opt2.step(grads_at(t, params2))
    for k in params:
        np.testing.assert_array_equal(params[k], params2[k])


def test_float32_stays_float32():
    params = make_params(dtype=np.float32)
    opt = AdamW(params, lr=0.01)
    opt.step(grads_at(1, params))
    assert all(p.dtype == np.float32 for p in params.values())
    assert all(s.dtype == np.float32 for k, s in opt.state_dict().items() if k != "step")


def test_bad_arguments():
    with pytest.raises(ValueError):
        AdamW(make_params(), betas=(1.0, 0.9))
    with pytest.raises(ValueError):
        SGD(make_params(), momentum=0.0, nesterov=True)
    with pytest.raises(KeyError):
        AdamW(make_params()).step({})


def test_clip_grad_norm():
    g = {"a": np.array([3.0, 0.0]), "b": np.array([[0.0, 4.0]])}
    assert global_norm(g) == pytest.approx(5.0)
    norm = clip_grad_norm(g, 1.0)
    assert norm == pytest.approx(5.0)
    assert global_norm(g) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(g["a"], [0.6, 0.0], rtol=1e-6)
    g2 = {"a": np.array([0.3, 0.4])}
    assert clip_grad_norm(g2, 1.0) == pytest.approx(0.5)       # below the bound: untouched
    np.testing.assert_array_equal(g2["a"], [0.3, 0.4])
    assert clip_grad_norm(g, 0.0) == pytest.approx(1.0, rel=1e-6)  # 0 disables


class SumOfRanks:
    """A group of ``size`` ranks whose other members each hold ``others`` (a stand-in for a
    Communicator's allreduce(op="sum") in a serial test)."""

    def __init__(self, size, others):
        self.size, self.others, self.calls = size, others, 0

    def allreduce(self, x, op="sum"):
        assert op == "sum" and x.dtype == np.float64 and x.shape == (1,)
        self.calls += 1
        return x + self.others


def test_clip_grad_norm_counts_what_it_is_told_and_adds_over_groups():
    g = {"a": np.array([3.0, 0.0]), "b": np.array([[0.0, 4.0]]), "c": np.array([12.0])}
    # count a and b only (c is a copy another rank counts); the group adds 144 from elsewhere
    tp, pp = SumOfRanks(2, 144.0), SumOfRanks(1, 1e9)
    norm = clip_grad_norm(g, 6.5, count={"a", "b"}, groups=(tp, pp))
    assert norm == pytest.approx(13.0) and tp.calls == 1 and pp.calls == 0   # size 1: no call
    np.testing.assert_allclose(g["c"], [12.0 * 6.5 / 13.0], rtol=1e-6)       # every tensor scaled
    with pytest.raises(ValueError, match="finite"):
        clip_grad_norm(g, float("nan"))


def test_the_norm_of_device_gradients_is_one_host_read(strict_cupy):
    """However many tensors: one synchronising device -> host copy (their sums of squares,
    stacked), the clip factor a number the scaling kernels take; the same maths as NumPy's,
    so the double (NumPy underneath) gives the same bits."""
    cp, rng = strict_cupy.xp, np.random.default_rng(3)
    host = {f"t{i}": rng.standard_normal((i % 7 + 1, 5)) for i in range(40)}
    dev = {k: cp.asarray(v) for k, v in host.items()}
    with strict_cupy.counting() as c:
        norm = clip_grad_norm(dev, 1.0)
    assert c.total("syncs") == 1 and c.total("d2h") == 1, c
    assert norm == clip_grad_norm(host, 1.0) and norm > 1.0
    for k, v in host.items():
        np.testing.assert_array_equal(dev[k].get(), v, err_msg=k)


def test_optimizer_spec_builds_what_it_names():
    params = make_params()
    spec = OptimizerSpec("adamw", lr=2e-3, weight_decay=0.1)
    opt = spec.build(params)
    assert isinstance(opt, AdamW) and (opt.b1, opt.b2, opt.eps) == (0.9, 0.95, 1e-8)
    assert opt.lr == 2e-3 and opt.weight_decay == 0.1
    assert spec.state_names == ("exp_avg", "exp_avg_sq")
    sgd = OptimizerSpec("sgd", lr=0.1, momentum=0.5).build(params)
    assert isinstance(sgd, SGD) and sgd.momentum == 0.5
    for bad in (dict(name="lamb"), dict(lr=float("inf")), dict(lr=-1.0), dict(weight_decay=float("nan"))):
        with pytest.raises(ValueError):
            OptimizerSpec(**bad)
    with pytest.raises(ValueError, match="finite"):
        AdamW(params, lr=float("nan"))


def test_cosine_lr_key_steps():
    lr, mn, w, total = 1.0, 0.1, 10, 110
    assert cosine_lr(0, lr, mn, w, total) == pytest.approx(0.1)
    assert cosine_lr(4, lr, mn, w, total) == pytest.approx(0.5)
    assert cosine_lr(9, lr, mn, w, total) == pytest.approx(1.0)
    assert cosine_lr(10, lr, mn, w, total) == pytest.approx(1.0)
    assert cosine_lr(60, lr, mn, w, total) == pytest.approx(0.55)
    assert cosine_lr(35, lr, mn, w, total) == pytest.approx(mn + 0.5 * (1 + math.cos(math.pi / 4)) * 0.9)
    assert cosine_lr(110, lr, mn, w, total) == pytest.approx(0.1)
    assert cosine_lr(500, lr, mn, w, total) == pytest.approx(0.1)
    assert cosine_lr(0, lr, mn, 0, total) == pytest.approx(1.0)   # no warm-up
    values = [cosine_lr(s, lr, mn, w, total) for s in range(w, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))        # monotone decay
