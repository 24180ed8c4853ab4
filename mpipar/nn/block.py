"""Pre-LN transformer block (GPT-2 / nanoGPT): two residual branches.

Math (x: (B, T, C))::

    x1  = x  + drop(g(attn(f(ln_1(x)))))
    out = x1 + drop(g(mlp(f(ln_2(x1)))))

    dx1 = dout + ln_2'(f'(mlp'(g'(drop'(dout)))))
    dx  = dx1  + ln_1'(f'(attn'(g'(drop'(dx1)))))

``f`` and ``g`` are the block's communication points (Megatron-LM's conjugate operators,
Shoeybi et al. 2019), given as a ``ParallelRegion``: one process uses ``SERIAL``, where both
are the identity; tensor parallelism passes a region whose ``g`` all-reduces in forward and
whose ``f`` all-reduces in backward (``parallel/tp_comm.py``), and this rank's slices of the
weights. The block itself exists once. The output projections' biases are added after
``g``, once, rather than inside the projection (where every tensor-parallel rank would add
them to its partial sum); the arithmetic is the same as ``linear``'s.

Activation recompute (``RECOMPUTE[mode]``, the block's policy for what its forward keeps;
``Layout.recompute`` chooses one for every block). Per layer and micro-batch, a forward keeps
(elements; s bytes each; B sequences of T positions, C = n_embd; under tp degree t: H = C/t
attention width, F = 4C/t MLP width, a = n_head/t heads; biases and weights are parameters,
not counted)::

    "none"        4BTC   block input x, ln_1 output (c_attn input), x1, ln_2 output (c_fc input)
                + 4BT    layer-norm mean and rstd, two layer norms
                + 4BTH   qkv (3BTH), attention output y (c_proj input)
                + 3BTF   c_fc output (GELU input), GELU's tanh, GELU output (c_proj input)
                + aBT^2  attention probabilities
      dropout p > 0:
                + aBT^2  attention-dropout mask      + 2BTC  the two residual-dropout masks
                = s BT (4C + 4H + 3F + 4 + aT)  [+ s BT (2C + aT)]
                = s BT (4C + 16C/t + 4 + aT)     with H = C/t, F = 4C/t
    "selective"   "none" without the two aBT^2 terms: s BT (4C + 16C/t + 4) [+ 2 s BTC]
                (Korthikanti et al. 2022, section 4.3: backward recomputes the scores, the
                softmax and the attention-dropout mask from the cached q, k: ``attention.RECOMPUTE``)
    "full"        s BTC: the block input only (``FullRecompute``)

Under sequence parallelism (``parallel/tp_comm.SequenceParallelRegion``) what lies between
the regions is (B, T/t, C): x, x1, the residual-dropout masks and the layer norms' mean and
rstd shrink by t, while f's all-gathered (B, T, C) inputs of c_attn and c_fc stay whole
(kept as gathered; Megatron keeps them split and gathers again in backward)::

    "none"        s BT (2C + 18C/t + 4/t + aT)  [+ s BT (2C/t + aT)]
    "selective"   s BT (2C + 18C/t + 4/t)       [+ 2 s BTC/t]
    "full"        s BTC/t

plus, when p > 0, a copy of the dropout generator's state for the masks to redraw (a few
hundred bytes: ``dropout.snapshot``). The masks are in the activations' dtype, s bytes an
element (Megatron's 1-byte masks would count 1). With "full", backward re-materialises one
block's "none" set at a time. Every mode gives the same bits: a recomputation runs the
operations of forward in their order, on the same inputs, and draws the same masks. What a
mode costs: "selective" one (B, a, T, T) matmul and softmax per backward; "full" one forward
of the block per backward, including its communication points (under tensor parallelism
one more g all-reduce per branch in backward, as in Megatron-LM's full recompute).

Parameters and gradients are dicts keyed by nanoGPT's names relative to the block:
``ln_1.weight``, ``ln_1.bias``, ``attn.c_attn.weight``, ``attn.c_attn.bias``,
``attn.c_proj.weight``, ``attn.c_proj.bias``, ``ln_2.*``, ``mlp.c_fc.*``, ``mlp.c_proj.*``.
Bias entries may be missing (``bias=False``).
"""

