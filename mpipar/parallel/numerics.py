"""The numerics guard: a step whose loss or gradient norm is not finite never reaches the
optimiser.

The check costs nothing a step does not do anyway: the trainer already has the mean loss and
the global gradient norm (the same numbers on every rank: the loss is broadcast over pp and
averaged over dp, the norm summed over tp, pp and, for ZeRO's shards, dp), and a NaN or an
infinity anywhere in the gradients makes the norm non-finite. Only then does every rank look
for its first non-finite tensor, in nanoGPT order, and two tiny all-reduces over the world
agree on the first one and the lowest rank that holds it::

    step 12: non-finite gradient in transformer.h.1.attn.c_attn.weight (rank 2)

What happens next is a policy object, chosen once (polymorphism, not a mode flag):
``StopOnNonFinite`` (the default) raises ``NonFiniteError`` on every rank, before the update,
so parameters and optimiser state stay as the previous step left them and no checkpoint of
non-finite state can be written; a loss-scaling policy (a later change) will return
``SKIP`` instead, and the trainer then drops the step's gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mpipar import backend


class NonFiniteError(FloatingPointError):
    """A step's loss, gradients or a model's state is not finite; the message names the step,
    the first tensor affected (nanoGPT order, over all ranks) and the rank that holds it."""

    def __init__(self, report: NonFinite) -> None:
        super().__init__(str(report))
        self.report = report


@dataclass(frozen=True)
class NonFinite:
    """What was found: ``what`` ("gradient", "parameter" ...), the first ``tensor`` that holds
    a NaN or an infinity (None: no tensor does, only the ``loss`` or ``norm``) and its ``rank``."""

    step: int
    what: str
    tensor: str | None
    rank: int | None
    loss: float
    norm: float

    def __str__(self) -> str:
        if self.tensor is not None:
            return f"step {self.step}: non-finite {self.what} in {self.tensor} (rank {self.rank})"
        if not math.isfinite(self.loss):
            return f"step {self.step}: non-finite loss ({self.loss}); every {self.what} is finite"
        return (f"step {self.step}: {self.what} norm {self.norm} with every {self.what} finite "
                f"(the sum of squares overflows)")


class NumericsPolicy(Protocol):
    """What a trainer does with a step whose loss or gradient norm is not finite."""

    def on_nonfinite(self, report: NonFinite) -> bool:
        """Called on every rank alike, before the optimiser; True: skip the step (drop its
        gradients, the update is not applied); or raise to stop."""


SKIP = True


class StopOnNonFinite:
    """The default: stop the run (``NonFiniteError`` on every rank), before any update."""

    def on_nonfinite(self, report: NonFinite) -> bool:
        raise NonFiniteError(report)


def first_nonfinite(tensors: Mapping[str, Any], order: Sequence[str]) -> int:
    """The position in ``order`` (nanoGPT names) of the first of ``tensors`` holding a NaN or an
    infinity, or ``len(order)`` if none does. Keys may be pieces, ``"name[a:b]"`` (ZeRO's
    shard), counted as their tensor."""
    position = {name: i for i, name in enumerate(order)}
    first = len(order)
    for key, t in tensors.items():
        i = position.get(key.split("[", 1)[0], len(order))
        if i < first and t.size and not bool(backend.array_module(t).isfinite(t).all()):
            first = i
    return first


def locate(world: Any, step: int, what: str, tensors: Mapping[str, Any], order: Sequence[str],
           loss: float = 0.0, norm: float = 0.0) -> NonFinite:
    """Collective over ``world``: the first tensor (in ``order``) holding a non-finite value on
    any rank, and the lowest rank holding it; ``tensor`` None if there is none."""
    mine = first_nonfinite(tensors, order)
    first = mine
    if world.size > 1:
        first = int(world.allreduce(np.array([mine], dtype=np.int64), op="min")[0])
    if first == len(order):
        return NonFinite(step, what, None, None, loss, norm)
    rank = world.rank if mine == first else world.size
    if world.size > 1:
        rank = int(world.allreduce(np.array([rank], dtype=np.int64), op="min")[0])
    return NonFinite(step, what, order[first], rank, loss, norm)
