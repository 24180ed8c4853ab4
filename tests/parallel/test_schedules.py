"""Pipeline schedules as data, checked without MPI: matched messages, no deadlock, order,
activation memory, and the simulated bubble against (P-1)/(M+P-1)."""

import pytest

from mpipar.parallel.schedules import (Backward, Forward, OptimizerStep, RecvActivation, RecvGrad,
                                       ScheduleError, SendActivation, SendGrad, all_ranks,
                                       bubble_fraction_theory, check_schedule, forward_only, gpipe,
                                       make_schedule, message_tag, one_f_one_b, simulate)

PS = range(1, 9)
MS = range(1, 13)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_every_schedule_passes_the_checker(name):
    for P in PS:
        for M in MS:
            check_schedule(all_ranks(name, P, M))


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_simulated_bubble_equals_theory(name):
    for P in PS:
        for M in MS:
            for f, b in ((1.0, 2.0), (1.0, 1.0), (0.3, 0.9)):
                res = simulate(all_ranks(name, P, M), f=f, b=b)
                assert res.step_time == pytest.approx((M + P - 1) * (f + b))
                for bub in res.bubble:     # uniform stages: every rank idles the same
                    assert bub == pytest.approx(bubble_fraction_theory(P, M), abs=1e-12)


def test_activations_in_flight():
    for P in PS:
        for M in MS:
            one = simulate(all_ranks("1f1b", P, M)).peak_activations
            assert one == [min(P - s, M) for s in range(P)]
            assert simulate(all_ranks("gpipe", P, M)).peak_activations == [M] * P


def test_interleaved_passes_and_shrinks_the_bubble():
    for P in range(2, 9):
        for M in (P, 2 * P, 3 * P):
            for v in (2, 3, 4):
                lists = all_ranks("interleaved", P, M, v)
                check_schedule(lists)
                res = simulate(lists, f=1.0 / v, b=2.0 / v)      # a chunk is 1/v of a stage
                for bub in res.bubble:
                    assert bub == pytest.approx(bubble_fraction_theory(P, M, v), abs=1e-12)
                assert bubble_fraction_theory(P, M, v) < bubble_fraction_theory(P, M)
    with pytest.raises(ValueError, match="multiple"):
        make_schedule("interleaved", 4, 0, 6, chunks=2)


def test_1f1b_shape_for_a_middle_stage():
    got = list(one_f_one_b(3, 1, 3))
    F = lambda m: [RecvActivation(m), Forward(m), SendActivation(m)]   # noqa: E731
    B = lambda m: [RecvGrad(m), Backward(m), SendGrad(m)]              # noqa: E731
    assert got == F(0) + F(1) + B(0) + F(2) + B(1) + B(2) + [OptimizerStep()]
    assert list(gpipe(1, 0, 2)) == [Forward(0), Forward(1), Backward(0), Backward(1), OptimizerStep()]


def test_tags_distinct_per_pair():
    for name, P, M, v in (("1f1b", 4, 6, 1), ("interleaved", 4, 8, 2)):
        for r, lst in enumerate(all_ranks(name, P, M, v)):
            tags = [message_tag(i, r, P, v) for i in lst if isinstance(i, (SendActivation, SendGrad))]
            assert len(tags) == len(set(tags))


def _broken(lists, rank, fn):
    out = [list(x) for x in lists]
    out[rank] = fn(out[rank])
    return out


def test_checker_catches_mistakes():
    good = [make_schedule("1f1b", 3, r, 4, sync=False) for r in range(3)]   # plain records
    check_schedule(good)
    cases = [   # rank 1 sends and receives in both directions
        (lambda L: [i for i in L if i != RecvActivation(2)], "before its RecvActivation"),
        (lambda L: [i for i in L if i != SendGrad(1)], "no matching send"),
        (lambda L: [SendActivation(0)] + [i for i in L if i != SendActivation(0)], "before Forward"),
        (lambda L: L[:1] + L, "appears twice"),
        (lambda L: [i for i in L if i not in (RecvGrad(3), Backward(3), SendGrad(3))], "missing"),
        (lambda L: L[-1:] + L[:-1], "not the last"),
    ]
    for fn, what in cases:
        with pytest.raises(ScheduleError, match=what):
            check_schedule(_broken(good, 1, fn))
    # the last stage sends an activation onwards that nobody receives
    with pytest.raises(ScheduleError, match="no matching receive"):
        check_schedule(_broken(good, 2, lambda L: L[:-1] + [SendActivation(0), L[-1]]))
    # a deadlock that only the simulation sees: rank 1 waits for a gradient of mb 1 before
    # sending the activation that produces it
    lst = [RecvActivation(0), Forward(0), RecvActivation(1), Forward(1), RecvGrad(1),
           SendActivation(0), SendActivation(1), RecvGrad(0), Backward(0), SendGrad(0),
           Backward(1), SendGrad(1), OptimizerStep()]
    with pytest.raises(ScheduleError, match="deadlock"):
        check_schedule(_broken(all_ranks("gpipe", 3, 2), 1, lambda L: lst))


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("zb-h1", 2, 0, 4)
    with pytest.raises(ValueError, match="stage 2"):
        make_schedule("gpipe", 2, 2, 4)


@pytest.mark.parametrize("name,chunks", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)])
def test_sync_is_carried_by_each_chunks_last_backward_and_the_step(name, chunks):
    """make_schedule(sync=True) marks exactly the last Backward of every chunk and the
    OptimizerStep; sync=False marks nothing; the checker accepts both."""
    P, M = 4, 8
    for sync in (True, False):
        lists = [make_schedule(name, P, r, M, chunks, sync=sync) for r in range(P)]
        check_schedule(lists)
        for lst in lists:
            backward = [i for i in lst if isinstance(i, Backward)]
            last = {i.chunk: i for i in backward}            # the last Backward of each chunk
            marked = [i for i in backward if i.sync]
            assert marked == ([i for i in backward if last[i.chunk] is i] if sync else [])
            assert len(last) == chunks and lst[-1] == OptimizerStep(sync=sync)


def test_forward_only_schedule():
    for P in range(1, 6):
        for M in (1, 3):
            lists = [list(forward_only(P, r, M)) for r in range(P)]
            res = check_schedule(lists)
            assert res.peak_activations == [0] * P          # nothing kept for a backward
            assert all(isinstance(i, (RecvActivation, Forward, SendActivation)) for L in lists for i in L)
            assert all(not i.keep_cache for L in lists for i in L if isinstance(i, Forward))
    bad = [list(forward_only(2, r, 2)) for r in range(2)]
    bad[1] = bad[1] + [OptimizerStep()]
    with pytest.raises(ScheduleError, match="in a forward-only schedule"):
        check_schedule(bad)
