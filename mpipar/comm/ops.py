"""Reduction operators shared by every collective algorithm.

An algorithm only ever combines two buffers elementwise (``op.combine(dst, src)``, in place),
so the same code reduces NumPy arrays, CuPy arrays, or (in the simulator) nothing at all.
``avg`` is ``sum`` followed by a division by the group size, done once at the end by the
Communicator so that every rank divides identical bits and gets identical bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mpipar.backend import array_module


@dataclass(frozen=True)
class ReduceOp:
    name: str
    ufunc: str  # name of the elementwise ufunc in numpy / cupy

    def combine(self, dst: Any, src: Any) -> None:
        """dst <- dst (op) src, elementwise and in place."""
        xp = array_module(dst)
        getattr(xp, self.ufunc)(dst, src, out=dst)

    def __str__(self) -> str:
        return self.name


SUM = ReduceOp("sum", "add")
MAX = ReduceOp("max", "maximum")
MIN = ReduceOp("min", "minimum")
AVG = ReduceOp("avg", "add")  # combined like sum; the Communicator divides at the end

OPS: dict[str, ReduceOp] = {op.name: op for op in (SUM, MAX, MIN, AVG)}
OP_NAMES = tuple(OPS)


def get_op(op: str | ReduceOp) -> ReduceOp:
    if isinstance(op, ReduceOp):
        return op
    try:
        return OPS[op]
    except KeyError:
        raise ValueError(f"unknown reduction op {op!r}; choose from {', '.join(OP_NAMES)}") from None


def finalize_avg(buf: Any, size: int) -> Any:
    """Divide an all-reduced sum by the group size, in place, keeping the dtype.

    Integers use floor division (as NCCL's ncclAvg truncates); floats true division.
    """
    xp = array_module(buf)
    if np.issubdtype(buf.dtype, np.integer):
        xp.floor_divide(buf, size, out=buf)
    else:
        xp.divide(buf, buf.dtype.type(size), out=buf)
    return buf
