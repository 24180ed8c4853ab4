"""The GPT as a list of stages, each a forward/backward pair over named parameter views.

    EmbeddingStage   forward(idx (B, T))          -> (x (B, T, C), cache)     wte, wpe (+ dropout)
    BlockStage(i)    forward(x (B, T, C))         -> (x (B, T, C), cache)     transformer.h.i.*
    HeadStage        forward(x, targets)          -> (None, loss, cache)      ln_f, lm_head (tied
                     forward(x)                   -> (logits, None, None)     to wte), the loss

    every stage      backward(dout, cache) -> dx  (the head's dout is d(total)/d(loss), a
                                                   number; the embedding returns None)

``GPT`` runs them in order; a pipeline stage runs a contiguous slice of the same list. Every
stage works on the model's dicts of parameter and gradient views (full nanoGPT names), so a
slice needs no copies. Caches are returned to the caller, which keys them by micro-batch
when several are in flight. Backward accumulates into the gradient views. Tensor
parallelism gives ``BlockStage`` a ``ParallelRegion`` (its communication points) and this
rank's weight slices, and swaps the embedding and head for vocabulary-parallel ones
(``parallel/tensor_parallel.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mpipar.nn import crossentropy, dropout, embedding, layernorm, linear
from mpipar.nn.block import RECOMPUTE, SERIAL, KeepActivations, ParallelRegion


@dataclass
class RunState:
    """Shared by a model's stages: dropout on or off, and the dropout generator."""

    training: bool = True
    dropout: float = 0.0
    rng: Any = None

    @property
    def p(self) -> float:
        return self.dropout if self.training else 0.0


class EmbeddingStage:
    """Token + position embedding, then dropout (``transformer.drop`` in nanoGPT)."""

    names = ("transformer.wte.weight", "transformer.wpe.weight")

    def __init__(self, params: dict, grads: dict, state: RunState):
        self.params, self.grads, self.state = params, grads, state

    def forward(self, idx: Any) -> tuple[Any, tuple]:
        x, emb = embedding.forward(idx, self.params["transformer.wte.weight"],
                                   self.params["transformer.wpe.weight"])  # (B, T, C)
        x, drop = dropout.forward(x, self.state.p, self.state.rng)
        return x, (emb, drop)

    def backward(self, dx: Any, cache: tuple) -> None:
        emb, drop = cache
        embedding.backward(dropout.backward(dx, drop), emb, self.grads["transformer.wte.weight"],
                           self.grads["transformer.wpe.weight"])


def block_grads(grads: Any, names: tuple[str, ...], prefix_len: int) -> dict[str, Any]:
    """A block's gradients under short names (``ln_1.weight`` ...), looked up now: ZeRO-2 may
    have given them new storage since the last backward (``GradStore.use_buckets``)."""
    return {k[prefix_len:]: grads[k] for k in names}


class BlockStage:
    """Transformer block ``i`` (parameters ``transformer.h.{i}.*``): ``NH`` heads, the
    block's communication points ``region`` (``SERIAL``: none; tensor parallel: this rank's
    shard of the weights, its heads, and the tp group's f and g), and what its forward keeps
    for backward, ``recompute`` (``block.RECOMPUTE["none" | "selective" | "full"]``)."""

    def __init__(self, i: int, params: dict, grads: dict, NH: int, state: RunState,
                 region: ParallelRegion = SERIAL, recompute: KeepActivations = RECOMPUTE["none"]):
        prefix = f"transformer.h.{i}."
        self.i, self.NH, self.state, self.region = i, NH, state, region
        self.recompute = recompute
        self.names = tuple(k for k in params if k.startswith(prefix))
        self.p = {k[len(prefix):]: params[k] for k in self.names}
        self.grads, self._prefix = grads, len(prefix)

    def forward(self, x: Any) -> tuple[Any, Any]:
        return self.recompute.forward(x, self.p, self.NH, self.state.p, self.state.rng,
                                      self.region)

    def backward(self, dx: Any, cache: Any) -> Any:
        return self.recompute.backward(dx, cache, self.p,
                                       block_grads(self.grads, self.names, self._prefix),
                                       self.NH, self.region)


class HeadStage:
    """Final layer norm, tied language-model head (``x wte^T``) and mean cross-entropy."""

    def __init__(self, params: dict, grads: dict):
        self.names = tuple(k for k in params if k.startswith("transformer.ln_f."))
        self.params, self.grads = params, grads

    def forward(self, x: Any, targets: Any = None) -> tuple[Any, Any, tuple | None]:
        """``(None, loss, cache)`` with targets (the logits become the cached softmax);
        ``(logits (B, T, V), None, None)`` without."""
        P = self.params
        h, ln = layernorm.forward(x, P["transformer.ln_f.weight"], P.get("transformer.ln_f.bias"))
        logits, lin = linear.forward(h, P["transformer.wte.weight"])  # (B, T, V)
        if targets is None:
            return logits, None, None
        loss, ce = crossentropy.forward(logits, targets)  # logits overwritten by softmax
        return None, loss, (ln, lin, ce)

    def backward(self, dloss: float, cache: tuple) -> Any:
        """dx (B, T, C) of ``dloss * loss``; accumulates into ln_f and wte gradients."""
        ln, lin, ce = cache
        G = self.grads
        dlogits = crossentropy.backward(dloss, ce)          # (B*T, V)
        dh = linear.backward(dlogits, lin, G["transformer.wte.weight"])  # (B, T, C)
        return layernorm.backward(dh, ln, G["transformer.ln_f.weight"],
                                  G.get("transformer.ln_f.bias"))
