"""Shape-only arrays (``mpipar.sim.symbolic``) behave as NumPy's, and charge what the kernels do.

The real layers run on both: every output, cache and gradient of a GPT forward and backward
has the shape, dtype and contiguity NumPy gives; the GEMMs charged are exactly the layers'
products, whose FLOPs add up to the closed form 6 N tokens + attention; the one-process
trainer steps on the namespace on one virtual rank; and the namespace's own rules
(broadcasting, indexing, promotion, errors) are checked against NumPy's on real arrays.
"""

import math

import numpy as np
import pytest

from mpipar import backend
from mpipar.nn import blocking
from mpipar.nn.gpt import GPT, PRESETS, count_parameters, flops_per_token
from mpipar.optim import OptimizerSpec
from mpipar.sim.symbolic import PLACEHOLDER, SymbolicArray, SymbolicNamespace, broadcast_shapes

CONFIG = PRESETS["small"].replace(n_layer=2, block_size=16)    # C 128, 4 heads, V 256
B, T = 4, 16


class Recorder:
    """A compute model that prices nothing but records every kernel asked for."""

    def __init__(self):
        self.gemms, self.memory = [], []

    def gemm_time(self, m, n, k, batch=1, dtype="float32"):
        self.gemms.append((m, n, k, batch, dtype))
        return 2.0 * m * n * k * batch * 1e-12         # 1 TFLOP/s

    def memory_time(self, nbytes, kind="elementwise"):
        self.memory.append((kind, nbytes))
        return nbytes * 1e-11                          # 100 GB/s


def namespace():
    charges = []
    ns = SymbolicNamespace(Recorder(), lambda kind, s: charges.append((kind, s)))
    return ns, charges


# ---- the real layers, on NumPy and on the namespace ------------------------------------------

def _trace(model, idx, targets):
    """Every array the stages return: forward outputs and caches, the loss, backward dx."""
    out, caches, x = [], [], idx
    for st in model.stages[:-1]:
        x, c = st.forward(x)
        out.append((x, c))
        caches.append(c)
    _, loss, c = model.stages[-1].forward(x, targets)
    out.append((loss, c))
    caches.append(c)
    dx = model.stages[-1].backward(1.0, caches[-1])
    out.append(dx)
    for st, c in zip(reversed(model.stages[:-1]), reversed(caches[:-1])):
        dx = st.backward(dx, c)
        out.append(dx)
    return out


def assert_like(sym, real, path="out"):
    """``sym`` has the structure of ``real``, with a SymbolicArray of the same shape, dtype
    and contiguity wherever ``real`` has a NumPy array (or scalar)."""
    if isinstance(real, (np.ndarray, np.generic)):
        assert isinstance(sym, SymbolicArray), f"{path}: {type(sym).__name__}, want an array"
        assert sym.shape == np.shape(real), f"{path}: shape {sym.shape}, NumPy {np.shape(real)}"
        assert sym.dtype == real.dtype, f"{path}: dtype {sym.dtype}, NumPy {real.dtype}"
        if isinstance(real, np.ndarray):
            assert sym.flags.c_contiguous == real.flags.c_contiguous, f"{path}: contiguity"
    elif isinstance(real, (tuple, list)):
        assert type(sym) is type(real) and len(sym) == len(real), path
        for i, (s, r) in enumerate(zip(sym, real)):
            assert_like(s, r, f"{path}[{i}]")
    elif isinstance(real, dict):
        assert sym.keys() == real.keys(), path
        for k in real:
            assert_like(sym[k], real[k], f"{path}[{k!r}]")
    else:
        assert sym == real, f"{path}: {sym!r} != {real!r}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gpt_forward_backward_gives_numpy_shapes_and_dtypes(dtype, dropout):
    config = CONFIG.replace(dropout=dropout)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))
    real = _trace(GPT(config, dtype=dtype), idx, targets)
    ns, _ = namespace()
    model = GPT(config, dtype=dtype, xp=ns)
    sym = _trace(model, ns.asarray(idx), ns.asarray(targets))
    assert_like(sym, real)
    assert float(sym[len(model.stages) - 1][0]) == PLACEHOLDER
    for name, g in model.grads.items():
        assert g.shape == model.params[name].shape and g.dtype == model.params[name].dtype


