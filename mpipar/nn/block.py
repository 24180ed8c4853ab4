"""Pre-LN transformer block (GPT-2 / nanoGPT): two residual branches.

Math (x: (B, T, C))::

    x1  = x  + drop(attn(ln_1(x)))
    out = x1 + drop(mlp(ln_2(x1)))

    dx1 = dout + ln_2'(mlp'(drop'(dout)))
    dx  = dx1  + ln_1'(attn'(drop'(dx1)))

Parameters and gradients are dicts keyed by nanoGPT's names relative to the block:
``ln_1.weight``, ``ln_1.bias``, ``attn.c_attn.weight``, ``attn.c_attn.bias``,
``attn.c_proj.weight``, ``attn.c_proj.bias``, ``ln_2.*``, ``mlp.c_fc.*``, ``mlp.c_proj.*``.
Bias entries may be missing (``bias=False``).
"""

from __future__ import annotations

from typing import Any

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


def forward(x: Any, p: dict[str, Any], NH: int, dropout_p: float = 0.0,
            rng: Any = None) -> tuple[Any, tuple]:
    g = p.get
    h, ln1 = layernorm.forward(x, p["ln_1.weight"], g("ln_1.bias"))  # (B, T, C)
    a, att = attention.forward(h, p["attn.c_attn.weight"], g("attn.c_attn.bias"),
                               p["attn.c_proj.weight"], g("attn.c_proj.bias"), NH,
                               dropout_p, rng)      # (B, T, C)
    a, drop1 = dropout.forward(a, dropout_p, rng)
    x1 = x + a                                      # (B, T, C)
    h, ln2 = layernorm.forward(x1, p["ln_2.weight"], g("ln_2.bias"))
    m, mlpc = mlp.forward(h, p["mlp.c_fc.weight"], g("mlp.c_fc.bias"),
                          p["mlp.c_proj.weight"], g("mlp.c_proj.bias"))  # (B, T, C)
    m, drop2 = dropout.forward(m, dropout_p, rng)
    m += x1                                         # (B, T, C) out
    return m, (ln1, att, drop1, ln2, mlpc, drop2)


def backward(dout: Any, cache: tuple, d: dict[str, Any]) -> Any:
    """Accumulate into the gradient dict ``d``; return dx (B, T, C)."""
    ln1, att, drop1, ln2, mlpc, drop2 = cache
    g = d.get
    dm = dropout.backward(dout, drop2)
    dh = mlp.backward(dm, mlpc, d["mlp.c_fc.weight"], g("mlp.c_fc.bias"),
                      d["mlp.c_proj.weight"], g("mlp.c_proj.bias"))  # (B, T, C)
    dx1 = layernorm.backward(dh, ln2, d["ln_2.weight"], g("ln_2.bias"))
    dx1 += dout                                     # (B, T, C) residual
    da = dropout.backward(dx1, drop1)
    dh = attention.backward(da, att, d["attn.c_attn.weight"], g("attn.c_attn.bias"),
                            d["attn.c_proj.weight"], g("attn.c_proj.bias"))
    dx = layernorm.backward(dh, ln1, d["ln_1.weight"], g("ln_1.bias"))
    dx += dx1                                       # (B, T, C)
    return dx
