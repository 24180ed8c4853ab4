"""The fused kernels (mpipar/kernels.py) against the NumPy bodies they replace, on the strict
CuPy double, which compiles their CUDA source for the CPU (mpipar/testing/cuda_cpu.py).

Tolerances, as max |fused - numpy| / max |numpy|: float64 1e-13, float32 2e-6 (the kernels do
NumPy's operations in its order; sums run in sequence, NumPy's pairwise, and ``tanh``/``exp``
are the C library's). The AdamW update has no sum and no transcendental beyond ``sqrt``, so on
the double (no fused multiply-adds) it gives NumPy's bits.
"""

import collections
import threading

import numpy as np
import pytest

from mpipar import backend, kernels
from mpipar.nn import GPT, PRESETS, attention, gelu, layernorm
from mpipar.optim.adamw import AdamW
from mpipar.sim.compute import ComputeModel
from mpipar.sim.symbolic import SymbolicNamespace

TOL = {"float64": 1e-13, "float32": 2e-6}
DTYPES = ["float32", "float64"]


def err(a, b):
    a, b = backend.to_host(a).astype(np.float64), backend.to_host(b).astype(np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def pair(double, host):
    """The same data as a NumPy array and as a device array of the double."""
    return host.copy(), double.xp.asarray(host)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_matches_numpy(strict_cupy, dtype):
    rng = np.random.default_rng(0)
    h, d = pair(strict_cupy, (rng.standard_normal((3, 5, 37)) * 3).astype(dtype))
    out_h, (x_h, t_h) = gelu.forward(h)
    with strict_cupy.counting() as c:
        out_d, (x_d, t_d) = gelu.forward(d)
    assert err(out_d, out_h) < TOL[dtype] and err(t_d, t_h) < TOL[dtype]
    assert out_d.dtype == dtype and out_d.shape == h.shape
    assert not [s for s in c.kernels if "nn/gelu.py" in s]          # the NumPy body did not run
    g_h, g_d = pair(strict_cupy, rng.standard_normal(h.shape).astype(dtype))
    assert err(gelu.backward(g_d, (x_d, t_d)), gelu.backward(g_h, (x_h, t_h))) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 40])
def test_causal_softmax_and_backward_match_numpy(strict_cupy, dtype, T):
    rng = np.random.default_rng(1)
    s_h, s_d = pair(strict_cupy, (rng.standard_normal((2, 3, T, T)) * 4).astype(dtype))
    attention.causal_softmax_(s_h)
    with strict_cupy.counting() as c:
        attention.causal_softmax_(s_d)
    assert c.total("kernels") == 1                                  # one launch, no mask array
    assert err(s_d, s_h) < TOL[dtype]
    above = np.triu(np.ones((T, T), bool), k=1)
    assert (backend.to_host(s_d)[..., above] == 0).all()
    d_h, d_d = pair(strict_cupy, rng.standard_normal(s_h.shape).astype(dtype))
    attention._softmax_backward_(d_h, s_h, np)
    attention._softmax_backward_(d_d, s_d, strict_cupy.xp)
    assert err(d_d, d_h) < TOL[dtype]


def test_softmax_of_a_strided_view_is_written_back(strict_cupy):
    """A non-contiguous input is worked on in a contiguous copy and written back in place."""
    rng = np.random.default_rng(2)
    base = rng.standard_normal((4, 2, 6, 6))
    d = strict_cupy.xp.asarray(base)
    want = np.ascontiguousarray(base[::2])
    attention.causal_softmax_(want)
    attention.causal_softmax_(d[::2])
    assert err(d[::2], want) < TOL["float64"]
    assert err(d[1::2], base[1::2]) == 0.0                          # the slabs between untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_numpy(strict_cupy, dtype, bias):
    rng = np.random.default_rng(3)
    C = 24
    x_h, x_d = pair(strict_cupy, (rng.standard_normal((2, 131, C)) * 2 + 0.7).astype(dtype))
    w_h, w_d = pair(strict_cupy, rng.standard_normal(C).astype(dtype))
    b_h, b_d = pair(strict_cupy, rng.standard_normal(C).astype(dtype)) if bias else (None, None)
    out_h, cache_h = layernorm.forward(x_h, w_h, b_h)
    with strict_cupy.counting() as c:
        out_d, cache_d = layernorm.forward(x_d, w_d, b_d)           # eps: the default, filled in
    assert not [s for s in c.kernels if "nn/layernorm.py" in s]
    assert err(out_d, out_h) < TOL[dtype]
    for i in (1, 2):                                                # mean, rstd (B, T, 1)
        assert cache_d[i].shape == cache_h[i].shape and err(cache_d[i], cache_h[i]) < TOL[dtype]
    g_h, g_d = pair(strict_cupy, rng.standard_normal(x_h.shape).astype(dtype))
    dw_h, dw_d = pair(strict_cupy, np.full(C, 0.25, dtype))         # accumulated into
    db_h, db_d = pair(strict_cupy, np.full(C, -1.0, dtype)) if bias else (None, None)
    dx_h = layernorm.backward(g_h, cache_h, dw_h, db_h)
    dx_d = layernorm.backward(g_d, cache_d, dw_d, db_d)
    assert err(dx_d, dx_h) < TOL[dtype] and err(dw_d, dw_h) < TOL[dtype] * 10
    if bias:
        assert err(db_d, db_h) < TOL[dtype] * 10                    # sums over 262 rows