def test_adamw_step_keeps_shapes_and_charges_its_elementwise_passes():
    """AdamW's update is 13 in-place passes per tensor, one more for the decayed ones."""
    ns, charges = namespace()
    model = GPT(CONFIG, dtype="float32", xp=ns)
    opt = OptimizerSpec("adamw", lr=1e-3, weight_decay=0.1).build(model.state_dict())
    ns.reset_counts()
    live = ns.live_bytes
    opt.step(model.grads)
    decayed = sum(opt.decay.values())
    assert ns.kernels["elementwise"] == 13 * len(opt.params) + decayed
    assert ns.kernels["gemm"] == 0 and ns.live_bytes == live      # no temporaries
    for name, p in opt.params.items():
        for state in opt.state.values():
            assert state[name].shape == p.shape and state[name].dtype == p.dtype


def _expected_gemms(config, B, T):
    """(m, n, k, batch) of every matmul of one forward + backward, from the layers' maths."""
    C, NH, V, L = config.n_embd, config.n_head, config.vocab_size, config.n_layer
    N, hs, F = B * T, C // NH, 4 * C
    linear = lambda OC, IC: [(N, OC, IC, 1), (OC, IC, N, 1), (N, IC, OC, 1)]  # fwd, dW, dx
    per_layer = (linear(3 * C, C) + linear(C, C) + linear(F, C) + linear(C, F)
                 + [(T, T, hs, B * NH), (T, hs, T, B * NH)]          # scores, att @ v
                 + [(T, hs, T, B * NH), (T, T, hs, B * NH),          # dv, d att
                    (T, hs, T, B * NH), (T, hs, T, B * NH)])         # dq, dk
    return sorted(per_layer * L + linear(V, C))


def test_gpt_charges_exactly_its_matmuls_and_the_closed_form_flops():
    ns, charges = namespace()
    model = GPT(CONFIG, dtype="float32", xp=ns)
    rec = ns.cost
    rec.gemms.clear()
    ns.reset_counts()
    charges.clear()
    model.loss_and_grads(ns.zeros((B, T), ns.int64), ns.zeros((B, T), ns.int64))
    want = _expected_gemms(CONFIG, B, T)
    # the model is asked once per distinct shape (the namespace caches prices) ...
    assert sorted(g[:4] for g in rec.gemms) == sorted(set(want))
    assert {g[4] for g in rec.gemms} == {"float32"}
    # ... and every matmul is charged: one GEMM charge per product, of its FLOPs' time
    got = sorted(round(s * 1e12) for k, s in charges if k == "gemm")
    assert got == sorted(2 * m * n * k * b for m, n, k, b in want)
    L, C, V = CONFIG.n_layer, CONFIG.n_embd, CONFIG.vocab_size
    tokens = B * T
    exact = 6 * (12 * L * C * C + V * C) * tokens + 12 * L * C * T * tokens
    assert ns.gemm_flops == exact
    # the closed form also counts biases and layer norms as parameters: within 1%
    assert ns.gemm_flops == pytest.approx(flops_per_token(CONFIG, T) * tokens, rel=1e-2)
    assert count_parameters(CONFIG, non_embedding=True) > 12 * L * C * C + V * C
    # every kernel was charged once, with the model's time
    assert len(charges) == sum(ns.kernels.values())
    assert ns.seconds["gemm"] == pytest.approx(ns.gemm_flops * 1e-12)


def test_the_trainer_steps_on_one_virtual_rank_and_charges_reach_its_clock():
    """``ParallelTrainer(Layout())`` on the namespace, on the simulator's one virtual rank
    whose clock every charge advances: the pipeline's measured compute is the charged time."""
    from mpipar.comm.communicator import Communicator
    from mpipar.parallel.layout import Layout
    from mpipar.parallel.trainer import ParallelTrainer
    from mpipar.sim import simulate

    def body(t):
        charged = []

        def charge(kind, seconds):
            t.engine.clock[t.grank] += seconds
            charged.append(seconds)

        ns = SymbolicNamespace(Recorder(), charge)
        world = Communicator(t, t.dup(), debug=False)
        trainer = ParallelTrainer(world, CONFIG, Layout(), OptimizerSpec("adamw", lr=1e-3),
                                  xp=ns, grad_clip=1.0)
        idx = np.zeros((B, T), dtype=np.int64)
        ns.reset_counts()
        charged.clear()
        t0 = t.clock()
        result = trainer.step(idx, idx)
        return (result, t.clock() - t0, sum(charged), dict(ns.kernels), ns.seconds["gemm"],
                len(trainer.local.params))

    result, elapsed, charged, kernels, gemm_s, n_tensors = simulate(body, 1).results[0]
    assert result.loss == PLACEHOLDER
    assert result.grad_norm == pytest.approx(math.sqrt(n_tensors))   # one placeholder per tensor
    assert kernels["gemm"] == len(_expected_gemms(CONFIG, B, T))
    assert elapsed == pytest.approx(charged) and charged > 0
    # forward and backward hold every GEMM; clipping and AdamW come after them
    assert gemm_s < result.pipe.compute < charged


