"""GPT-2 style decoder (nanoGPT's architecture and parameter names), hand-written backward.

    from mpipar.nn import GPT, PRESETS
    model = GPT(PRESETS["tiny"], seed=0, dtype="float32")      # xp=numpy by default
    loss, grads = model.loss_and_grads(idx, targets)          # idx, targets: int (B, T)
    model.param_buffer -= lr * model.grad_buffer              # one flat buffer each
    out = model.generate(idx[:1, :4], max_new_tokens=20, seed=0)

Parameters live in one flat contiguous buffer (``param_buffer``) and ``params`` maps each
nanoGPT name to a view of it; gradients likewise (``grad_buffer``, ``grads``), in the same
layout (``layout.offsets[name]``). The input embedding ``transformer.wte.weight`` doubles as
the output head (weight tying, Press & Wolf 2017), so its gradient is the sum of both uses
and ``lm_head.weight`` is not a separate parameter.

The model is the list ``stages``: an EmbeddingStage, n_layer BlockStages and a HeadStage
(final layer norm, head, loss), each a forward/backward pair (see ``stages.py``).

Initialisation follows GPT-2 / nanoGPT: weights N(0, 0.02), residual projections
(``*.c_proj.weight``) N(0, 0.02 / sqrt(2 n_layer)), biases 0, layer-norm weights 1. Values
are drawn in float64 on the host from ``numpy.random.default_rng(seed)``, tensor by tensor in
``layout`` order, then cast: every dtype and device starts from the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import numpy as np

from mpipar.backend import resolve_dtype, to_device, to_host
from mpipar.nn import block
from mpipar.nn.flat import FlatLayout
from mpipar.nn.grads import GradStore
from mpipar.nn.stages import BlockStage, EmbeddingStage, HeadStage, RunState


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    bias: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

    def replace(self, **kw: Any) -> "GPTConfig":
        return replace(self, **kw)


PRESETS: dict[str, GPTConfig] = {
    # tests: n_layer, n_head, n_embd, 4C all divisible by 8, so every dp x tp x pp layout
    # of up to 8 ranks fits (hs = 8)
    "tiny": GPTConfig(vocab_size=256, block_size=32, n_layer=8, n_head=8, n_embd=64),
    # trains visibly in about a minute on a 2-core CPU
    "small": GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128),
    # nanoGPT's shakespeare_char model (byte vocabulary; dropout 0 for benchmarking)
    "shakespeare": GPTConfig(vocab_size=256, block_size=256, n_layer=6, n_head=6, n_embd=384),
}

INIT_STD = 0.02


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """nanoGPT's parameter names and shapes, in its order (no ``lm_head.weight``: tied)."""
    V, C, L = config.vocab_size, config.n_embd, config.n_layer
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (V, C),
        "transformer.wpe.weight": (config.block_size, C),
    }
    for i in range(L):
        for k, s in block.param_shapes(C, config.bias).items():
            shapes[f"transformer.h.{i}.{k}"] = s
    shapes["transformer.ln_f.weight"] = (C,)
    if config.bias:
        shapes["transformer.ln_f.bias"] = (C,)
    return shapes


def init_host(config: GPTConfig, layout: FlatLayout, seed: int) -> np.ndarray:
    """The GPT-2 initial parameters as one float64 host buffer (``layout`` order)."""
    rng = np.random.default_rng(seed)
    buf = np.zeros(layout.numel, dtype=np.float64)
    views = layout.views(buf)
    resid_std = INIT_STD / math.sqrt(2 * config.n_layer)
    for name, v in views.items():
        if name.endswith(".bias"):
            continue                                     # zeros
        if ".ln_" in name or name.startswith("transformer.ln_f"):
            v[...] = 1.0                                 # layer-norm gain
        else:
            std = resid_std if name.endswith("c_proj.weight") else INIT_STD
            v[...] = rng.standard_normal(v.shape) * std
    return buf


def count_parameters(config: GPTConfig, non_embedding: bool = False) -> int:
    """Parameter count (the tied embedding once); ``non_embedding`` leaves out the position
    embedding, as nanoGPT's ``get_num_params`` does (wte stays: it is the head). A function of
    the config alone, so a sharded run can report the whole model's size."""
    shapes = param_shapes(config)
    n = sum(math.prod(s) for s in shapes.values())
    if non_embedding:
        n -= math.prod(shapes["transformer.wpe.weight"])
    return n


