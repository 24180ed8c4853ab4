"""Data parallelism equals the single process: bucketed, overlapped gradient all-reduce.

Every dp rank trains the tiny GPT in float64 on its contiguous slice of a fixed global batch;
after N steps the per-step loss and the final weights must match a single process trained on
the whole global batch, within a relative 1e-10. Not bit for bit: the mean gradient is summed
in a different order (per rank over its rows, then across ranks by the all-reduce algorithm,
instead of over all rows at once), and float addition is not associative. Measured at dp 2, 3, 4, 8:
loss <= 3.2e-16, weights <= 1.7e-15 (SGD) and <= 1.2e-12 (AdamW, whose update divides by
sqrt(v) and so magnifies the gradient's rounding), relative to each tensor's largest entry.

The helpers here are shared with test_zero.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpipar.nn.gpt import GPT, PRESETS
from mpipar.optim import SGD, AdamW, clip_grad_norm
from mpipar.parallel.data_parallel import (GradBuckets, backward_stages, dp_train_step,
                                           partition_buckets)

CONFIG = PRESETS["tiny"]
B, T, STEPS = 24, 8, 3      # 24 sequences: divisible by every tested dp size 1, 2, 3, 4, 8
TOL = 1e-10
HYPER = {"sgd": dict(lr=0.1, momentum=0.9, weight_decay=0.01),
         "adamw": dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)}
CLIP = {"sgd": 0.0, "adamw": 0.5}    # adamw runs also test global-norm clipping (it clips)
ALGORITHMS = ["native", "ring", "rhd", "tree", "dbtree", "ps", "hier"]


def global_batches() -> np.ndarray:
    """(STEPS, B, T + 1) tokens: step s trains on x = [..., :-1], y = [..., 1:]."""
    return np.random.default_rng(1234).integers(0, CONFIG.vocab_size, size=(STEPS, B, T + 1))


def micro_batches(step: int, rank: int, size: int, K: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """This dp rank's contiguous rows of the global batch, cut into K micro-batches."""
    rows = global_batches()[step, rank * B // size:(rank + 1) * B // size]
    b = len(rows) // K
    return [(rows[k * b:(k + 1) * b, :-1], rows[k * b:(k + 1) * b, 1:]) for k in range(K)]


def accum_steps(size: int) -> int:
    """2 micro-batches where the rank's rows divide by 2, else 3 (dp 8: 3 rows per rank)."""
    return 2 if (B // size) % 2 == 0 else 3


_REFERENCE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def reference(opt: str) -> tuple[np.ndarray, np.ndarray]:
    """(per-step losses, final flat weights) of the single process on the global batch."""
    if opt not in _REFERENCE:
        model = GPT(CONFIG, seed=0, dtype="float64")
        optim = (SGD if opt == "sgd" else AdamW)(model.state_dict(), **HYPER[opt])
        losses = []
        for step in range(STEPS):
            (x, y), = micro_batches(step, 0, 1, 1)
            loss, grads = model.loss_and_grads(x, y)
            clip_grad_norm(grads, CLIP[opt])
            optim.step(grads)
            losses.append(loss)
        _REFERENCE[opt] = (np.array(losses), model.param_buffer.copy())
    return _REFERENCE[opt]


def max_rel_diff(model: GPT, losses: np.ndarray, opt: str) -> tuple[float, float]:
    """(largest relative loss difference, largest per-tensor max|w - w_ref| / max|w_ref|)."""
    ref_losses, ref_params = reference(opt)
    dl = float(np.max(np.abs(losses - ref_losses) / np.abs(ref_losses)))
    dw = 0.0
    for name, (s, e) in model.layout.offsets.items():
        ref = ref_params[s:e]
        dw = max(dw, float(np.max(np.abs(model.param_buffer[s:e] - ref)) / np.max(np.abs(ref))))
    return dl, dw


def assert_same_on_all_ranks(comm, a: np.ndarray) -> None:
    got = comm.allgather(np.ascontiguousarray(a).reshape(1, -1))
    assert all(np.array_equal(got[r], got[0]) for r in range(comm.size)), "ranks differ"


def run_dp(comm, opt: str, bucket_mb=0.1, algorithm=None, K: int = 1, hooks: bool = True):
    """Plain data parallelism over ``comm``: returns (model, losses, buckets)."""
    model = GPT(CONFIG, seed=0, dtype="float64")
    optim = (SGD if opt == "sgd" else AdamW)(model.state_dict(), **HYPER[opt])
    buckets = GradBuckets(model.grad_buffer, model.layout, comm, bucket_mb=bucket_mb,
                          algorithm=algorithm)
    losses = []
    for step in range(STEPS):
        res = dp_train_step(model, buckets, optim, micro_batches(step, comm.rank, comm.size, K),
                            grad_clip=CLIP[opt], hooks=hooks)
        losses.append(res.loss)
    return model, np.array(losses), buckets


def check(comm, model, losses, opt, what: str) -> None:
    dl, dw = max_rel_diff(model, losses, opt)
    print(f"[dp {comm.size}] {what}: max rel diff loss {dl:.1e} weights {dw:.1e}")
    assert dl <= TOL and dw <= TOL, (what, dl, dw)
    assert_same_on_all_ranks(comm, model.param_buffer)


# -- serial: the partition -------------------------------------------------------------------
@pytest.mark.parametrize("bucket_mb", [1e-4, 0.05, 0.5, None])
def test_buckets_reverse_order_whole_tensors_cover_the_buffer(bucket_mb):
    model = GPT(CONFIG, seed=0, dtype="float64")
    buckets = partition_buckets(model.layout, 8, bucket_mb)
    cap = np.inf if bucket_mb is None else bucket_mb * 2**20 / 8
    assert buckets[0].end == model.layout.numel and buckets[-1].start == 0
    for a, b in zip(buckets, buckets[1:]):
        assert a.start == b.end                        # contiguous, descending
    for b in buckets:
        assert b.numel <= cap or len(b.names) == 1     # over the cap only as one big tensor
        assert sum(np.prod(model.layout.shapes[n]) for n in b.names) == b.numel
    names = [n for b in buckets for n in b.names]
    assert sorted(names) == sorted(model.layout.names) and len(set(names)) == len(names)
    assert buckets[0].names[0] == "transformer.ln_f.bias"           # produced first
    assert "transformer.wte.weight" in buckets[-1].names             # tied: ready last
    if bucket_mb == 1e-4:
        assert len(buckets) == len(model.layout.names)               # one tensor each


# -- MPI: equals the single process ------------------------------------------------------------
pytestmark_mpi = pytest.mark.mpi(min_size=1)


@pytestmark_mpi
@pytest.mark.parametrize("opt,bucket_mb", [("sgd", 1e-4), ("adamw", 1e-4), ("adamw", 0.05),
                                           ("sgd", None)])
def test_dp_matches_single_process(comm, opt, bucket_mb):
    model, losses, buckets = run_dp(comm, opt, bucket_mb=bucket_mb)
    check(comm, model, losses, opt, f"{opt} bucket_mb={bucket_mb} ({len(buckets.buckets)} buckets)")


@pytestmark_mpi
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_dp_grad_accumulation_matches_single_process(comm, opt):
    K = accum_steps(comm.size)
    model, losses, buckets = run_dp(comm, opt, bucket_mb=0.05, K=K)
    check(comm, model, losses, opt, f"{opt} grad_accum {K}")
    # one reduction per optimiser step, whatever K
    assert buckets.totals.collectives == (STEPS * len(buckets.buckets) if comm.size > 1 else 0)


@pytestmark_mpi
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dp_each_allreduce_algorithm(comm, algorithm):
    model, losses, _ = run_dp(comm, "adamw", bucket_mb=0.05, algorithm=algorithm)
    check(comm, model, losses, "adamw", f"allreduce {algorithm}")


@pytestmark_mpi
def test_dp_without_readiness_marks(comm):
    """A model without hooks: finish() starts every bucket itself."""
    model, losses, _ = run_dp(comm, "sgd", bucket_mb=0.05, hooks=False)
    check(comm, model, losses, "sgd", "no mark_ready calls")


@pytestmark_mpi
def test_buckets_start_during_backward_and_report_times(comm):
    """Buckets start in index order as their stages finish backward; times are reported."""
    model = GPT(CONFIG, seed=0, dtype="float64")
    buckets = GradBuckets(model.grad_buffer, model.layout, comm, bucket_mb=1e-4)
    (x, y), = micro_batches(0, comm.rank, comm.size, 1)
    model.zero_grad()
    _, _, cache = model.forward(x, y)
    started = []

    def on_ready(names):
        buckets.mark_ready(names)
        started.append(buckets._next)

    backward_stages(model, cache, 1.0, on_ready)
    # the head (ln_f: 2 buckets) starts at once; wte, tied, only after the embedding stage
    assert started[0] == 2 and started[-1] == len(buckets.buckets)
    assert started == sorted(started) and started[-2] < started[-1]
    with pytest.raises(KeyError, match="not a tensor"):
        buckets.mark_ready(["no.such.tensor"])
    stats = buckets.finish()
    if comm.size > 1:
        assert stats.collectives == len(buckets.buckets) and stats.total_s > 0
        assert 0 <= stats.exposed_s and stats.bytes == model.grad_buffer.nbytes
    else:
        assert stats.collectives == 0
    assert buckets._next == 0 and buckets._inflight == []          # ready for the next step