# ---- the namespace against NumPy ---------------------------------------------------------------

SHAPE_PAIRS = [((2, 3), (3,)), ((4, 1, 5), (3, 1)), ((), (2, 2)), ((1,), (7, 1, 1)),
               ((8, 1, 6, 1), (7, 1, 5)), ((2, 3), (4,)), ((3, 1), (2, 2)), ((0, 3), (1, 3))]


@pytest.mark.parametrize("a, b", SHAPE_PAIRS)
def test_broadcasting_is_numpys_including_its_errors(a, b):
    ns, _ = namespace()
    try:
        want = np.empty(a) + np.empty(b)
    except ValueError as e:
        with pytest.raises(ValueError) as got:
            ns.empty(a) + ns.empty(b)
        assert str(got.value) == str(e)
        with pytest.raises(ValueError):
            broadcast_shapes(a, b)
        return
    assert (ns.empty(a) + ns.empty(b)).shape == want.shape == broadcast_shapes(a, b)


def test_shape_errors_are_raised_like_numpys():
    ns, _ = namespace()
    x = ns.empty((2, 3))
    cases = [lambda m: m.empty((2, 3)) @ m.empty((4, 5)),
             lambda m: m.empty((2, 3)).reshape(4),
             lambda m: m.multiply(m.empty((3, 4)), 2.0, out=m.empty((3, 1))),
             lambda m: m.empty((6,)).__setitem__(slice(0, 4), m.empty((3,))),
             lambda m: m.empty((2, 3))[0, 0, 0]]
    for case in cases:
        with pytest.raises((ValueError, IndexError)) as want:
            case(np)
        with pytest.raises(type(want.value)) as got:
            case(ns)
        assert str(got.value) == str(want.value)
    with pytest.raises(TypeError, match="holds no data"):
        np.asarray(x)
    with pytest.raises(TypeError):
        float(x)                                   # only a size-1 array has a placeholder


INDEXES = [np.s_[1:3], np.s_[:, 0], np.s_[..., 1], np.s_[:, :, 0], np.s_[1], np.s_[None, :, 2],
           np.s_[::2], np.s_[:, 1:3], np.s_[2:3, :, 1:2], np.s_[..., None],
           np.s_[np.array([0, 2, 2])], np.s_[:, np.array([1, 0])],
           np.s_[np.array([0, 1]), :, np.array([1, 2])], np.s_[np.array([[0], [1]]), np.array([0, 2])],
           np.s_[0, :, np.array([0, 1])]]


@pytest.mark.parametrize("key", INDEXES, ids=range(len(INDEXES)))
def test_indexing_gives_numpys_shapes_views_and_copies(key):
    ns, _ = namespace()
    real = np.empty((4, 3, 5))
    sym = ns.empty((4, 3, 5))
    skey = tuple(ns.asarray(k) if isinstance(k, np.ndarray) else k
                 for k in (key if isinstance(key, tuple) else (key,)))
    got, want = sym[skey], real[key]
    assert got.shape == want.shape
    view = np.shares_memory(want, real)
    assert (got.base is not None) == view                          # a view, or a copy
    if view:                                 # (NumPy may lay a copy out in another order)
        assert got.flags.c_contiguous == want.flags.c_contiguous
    sym[skey] = 1.0                                                  # assignment takes it


def test_a_boolean_mask_selects_every_element_an_upper_bound():
    ns, _ = namespace()
    x = ns.empty((4, 3))
    assert x[ns.ones(4, dtype=bool)].shape == (4, 3)
    assert x[ns.ones((4, 3), dtype=bool)].shape == (12,)
    assert [a.shape for a in ns.nonzero(ns.ones(6, dtype=bool))] == [(6,)]


