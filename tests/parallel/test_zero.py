"""ZeRO-1/2 equal the single process, and shard the optimiser state (and gradients) 1/D.

Same set-up as test_data_parallel.py (tiny GPT, float64, fixed global batch of 24, 3 steps,
through ``ParallelTrainer`` with ``Layout(dp=world, zero=stage)``; relative 1e-10, not
bitwise because the mean gradient is summed in another order).
"""

from __future__ import annotations

import numpy as np
import pytest

from mpipar.comm.communicator import split_counts
from mpipar.parallel.layout import Layout
from mpipar.parallel.model import load_full_state_dict
from mpipar.parallel.schedules import make_schedule
from mpipar.parallel.trainer import ParallelTrainer
from mpipar.parallel.zero import ZeroSync
from test_data_parallel import (ALGORITHMS, CLIP, CONFIG, SPEC, STEPS, TOL, accum_steps,
                                assert_same_on_all_ranks, check, max_rel_diff, rank_rows, run_dp)

pytestmark = pytest.mark.mpi(min_size=1)


def make_zero(comm, opt: str, stage: int, **layout) -> ParallelTrainer:
    layout.setdefault("bucket_mb", 0.1)
    return ParallelTrainer(comm, CONFIG, Layout(dp=comm.size, zero=stage, **layout), SPEC[opt],
                           dtype="float64", grad_clip=CLIP[opt])


@pytest.mark.parametrize("stage,opt,bucket_mb", [
    (1, "sgd", 1e-4), (1, "adamw", 0.05), (2, "adamw", 1e-4), (2, "sgd", None), (2, "adamw", 0.05)])
def test_zero_matches_single_process(comm, stage, opt, bucket_mb):
    trainer, losses = run_dp(comm, opt, trainer=make_zero(comm, opt, stage, bucket_mb=bucket_mb))
    assert isinstance(trainer.sync, ZeroSync) and trainer.sync.stage == stage
    check(comm, trainer, losses, opt, f"zero-{stage} {opt} bucket_mb={bucket_mb} "
                                      f"({len(trainer.sync.buckets.buckets)} buckets)")


def test_zero2_does_what_zero1_does_with_one_micro_batch(comm):
    """Without accumulation both stages reduce-scatter each bucket once per step; stage 2
    from per-tensor storage donated to the collective, stage 1 from the flat buffer: the
    same arithmetic, so the same bits."""
    one, l1 = run_dp(comm, "adamw", trainer=make_zero(comm, "adamw", 1, bucket_mb=0.01))
    two, l2 = run_dp(comm, "adamw", trainer=make_zero(comm, "adamw", 2, bucket_mb=0.01))
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(one.local.param_buffer, two.local.param_buffer)


