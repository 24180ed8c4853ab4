"""The GPT model: gradients, names and shapes, checkpoints, initialisation, sampling."""

import math

import numpy as np
import pytest

from mpipar.backend import to_host
from mpipar.nn import GPT, PRESETS, GPTConfig
from mpipar.nn.stages import BlockStage, EmbeddingStage, HeadStage
from mpipar.testing.arrays import arrays_in
from nn_gradcheck import numerical_grad, rel_error

MICRO = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


def batch(xp, cfg, B=2, T=None, seed=0):
    rng = np.random.default_rng(seed)
    T = T or cfg.block_size
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    return xp.asarray(idx), xp.asarray(targets)


def nanogpt_shapes(V, block, L, C, bias=True):
    s = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (block, C)}
    for i in range(L):
        h = f"transformer.h.{i}."
        s.update({h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
                  h + "attn.c_attn.weight": (3 * C, C), h + "attn.c_attn.bias": (3 * C,),
                  h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
                  h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
                  h + "mlp.c_fc.weight": (4 * C, C), h + "mlp.c_fc.bias": (4 * C,),
                  h + "mlp.c_proj.weight": (C, 4 * C), h + "mlp.c_proj.bias": (C,)})
    s.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)})
    if not bias:
        s = {k: v for k, v in s.items() if not k.endswith(".bias")}
    return s


@pytest.mark.parametrize("cfg", [MICRO, MICRO.replace(bias=False), MICRO.replace(dropout=0.1)],
                         ids=["bias", "nobias", "dropout"])
def test_model_gradient(xp, cfg):
    model = GPT(cfg, seed=1, dtype="float64", xp=xp)
    # larger weights than the 0.02 init so every path carries signal
    model.param_buffer[...] = xp.asarray(np.random.default_rng(2).standard_normal(model.layout.numel) * 0.3)
    idx, targets = batch(xp, cfg, T=6)

    def reseed():  # identical dropout masks in every forward
        if cfg.dropout:
            model.state.rng = xp.random.default_rng(4)

    reseed()
    loss, grads = model.loss_and_grads(idx, targets)

    def f():
        reseed()
        return float(model.forward(idx, targets)[1])

    assert abs(f() - loss) < 1e-12
    small = ["transformer.ln_f.weight", "transformer.h.0.attn.c_proj.weight",
             "transformer.h.1.ln_1.weight", "transformer.wpe.weight"]
    if cfg.bias:
        small += ["transformer.h.0.attn.c_attn.bias", "transformer.h.1.mlp.c_proj.bias"]
    for name in small:
        err = rel_error(grads[name], numerical_grad(f, model.params[name]))
        assert err < 1e-6, f"{name}: {err:.2e}"
    # a random subset of all entries, through the flat buffer
    entries = np.random.default_rng(3).choice(model.layout.numel, 60, replace=False)
    num = numerical_grad(f, model.param_buffer, entries=entries)
    err = rel_error(to_host(model.grad_buffer)[entries], num[entries])
    assert err < 1e-6, f"random entries: {err:.2e}"


def test_names_and_shapes_match_nanogpt():
    for cfg in (MICRO, MICRO.replace(bias=False), PRESETS["tiny"]):
        sd = GPT(cfg).state_dict()
        want = nanogpt_shapes(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd, cfg.bias)
        assert list(sd) == list(want)
        assert {k: tuple(v.shape) for k, v in sd.items()} == want
        assert "lm_head.weight" not in sd


def test_flat_buffers(xp):
    model = GPT(MICRO, xp=xp)
    assert model.param_buffer.ndim == 1 and model.param_buffer.size == model.num_parameters()
    assert model.grad_buffer.shape == model.param_buffer.shape
    assert model.param_buffer.dtype == np.float32 and model.params["transformer.wte.weight"].dtype == np.float32
    pos = 0
    for name, (a, b) in model.layout.offsets.items():
        assert a == pos
        pos = b
        model.params[name][...] = 7          # views write through to the buffer
        model.grads[name][...] = 3
        assert np.all(to_host(model.param_buffer[a:b]) == 7) and np.all(to_host(model.grad_buffer[a:b]) == 3)
    assert pos == model.layout.numel


def test_init(xp):
    cfg = PRESETS["tiny"]
    a, b, c = GPT(cfg, seed=0, xp=xp), GPT(cfg, seed=0, xp=xp), GPT(cfg, seed=1, xp=xp)
    assert np.array_equal(to_host(a.param_buffer), to_host(b.param_buffer))
    assert not np.array_equal(to_host(a.param_buffer), to_host(c.param_buffer))
    d = GPT(cfg, seed=0, dtype="float64", xp=xp)
    assert np.array_equal(to_host(a.param_buffer), to_host(d.param_buffer).astype(np.float32))
    sd = {k: to_host(v) for k, v in a.state_dict().items()}
    for k, v in sd.items():
        if k.endswith(".bias"):
            assert np.all(v == 0), k
        elif ".ln_" in k:
            assert np.all(v == 1), k
    wte_std = sd["transformer.wte.weight"].std()
    proj_std = np.concatenate([sd[f"transformer.h.{i}.mlp.c_proj.weight"].ravel() for i in range(cfg.n_layer)]).std()
    assert abs(wte_std - 0.02) < 0.001
    assert abs(proj_std - 0.02 / math.sqrt(2 * cfg.n_layer)) < 0.0005


