"""Free lists of reusable host buffers, by power-of-two size class.

Two users: the staged GPU path (page-locked buffers, slow to allocate) and the from-scratch
algorithms' scratch space (see ``take_scratch`` in ``algorithms/_util.py``). A new large NumPy
array is fresh memory to the kernel: glibc serves it from newly mapped pages, or from pages
it just gave back, and the first write to each 4 KiB page faults. Measured here (2 ranks,
MPICH, 1 MiB): an exchange into a new ``np.empty`` took 1010 us, one into a buffer written
before 256 us. Reusing buffers makes a message cost what the network charges, not what the
allocator's history happens to be.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np


def _owner(buf: np.ndarray) -> np.ndarray:
    """The array that owns ``buf``'s memory (NumPy points views at it directly)."""
    base = buf
    while isinstance(base.base, np.ndarray):
        base = base.base
    return base


class BufferPool:
    """``take(nbytes)`` a uint8 buffer, ``give`` it back when no request uses it any more.

    A buffer not given back (an exception on the way) is simply left to the garbage
    collector. Taking and giving are thread-safe, and a buffer is never handed out twice at
    once, so concurrent callers each get their own. At most ``max_bytes`` (None: no limit)
    are kept in the free lists; what is given beyond that is dropped.
    """

    def __init__(self, alloc: Callable[[int], np.ndarray] | None = None, max_bytes: int | None = None) -> None:
        self._alloc = alloc or (lambda n: np.empty(n, dtype=np.uint8))
        self.max_bytes = max_bytes
        self._free: dict[int, list[np.ndarray]] = {}
        self._held = 0  # bytes in the free lists
        self._lock = threading.Lock()

    @staticmethod
    def size_class(nbytes: int) -> int:
        return 1 << max(nbytes - 1, 0).bit_length()

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 host buffer, exactly ``nbytes`` long (a view of a size-class buffer)."""
        cls = self.size_class(nbytes)
        with self._lock:
            free = self._free.get(cls)
            buf = free.pop() if free else None
            if buf is not None:
                self._held -= buf.nbytes
        if buf is None:
            buf = self._alloc(cls)
        return buf[:nbytes]

    def give(self, buf: Any) -> None:
        owner = _owner(buf)
        cls = self.size_class(owner.nbytes)
        if owner.nbytes != cls or owner.dtype != np.uint8:
            return  # not one of ours: nothing to keep
        with self._lock:
            if self.max_bytes is not None and self._held + cls > self.max_bytes:
                return
            if any(b is owner for b in self._free.get(cls, ())):
                return  # given twice: keep one entry, or it would be handed out twice
            self._free.setdefault(cls, []).append(owner)
            self._held += cls

    def kept(self) -> list[np.ndarray]:
        """The buffers in the free lists now (for inspection)."""
        with self._lock:
            return [b for free in self._free.values() for b in free]

    @property
    def held_bytes(self) -> int:
        """Bytes kept in the free lists now."""
        return self._held
