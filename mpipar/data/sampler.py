"""Deterministic batches, defined once globally and sharded across data-parallel ranks.

Batch ``step`` of a run is a function of ``(seed, stream, step)`` alone: B random windows
of T + 1 tokens (x is the first T, y the last T, shifted by one). Each data-parallel rank
and micro-batch takes a contiguous slice of those B rows::

    global batch rows:   0 .. B-1
    dp rank r of D:      rows [r B/D, (r+1) B/D)
    micro-batch m of M:  rows r B/D + [m B/(D M), (m+1) B/(D M))

so the union over ranks and micro-batches is exactly the single-process batch, in order,
and data parallelism or accumulation never changes what is trained (only the summation
order of the gradient).
"""

from __future__ import annotations

import numpy as np


class BatchSampler:
    """Random windows of ``block_size + 1`` tokens from ``tokens``.

    ``stream`` separates independent batch sequences drawn with the same seed (e.g. 0 for
    training, 1 for evaluation).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int = 0,
                 stream: int = 0) -> None:
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, "
                             f"{block_size}")
        if len(tokens) < block_size + 1:
            raise ValueError(f"{len(tokens)} tokens cannot fill one window of block_size + 1 "
                             f"= {block_size + 1} tokens")
        self.tokens = tokens
        self.batch_size, self.block_size = int(batch_size), int(block_size)
        self.seed, self.stream = int(seed), int(stream)

    def offsets(self, step: int) -> np.ndarray:
        """Start of every window of global batch ``step`` (B,), the same on every rank."""
        rng = np.random.default_rng((self.seed, self.stream, int(step)))
        return rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)

    def rows(self, dp_rank: int = 0, dp_size: int = 1, micro: int = 0,
             n_micro: int = 1) -> slice:
        """The slice of global rows that (``dp_rank``, ``micro``) owns."""
        B = self.batch_size
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        if n_micro < 1 or not 0 <= micro < n_micro:
            raise ValueError(f"micro-batch {micro} is not in [0, {n_micro})")
        if B % (dp_size * n_micro):
            raise ValueError(f"global batch size {B} is not divisible by data-parallel size "
                             f"{dp_size} x micro-batches {n_micro} = {dp_size * n_micro}")
        per_rank = B // dp_size
        per_micro = per_rank // n_micro
        start = dp_rank * per_rank + micro * per_micro
        return slice(start, start + per_micro)

    def batch(self, step: int, dp_rank: int = 0, dp_size: int = 1, micro: int = 0,
              n_micro: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), int64 arrays (b, T) with b = B / (dp_size n_micro); y is x shifted by one."""
        starts = self.offsets(step)[self.rows(dp_rank, dp_size, micro, n_micro)]  # (b,)
        idx = starts[:, None] + np.arange(self.block_size + 1)                   # (b, T+1)
        window = np.asarray(self.tokens[idx], dtype=np.int64)                     # (b, T+1)
        return np.ascontiguousarray(window[:, :-1]), np.ascontiguousarray(window[:, 1:])

    def shard(self, rank: int, world: int):  # noqa: ANN201
        """A view of this sampler that returns rank ``rank``'s slice of every global batch."""
        return _Shard(self, rank, world)


class _Shard:
    def __init__(self, sampler: BatchSampler, rank: int, world: int) -> None:
        sampler.rows(rank, world)  # validates divisibility now, before any step
        self.sampler, self.rank, self.world = sampler, rank, world

    def batch(self, step: int, micro: int = 0, n_micro: int = 1) -> tuple[np.ndarray, np.ndarray]:
        return self.sampler.batch(step, self.rank, self.world, micro, n_micro)