from __future__ import annotations

from typing import Any, Protocol

from mpipar.backend import compute_dtype
from mpipar.nn import attention, dropout, layernorm, mlp

PARAM_NAMES = (
    "ln_1.weight", "ln_1.bias",
    "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
)


def param_shapes(C: int, bias: bool = True, mlp_ratio: int = 4) -> dict[str, tuple[int, ...]]:
    """Shapes of one block's parameters, PyTorch layout (out, in), in nanoGPT's order."""
    F = mlp_ratio * C
    shapes = {
        "ln_1.weight": (C,), "ln_1.bias": (C,),
        "attn.c_attn.weight": (3 * C, C), "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
        "ln_2.weight": (C,), "ln_2.bias": (C,),
        "mlp.c_fc.weight": (F, C), "mlp.c_fc.bias": (F,),
        "mlp.c_proj.weight": (C, F), "mlp.c_proj.bias": (C,),
    }
    if not bias:
        shapes = {k: v for k, v in shapes.items() if not k.endswith(".bias")}
    return shapes


class ParallelRegion(Protocol):
    """Where a block's branches meet other ranks: Megatron's f (around a branch's input) and
    g (around its output). Each returns its argument or a new array."""

    def copy_forward(self, x: Any) -> Any:
        """f forward: the branch input enters the parallel region."""

    def copy_backward(self, dx: Any) -> Any:
        """f backward: the gradient of the branch input leaves it."""

    def reduce_forward(self, x: Any) -> Any:
        """g forward: the branch output leaves the parallel region."""

    def reduce_backward(self, dx: Any) -> Any:
        """g backward: the gradient of the branch output enters it."""


class SerialRegion:
    """One process: f and g are the identity (no copy)."""

    def copy_forward(self, x: Any) -> Any:
        return x

    def copy_backward(self, dx: Any) -> Any:
        return dx

    def reduce_forward(self, x: Any) -> Any:
        return x

    def reduce_backward(self, dx: Any) -> Any:
        return dx


SERIAL = SerialRegion()


def _add_bias(x: Any, b: Any) -> None:
    if b is not None:
        x += b                                       # (B, T, C) + (C,)


def _bias_grad(dout: Any, db: Any) -> None:
    """db += the sum of dout over positions: ``linear.backward``'s bias term."""
    if db is not None:
        d2 = dout.reshape(-1, dout.shape[-1])
        db += d2.sum(axis=0, dtype=compute_dtype(d2.dtype))  # (C,), 16-bit: summed in fp32


def forward(x: Any, p: dict[str, Any], NH: int, dropout_p: float = 0.0, rng: Any = None,
            region: ParallelRegion = SERIAL,
            probabilities: attention.KeepProbabilities = attention.KEEP) -> tuple[Any, tuple]:
    """``(out, cache)``; ``NH`` is the number of heads whose weights ``p`` holds;
    ``probabilities``: what attention keeps of its softmax (``attention.KEEP`` / ``RECOMPUTE``)."""
    g = p.get
    h, ln1 = layernorm.forward(x, p["ln_1.weight"], g("ln_1.bias"))  # (B, T, C)
    h = region.copy_forward(h)
    a, att = attention.forward(h, p["attn.c_attn.weight"], g("attn.c_attn.bias"),
                               p["attn.c_proj.weight"], None, NH,
                               dropout_p, rng, probabilities)  # (B, T, C), partial under tp
    a = region.reduce_forward(a)                    # (B, T, C) whole
    _add_bias(a, g("attn.c_proj.bias"))
    a, drop1 = dropout.forward(a, dropout_p, rng)
    x1 = x + a                                      # (B, T, C)
    h, ln2 = layernorm.forward(x1, p["ln_2.weight"], g("ln_2.bias"))
    h = region.copy_forward(h)
    m, mlpc = mlp.forward(h, p["mlp.c_fc.weight"], g("mlp.c_fc.bias"),
                          p["mlp.c_proj.weight"], None)  # (B, T, C), partial under tp
    m = region.reduce_forward(m)
    _add_bias(m, g("mlp.c_proj.bias"))
    m, drop2 = dropout.forward(m, dropout_p, rng)
    m += x1                                         # (B, T, C) out
    return m, (ln1, att, drop1, ln2, mlpc, drop2)


