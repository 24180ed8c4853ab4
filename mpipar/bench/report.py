"""Helpers of the benchmarks alone. The nccl-tests tables and size parsing they share with the
simulator are in ``mpipar.sim.report``."""

from __future__ import annotations

import random
from typing import Any, Iterable


def shuffled(items: Iterable[Any], seed: int) -> list[Any]:
    """``items`` in an order drawn from ``seed``: the same on every rank for the same seed.

    Benchmarks that take turns give each round a new order: whatever runs just before a
    measurement (MPI's own collective, another algorithm's point-to-point, a large buffer
    that evicted the caches) changes it, and a fixed order or a rotation charges that to
    the same algorithm every time."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out
