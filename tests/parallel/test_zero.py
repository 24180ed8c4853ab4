"""ZeRO-1/2 equal the single process, and shard the optimiser state (and gradients) 1/D.

Same set-up as test_data_parallel.py (tiny GPT, float64, fixed global batch of 24, 3 steps;
relative 1e-10, not bitwise because the mean gradient is summed in another order).
"""

from __future__ import annotations

import numpy as np
import pytest

from mpipar.comm.communicator import split_counts
from mpipar.nn.gpt import GPT
from mpipar.parallel.data_parallel import dp_train_step
from mpipar.parallel.zero import ZeroOptimizer
from test_data_parallel import (ALGORITHMS, CLIP, CONFIG, HYPER, STEPS, accum_steps, check,
                                micro_batches)

pytestmark = pytest.mark.mpi(min_size=1)


def make_zero(comm, opt: str, stage: int, bucket_mb=0.1, algorithm=None, flat=False):
    """``flat``: hand ZeRO the model's flat gradient buffer instead of its GradStore (stage 2
    then keeps the full buffer rather than moving gradients into per-bucket storage)."""
    model = GPT(CONFIG, seed=0, dtype="float64")
    zero = ZeroOptimizer(model.param_buffer, model.grad_buffer if flat else model.grads,
                         model.layout, comm, opt, stage=stage, bucket_mb=bucket_mb,
                         algorithm=algorithm, **HYPER[opt])
    return model, zero


def run_zero(comm, opt: str, stage: int, bucket_mb=0.1, algorithm=None, K: int = 1, steps=STEPS,
             start=0, model=None, zero=None, flat=False):
    if model is None:
        model, zero = make_zero(comm, opt, stage, bucket_mb, algorithm, flat)
    losses = []
    for step in range(start, steps):
        res = dp_train_step(model, zero.buckets, zero, micro_batches(step, comm.rank, comm.size, K),
                            grad_clip=CLIP[opt])
        losses.append(res.loss)
    return model, np.array(losses), zero


@pytest.mark.parametrize("stage,opt,bucket_mb,flat", [
    (1, "sgd", 1e-4, False), (1, "adamw", 0.05, False), (2, "adamw", 1e-4, False),
    (2, "sgd", None, False), (2, "adamw", 0.05, True)])
def test_zero_matches_single_process(comm, stage, opt, bucket_mb, flat):
    model, losses, zero = run_zero(comm, opt, stage, bucket_mb, flat=flat)
    check(comm, model, losses, opt, f"zero-{stage} {opt} bucket_mb={bucket_mb} flat={flat} "
                                    f"({len(zero.buckets.buckets)} buckets)")


