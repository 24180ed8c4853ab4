"""SGD with momentum, optionally Nesterov (Sutskever et al., 2013), torch.optim.SGD's rule.

Per tensor, with gradient g (dampening 0)::

    g = g + wd p                 (L2 weight decay, matrices only, see base.py)
    b = mu b + g                 (b starts at zero, so the first step has b = g)
    d = g + mu b if nesterov else b
    p = p - lr d
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mpipar.optim.base import Optimizer, decays_by_default


class SGD(Optimizer):
    _state_names = ("momentum_buffer",)

    def __init__(self, params: Mapping[str, Any], lr: float = 1e-2, momentum: float = 0.9,
                 nesterov: bool = False, weight_decay: float = 0.0,
                 decay: Callable[[str, Any], bool] = decays_by_default) -> None:
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        super().__init__(params, lr, weight_decay, decay)
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def _update(self, p: Any, g: Any, state: dict[str, Any], lr: float, decay: bool,
                buf: Any) -> None:
        if decay and self.weight_decay:
            self.xp.multiply(p, self.weight_decay, out=buf)
            buf += g                               # g + wd p (grads stay untouched)
            g = buf.copy()
        b = state["momentum_buffer"]
        b *= self.momentum
        b += g                                     # b = mu b + g
        if self.nesterov:
            self.xp.multiply(b, self.momentum, out=buf)
            buf += g                               # g + mu b
        else:
            buf[...] = b
        buf *= -lr
        p += buf
