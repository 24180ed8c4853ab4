"""What SGD and AdamW share: the parameter dict, which tensors decay, state save/restore."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mpipar import backend
from mpipar.backend import fused
from mpipar.nn.blocking import for_each_block


def decays_by_default(name: str, p: Any) -> bool:
    """Weight decay for matrices (linear and embedding weights) only.

    Biases and LayerNorm gains/shifts are 1-D: decaying them towards zero only hurts (the
    rule nanoGPT uses; see Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019).
    """
    return p.ndim >= 2


class Optimizer:
    """Base: keeps ``params`` (name -> array, updated in place) and per-tensor state.

    Subclasses name their per-tensor state buffers in ``_state_names`` and implement
    ``_update(p, g, state, lr, decay, buf)`` for one tensor or a piece of it: ``state`` maps
    each state name to the same piece of its buffer, ``buf`` is scratch space of ``p``'s shape,
    shared across tensors so that an update allocates nothing.

    An update is a chain of elementwise passes over the parameter, its gradient and state.
    On NumPy the chain runs on blocks of the flattened tensor (``nn.blocking.for_each_block``,
    on every CPU thread), so a block's p, g, state and scratch stay in cache from the first
    pass to the last and memory is read and written about once per step instead of once per
    pass; the arithmetic of every element is the same.
    """

    _state_names: tuple[str, ...] = ()

    def __init__(self, params: Mapping[str, Any], lr: float, weight_decay: float = 0.0,
                 decay: Callable[[str, Any], bool] = decays_by_default) -> None:
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"the learning rate must be a finite number >= 0, got {lr}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight decay must be a finite number >= 0, got {weight_decay}")
        if not params:
            raise ValueError("optimiser got no parameters")
        self.params = dict(params)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.decay = {name: bool(decay(name, p)) for name, p in self.params.items()}
        self.step_count = 0
        first = next(iter(self.params.values()))
        self.xp = backend.array_module(first)
        self.state: dict[str, dict[str, Any]] = {
            s: {name: self.xp.zeros_like(p) for name, p in self.params.items()}
            for s in self._state_names}
        largest = max(p.size for p in self.params.values())
        self._scratch = self.xp.empty(largest, dtype=first.dtype)

    def step(self, grads: Mapping[str, Any], lr: float | None = None) -> None:
        """One update of every parameter from ``grads`` (not modified); ``lr`` overrides."""
        lr = self.lr if lr is None else float(lr)
        missing = self.params.keys() - grads.keys()
        if missing:
            raise KeyError(f"no gradient for {sorted(missing)[:3]}")
        self.step_count += 1
        with fused(self.xp):           # a GPU runs it as one multi-tensor kernel (fused Adam)
            for name, p in self.params.items():
                g = grads[name]
                if g.shape != p.shape:
                    raise ValueError(f"gradient of {name} has shape {g.shape}, parameter {p.shape}")
                self._step_tensor(name, p, g, lr, self.decay[name])

    def _step_tensor(self, name: str, p: Any, g: Any, lr: float, decay: bool) -> None:
        """One tensor's update, block by block over its elements where it is contiguous (on
        NumPy: the blocks are for the CPU's caches; other modules update it whole)."""
        buf = self._scratch[:p.size].reshape(p.shape)
        state = {s: self.state[s][name] for s in self._state_names}
        if self.xp is not np or not all(getattr(a, "flags", None) is None or a.flags.c_contiguous
                                        for a in (p, *state.values())):  # flattening would copy
            self._update(p, g, state, lr, decay, buf)
            return
        p1, g1, b1 = p.reshape(-1), g.reshape(-1), buf.reshape(-1)
        s1 = {k: a.reshape(-1) for k, a in state.items()}
        for_each_block(self.xp, p.size, 1, lambda s: self._update(
            p1[s], g1[s], {k: a[s] for k, a in s1.items()}, lr, decay, b1[s]))

    def _update(self, p: Any, g: Any, state: dict[str, Any], lr: float, decay: bool,
                buf: Any) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """``{"step": int, "<state>.<param name>": host array, ...}``: plain arrays and ints."""
        out: dict[str, Any] = {"step": self.step_count}
        for s, bufs in self.state.items():
            for name, a in bufs.items():
                out[f"{s}.{name}"] = backend.to_host(a).copy()
        return out

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()`` output (arrays copied into the existing buffers)."""
        if "step" not in sd:
            raise KeyError("optimiser state has no 'step'")
        for s, bufs in self.state.items():
            for name, a in bufs.items():
                key = f"{s}.{name}"
                if key not in sd:
                    raise KeyError(f"optimiser state has no {key!r}")
                src = np.asarray(backend.to_host(sd[key]))
                if src.shape != a.shape:
                    raise ValueError(f"optimiser state {key!r} has shape {src.shape}, "
                                     f"expected {a.shape}")
                a[...] = backend.to_device(src.astype(a.dtype, copy=False), self.xp)
        self.step_count = int(np.asarray(sd["step"]))
