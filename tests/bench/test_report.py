"""``mpipar.bench.report``: the loss after a fixed wall time, as the benchmarks read it from
their step times and evaluations; the shuffled order every rank draws alike."""

from __future__ import annotations

from mpipar.bench.report import eval_steps, loss_within, shuffled


def test_eval_steps_start_at_zero_and_end_at_the_last_step():
    assert eval_steps(10, 4) == {0, 4, 8, 10}
    assert eval_steps(10, 0) == eval_steps(10, 20) == {0, 10}


def test_loss_within_is_the_last_evaluation_the_budget_reaches():
    steps = [1.0, 1.0, 3.0, 1.0]                     # elapsed after 0..4 steps: 0 1 2 5 6
    evals = {0: 5.0, 2: 4.0, 4: 3.0}
    assert loss_within(steps, evals, 6.0) == (4, 3.0)
    assert loss_within(steps, evals, 5.9) == (2, 4.0)   # step 4 ends at 6 s: beyond
    assert loss_within(steps, evals, 2.0) == (2, 4.0)   # exactly at the budget counts
    assert loss_within(steps, evals, 0.5) == (0, 5.0)   # the initial model always fits
    # float sums: a run's own total time is within its own budget
    tenths = [0.1] * 10
    assert loss_within(tenths, {0: 2.0, 10: 1.0}, sum(tenths)) == (10, 1.0)


def test_shuffled_is_a_permutation_fixed_by_the_seed():
    assert shuffled(range(8), 3) == shuffled(range(8), 3)
    assert sorted(shuffled(range(8), 3)) == list(range(8))
