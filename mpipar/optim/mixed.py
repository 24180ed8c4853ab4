"""Mixed precision: 16-bit compute, fp32 master weights, and the loss scale of fp16.

    precision = Precision("fp16")
    precision.compute_dtype                  # float16: parameters, activations, gradients
    scaler = precision.loss_scaler(StopOnNonFinite())
    spec = precision.optimizer(OptimizerSpec("adamw"), scaler)
    opt = spec.build(model.params)           # AdamW over fp32 masters of the 16-bit params
    ... backward of (loss * scaler.scale) ...
    opt.step(grads)                          # unscaled in fp32, update, params = round(master)

What is in which type (the meaning of ``python -m mpipar.sim train --precision`` and of
``sim/memory.py``'s table: 2 bytes of parameters + 2 of gradients + 4 master + 4 + 4 of AdamW
state per parameter)::

    fp32         everything float32 (or float64 with --dtype float64): the plain optimiser
    bf16, fp16   parameters compute reads, activations (the layers' caches) and gradients in
                 the 16-bit type; each product 16-bit inputs accumulated in float32
                 (backend.matmul), elementwise chains, softmax, layer-norm statistics and
                 the loss in float32, stored 16-bit; the optimiser (MasterWeights) keeps a
                 float32 master copy of every parameter and float32 state, and after each
                 update the 16-bit parameters are the master rounded

Loss scaling (fp16 only; Micikevicius et al., "Mixed Precision Training", ICLR 2018). fp16's
smallest normal number is 2^-14: small gradients flush to zero. The backward runs on
``loss * S`` (the trainer scales d loss), so the gradients are S times the true ones; the
optimiser unscales each in float32 (``g32 = float32(g) / S``, exact: S is a power of two)
before the update, and the trainer divides the gradients' sums of squares by S^2 before the
norm and clipping, so the norm is the true one. ``DynamicLossScaler`` starts at S = 2^16; a
step whose gradients overflow (the global norm is not finite: that is already agreed over
every rank, ``parallel/numerics.py``) is the scaler's business, not an error: the step is
skipped (weights and optimiser state untouched), S halves and its clean-step count restarts;
after ``growth_interval`` (2000) clean steps in a row S doubles. A non-finite LOSS is a forward
overflow, which no scale causes or cures: it goes to the run's numerics policy (by default:
stop). bf16 has fp32's exponent range and fp32 needs none: ``NoLossScaling`` (S = 1, and every
non-finite step goes to the policy), chosen once, so the trainer never asks which it has.
The scale and its counter are part of the checkpoint (``state_dict``: plain numbers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpipar import backend, kernels
from mpipar.optim.base import Optimizer, decays_by_default
from mpipar.optim.spec import OptimizerSpec

PRECISIONS = ("fp32", "bf16", "fp16")
# the array dtype of parameters, activations and gradients under each precision (fp32: the
# run's own --dtype, float32 or float64)
COMPUTE_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MASTER = "master"        # the optimiser state buffer holding the fp32 master weights


# ---- loss scaling ---------------------------------------------------------------------------
class NoLossScaling:
    """fp32 and bf16: scale 1, every non-finite step goes to ``policy`` (the numerics policy)."""

    scale = 1.0

    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def on_nonfinite(self, report: Any) -> bool:
        return self.policy.on_nonfinite(report)

    def on_finite(self) -> None:
        """A step whose gradients were finite and applied: nothing to count."""

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Nothing to restore (a checkpoint of a scaled run resumed unscaled ignores it)."""