def test_zero2_never_holds_the_full_gradient(comm):
    """Stage 2: no flat gradient buffer; a tensor exists from backward's first write into it
    until its bucket goes to the reduce-scatter. The peak is what the backward order allows
    (the tied wte lives through it all, plus the buckets of the block being differentiated)."""
    K = accum_steps(comm.size)
    trainer, losses = run_dp(comm, "adamw", trainer=make_zero(comm, "adamw", 2, bucket_mb=0.01,
                                                              grad_accum=K))
    dl, dw = max_rel_diff(trainer, losses, "adamw")
    assert dl <= TOL and dw <= TOL, (dl, dw)
    local, zero = trainer.local, trainer.sync
    store = local.grads
    assert local.grad_buffer is None and store.bucketed
    assert store.allocated_bytes() == 0          # every bucket went to its reduce-scatter

    # at most: wte's bucket + the buckets of one block (tensors wait for their whole bucket)
    item = local.param_buffer.itemsize
    bytes_of = {b.index: b.numel * item for b in zero.buckets.buckets}
    bucket_of = {n: b.index for b in zero.buckets.buckets for n in b.names}
    wte = {bucket_of["transformer.wte.weight"]}
    block = max(sum(bytes_of[i] for i in {bucket_of[n] for n in local.layout.names
                                           if n.startswith(f"transformer.h.{j}.")} | wte)
                for j in range(CONFIG.n_layer))
    full = local.layout.numel * item
    largest = max(np.prod(shape) for shape in local.layout.shapes.values()) * item
    assert largest <= store.peak_bytes <= block < full / 4
    rep = trainer.memory_report()
    assert rep["grads"] == store.peak_bytes + zero.buckets.shard_grad.nbytes
    assert rep["grads_kept"] == zero.buckets.shard_grad.nbytes
    with pytest.raises(RuntimeError, match="already handed to its reduce-scatter"):
        # a late backward into a bucket that has gone to its reduce-scatter
        trainer.pipe.step(make_schedule("1f1b", 1, 0, 1, sync=False),
                          [rank_rows(0, comm.rank, comm.size)], zero_grad=False)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_grad_accumulation(comm, stage):
    K = accum_steps(comm.size)
    trainer, losses = run_dp(comm, "adamw", trainer=make_zero(comm, "adamw", stage,
                                                              bucket_mb=0.05, grad_accum=K))
    dl, dw = max_rel_diff(trainer, losses, "adamw")
    assert dl <= TOL and dw <= TOL, (dl, dw)
    assert_same_on_all_ranks(comm, trainer.local.param_buffer)
    buckets = trainer.sync.buckets
    n = len(buckets.buckets) * STEPS
    # stage 1: one reduce-scatter per step; stage 2: one per micro-step (into the shard)
    expected = n * (K if stage == 2 else 1) if comm.size > 1 else 0
    assert buckets.totals.collectives == expected


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_zero_each_algorithm(comm, algorithm):
    """ring, rhd and native run their own reduce-scatter and all-gather; the others have
    none, and ZeRO uses MPI's native ones for them."""
    trainer, losses = run_dp(comm, "adamw", trainer=make_zero(comm, "adamw", 2, bucket_mb=0.05,
                                                              allreduce=algorithm))
    zero = trainer.sync
    check(comm, trainer, losses, "adamw", f"zero-2 algorithm {algorithm} "
                                          f"(rs {zero.buckets.rs_algorithm}, ag {zero.ag_algorithm})")


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_memory_is_one_over_d(comm, stage):
    trainer = make_zero(comm, "adamw", stage, bucket_mb=0.05)
    zero, local = trainer.sync, trainer.local
    D, nb = comm.size, len(zero.buckets.buckets)
    rep = trainer.memory_report()
    item = local.param_buffer.itemsize
    # exact up to the uneven split: at most one element per bucket above or below numel / D
    assert abs(rep["optimizer_state"] - rep["optimizer_state_unsharded"] / D) <= 2 * nb * item
    assert abs(zero.buckets.shard_grad.nbytes - rep["grads_unsharded"] / D) <= nb * item
    total = comm.allreduce(np.array([rep["optimizer_state"], zero.buckets.shard_numel]), op="sum")
    assert total[0] == rep["optimizer_state_unsharded"] and total[1] == local.layout.numel
    if stage == 2:
        assert rep["grads_kept"] == zero.buckets.shard_grad.nbytes
    else:
        assert rep["grads_kept"] == rep["grads"] == rep["grads_unsharded"] + zero.buckets.shard_grad.nbytes
    # the shards are the split of every bucket that reduce_scatter makes
    for b, (lo, hi), c in zip(zero.buckets.buckets, zero.buckets.blocks, zero.buckets.counts):
        assert c == split_counts(b.numel, D) and hi - lo == c[comm.rank]
        assert lo == b.start + sum(c[:comm.rank])
    if comm.rank == 0:
        print(f"[dp {D}] zero-{stage}: {rep}")


def test_zero_with_one_bucket_has_contiguous_shards(comm):
    trainer = make_zero(comm, "sgd", 1, bucket_mb=None)
    (lo, hi), = trainer.sync.buckets.blocks
    c = split_counts(trainer.local.layout.numel, comm.size)
    assert (lo, hi) == (sum(c[:comm.rank]), sum(c[:comm.rank + 1]))


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_resumes_exactly_from_the_full_state(comm, stage):
    """The full model and optimiser state after 2 steps, loaded into a fresh trainer of the
    same layout: step 3 is bit-identical to the uninterrupted run's."""
    a, _ = run_dp(comm, "adamw", steps=2, trainer=make_zero(comm, "adamw", stage))
    sd, osd = a.full_state_dict(), a.full_optimizer_state()
    assert osd["step"] == 2 and set(osd) - {"step"} == {
        f"{s}.{n}" for s in ("exp_avg", "exp_avg_sq") for n in sd}
    run_dp(comm, "adamw", trainer=a, start=2)
    b = make_zero(comm, "adamw", stage)
    load_full_state_dict(b.local, sd)
    b.load_full_optimizer_state(osd)
    run_dp(comm, "adamw", trainer=b, start=2)
    np.testing.assert_array_equal(b.local.param_buffer, a.local.param_buffer)
    assert b.sync.step_count == a.sync.step_count == STEPS
