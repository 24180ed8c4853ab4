"""Helpers of the benchmarks alone. The nccl-tests tables and size parsing they share with the
simulator are in ``mpipar.sim.report``."""

from __future__ import annotations

import random
from typing import Any, Iterable, Mapping, Sequence


def shuffled(items: Iterable[Any], seed: int) -> list[Any]:
    """``items`` in an order drawn from ``seed``: the same on every rank for the same seed.

    Benchmarks that take turns give each round a new order: whatever runs just before a
    measurement (MPI's own collective, another algorithm's point-to-point, a large buffer
    that evicted the caches) changes it, and a fixed order or a rotation charges that to
    the same algorithm every time."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def loss_within(step_seconds: Sequence[float], evals: Mapping[int, float],
                budget: float) -> tuple[int, float]:
    """(steps, validation loss) of the last evaluation made within ``budget`` seconds of
    training: ``step_seconds[s]`` is step s's time, ``evals`` maps a step count to the loss
    evaluated after that many steps (0: the initial model, so one always fits). What "the
    loss after a fixed wall time" is for runs of equal steps but unequal speed: evaluation
    time is not training time and is not counted."""
    elapsed = [0.0]
    for t in step_seconds:
        elapsed.append(elapsed[-1] + t)
    fits = [s for s in evals if s < len(elapsed) and elapsed[s] <= budget * (1 + 1e-12)]
    best = max(fits)
    return best, evals[best]


def eval_steps(steps: int, every: int) -> set[int]:
    """The step counts after which a benchmark evaluates for ``loss_within``: 0, every
    ``every``-th, and the last."""
    return {0, steps, *range(every, steps, every)} if every > 0 else {0, steps}
