"""Reusable page-locked host buffers for staging GPU messages through host memory.

Pinned memory makes device<->host copies fast, but allocating it is slow, so buffers are
kept in free lists by power-of-two size class and reused for the life of the transport.
"""

from __future__ import annotations

import numpy as np

from mpipar.backend import pinned_empty
from mpipar.comm.transport.pool import BufferPool


class PinnedPool(BufferPool):
    def __init__(self) -> None:
        super().__init__(lambda n: pinned_empty(n, np.uint8))
