"""Which transformer blocks each pipeline stage runs: contiguous slices, balanced or given.

    balanced_layers(8, 3)                            # [range(0, 3), range(3, 6), range(6, 8)]
    balanced_layers(8, 3, gpt_stage_costs(cfg, T))   # embedding on stage 0, head on the last

(A split given as blocks per stage is ``Layout.stage_layers``, checked by ``Layout.check``.)

Stage ``s`` runs blocks ``layers[s]``; stage 0 also runs the embedding and the last stage the
final layer norm, the (tied) head and the loss. A pipeline step lasts as long as its slowest
stage, so the slices minimise the largest stage cost (the bottleneck), then, among slices
with that bottleneck, the sum of squared stage costs (the others as even as possible), then
give earlier stages the larger share.

Costs are estimated forward FLOPs per token (``gpt_stage_costs``; backward is about twice
forward for every part, so the ratio is the same)::

    block   2 * 12 C^2  (qkv 3C^2, proj C^2, mlp 8C^2 multiply-adds)  +  2 * 2 T C  (scores, sum)
    head    2 * V C     (logits)  + a few V for the softmax/cross-entropy
    embed   C           (a gather and an add)

With a byte vocabulary (V = 256) the head is cheap; with GPT-2's V = 50257 and C = 768 it
costs about 6 blocks, and the last stage should get that many fewer.
"""

from __future__ import annotations

import functools

from typing import Any, Sequence


def gpt_stage_costs(config: Any, T: int | None = None) -> list[float]:
    """Estimated forward FLOPs per token of [embedding, block 0 .. block L-1, head]."""
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    T = config.block_size if T is None else T
    block = 24.0 * C * C + 4.0 * T * C
    head = 2.0 * V * C + 5.0 * V + 10.0 * C
    embed = float(C)
    return [embed] + [block] * L + [head]


def _check(n_layer: int, pp: int) -> None:
    if pp < 1:
        raise ValueError(f"pipeline size pp must be at least 1, got {pp}")
    if n_layer < pp:
        raise ValueError(f"cannot split {n_layer} layers into {pp} pipeline stages: every stage "
                         f"needs at least one layer")


def balanced_layers(n_layer: int, pp: int, costs: Sequence[float] | None = None) -> list[range]:
    """``pp`` contiguous, non-empty slices of ``range(n_layer)`` with balanced cost.

    ``costs``: per block (length ``n_layer``), or per model stage (length ``n_layer + 2``:
    embedding, blocks, head, as ``gpt_stage_costs`` gives) so that stage 0 is charged the
    embedding and the last stage the head. Default: every block costs the same.

    The search is O(pp n_layer^2) in Python (about a second at 64 stages of 128 blocks), and
    every rank of a job asks the same question: answers are kept per process.
    """
    return list(_balanced_layers(n_layer, pp, None if costs is None else tuple(float(c) for c in costs)))


@functools.lru_cache(maxsize=64)
def _balanced_layers(n_layer: int, pp: int, costs: tuple[float, ...] | None) -> tuple[range, ...]:
    _check(n_layer, pp)
    first = last = 0.0
    if costs is None:
        block = [1.0] * n_layer
    elif len(costs) == n_layer:
        block = [float(c) for c in costs]
    elif len(costs) == n_layer + 2:
        first, block, last = float(costs[0]), [float(c) for c in costs[1:-1]], float(costs[-1])
    else:
        raise ValueError(f"costs has {len(costs)} entries; expected {n_layer} (one per block) "
                         f"or {n_layer + 2} (embedding, blocks, head)")
    if any(c < 0 for c in block) or first < 0 or last < 0:
        raise ValueError("costs must be non-negative")
    prefix = [0.0]
    for c in block:
        prefix.append(prefix[-1] + c)
    tol = 1e-9 * max(prefix[-1] + first + last, 1.0)

    def cost(s: int, i: int, j: int) -> float:  # stage s runs blocks i..j-1
        return prefix[j] - prefix[i] + (first if s == 0 else 0.0) + (last if s == pp - 1 else 0.0)

    # 1. the bottleneck: best[s][i] = least max cost of stages s.. covering blocks i..
    INF = float("inf")
    best = [[INF] * (n_layer + 1) for _ in range(pp + 1)]
    best[pp][n_layer] = 0.0
    for s in range(pp - 1, -1, -1):
        for i in range(n_layer - (pp - s), -1, -1):      # leave one block per later stage
            for j in range(i + 1, n_layer - (pp - s - 1) + 1):
                v = max(cost(s, i, j), best[s + 1][j])
                if v < best[s][i]:
                    best[s][i] = v
    cap = best[0][0] + tol
    # 2. under that cap, least sum of squares; ties keep the larger earlier stage
    sq = [[INF] * (n_layer + 1) for _ in range(pp + 1)]
    choice = [[-1] * (n_layer + 1) for _ in range(pp + 1)]
    sq[pp][n_layer] = 0.0
    for s in range(pp - 1, -1, -1):
        for i in range(n_layer - (pp - s), -1, -1):
            for j in range(n_layer - (pp - s - 1), i, -1):   # larger first slice first
                c = cost(s, i, j)
                if c > cap or sq[s + 1][j] == INF:
                    continue
                v = c * c + sq[s + 1][j]
                if v < sq[s][i] * (1 - 1e-12):  # strictly better: a tie keeps the larger slice
                    sq[s][i], choice[s][i] = v, j
    out, i = [], 0
    for s in range(pp):
        j = choice[s][i]
        out.append(range(i, j))
        i = j
    return tuple(out)
