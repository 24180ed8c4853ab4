"""Neural-network layers as forward/backward pairs on ``xp`` arrays, and the GPT model.

Each op module (``linear``, ``layernorm``, ``gelu``, ``attention``, ``mlp``, ``block``,
``embedding``, ``crossentropy``, ``dropout``) has ``forward(x, params...) -> (out, cache)``
and ``backward(dout, cache, grads...) -> dx``; backward accumulates (``+=``) into the
gradient arrays it is given. ``gpt.GPT`` strings them into stages over flat buffers.
"""

from mpipar.nn.gpt import GPT, PRESETS, GPTConfig

__all__ = ["GPT", "GPTConfig", "PRESETS"]