def test_layernorm_of_a_transposed_input(strict_cupy):
    rng = np.random.default_rng(4)
    x_h, x_d = pair(strict_cupy, rng.standard_normal((16, 3, 8)))
    w_h, w_d = pair(strict_cupy, rng.standard_normal(16))
    out_h, _ = layernorm.forward(x_h.transpose(1, 2, 0), w_h)
    out_d, _ = layernorm.forward(x_d.transpose(1, 2, 0), w_d)
    assert err(out_d, out_h) < TOL["float64"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_update_gives_numpys_bits(strict_cupy, dtype):
    rng = np.random.default_rng(5)
    shapes = {"w": (6, 10), "b": (10,)}                             # w decays, b does not
    host = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    opt_h = AdamW({k: v.copy() for k, v in host.items()}, lr=3e-3, weight_decay=0.1)
    opt_d = AdamW({k: strict_cupy.xp.asarray(v) for k, v in host.items()}, lr=3e-3, weight_decay=0.1)
    for step in range(4):
        grads = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
        opt_h.step(grads)
        with strict_cupy.counting() as c:
            opt_d.step({k: strict_cupy.xp.asarray(g) for k, g in grads.items()})
        assert not [s for s in c.kernels if "optim/adamw.py" in s]
    for k in shapes:
        assert np.array_equal(backend.to_host(opt_d.params[k]), opt_h.params[k])
        for s in ("exp_avg", "exp_avg_sq"):
            assert np.array_equal(backend.to_host(opt_d.state[s][k]), opt_h.state[s][k])


def test_the_choice_is_made_by_array_module(strict_cupy):
    """NumPy and the simulator's namespace run the NumPy bodies; a module with CuPy's kernel
    API gets one Kernels, the same for every thread."""
    assert kernels.of(np) is None
    assert kernels.of(SymbolicNamespace(ComputeModel.named("dgx-a100"))) is None
    k = kernels.of(strict_cupy.xp)
    assert isinstance(k, kernels.Kernels) and k.xp is strict_cupy.xp
    seen = []
    t = threading.Thread(target=lambda: seen.append(kernels.of(strict_cupy.xp)))
    t.start()
    t.join(timeout=30)
    assert seen == [k]
    assert gelu.forward.numpy_body is not gelu.forward.fused is kernels.gelu_forward
    with pytest.raises(TypeError, match="float32 or float64"):
        k.raw("causal_softmax", "float16")


def test_causal_mask_is_per_thread_off_numpy(strict_cupy):
    """NumPy's mask is one read-only array; another module's is copied on each thread that
    asks (never an array written on another thread's stream)."""
    m = attention.causal_mask(5, "float32")
    assert m is attention.causal_mask(5, np.float32) and not m.flags.writeable
    xp = strict_cupy.xp
    mine = attention.causal_mask(5, "float32", xp)
    assert mine is attention.causal_mask(5, "float32", xp)
    theirs = []

    def other_thread() -> None:
        a = attention.causal_mask(5, "float32", xp)
        theirs.extend([a, backend.to_host(a)])    # read on its own stream

    t = threading.Thread(target=other_thread)
    t.start()
    t.join(timeout=30)
    assert theirs[0] is not mine and np.array_equal(theirs[1], m)


# (owner, function, operations one call of its fused twin queues on the double: its launches
# plus the views and allocations the double also counts)
FUSED = [(gelu, "forward", 3), (gelu, "backward", 3), (layernorm, "forward", 4),
         (layernorm, "backward", 3), (attention, "causal_softmax_", 1),
         (attention, "_softmax_backward_", 1), (AdamW, "_update", 1)]


def test_tiny_model_operations_before_and_after(strict_cupy, monkeypatch):
    """The table of docs/training.md ("Fused kernels"): the operations the double queues in each
    fused function during one forward+backward and one AdamW step of the tiny model, fused and
    not (``kernels.of`` patched to None); the loss is the same."""
    xp = strict_cupy.xp
    cfg = PRESETS["tiny"]
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg.vocab_size, (4, cfg.block_size))
    tgt = rng.integers(0, cfg.vocab_size, (4, cfg.block_size))
    ops: dict[int, list[int]] = collections.defaultdict(list)   # FUSED index -> per call
    for i, (owner, name, _) in enumerate(FUSED):
        def counted(*a, _f=getattr(owner, name), _i=i, **k):
            with strict_cupy.counting() as c:
                r = _f(*a, **k)
            ops[_i].append(c.total("kernels"))
            return r
        monkeypatch.setattr(owner, name, counted)

    def run() -> tuple[dict, int, int, float]:
        ops.clear()
        model = GPT(cfg, seed=0, dtype="float32", xp=xp)
        opt = AdamW(dict(model.params), lr=1e-3, weight_decay=0.1)
        with strict_cupy.counting() as c:
            loss, grads = model.loss_and_grads(xp.asarray(idx), xp.asarray(tgt))
        with strict_cupy.counting() as s:
            opt.step(grads)
        return dict(ops), c.total("kernels"), s.total("kernels"), float(loss)

    fused = run()
    monkeypatch.setattr(kernels, "of", lambda module: None)
    unfused = run()
    assert len(fused[0][0]) == cfg.n_layer and len(fused[0][6]) == len(dict(GPT(cfg, xp=np).params))
    for i, (owner, name, per_call) in enumerate(FUSED):
        assert fused[0][i] == [per_call] * len(fused[0][i]), (name, fused[0][i])
        assert len(unfused[0][i]) == len(fused[0][i]) and min(unfused[0][i]) > per_call, name
    assert fused[1] < unfused[1] and fused[2] < unfused[2] / 4
    assert abs(fused[3] - unfused[3]) < 1e-5