def test_zero2_never_holds_the_full_gradient(comm):
    """Stage 2 with the model's GradStore: no flat gradient buffer; a tensor exists from
    backward's first write into it until its bucket goes to the reduce-scatter. The peak is
    what the backward order allows (the tied wte lives through it all, plus the buckets of
    the block being differentiated), and every step is bit-identical to stage 2 on the flat
    buffer, which does the same arithmetic."""
    K = accum_steps(comm.size)
    model, losses, zero = run_zero(comm, "adamw", 2, bucket_mb=0.01, K=K)
    flat_model, flat_losses, _ = run_zero(comm, "adamw", 2, bucket_mb=0.01, K=K, flat=True)
    np.testing.assert_array_equal(losses, flat_losses)
    np.testing.assert_array_equal(model.param_buffer, flat_model.param_buffer)
    store = model.grads
    assert model.grad_buffer is None and store.bucketed
    assert store.allocated_bytes() == 0          # every bucket went to its reduce-scatter

    # at most: wte's bucket + the buckets of one block (tensors wait for their whole bucket)
    item = model.param_buffer.itemsize
    bytes_of = {b.index: b.numel * item for b in zero.buckets.buckets}
    bucket_of = {n: b.index for b in zero.buckets.buckets for n in b.names}
    wte = {bucket_of["transformer.wte.weight"]}
    block = max(sum(bytes_of[i] for i in {bucket_of[n] for n in model.layout.names
                                           if n.startswith(f"transformer.h.{j}.")} | wte)
                for j in range(CONFIG.n_layer))
    full = model.layout.numel * item
    largest = max(np.prod(shape) for shape in model.layout.shapes.values()) * item
    assert largest <= store.peak_bytes <= block < full / 4
    rep = zero.memory_report()
    assert rep["grads_allocated"] == store.peak_bytes + zero.buckets.shard_grad.nbytes
    with pytest.raises(RuntimeError, match="already handed to its reduce-scatter"):
        model.backward(model.forward(*micro_batches(0, comm.rank, comm.size, 1)[0])[2])


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_grad_accumulation(comm, stage):
    K = accum_steps(comm.size)
    model, losses, zero = run_zero(comm, "adamw", stage, bucket_mb=0.05, K=K)
    check(comm, model, losses, "adamw", f"zero-{stage} grad_accum {K}")
    n = len(zero.buckets.buckets) * STEPS
    # stage 1: one reduce-scatter per step; stage 2: one per micro-step (into the shard)
    expected = n * (K if stage == 2 else 1) if comm.size > 1 else 0
    assert zero.buckets.totals.collectives == expected


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_zero_each_algorithm(comm, algorithm):
    """ring, rhd and native run their own reduce-scatter and all-gather; the others have
    none, and ZeRO uses MPI's native ones for them."""
    model, losses, zero = run_zero(comm, "adamw", 2, bucket_mb=0.05, algorithm=algorithm)
    check(comm, model, losses, "adamw", f"zero-2 algorithm {algorithm} "
                                        f"(rs {zero.buckets.rs_algorithm}, ag {zero.ag_algorithm})")


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_memory_is_one_over_d(comm, stage):
    model, zero = make_zero(comm, "adamw", stage, bucket_mb=0.05)
    D, nb = comm.size, len(zero.buckets.buckets)
    rep = zero.memory_report()
    item = model.param_buffer.itemsize
    # exact up to the uneven split: at most one element per bucket above or below numel / D
    assert abs(rep["optimizer_state"] - rep["optimizer_state_unsharded"] / D) <= 2 * nb * item
    assert abs(zero.buckets.shard_grad.nbytes - rep["grads_unsharded"] / D) <= nb * item
    total = comm.allreduce(np.array([rep["optimizer_state"], zero.buckets.shard_numel]), op="sum")
    assert total[0] == rep["optimizer_state_unsharded"] and total[1] == model.layout.numel
    if stage == 2:
        assert rep["grads"] == zero.buckets.shard_grad.nbytes
    else:
        assert rep["grads"] == rep["grads_unsharded"] + zero.buckets.shard_grad.nbytes
    # the shards are the split of every bucket that reduce_scatter makes
    for b, (lo, hi), c in zip(zero.buckets.buckets, zero.buckets.blocks, zero.buckets.counts):
        assert c == split_counts(b.numel, D) and hi - lo == c[comm.rank]
        assert lo == b.start + sum(c[:comm.rank])
    if comm.rank == 0:
        print(f"[dp {D}] zero-{stage}: {rep}")


def test_zero_with_one_bucket_has_contiguous_shards(comm):
    model, zero = make_zero(comm, "sgd", 1, bucket_mb=None)
    (lo, hi), = zero.buckets.blocks
    c = split_counts(model.layout.numel, comm.size)
    assert (lo, hi) == (sum(c[:comm.rank]), sum(c[:comm.rank + 1]))


def test_zero_state_dict_resumes_exactly(comm):
    """Save each rank's shard after 2 steps, restore into a fresh ZeroOptimizer: step 3 is
    bit-identical to the uninterrupted run."""
    model, _, zero = run_zero(comm, "adamw", 2, steps=2)
    sd = zero.state_dict()
    assert sd["zero.dp_rank"] == comm.rank and sd["step"] == 2
    assert all(k.startswith(("exp_avg", "zero.", "step")) for k in sd)
    params = model.param_buffer.copy()
    run_zero(comm, "adamw", 2, start=2, steps=3, model=model, zero=zero)

    model2, zero2 = make_zero(comm, "adamw", 2)
    model2.param_buffer[...] = params
    zero2.load_state_dict(sd)
    run_zero(comm, "adamw", 2, start=2, steps=3, model=model2, zero=zero2)
    np.testing.assert_array_equal(model2.param_buffer, model.param_buffer)
    bad = dict(sd, **{"zero.dp_size": comm.size + 1})
    with pytest.raises(ValueError, match="dp_size"):
        zero2.load_state_dict(bad)
