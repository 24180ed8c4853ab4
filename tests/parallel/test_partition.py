"""Splitting the blocks into contiguous pipeline stages: balanced by cost, or given."""

import itertools

import pytest

from mpipar.nn.gpt import PRESETS, GPTConfig
from mpipar.parallel.partition import balanced_layers, gpt_stage_costs


def _brute_bottleneck(costs, pp, first=0.0, last=0.0):
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), pp - 1):
        b = (0,) + cuts + (n,)
        stage = [sum(costs[b[s]:b[s + 1]]) for s in range(pp)]
        stage[0] += first
        stage[-1] += last
        best = min(best, max(stage))
    return best


def _check_slices(slices, n, pp):
    assert len(slices) == pp and all(len(r) > 0 for r in slices)
    assert [i for r in slices for i in r] == list(range(n))


def test_uniform_split():
    assert balanced_layers(8, 3) == [range(0, 3), range(3, 6), range(6, 8)]
    assert balanced_layers(8, 8) == [range(i, i + 1) for i in range(8)]
    assert balanced_layers(8, 1) == [range(0, 8)]
    assert balanced_layers(8, 2) == [range(0, 4), range(4, 8)]


def test_bottleneck_is_optimal():
    import random

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        pp = rng.randint(1, n)
        costs = [rng.choice([1.0, 2.0, 3.5, 0.5]) for _ in range(n)]
        first, last = rng.choice([0.0, 1.0]), rng.choice([0.0, 4.0])
        slices = balanced_layers(n, pp, [first] + costs + [last])
        _check_slices(slices, n, pp)
        stage = [sum(costs[i] for i in r) for r in slices]
        stage[0] += first
        stage[-1] += last
        assert max(stage) == pytest.approx(_brute_bottleneck(costs, pp, first, last))


def test_big_head_gets_fewer_layers():
    gpt2 = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    costs = gpt_stage_costs(gpt2)
    head_in_blocks = costs[-1] / costs[1]
    assert 4 < head_in_blocks < 7                      # 2VC vs 24C^2 + 4TC
    slices = balanced_layers(12, 4, costs)
    _check_slices(slices, 12, 4)
    assert len(slices[-1]) == 1 and len(slices[0]) >= 3
    # the tiny preset's byte vocabulary makes a cheap head: an even split
    assert [len(r) for r in balanced_layers(8, 4, gpt_stage_costs(PRESETS["tiny"], 8))] == [2, 2, 2, 2]


def test_bad_requests():
    with pytest.raises(ValueError, match="at least one layer"):
        balanced_layers(3, 4)
    with pytest.raises(ValueError, match="expected 8"):
        balanced_layers(8, 2, [1.0] * 5)
