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

Parameters and gradients are dicts keyed by nanoGPT's names relative to the block:
``ln_1.weight``, ``ln_1.bias``, ``attn.c_attn.weight``, ``attn.c_attn.bias``,
``attn.c_proj.weight``, ``attn.c_proj.bias``, ``ln_2.*``, ``mlp.c_fc.*``, ``mlp.c_proj.*``.
Bias entries may be missing (``bias=False``).
"""

from __future__ import annotations

from typing import Any, Protocol

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
        db += dout.reshape(-1, dout.shape[-1]).sum(axis=0)  # (C,)


def forward(x: Any, p: dict[str, Any], NH: int, dropout_p: float = 0.0, rng: Any = None,
            region: ParallelRegion = SERIAL) -> tuple[Any, tuple]:
    """``(out, cache)``; ``NH`` is the number of heads whose weights ``p`` holds."""
    g = p.get
    h, ln1 = layernorm.forward(x, p["ln_1.weight"], g("ln_1.bias"))  # (B, T, C)
    h = region.copy_forward(h)
    a, att = attention.forward(h, p["attn.c_attn.weight"], g("attn.c_attn.bias"),
                               p["attn.c_proj.weight"], None, NH,
                               dropout_p, rng)      # (B, T, C), a partial sum under tp
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
