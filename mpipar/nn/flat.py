"""Named tensors laid out in one flat, contiguous 1-D buffer.

A model's parameters (and, in a second buffer with the same layout, its gradients) live in
one array; each named tensor is a reshaped view of a slice. Data-parallel gradient buckets
are then slices of the gradient buffer, ZeRO shards are slices of both, and an optimiser
can update every parameter with a handful of vector operations.

    layout = FlatLayout([("w", (3, 4)), ("b", (3,))])
    buf = xp.zeros(layout.numel, dtype)          # (15,)
    views = layout.views(buf)                    # {"w": (3, 4) view, "b": (3,) view}
    layout.offsets["b"]                          # (12, 15): start and end in buf

Tensors are packed back to back in the given order, with no padding.
"""

from __future__ import annotations

from math import prod
from typing import Any, Iterable


class FlatLayout:
    """Where each named tensor sits in a flat buffer: ``offsets[name] = (start, end)``."""

    def __init__(self, specs: Iterable[tuple[str, tuple[int, ...]]]):
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for name, shape in specs:
            if name in self.shapes:
                raise ValueError(f"duplicate tensor name {name!r}")
            shape = tuple(int(s) for s in shape)
            n = prod(shape)
            self.shapes[name] = shape
            self.offsets[name] = (pos, pos + n)
            pos += n
        self.numel = pos

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def views(self, buf: Any) -> dict[str, Any]:
        """name -> view of ``buf`` (1-D, ``numel`` long) with the tensor's shape."""
        if buf.ndim != 1 or buf.shape[0] != self.numel:
            raise ValueError(f"buffer must be 1-D of length {self.numel}, got {buf.shape}")
        return {name: buf[a:b].reshape(self.shapes[name]) for name, (a, b) in self.offsets.items()}

    def __repr__(self) -> str:
        return f"FlatLayout({len(self.shapes)} tensors, {self.numel} elements)"