def test_loss_at_init_is_log_vocab(xp):
    cfg = PRESETS["tiny"]
    model = GPT(cfg, xp=xp)
    idx, targets = batch(xp, cfg, B=4)
    loss, _ = model.loss_and_grads(idx, targets)
    assert abs(loss - math.log(cfg.vocab_size)) < 0.05
    assert np.isfinite(to_host(model.grad_buffer)).all()


def test_float32_matches_float64(xp):
    cfg = PRESETS["tiny"]
    idx, targets = batch(xp, cfg, B=2)
    l32, g32 = GPT(cfg, xp=xp).loss_and_grads(idx, targets)
    m64 = GPT(cfg, dtype="float64", xp=xp)
    l64, _ = m64.loss_and_grads(idx, targets)
    assert abs(l32 - l64) < 1e-5
    assert rel_error(to_host(GPT(cfg, xp=xp).loss_and_grads(idx, targets)[1]["transformer.wte.weight"]),
                     to_host(m64.grads["transformer.wte.weight"])) < 1e-4


def test_grads_zeroed_or_accumulated(xp):
    model = GPT(MICRO, dtype="float64", xp=xp)
    idx, targets = batch(xp, MICRO)
    model.loss_and_grads(idx, targets)
    once = to_host(model.grad_buffer).copy()
    model.loss_and_grads(idx, targets)
    assert np.array_equal(to_host(model.grad_buffer), once)
    model.loss_and_grads(idx, targets, accumulate=True)
    assert np.allclose(to_host(model.grad_buffer), 2 * once, rtol=1e-12, atol=0)
    model.loss_and_grads(idx, targets, dloss=0.5)
    assert np.allclose(to_host(model.grad_buffer), 0.5 * once, rtol=1e-12, atol=0)


def test_tied_embedding_gradient_is_sum_of_both_uses(xp):
    cfg = MICRO
    model = GPT(cfg, dtype="float64", xp=xp)
    idx, targets = batch(xp, cfg)
    _, loss, caches = model.forward(idx, targets)
    model.zero_grad()
    dx = model.stages[-1].backward(1.0, caches[-1])
    head_part = to_host(model.grads["transformer.wte.weight"]).copy()
    for stage, c in zip(reversed(model.stages[1:-1]), reversed(caches[1:-1])):
        dx = stage.backward(dx, c)
    emb_part = np.zeros_like(head_part)
    np.add.at(emb_part, to_host(idx).ravel(), to_host(dx).reshape(-1, cfg.n_embd))
    model.stages[0].backward(dx, caches[0])
    assert np.abs(head_part).max() > 0 and np.abs(emb_part).max() > 0
    assert np.allclose(to_host(model.grads["transformer.wte.weight"]), head_part + emb_part,
                       rtol=1e-12, atol=1e-15)


def test_stages_compose_to_forward(xp):
    model = GPT(MICRO, dtype="float64", xp=xp)
    assert isinstance(model.stages[0], EmbeddingStage) and isinstance(model.stages[-1], HeadStage)
    assert all(isinstance(s, BlockStage) for s in model.stages[1:-1])
    assert len(model.stages) == MICRO.n_layer + 2
    idx, targets = batch(xp, MICRO)
    _, loss, _ = model.forward(idx, targets)
    x, _ = model.stages[0].forward(idx)
    for s in model.stages[1:-1]:
        x, _ = s.forward(x)
    _, loss2, _ = model.stages[-1].forward(x, targets)
    assert float(loss) == float(loss2)
    logits, none, cache = model.forward(idx)
    assert logits.shape == (2, MICRO.block_size, MICRO.vocab_size) and none is None and cache is None


def test_state_dict_round_trip(xp):
    cfg = PRESETS["tiny"]
    a = GPT(cfg, seed=0, xp=xp)
    idx, targets = batch(xp, cfg, B=2)
    a.param_buffer += xp.asarray(np.random.default_rng(5).standard_normal(a.layout.numel).astype(np.float32) * 0.01)
    saved = {k: to_host(v).copy() for k, v in a.state_dict().items()}  # e.g. np.savez
    b = GPT(cfg, seed=123, xp=xp)
    assert b.loss_and_grads(idx, targets)[0] != a.loss_and_grads(idx, targets)[0]
    b.load_state_dict(saved)
    la, lb = a.loss_and_grads(idx, targets)[0], b.loss_and_grads(idx, targets)[0]
    assert la == lb
    assert np.array_equal(to_host(a.grad_buffer), to_host(b.grad_buffer))


