"""Where a model's gradients live: one flat buffer, or per-bucket storage that ZeRO-2 frees.

Layers accumulate into ``grads[name]`` (``+=``), looked up when their backward runs. By
default every name is a view of one flat buffer laid out like the parameters (``buffer``),
which is what data parallelism reduces in buckets and an optimiser steps over.

ZeRO-2 keeps only its shard of the gradient across a step, so the full gradient need not
exist at once. ``use_buckets(ranges)`` drops the flat buffer: from then on each tensor gets
storage of its own, created zeroed the first time backward touches it, and a bucket (a
contiguous range of the flat layout holding whole tensors) is handed over as one new
contiguous array (``take``), which frees its tensors. So what is held at once is the tensors
backward has written whose bucket is not complete yet; allocating whole buckets instead
would keep, for example, the tied embedding's entire bucket alive through all of backward.
Reading a taken tensor is an error until ``zero()`` starts the next micro-step: a late write
would otherwise be lost silently.

    grads = GradStore(layout, "float64", np)
    grads["transformer.h.0.mlp.c_fc.weight"] += dw     # a view of grads.buffer
    grads.use_buckets([(0, 1000), (1000, layout.numel)])
    grads["transformer.ln_f.weight"] += d              # its own storage, zeroed on first use
    g = grads.take(1)                                  # 1-D copy of bucket 1; its tensors freed
    grads.zero()                                       # every tensor absent (= zeros) again
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Sequence

from mpipar.nn.flat import FlatLayout

_TAKEN = object()   # a tensor whose bucket was handed over this micro-step


class GradStore(Mapping):
    """name -> gradient array (the tensor's shape), for the tensors of ``layout``."""

    def __init__(self, layout: FlatLayout, dtype: Any, xp: Any) -> None:
        self.layout, self.dtype, self.xp = layout, dtype, xp
        self.buffer: Any = xp.zeros(layout.numel, dtype=dtype)
        self._views: dict[str, Any] = layout.views(self.buffer)
        self._ranges: list[tuple[int, int]] = []
        self._members: list[list[str]] = []         # per bucket: its tensors, layout order
        self._bucket_of: dict[str, int] = {}
        self._storage: dict[str, Any] = {}          # per tensor: array or _TAKEN; absent = 0
        self._held = 0                              # bytes of the arrays in _storage
        self.peak_bytes = 0                         # most tensor bytes held at once

    # -- the Mapping -----------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        if self.buffer is not None:
            return self._views[name]
        i = self._bucket_of[name]                   # KeyError for an unknown name, as a dict
        s = self._storage.get(name)
        if s is _TAKEN:
            lo, hi = self._ranges[i]
            raise RuntimeError(f"gradient of {name} (bucket {i}, elements [{lo}, {hi})) was already "
                               f"handed to its reduce-scatter and freed; zero() must start the "
                               f"next micro-step first")
        if s is None:
            s = self._storage[name] = self.xp.zeros(self.layout.shapes[name], dtype=self.dtype)
            self._held += int(s.nbytes)
            self.peak_bytes = max(self.peak_bytes, self._held)
        return s

    def __setitem__(self, name: str, value: Any) -> None:
        """Write into the tensor's storage (``grads[name] += d`` works as on a dict of views;
        the store's names and storage never change by assignment)."""
        target = self[name]
        if value is not target:
            target[...] = value

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.shapes)

    def __len__(self) -> int:
        return len(self.layout.shapes)

    # -- per-bucket storage ------------------------------------------------------------------
    @property
    def bucketed(self) -> bool:
        return self.buffer is None

    def use_buckets(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Drop the flat buffer; from now on bucket ``i`` covers ``ranges[i]`` (together they
        must tile the layout, each holding whole tensors). Every tensor starts absent."""
        pos = 0
        for lo, hi in sorted(ranges):
            if lo != pos or hi <= lo:
                raise ValueError(f"bucket ranges must tile [0, {self.layout.numel}) without gaps: "
                                 f"{sorted(ranges)}")
            pos = hi
        if pos != self.layout.numel:
            raise ValueError(f"bucket ranges end at {pos}, the layout has {self.layout.numel}")
        members: list[list[str]] = [[] for _ in ranges]
        bucket_of = {}
        for name, (a, b) in self.layout.offsets.items():
            i = next(i for i, (lo, hi) in enumerate(ranges) if lo <= a < hi or a == b == hi)
            if b > ranges[i][1]:
                raise ValueError(f"{name} [{a}, {b}) is split across bucket ranges")
            bucket_of[name] = i
            members[i].append(name)
        self._ranges = [(int(lo), int(hi)) for lo, hi in ranges]
        self._members, self._bucket_of = members, bucket_of
        self._storage, self._held = {}, 0
        self.buffer, self._views = None, {}

    def take(self, i: int) -> Any:
        """Bucket ``i`` as one new contiguous 1-D array (untouched tensors are zeros); its
        tensors are freed until the next ``zero()``."""
        lo, hi = self._ranges[i]
        out = self.xp.zeros(hi - lo, dtype=self.dtype)
        for name in self._members[i]:
            a, b = self.layout.offsets[name]
            s = self[name] if name in self._storage else None   # raises if already taken
            if s is not None:
                out[a - lo:b - lo] = s.reshape(-1)
                self._held -= int(s.nbytes)
            self._storage[name] = _TAKEN
        return out

    def zero(self) -> None:
        """Every gradient zero: the flat buffer filled, or every tensor dropped."""
        if self.buffer is not None:
            self.buffer.fill(0)
        else:
            self._storage, self._held = {}, 0

    def allocated_bytes(self) -> int:
        """Bytes of gradient storage held now."""
        if self.buffer is not None:
            return int(self.buffer.nbytes)
        return self._held

    def __repr__(self) -> str:
        where = (f"{len(self._ranges)} buckets, {self.allocated_bytes()} bytes held"
                 if self.bucketed else "one flat buffer")
        return f"GradStore({len(self)} tensors, {where})"
