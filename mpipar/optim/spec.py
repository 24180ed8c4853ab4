"""Which optimiser, with which hyper-parameters: one value, built once per parameter set.

    spec = OptimizerSpec("adamw", lr=3e-4, weight_decay=0.1)   # betas (0.9, 0.95), eps 1e-8
    opt = spec.build(model.state_dict())                       # an AdamW over those tensors
    spec.state_names                                           # ("exp_avg", "exp_avg_sq")

The trainer builds one over its parameters, ZeRO one over its shard's pieces, the training
benchmark one for mpipar and the same numbers for PyTorch: the defaults live here once.
``betas`` default to GPT-2/nanoGPT's (0.9, 0.95), not Adam's (0.9, 0.999).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mpipar.optim.adamw import AdamW
from mpipar.optim.base import Optimizer, decays_by_default
from mpipar.optim.sgd import SGD

OPTIMIZERS: dict[str, type[Optimizer]] = {"adamw": AdamW, "sgd": SGD}


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)     # AdamW
    eps: float = 1e-8                            # AdamW
    momentum: float = 0.9                        # SGD

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimiser {self.name!r} is not one of {', '.join(OPTIMIZERS)}")
        for what, v in (("learning rate", self.lr), ("weight decay", self.weight_decay),
                        ("eps", self.eps), ("momentum", self.momentum)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{what} must be a finite number >= 0, got {v}")

    @property
    def cls(self) -> type[Optimizer]:
        return OPTIMIZERS[self.name]

    @property
    def state_names(self) -> tuple[str, ...]:
        """The per-tensor state buffers of this optimiser (``exp_avg`` ...)."""
        return self.cls._state_names

    def hyper(self) -> dict[str, Any]:
        """Keyword arguments of ``cls`` (the ones it takes)."""
        if self.name == "adamw":
            return dict(lr=self.lr, weight_decay=self.weight_decay, betas=self.betas, eps=self.eps)
        return dict(lr=self.lr, weight_decay=self.weight_decay, momentum=self.momentum)

    def build(self, params: Mapping[str, Any],
              decay: Callable[[str, Any], bool] = decays_by_default) -> Optimizer:
        return self.cls(params, decay=decay, **self.hyper())
