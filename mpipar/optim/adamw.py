"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019; Kingma & Ba, 2015).

Per tensor, at step t (1-based), with gradient g::

    m = b1 m + (1 - b1) g                      first moment
    v = b2 v + (1 - b2) g^2                    second moment
    p = p (1 - lr wd)                          decoupled decay (matrices only, see base.py)
    p = p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

the same arithmetic as torch.optim.AdamW, so checkpoints and curves compare directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from mpipar import kernels
from mpipar.optim.base import Optimizer, decays_by_default


class AdamW(Optimizer):
    _state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Mapping[str, Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01,
                 decay: Callable[[str, Any], bool] = decays_by_default) -> None:
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        super().__init__(params, lr, weight_decay, decay)
        self.b1, self.b2, self.eps = float(b1), float(b2), float(eps)

    def bias_corrections(self) -> tuple[float, float]:
        """``(1 - b1^t, 1 - b2^t)`` at the current step t: Adam's bias corrections."""
        t = self.step_count
        return 1.0 - self.b1 ** t, 1.0 - self.b2 ** t

    @kernels.twin(kernels.adamw_update, arg=1)  # a GPU: one fused kernel per tensor
    def _update(self, p: Any, g: Any, state: dict[str, Any], lr: float, decay: bool,
                buf: Any) -> None:
        xp, b1, b2 = self.xp, self.b1, self.b2
        m, v = state["exp_avg"], state["exp_avg_sq"]
        bc1, bc2 = self.bias_corrections()
        # every op writes into m, v, p or the shared scratch: no temporaries per tensor
        m *= b1
        xp.multiply(g, 1.0 - b1, out=buf)
        m += buf                                   # m = b1 m + (1-b1) g
        v *= b2
        xp.multiply(g, g, out=buf)
        buf *= 1.0 - b2
        v += buf                                   # v = b2 v + (1-b2) g^2
        if decay and self.weight_decay:
            p *= 1.0 - lr * self.weight_decay
        xp.sqrt(v, out=buf)
        buf *= 1.0 / math.sqrt(bc2)
        buf += self.eps                            # sqrt(v_hat) + eps
        xp.divide(m, buf, out=buf)
        buf *= -lr / bc1                           # -lr m_hat / (sqrt(v_hat) + eps)
        p += buf