def flops_per_token(config: GPTConfig, T: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT MFU::

        6 N + 12 L C T

    N = non-embedding parameters (``count_parameters(config, non_embedding=True)``), L layers,
    C = n_embd (= n_head * hs), T = sequence length (block_size by default). 6N counts
    the weight matmuls (2 forward + 4 backward per parameter), 12 L C T the attention
    scores and weighted sums; causal masking savings are not counted.
    """
    T = config.block_size if T is None else T
    return 6 * count_parameters(config, non_embedding=True) + 12 * config.n_layer * config.n_embd * T


_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers, not parameters


class GPT:
    """GPT-2 decoder on ``xp`` arrays with parameters and gradients in flat buffers."""

    def __init__(self, config: GPTConfig, seed: int = 0, dtype: Any = "float32",
                 xp: ModuleType = np):
        self.config = config
        self.xp = xp
        self.dtype = resolve_dtype(dtype)
        self.layout = FlatLayout(param_shapes(config).items())
        self.param_buffer = to_device(init_host(config, self.layout, seed).astype(self.dtype), xp)
        self.params = self.layout.views(self.param_buffer)
        self._build_stages(seed + 1)                    # dropout masks: a separate stream

    def _build_stages(self, dropout_seed: int) -> None:
        """Gradients, run state and the stages over ``params``."""
        config, xp = self.config, self.xp
        self.grads = GradStore(self.layout, self.dtype, xp)   # views of grads.buffer
        rng = xp.random.default_rng(dropout_seed) if config.dropout > 0.0 else None
        self.state = RunState(training=True, dropout=config.dropout, rng=rng)
        self.stages: list[Any] = [EmbeddingStage(self.params, self.grads, self.state)]
        self.stages += [BlockStage(i, self.params, self.grads, config.n_head, self.state)
                        for i in range(config.n_layer)]
        self.stages.append(HeadStage(self.params, self.grads))

    def replica(self, dropout_seed: int) -> "GPT":
        """A GPT over the same parameter arrays (not copies) with gradients, caches and a
        dropout generator (seeded ``dropout_seed``) of its own, so it can run forward and
        backward beside this one on another thread (``nn.batch_threads``)."""
        twin = object.__new__(GPT)
        twin.config, twin.xp, twin.dtype, twin.layout = (self.config, self.xp, self.dtype,
                                                         self.layout)
        twin.param_buffer, twin.params = self.param_buffer, self.params
        twin._build_stages(dropout_seed)
        twin.state.training = self.state.training
        return twin

    # ---- mode -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "GPT":
        self.state.training = mode
        return self

    def eval(self) -> "GPT":
        return self.train(False)

    # ---- forward / backward -------------------------------------------------------------
    def forward(self, idx: Any, targets: Any = None) -> tuple[Any, Any, list | None]:
        """``(None, loss, cache)`` with targets, ``(logits (B, T, V), None, None)`` without.

        ``loss`` is a 0-d array: the mean cross-entropy over all B*T positions. With
        targets the logits are turned into softmax probabilities in place (kept in the
        cache) rather than returned.
        """
        idx = self.xp.asarray(idx)                       # host ints are copied to the device
        targets = None if targets is None else self.xp.asarray(targets)
        caches = []
        x = idx
        for stage in self.stages[:-1]:
            x, c = stage.forward(x)
            caches.append(c)
        logits, loss, c = self.stages[-1].forward(x, targets)
        if targets is None:
            return logits, None, None
        caches.append(c)
        return None, loss, caches

    def backward(self, cache: list, dloss: float = 1.0) -> None:
        """Accumulate d(dloss * loss)/dparams into ``grads`` (no zeroing here)."""
        dx = self.stages[-1].backward(dloss, cache[-1])
        for stage, c in zip(reversed(self.stages[:-1]), reversed(cache[:-1])):
            dx = stage.backward(dx, c)

    @property
    def grad_buffer(self) -> Any:
        """The flat gradient buffer (``grads`` are views of it); None once ZeRO-2 has moved
        the gradients into storage per tensor (``GradStore.use_buckets``)."""
        return self.grads.buffer

    def zero_grad(self) -> None:
        self.grads.zero()

    def loss_and_grads(self, idx: Any, targets: Any, accumulate: bool = False,
                       dloss: float = 1.0) -> tuple[float, dict[str, Any]]:
        """Mean loss (a float) and ``grads`` (views of ``grad_buffer``), zeroed first unless
        ``accumulate``; ``dloss`` scales the gradient (e.g. 1/micro-batches)."""
        if not accumulate:
            self.zero_grad()
        _, loss, cache = self.forward(idx, targets)
        self.backward(cache, dloss)
        return float(loss), self.grads

    # ---- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """name -> parameter, nanoGPT's names and shapes (no ``lm_head.weight``: tied to
        ``transformer.wte.weight``). The arrays are views of ``param_buffer``, as PyTorch's
        are references: copy them for a snapshot."""
        return dict(self.params)

    def load_state_dict(self, sd: dict[str, Any], strict: bool = True) -> None:
        """Copy ``sd`` (numpy/cupy/array-likes; a ``_orig_mod.`` prefix is stripped) into
        the parameters. ``lm_head.weight`` and causal-mask buffers (``*.attn.bias``) are
        accepted and not loaded; ``lm_head.weight`` must equal the embedding (tied)."""
        sd = {(k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k): v for k, v in sd.items()}
        if "lm_head.weight" in sd:
            head = to_host(sd.pop("lm_head.weight"))
            V, C = self.layout.shapes["transformer.wte.weight"]
            if head.shape != (V, C):
                raise ValueError(f"lm_head.weight has shape {head.shape}, expected {(V, C)}")
            wte = sd.get("transformer.wte.weight")
            if wte is not None and not np.array_equal(head, to_host(wte)):
                raise ValueError("lm_head.weight differs from transformer.wte.weight; this "
                                 "model ties them and cannot load an untied head")
        sd = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
        expected = self.layout.shapes
        missing = [k for k in expected if k not in sd]
        unexpected = [k for k in sd if k not in expected]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for name, value in sd.items():
            if name not in expected:
                continue
            host = to_host(value)
            if tuple(host.shape) != expected[name]:
                raise ValueError(f"{name}: shape {tuple(host.shape)} in state dict, "
                                 f"model expects {expected[name]}")
            self.params[name][...] = to_device(host.astype(self.dtype, copy=False), self.xp)

    # ---- sizes ----------------------------------------------------------------------
    def num_parameters(self, non_embedding: bool = False) -> int:
        """See ``count_parameters``."""
        return count_parameters(self.config, non_embedding)

    def flops_per_token(self, T: int | None = None) -> int:
        """See the module function ``flops_per_token``."""
        return flops_per_token(self.config, T)

    # ---- sampling -------------------------------------------------------------------
    def _last_logits(self, idx: Any) -> Any:
        """Logits of the last position only (B, V): the head runs on one position."""
        x = idx
        for stage in self.stages[:-1]:
            x, _ = stage.forward(x)
        logits, _, _ = self.stages[-1].forward(x[:, -1:, :])
        return logits[:, -1, :]                           # (B, V)

    def generate(self, idx: Any, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None) -> Any:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T0) and return (B, T0+n).

        The context is cropped to the last ``block_size`` tokens; sampling runs on the host
        in float64 with ``numpy.random.default_rng(seed)``, so a seed gives the same tokens
        on every device. ``temperature=0`` picks the most likely token; dropout is off.
        """
        xp = self.xp
        idx = xp.asarray(idx)
        if idx.ndim == 1:
            idx = idx[None, :]
        rng = np.random.default_rng(seed)
        was_training = self.state.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                cond = idx[:, -self.config.block_size:]
                logits = to_host(self._last_logits(cond)).astype(np.float64)  # (B, V)
                if temperature == 0:
                    nxt = logits.argmax(axis=-1)
                else:
                    logits /= temperature
                    if top_k is not None and top_k < logits.shape[-1]:
                        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]  # (B, 1)
                        logits[logits < kth] = -np.inf
                    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
                    cdf = np.cumsum(p, axis=-1)
                    u = rng.random((p.shape[0], 1)) * cdf[:, -1:]
                    nxt = np.minimum((cdf <= u).sum(axis=-1), p.shape[-1] - 1)
                nxt = xp.asarray(nxt.astype(idx.dtype)[:, None])  # (B, 1)
                idx = xp.concatenate([idx, nxt], axis=1)
        finally:
            self.train(was_training)
        return idx

    def __repr__(self) -> str:
        c = self.config
        return (f"GPT(L={c.n_layer}, NH={c.n_head}, C={c.n_embd}, V={c.vocab_size}, "
                f"block={c.block_size}, params={self.num_parameters():,}, {self.dtype.name})")