def backward(dout: Any, cache: tuple, d: dict[str, Any],
             region: ParallelRegion = SERIAL) -> Any:
    """Accumulate into the gradient dict ``d``; return dx (B, T, C)."""
    ln1, att, drop1, ln2, mlpc, drop2 = cache
    g = d.get
    dm = region.reduce_backward(dropout.backward(dout, drop2))  # (B, T, C)
    _bias_grad(dm, g("mlp.c_proj.bias"))
    dh = mlp.backward(dm, mlpc, d["mlp.c_fc.weight"], g("mlp.c_fc.bias"),
                      d["mlp.c_proj.weight"], None)  # (B, T, C), partial under tp
    dh = region.copy_backward(dh)                   # (B, T, C) whole
    dx1 = layernorm.backward(dh, ln2, d["ln_2.weight"], g("ln_2.bias"))
    dx1 += dout                                     # (B, T, C) residual
    da = region.reduce_backward(dropout.backward(dx1, drop1))
    _bias_grad(da, g("attn.c_proj.bias"))
    dh = attention.backward(da, att, d["attn.c_attn.weight"], g("attn.c_attn.bias"),
                            d["attn.c_proj.weight"], None)
    dh = region.copy_backward(dh)
    dx = layernorm.backward(dh, ln1, d["ln_1.weight"], g("ln_1.bias"))
    dx += dx1                                       # (B, T, C)
    return dx


# ---- activation recompute: what a block's forward keeps for its backward ---------------------

class KeepActivations:
    """Recompute "none": the cache of ``forward`` is kept whole (see the module docstring)."""

    probabilities: attention.KeepProbabilities = attention.KEEP

    def forward(self, x: Any, p: dict[str, Any], NH: int, dropout_p: float, rng: Any,
                region: ParallelRegion) -> tuple[Any, Any]:
        """``(out, saved)``: the block's output and what its backward will need."""
        return forward(x, p, NH, dropout_p, rng, region, self.probabilities)

    def backward(self, dout: Any, saved: Any, p: dict[str, Any], d: dict[str, Any], NH: int,
                 region: ParallelRegion) -> Any:
        """dx of the block, accumulating into ``d``, from what ``forward`` saved."""
        return backward(dout, saved, d, region)


class SelectiveRecompute(KeepActivations):
    """Recompute "selective": attention keeps nothing of size T x T (``attention.RECOMPUTE``)."""

    probabilities = attention.RECOMPUTE


class FullRecompute(KeepActivations):
    """Recompute "full": forward keeps the block input and the dropout generator's state;
    backward reruns forward from them (its communication points included), then backward."""

    def forward(self, x: Any, p: dict[str, Any], NH: int, dropout_p: float, rng: Any,
                region: ParallelRegion) -> tuple[Any, Any]:
        saved = dropout.snapshot(rng) if dropout_p > 0.0 else None   # before forward draws
        out, _ = forward(x, p, NH, dropout_p, rng, region)
        return out, (x, dropout_p, saved)

    def backward(self, dout: Any, saved: Any, p: dict[str, Any], d: dict[str, Any], NH: int,
                 region: ParallelRegion) -> Any:
        return backward(dout, self.rerun(saved, p, NH, region), d, region)

    def rerun(self, saved: Any, p: dict[str, Any], NH: int, region: ParallelRegion) -> tuple:
        """The recomputation alone: forward again from the saved input and generator state;
        returns the whole cache "none" would have kept (a method of its own, so that a
        profiler or the simulator can tell recompute time from backward time)."""
        x, dropout_p, rng = saved
        return forward(x, p, NH, dropout_p, rng, region)[1]


RECOMPUTE: dict[str, KeepActivations] = {
    "none": KeepActivations(), "selective": SelectiveRecompute(), "full": FullRecompute(),
}
