"""Reusable page-locked host buffers for staging GPU messages through host memory.

Pinned memory makes device<->host copies fast, but allocating it is slow, so buffers are
kept in free lists by power-of-two size class and reused for the life of the transport.
"""

from __future__ import annotations

import numpy as np

from mpipar.backend import pinned_empty


class PinnedPool:
    def __init__(self) -> None:
        self._free: dict[int, list[np.ndarray]] = {}

    @staticmethod
    def _size_class(nbytes: int) -> int:
        return 1 << max(nbytes - 1, 0).bit_length()

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 host buffer of at least ``nbytes`` (exactly ``nbytes`` long view)."""
        cls = self._size_class(nbytes)
        free = self._free.get(cls)
        buf = free.pop() if free else pinned_empty(cls, np.uint8)
        return buf[:nbytes]

    def give(self, buf: np.ndarray) -> None:
        base = buf.base if buf.base is not None else buf
        while getattr(base, "base", None) is not None and isinstance(base.base, np.ndarray):
            base = base.base
        self._free.setdefault(self._size_class(base.nbytes), []).append(base)
