"""Data parallelism equals the single process: bucketed, overlapped gradient all-reduce.

Every dp rank trains the tiny GPT in float64 through ``ParallelTrainer`` (the layout
dp x 1 x 1) on its contiguous slice of a fixed global batch; after N steps the per-step loss
and the final weights must match a single process trained on the whole global batch, within
a relative 1e-10. Not bit for bit: the mean gradient is summed in a different order (per
rank over its rows, then across ranks by the all-reduce algorithm, instead of over all rows
at once), and float addition is not associative. Measured at dp 2, 3, 4, 8: loss <= 3.2e-16,
weights <= 1.7e-15 (SGD) and <= 1.2e-12 (AdamW, whose update divides by sqrt(v) and so
magnifies the gradient's rounding), relative to each tensor's largest entry. At dp 1 the
trainer is the single process: bitwise.

The helpers here are shared with test_zero.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpipar.nn.gpt import GPT, PRESETS
from mpipar.optim import OptimizerSpec, clip_grad_norm
from mpipar.parallel.data_parallel import DataParallelSync, partition_buckets
from mpipar.parallel.layout import Layout
from mpipar.parallel.trainer import ParallelTrainer

CONFIG = PRESETS["tiny"]
B, T, STEPS = 24, 8, 3      # 24 sequences: divisible by every tested dp size 1, 2, 3, 4, 8
TOL = 1e-10
SPEC = {"sgd": OptimizerSpec("sgd", lr=0.1, momentum=0.9, weight_decay=0.01),
        "adamw": OptimizerSpec("adamw", lr=3e-3, weight_decay=0.1)}
CLIP = {"sgd": 0.0, "adamw": 0.5}    # adamw runs also test global-norm clipping (it clips)
ALGORITHMS = ["native", "ring", "rhd", "tree", "dbtree", "ps", "hier"]


def global_batches() -> np.ndarray:
    """(STEPS, B, T + 1) tokens: step s trains on x = [..., :-1], y = [..., 1:]."""
    return np.random.default_rng(1234).integers(0, CONFIG.vocab_size, size=(STEPS, B, T + 1))


def rank_rows(step: int, rank: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """This dp rank's contiguous rows of global batch ``step``."""
    rows = global_batches()[step, rank * B // size:(rank + 1) * B // size]
    return rows[:, :-1], rows[:, 1:]


def accum_steps(size: int) -> int:
    """2 micro-batches where the rank's rows divide by 2, else 3 (dp 8: 3 rows per rank)."""
    return 2 if (B // size) % 2 == 0 else 3


_REFERENCE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def reference(opt: str) -> tuple[np.ndarray, np.ndarray]:
    """(per-step losses, final flat weights) of the single process on the global batch."""
    if opt not in _REFERENCE:
        model = GPT(CONFIG, seed=0, dtype="float64")
        optim = SPEC[opt].build(model.state_dict())
        losses = []
        for step in range(STEPS):
            loss, grads = model.loss_and_grads(*rank_rows(step, 0, 1))
            clip_grad_norm(grads, CLIP[opt])
            optim.step(grads)
            losses.append(loss)
        _REFERENCE[opt] = (np.array(losses), model.param_buffer.copy())
    return _REFERENCE[opt]


def max_rel_diff(trainer: ParallelTrainer, losses: np.ndarray, opt: str) -> tuple[float, float]:
    """(largest relative loss difference, largest per-tensor max|w - w_ref| / max|w_ref|)."""
    ref_losses, ref_params = reference(opt)
    dl = float(np.max(np.abs(losses - ref_losses) / np.abs(ref_losses)))
    dw = 0.0
    local = trainer.local                 # tp = pp = 1: laid out as the single process's GPT
    for name, (s, e) in local.layout.offsets.items():
        ref = ref_params[s:e]
        dw = max(dw, float(np.max(np.abs(local.param_buffer[s:e] - ref)) / np.max(np.abs(ref))))
    return dl, dw


def assert_same_on_all_ranks(comm, a: np.ndarray) -> None:
    got = comm.allgather(np.ascontiguousarray(a).reshape(1, -1))
    assert all(np.array_equal(got[r], got[0]) for r in range(comm.size)), "ranks differ"


def run_dp(comm, opt: str, steps: int = STEPS, trainer: ParallelTrainer | None = None,
           start: int = 0, hooks: bool = True, **layout) -> tuple[ParallelTrainer, np.ndarray]:
    """Data parallelism over ``comm`` (``layout``: Layout fields, dp = the world); returns
    (trainer, losses of steps start .. steps-1)."""
    if trainer is None:
        trainer = ParallelTrainer(comm, CONFIG, Layout(dp=comm.size, **layout), SPEC[opt],
                                  dtype="float64", grad_clip=CLIP[opt], hooks=hooks)
    losses = [trainer.step(*rank_rows(step, comm.rank, comm.size)).loss
              for step in range(start, steps)]
    return trainer, np.array(losses)


def check(comm, trainer, losses, opt, what: str) -> None:
    dl, dw = max_rel_diff(trainer, losses, opt)
    print(f"[dp {comm.size}] {what}: max rel diff loss {dl:.1e} weights {dw:.1e}")
    assert dl <= TOL and dw <= TOL, (what, dl, dw)
    if comm.size == 1:                    # one process: the reference's own arithmetic
        assert dl == 0 and dw == 0, (what, dl, dw)
    assert_same_on_all_ranks(comm, trainer.local.param_buffer)
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
    for b in buckets:   # each bucket's shapes: its tensors in buffer order, end to end
        starts = sorted(model.layout.offsets[n][0] for n in b.names)
        assert starts[0] == b.start
        assert b.shapes == tuple(model.layout.shapes[n] for n in reversed(b.names))
        assert [model.layout.offsets[n][0] for n in reversed(b.names)] == starts


# -- MPI: equals the single process ------------------------------------------------------------
pytestmark_mpi = pytest.mark.mpi(min_size=1)


@pytestmark_mpi
@pytest.mark.parametrize("opt,bucket_mb", [("sgd", 1e-4), ("adamw", 1e-4), ("adamw", 0.05),
                                           ("sgd", None)])
def test_dp_matches_single_process(comm, opt, bucket_mb):
    trainer, losses = run_dp(comm, opt, bucket_mb=bucket_mb)
    assert isinstance(trainer.sync, DataParallelSync)
    check(comm, trainer, losses, opt, f"{opt} bucket_mb={bucket_mb} "
                                      f"({len(trainer.sync.buckets.buckets)} buckets)")


@pytestmark_mpi
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_dp_grad_accumulation_matches_single_process(comm, opt):
    K = accum_steps(comm.size)
    trainer, losses = run_dp(comm, opt, bucket_mb=0.05, grad_accum=K)
    dl, dw = max_rel_diff(trainer, losses, opt)       # K chunks sum in another order: not bitwise
    assert dl <= TOL and dw <= TOL, (dl, dw)
    assert_same_on_all_ranks(comm, trainer.local.param_buffer)
    buckets = trainer.sync.buckets
    # one reduction per optimiser step, whatever K
    assert buckets.totals.collectives == (STEPS * len(buckets.buckets) if comm.size > 1 else 0)


@pytestmark_mpi
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dp_each_allreduce_algorithm(comm, algorithm):
    trainer, losses = run_dp(comm, "adamw", bucket_mb=0.05, allreduce=algorithm)
    check(comm, trainer, losses, "adamw", f"allreduce {algorithm}")


@pytestmark_mpi
def test_dp_without_readiness_marks(comm):
    """No hooks: finish() starts every bucket itself."""
    trainer, losses = run_dp(comm, "sgd", bucket_mb=0.05, hooks=False)
    check(comm, trainer, losses, "sgd", "no mark_ready calls")


@pytestmark_mpi
def test_buckets_start_during_backward_and_report_times(comm):
    """Buckets start in index order as their stages finish backward; times are reported."""
    trainer = ParallelTrainer(comm, CONFIG, Layout(dp=comm.size, bucket_mb=1e-4),
                              SPEC["sgd"], dtype="float64")
    buckets = trainer.sync.buckets
    started = []                           # after the trainer's own hook has marked them
    trainer.pipe.on_stage_backward_done.append(lambda i, names: started.append(buckets._next))
    res = trainer.step(*rank_rows(0, comm.rank, comm.size))
    # the head (ln_f: 2 buckets) starts at once; wte, tied, only after the embedding stage
    assert started[0] == 2 and started[-1] == len(buckets.buckets)
    assert started == sorted(started) and started[-2] < started[-1]
    with pytest.raises(KeyError, match="not a tensor"):
        buckets.mark_ready(["no.such.tensor"])
    stats = res.comm
    if comm.size > 1:
        assert stats.collectives == len(buckets.buckets) and stats.total_s > 0
        assert 0 <= stats.exposed_s and stats.bytes == trainer.local.grad_buffer.nbytes
    else:
        assert stats.collectives == 0
    assert buckets._next == 0 and len(buckets._timed) == 0          # ready for the next step


# -- MPI: gradient compression (Layout.compress) ---------------------------------------------
def expected_bytes(spec: str, numel: int, itemsize: int, p: int) -> int:
    """What ``comm.compress`` counts for one bucket of ``numel`` elements (its docstring):
    fp16 2 bytes an element; int8 one scale and the int8 payload packed to whole int32 words;
    topk ceil(RATIO n) int32 indices and values. 0 in a group of one."""
    if p == 1:
        return 0
    if spec == "fp16":
        return 2 * numel
    if spec == "bf16":
        return 2 * 2 * -(-numel // 2)        # bfloat16 patterns packed two to an int32 word
    if spec == "int8":
        return itemsize + 4 * -(-numel // 4)
    k = min(numel, -(-int(float(spec.split(":")[1]) * 1e6) * numel // 1_000_000))
    return k * (4 + itemsize)


def powersgd_bytes(rank: int, shapes, itemsize: int, p: int) -> int:
    """PowerSGD's count for one bucket of tensors ``shapes`` (comm.compress docstring): per
    matrix (first dimension by the rest) (n + m) min(rank, n, m) elements, vectors whole."""
    if p == 1:
        return 0
    total = 0
    for shape in shapes:
        size = int(np.prod(shape))
        if len(shape) >= 2:
            n, m = shape[0], size // shape[0]
            total += (n + m) * min(rank, n, m)
        else:
            total += size
    return total * itemsize


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_full_rank_powersgd_trains_as_uncompressed(comm, opt):
    """PowerSGD at a rank above every matrix's min(n, m) (capped there): P^ is square
    orthogonal, so P^ P^T mean(M) = mean(M) up to rounding (the QR and two products add
    ~1e-15 relative), whatever the gradients' rank: the single process's training within the
    same 1e-10 as plain data parallelism, through two all-reduces of factors a bucket."""
    trainer, losses = run_dp(comm, opt, bucket_mb=0.05, compress="powersgd:10000")
    compressor = trainer.sync.buckets.reducer.compressor
    assert compressor.spec == "powersgd:10000"
    assert compressor.calls == STEPS * len(trainer.sync.buckets.buckets)
    assert any(k.endswith(".Q") for k in compressor.state_dict())      # matrices went as factors
    check(comm, trainer, losses, opt, "compress powersgd full rank")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_topk_1_trains_as_uncompressed(comm, opt):
    """``topk:1.0`` sends every entry (the residual stays 0): the single process's training,
    within the same 1e-10 as plain data parallelism, through the compressor's all-gathers."""
    trainer, losses = run_dp(comm, opt, bucket_mb=0.05, compress="topk:1.0")
    compressor = trainer.sync.buckets.reducer.compressor
    assert compressor.spec == "topk:1" and compressor.calls == STEPS * len(trainer.sync.buckets.buckets)
    check(comm, trainer, losses, opt, "compress topk:1.0")


# fp16 / int8 / topk:0.05 against plain dp, relative loss difference over STEPS adamw steps.
# Step 0's loss is before any update: equal. After that the difference is the compressed
# gradient's effect on 2 AdamW updates, which (dividing by sqrt(v)) moves every weight by about
# lr whatever the gradient's size, so a rounding of the gradient moves the loss little (fp16:
# 2^-11 relative) and a sparse one more (topk keeps 5% per step, the rest delayed). Measured
# at dp 2, 3, 4, 8 (the largest of them): fp16 9.4e-6, int8 2.0e-4, topk:0.05 2.9e-3, bf16
# 7.7e-4 (8 significant bits), powersgd:2 3.6e-3 (rank 2 of matrices up to 64 x 256); the
# bounds are about 5x that, for the summation order of other sizes and libraries.
LOSSY = {"fp16": 5e-5, "int8": 1e-3, "topk:0.05": 1.5e-2, "bf16": 4e-3, "powersgd:2": 1.5e-2}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("spec", sorted(LOSSY))
def test_lossy_compression_trains_close_and_counts_its_bytes(comm, spec):
    plain, plain_losses = run_dp(comm, "adamw", bucket_mb=0.05)
    trainer = ParallelTrainer(comm, CONFIG, Layout(dp=comm.size, bucket_mb=0.05, compress=spec),
                              SPEC["adamw"], dtype="float64", grad_clip=CLIP["adamw"])
    buckets = trainer.sync.buckets
    compressor = buckets.reducer.compressor
    itemsize = trainer.local.grad_buffer.itemsize
    if spec.startswith("powersgd"):
        per_step = sum(powersgd_bytes(int(spec.split(":")[1]), b.shapes, itemsize, comm.size)
                       for b in buckets.buckets)
    else:
        per_step = sum(expected_bytes(spec, b.numel, itemsize, comm.size) for b in buckets.buckets)
    losses = []
    for step in range(STEPS):
        before = compressor.bytes_sent
        res = trainer.step(*rank_rows(step, comm.rank, comm.size))
        losses.append(res.loss)
        # what the statistics count is what the compressor handed to collectives
        assert res.comm.bytes == compressor.bytes_sent - before == per_step, (res.comm, per_step)
        assert res.comm.collectives == len(buckets.buckets)
        assert res.comm.bytes < plain.local.grad_buffer.nbytes
    losses = np.array(losses)
    assert np.all(np.isfinite(losses)) and losses[0] == plain_losses[0]
    rel = float(np.max(np.abs(losses - plain_losses) / plain_losses))
    print(f"[dp {comm.size}] {spec}: {per_step:,} bytes a step (uncompressed "
          f"{plain.local.grad_buffer.nbytes:,}), max rel loss diff {rel:.1e}")
    assert rel <= LOSSY[spec], (spec, rel)
    # one residual per bucket, keyed by its index, the same keys every step
    assert sorted(k for k in compressor.state_dict() if not k.endswith(".Q")) == \
        sorted(f"bucket{b.index}" for b in buckets.buckets)
    # memory_report's own kind: a residual the size of each bucket (the whole buffer), and
    # PowerSGD's Q, m x min(rank, n, m) per matrix
    kept = trainer.local.grad_buffer.nbytes
    if spec.startswith("powersgd"):
        rank = int(spec.split(":")[1])
        kept += itemsize * sum(max(s[0], int(np.prod(s[1:]))) * min(rank, s[0], int(np.prod(s[1:])))
                               for b in buckets.buckets for s in b.shapes if len(s) >= 2)
    assert trainer.memory_report()["compression_state"] == kept
    assert_same_on_all_ranks(comm, trainer.local.param_buffer)


@pytestmark_mpi
def test_none_is_the_plain_allreduce_bitwise(comm):
    """``compress="none"`` is the all-reduce path itself: the same bits as a layout that
    never mentions compression, the bucket's whole size counted."""
    from mpipar.parallel.data_parallel import AllreduceMean

    default, default_losses = run_dp(comm, "adamw", bucket_mb=0.05)
    none, none_losses = run_dp(comm, "adamw", bucket_mb=0.05, compress="none")
    assert type(none.sync.buckets.reducer) is AllreduceMean
    assert np.array_equal(none_losses, default_losses)
    assert np.array_equal(none.local.param_buffer, default.local.param_buffer)
    nbytes = none.local.grad_buffer.nbytes if comm.size > 1 else 0
    assert none.sync.buckets.last.bytes == default.sync.buckets.last.bytes == nbytes


@pytestmark_mpi
def test_a_group_of_one_compresses_nothing(comm):
    """dp 1 (tp or pp over the world): nothing is sent, so nothing is compressed; the
    compressor is never called."""
    if comm.size not in (1, 2):
        pytest.skip("tp over a world of 1 or 2")
    trainer = ParallelTrainer(comm, CONFIG, Layout(tp=comm.size, compress="int8"), SPEC["sgd"],
                              dtype="float64")
    res = trainer.step(*rank_rows(0, 0, 1))
    assert res.comm.bytes == 0 and trainer.sync.buckets.reducer.compressor.calls == 0
    assert trainer.memory_report()["compression_state"] == 0