class DynamicLossScaler(NoLossScaling):
    """fp16's dynamic loss scale (module docstring): ``scale`` S, halved (``backoff``) on a
    step whose gradients overflow, which is skipped; doubled (``growth_factor``) after
    ``growth_interval`` clean steps in a row (``good_steps`` counts them)."""

    def __init__(self, policy: Any, init_scale: float = 2.0 ** 16, growth_interval: int = 2000,
                 growth_factor: float = 2.0, backoff: float = 0.5) -> None:
        super().__init__(policy)
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"the initial loss scale must be a finite number > 0, got {init_scale}")
        if int(growth_interval) < 1:
            raise ValueError(f"the loss scale's growth interval must be >= 1 step, got {growth_interval}")
        if not (growth_factor > 1 and 0 < backoff < 1):
            raise ValueError(f"loss scale growth factor {growth_factor} must be > 1 and backoff "
                             f"{backoff} in (0, 1)")
        self.scale = float(init_scale)
        self.growth_interval, self.growth_factor = int(growth_interval), float(growth_factor)
        self.backoff = float(backoff)
        self.good_steps = 0
        self.skipped = 0                     # steps skipped for overflow since construction

    def on_nonfinite(self, report: Any) -> bool:
        """Gradients overflowed (finite loss): skip the step, lower the scale. A non-finite
        loss is the policy's (the forward overflowed: no scale cures that)."""
        if not math.isfinite(report.loss):
            return self.policy.on_nonfinite(report)
        self.scale *= self.backoff
        self.good_steps = 0
        self.skipped += 1
        return True                          # numerics.SKIP

    def on_finite(self) -> None:
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict[str, float]:
        return {"loss_scale": self.scale, "loss_scale_good_steps": self.good_steps}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; a checkpoint without a scale (an fp32 or bf16 run's)
        leaves the initial one."""
        if "loss_scale" in sd:
            scale = _number(sd["loss_scale"])
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"the checkpoint's loss scale {scale} is not a finite number > 0")
            self.scale = scale
            self.good_steps = int(_number(sd.get("loss_scale_good_steps", 0)))


def _number(x: Any) -> float:
    """A saved scalar: a number, or a one-element array (as a checkpoint file holds it)."""
    return float(np.asarray(x).reshape(-1)[0])


# ---- fp32 master weights ----------------------------------------------------------------------
class _Unscaled(Mapping):
    """The gradients as the inner optimiser reads them: each, on access, converted to
    float32 and multiplied by 1/S into one scratch buffer (the optimiser reads one tensor at
    a time, so no float32 copy of the whole gradient ever exists)."""

    def __init__(self, grads: Mapping[str, Any], inverse: float, scratch: Any) -> None:
        self.grads, self.inverse, self.scratch = grads, inverse, scratch

    def __getitem__(self, name: str) -> Any:
        g = self.grads[name]
        out = self.scratch[:g.size].reshape(g.shape)
        out[...] = g
        if self.inverse != 1.0:
            out *= self.inverse
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.grads)

    def __len__(self) -> int:
        return len(self.grads)


class MasterWeights:
    """An optimiser over float32 masters of 16-bit ``params`` (name -> array, updated in
    place): the inner optimiser (``OptimizerSpec.build``) steps the masters from the unscaled
    float32 gradients, then every parameter is its master rounded. Its ``state`` is the
    inner one's buffers plus ``master``, so checkpoints, ZeRO's shards and memory reports
    treat the masters as optimiser state (which they are: 4 bytes a parameter)."""

    def __init__(self, inner: OptimizerSpec, params: Mapping[str, Any], scaler: NoLossScaling,
                 decay: Callable[[str, Any], bool] = decays_by_default) -> None:
        self.params = dict(params)
        first = next(iter(self.params.values()))
        self.xp = backend.array_module(first)
        dt = backend.compute_dtype(first.dtype)
        self.master = {n: p.astype(dt) for n, p in self.params.items()}
        self.inner: Optimizer = inner.build(self.master, decay=decay)
        self.scaler = scaler
        self.state: dict[str, dict[str, Any]] = {**self.inner.state, MASTER: self.master}
        largest = max(p.size for p in self.params.values())
        self._grad = self.xp.empty(largest, dtype=dt)

    @property
    def step_count(self) -> int:
        return self.inner.step_count

    def step(self, grads: Mapping[str, Any], lr: float | None = None) -> None:
        """Unscale (float32), update the masters, round them into the parameters."""
        self.inner.step(_Unscaled(grads, 1.0 / self.scaler.scale, self._grad), lr=lr)
        for name, p in self.params.items():
            p[...] = self.master[name]

    def state_dict(self) -> dict[str, Any]:
        out = self.inner.state_dict()
        out.update({f"{MASTER}.{n}": backend.to_host(a).copy() for n, a in self.master.items()})
        return out

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; the parameters become the masters rounded."""
        self.inner.load_state_dict(sd)
        for name, a in self.master.items():
            key = f"{MASTER}.{name}"
            if key not in sd:
                raise KeyError(f"optimiser state has no {key!r} (a mixed-precision run resumes "
                               f"from a checkpoint of a mixed-precision run)")
            src = np.asarray(backend.to_host(sd[key]))
            if src.shape != a.shape:
                raise ValueError(f"optimiser state {key!r} has shape {src.shape}, expected {a.shape}")
            a[...] = backend.to_device(src.astype(a.dtype, copy=False), self.xp)
            self.params[name][...] = a


@dataclass(frozen=True)
class MasterWeightsSpec:
    """An ``OptimizerSpec`` whose optimisers keep float32 masters (``MasterWeights``): what a
    GradSync builds over its parameters (or ZeRO's pieces) under mixed precision."""

    inner: OptimizerSpec
    scaler: NoLossScaling

    @property
    def state_names(self) -> tuple[str, ...]:
        return self.inner.state_names + (MASTER,)

    def build(self, params: Mapping[str, Any],
              decay: Callable[[str, Any], bool] = decays_by_default) -> MasterWeights:
        return MasterWeights(self.inner, params, self.scaler, decay)


# ---- the choice, made once ----------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """``fp32``, ``bf16`` or ``fp16`` (module docstring): what the trainer builds for it;
    fp16's dynamic loss scale starts at ``loss_scale``, doubles after ``loss_scale_interval``
    clean steps and is multiplied by ``loss_scale_backoff`` on an overflow (other precisions
    have no loss scale, and refuse values other than these defaults)."""

    name: str = "fp32"
    loss_scale: float = 2.0 ** 16
    loss_scale_interval: int = 2000
    loss_scale_backoff: float = 0.5

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"precision {self.name!r} is not one of {', '.join(PRECISIONS)}")
        given = self._scaling()
        if self.name == "fp16":
            DynamicLossScaler(None, **given)        # its checks: each names the quantity
        elif given != Precision("fp16")._scaling():
            raise ValueError(f"precision {self.name} has no loss scale (fp16's: its gradients "
                             f"underflow without one)")

    def _scaling(self) -> dict[str, Any]:
        return {"init_scale": self.loss_scale, "growth_interval": self.loss_scale_interval,
                "backoff": self.loss_scale_backoff}

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    def model_dtype(self, dtype: Any) -> np.dtype:
        """The dtype of parameters, activations and gradients for a run of ``dtype`` (fp32:
        ``dtype`` itself; mixed precision keeps float32 masters, so ``dtype`` must be float32)."""
        dt = backend.resolve_dtype(dtype)
        if not self.mixed:
            return dt
        if dt != np.float32:
            raise ValueError(f"precision {self.name} keeps float32 master weights; dtype "
                             f"{dt.name} is for precision fp32 only")
        return backend.resolve_dtype(COMPUTE_DTYPE[self.name])

    def check_device(self, xp: Any) -> None:
        """bf16 is ml_dtypes' bfloat16, a NumPy dtype: CuPy up to 13 has no bfloat16 arrays
        (cupy/cupy#9494 adds them, after mpipar's GPU path and fused kernels were written for
        float16/32/64), so a GPU module (one with CuPy's kernel API) is refused; NumPy and the
        simulator's namespace (which prices a GPU's bfloat16 without arrays) are not."""
        if self.name == "bf16" and kernels.of(xp) is not None:   # CuPy (or its test double)
            raise ValueError("precision bf16 runs on the CPU only: CuPy has no bfloat16 dtype "
                             "mpipar's GPU path can use (use fp16 on a GPU)")

    def loss_scaler(self, policy: Any) -> NoLossScaling:
        """fp16: the dynamic loss scale; otherwise none. ``policy``: the numerics policy for
        what the scale does not handle."""
        if self.name == "fp16":
            return DynamicLossScaler(policy, **self._scaling())
        return NoLossScaling(policy)

    def optimizer(self, spec: OptimizerSpec, scaler: NoLossScaling) -> Any:
        """What the GradSync builds: ``spec`` itself for fp32, else with float32 masters."""
        return MasterWeightsSpec(spec, scaler) if self.mixed else spec

    def state_names(self, spec: OptimizerSpec) -> tuple[str, ...]:
        """The per-parameter state a checkpoint of this precision holds (``master`` too)."""
        return self.optimizer(spec, NoLossScaling(None)).state_names