def test_load_state_dict_nanogpt_extras_and_errors():
    a, b = GPT(MICRO, seed=0), GPT(MICRO, seed=1)
    sd = {k: v.copy() for k, v in a.state_dict().items()}
    # nanoGPT checkpoints: lm_head.weight (tied), causal-mask buffers, torch.compile prefix
    ext = {"_orig_mod." + k: v for k, v in sd.items()}
    ext["_orig_mod.lm_head.weight"] = sd["transformer.wte.weight"].copy()
    ext["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 8, 8)))
    b.load_state_dict(ext)
    assert np.array_equal(a.param_buffer, b.param_buffer)

    bad = dict(sd, **{"lm_head.weight": sd["transformer.wte.weight"] + 1})
    with pytest.raises(ValueError, match="lm_head"):
        b.load_state_dict(bad)
    missing = {k: v for k, v in sd.items() if k != "transformer.ln_f.bias"}
    with pytest.raises(KeyError, match="transformer.ln_f.bias"):
        b.load_state_dict(missing)
    b.load_state_dict(missing, strict=False)
    with pytest.raises(KeyError, match="foo"):
        b.load_state_dict(dict(sd, foo=np.zeros(3)))
    b.load_state_dict(dict(sd, foo=np.zeros(3)), strict=False)
    with pytest.raises(ValueError, match="shape"):
        b.load_state_dict(dict(sd, **{"transformer.wpe.weight": np.zeros((9, 8))}))


def test_num_parameters_and_flops():
    cfg = PRESETS["shakespeare"]
    model = GPT(cfg)
    shapes = nanogpt_shapes(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd)
    N = sum(math.prod(s) for s in shapes.values())
    assert model.num_parameters() == N
    Nne = N - cfg.block_size * cfg.n_embd
    assert model.num_parameters(non_embedding=True) == Nne
    assert model.flops_per_token() == 6 * Nne + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert model.flops_per_token(T=64) == 6 * Nne + 12 * cfg.n_layer * cfg.n_embd * 64


def test_presets_fit_parallel_layouts():
    t = PRESETS["tiny"]
    for n in (t.n_layer, t.n_head, t.n_embd, 4 * t.n_embd):
        assert n % 8 == 0 and n % 4 == 0
    assert t.vocab_size == 256
    s = PRESETS["shakespeare"]
    assert (s.n_layer, s.n_head, s.n_embd, s.block_size, s.vocab_size) == (6, 6, 384, 256, 256)


def test_generate(xp):
    cfg = MICRO
    model = GPT(cfg, seed=0, xp=xp)
    prompt = xp.asarray(np.array([[1, 2, 3], [4, 5, 6]]))
    out1 = to_host(model.generate(prompt, 20, seed=7))
    out2 = to_host(model.generate(prompt, 20, seed=7))
    out3 = to_host(model.generate(prompt, 20, seed=8))
    assert out1.shape == (2, 23) and np.array_equal(out1[:, :3], to_host(prompt))
    assert np.array_equal(out1, out2) and not np.array_equal(out1, out3)
    assert out1.min() >= 0 and out1.max() < cfg.vocab_size
    # beyond block_size the context is cropped (no error), and top_k=1 is greedy
    long = to_host(model.generate(prompt, 2 * cfg.block_size, top_k=1, seed=0))
    greedy = to_host(model.generate(prompt, 2 * cfg.block_size, temperature=0))
    assert long.shape == (2, 3 + 2 * cfg.block_size) and np.array_equal(long, greedy)
    # the last greedy token is the argmax over the last block_size tokens only
    logits, _, _ = model.forward(xp.asarray(greedy[:, -cfg.block_size - 1:-1]))
    assert np.array_equal(to_host(logits)[:, -1].argmax(-1), greedy[:, -1])


def test_generate_turns_off_dropout():
    model = GPT(MICRO.replace(dropout=0.5), seed=0)
    prompt = np.array([[1, 2, 3]])
    a = model.generate(prompt, 5, temperature=0)
    b = model.generate(prompt, 5, temperature=0)
    assert np.array_equal(a, b) and model.state.training


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_float32_stays_float32(xp, dropout):
    """No silent float64 upcasts (a NumPy float64 scalar would promote a whole tensor)."""
    cfg = MICRO.replace(dropout=dropout)
    model = GPT(cfg, xp=xp)
    idx, targets = batch(xp, cfg)
    _, loss, caches = model.forward(idx, targets)
    assert loss.dtype == np.float32
    floats = [a for a in arrays_in(caches) if a.dtype.kind == "f"]
    assert floats and all(a.dtype == np.float32 for a in floats), {str(a.dtype) for a in floats}
    model.backward(caches)
    assert model.grad_buffer.dtype == np.float32
