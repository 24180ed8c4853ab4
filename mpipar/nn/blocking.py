"""Cache blocking for chains of elementwise passes on the CPU.

NumPy runs one pass over memory per operation; a chain of k passes over an array larger
than the cache reads it from DRAM k times. Running the whole chain on one block of rows
before moving to the next keeps the block in L2 between passes (measured 1.4-2.5x faster
for GELU and the attention softmax at the shakespeare sizes on a 2-core EPYC). On CuPy the
chain is already one kernel launch per pass over device memory, so the whole array is one
block there.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

BLOCK = 1 << 16  # elements per block on the CPU: 256 KiB of float32


def row_blocks(xp: Any, rows: int, row_size: int) -> Iterator[slice]:
    """Slices over ``rows`` leading rows of ``row_size`` elements each, ~BLOCK per slice."""
    step = rows if xp is not np else max(1, BLOCK // max(row_size, 1))
    for i in range(0, rows, step):
        yield slice(i, min(i + step, rows))