def test_views_share_their_base_and_only_owners_hold_memory():
    ns, _ = namespace()
    a = ns.empty((64, 32), ns.float32)
    assert ns.live_bytes == a.nbytes == 64 * 32 * 4
    views = [a[8:], a.T, a.reshape(32, 64), a[:, 3], a.reshape(-1)[10:20], a[2:].T[1:]]
    assert all(v.base is a for v in views) and ns.live_bytes == a.nbytes
    assert a.T.flags.c_contiguous is False and a.reshape(-1).flags.c_contiguous
    c = a.T.copy()
    assert c.base is None and c.flags.c_contiguous and ns.live_bytes == 2 * a.nbytes
    d = a.T.reshape(-1)                      # NumPy copies what it cannot view
    assert d.base is not None and d.base is not a and ns.live_bytes == 3 * a.nbytes
    del c, d
    assert ns.live_bytes == a.nbytes
    v = views[0]
    del a, views
    assert ns.live_bytes == 64 * 32 * 4      # a view keeps its base alive
    del v
    assert ns.live_bytes == 0 and ns.peak_bytes == 3 * 64 * 32 * 4
    ns.reset_peak()
    assert ns.peak_bytes == 0
    b = ns.zeros(1000, ns.float64)
    assert ns.peak_bytes == 8000
    del b
    assert ns.live_bytes == 0 and ns.peak_bytes == 8000


PROMOTIONS = [("float32", 2.0), ("float32", 2), ("int64", 1.5), ("float32", "float64"),
              ("float16", "float32"), ("int32", "int64"), ("int64", "float32"), ("bool", 1)]


@pytest.mark.parametrize("a, b", PROMOTIONS)
def test_dtype_promotion_is_numpy_2s(a, b):
    ns, _ = namespace()
    real_b = np.ones(3, dtype=b) if isinstance(b, str) else b
    sym_b = ns.ones(3, dtype=b) if isinstance(b, str) else b
    for op in ("__add__", "__mul__", "__truediv__", "__ge__"):
        want = getattr(np.ones(3, dtype=a), op)(real_b)
        got = getattr(ns.ones(3, dtype=a), op)(sym_b)
        assert got.dtype == want.dtype, f"{a} {op} {b}"
    for red in ("sum", "mean", "max"):
        assert getattr(ns.ones((3, 2), dtype=a), red)(axis=0).dtype == \
            getattr(np.ones((3, 2), dtype=a), red)(axis=0).dtype


def test_bfloat16_and_float16_are_two_byte_shape_only_dtypes():
    ns, _ = namespace()
    x = ns.empty((8, 16), ns.bfloat16)
    assert x.nbytes == 256 and x.itemsize == 2 and str(x.dtype) == "bfloat16"
    assert (x @ ns.empty((16, 4), ns.bfloat16)).dtype == ns.bfloat16
    assert ns.cost.gemms[-1] == (8, 4, 16, 1, "bfloat16")      # priced as bfloat16
    assert (x + ns.empty(16, ns.float32)).dtype == np.float32
    assert (x * 0.5).dtype == ns.bfloat16 and x.astype(ns.float32).nbytes == 512
    assert ns.empty(4, ns.float16).nbytes == 8
    assert np.dtype(ns.bfloat16).itemsize == 2             # what NumPy-side code sees


def test_array_module_and_blocking_see_the_namespace():
    ns, charges = namespace()
    x = ns.empty((1000, 512), ns.float32)
    assert backend.array_module(x) is ns
    assert backend.array_module(np.empty(3)) is np
    assert list(blocking.row_blocks(ns, 1000, 512)) == [slice(0, 1000)]   # one kernel
    assert len(list(blocking.row_blocks(np, 1000, 512))) > 1               # NumPy: blocks
    calls = []
    blocking.for_each_block(ns, 1000, 512, calls.append)
    assert calls == [slice(0, 1000)]


def test_add_at_and_gathers_are_charged_as_scatter_and_gather():
    ns, charges = namespace()
    w = ns.zeros((256, 64), ns.float32)
    idx = ns.zeros(100, ns.int64)
    charges.clear()
    rows = w[idx]
    ns.add.at(w, idx, rows)
    assert [k for k, _ in charges] == ["gather", "scatter"]
    assert rows.shape == (100, 64) and rows.base is None
    assert ns.cost.memory[-1] == ("scatter", 800 + 3 * 100 * 64 * 4)
