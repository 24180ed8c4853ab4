"""Every dp x tp x pp layout of the world trains exactly what one process trains.

On the tiny preset in float64, N optimiser steps from the same seed and global batch give
per-step losses and final weights equal to the single-process run within a relative 1e-10.
Not bit for bit, because the layouts add the same numbers in other orders: data-parallel
ranks' partial gradients are summed by an all-reduce, tensor-parallel ranks' partial
matmuls likewise, micro-batches accumulate one after another, and the tied embedding's two
uses are summed across stages. Measured differences are around 1e-15 (SGD) to 1e-12 (AdamW,
whose division by sqrt(v) magnifies rounding).
"""

import numpy as np
import pytest

from mpipar.nn.gpt import GPT, PRESETS
from mpipar.optim import OPTIMIZERS
from mpipar.parallel.mesh import LayoutError, layouts
from mpipar.parallel.trainer import ParallelTrainer, check_batch, choose_layout

CONFIG = PRESETS["tiny"].replace(block_size=8)
B, T, STEPS, LR = 8, 8, 2, 0.05
TOL = 1e-10


def _batches():
    rng = np.random.default_rng(5)
    return [(rng.integers(0, CONFIG.vocab_size, (B, T)), rng.integers(0, CONFIG.vocab_size, (B, T)))
            for _ in range(STEPS)]


def _reference(optimizer, grad_clip):
    model = GPT(CONFIG, seed=0, dtype="float64")
    hyper = dict(lr=LR, weight_decay=0.1) | ({"betas": (0.9, 0.95)} if optimizer == "adamw" else {})
    opt = OPTIMIZERS[optimizer](model.state_dict(), **hyper)
    losses = []
    for x, y in _batches():
        loss, grads = model.loss_and_grads(x, y)
        from mpipar.optim.clip import clip_grad_norm

        clip_grad_norm(grads, grad_clip)
        opt.step(grads, lr=LR)
        losses.append(loss)
    return losses, {k: v.copy() for k, v in model.state_dict().items()}


_REF = {}


def reference(optimizer="sgd", grad_clip=0.0):
    key = (optimizer, grad_clip)
    if key not in _REF:
        _REF[key] = _reference(optimizer, grad_clip)
    return _REF[key]


def fits(dp, tp, pp):
    """Layouts the tiny model takes (tp must divide its 8 heads); the others are errors,
    tested in test_tensor_parallel.py."""
    return CONFIG.n_head % tp == 0 and pp <= CONFIG.n_layer


def run_layout(comm, dp, tp, pp, **kw):
    opt = kw.pop("optimizer", "sgd")
    clip = kw.pop("grad_clip", 0.0)
    trainer = ParallelTrainer(comm, CONFIG, dp=dp, tp=tp, pp=pp, dtype="float64", optimizer=opt,
                              lr=LR, weight_decay=0.1, grad_clip=clip, **kw)
    rows = B // dp
    losses = []
    for x, y in _batches():
        lo = trainer.mesh.dp_rank * rows
        losses.append(trainer.step(x[lo:lo + rows], y[lo:lo + rows], lr=LR).loss)
    return losses, trainer.full_state_dict()


def assert_matches(comm, got, optimizer="sgd", grad_clip=0.0, what=""):
    ref_losses, ref_sd = reference(optimizer, grad_clip)
    losses, sd = got
    np.testing.assert_allclose(losses, ref_losses, rtol=TOL, atol=0, err_msg=what)
    worst = 0.0
    for name, ref in ref_sd.items():
        diff = np.max(np.abs(sd[name] - ref)) / max(np.max(np.abs(ref)), 1e-300)
        worst = max(worst, diff)
        assert diff <= TOL, f"{what}: {name} differs by {diff:.2e} (relative)"
    return worst


@pytest.mark.mpi(min_size=1)
def test_every_layout_equals_single_process(comm):
    for dp, tp, pp in layouts(comm.size):
        if B % (dp * 2) or not fits(dp, tp, pp):
            continue
        assert_matches(comm, run_layout(comm, dp, tp, pp, micro_batches=2), what=f"dp{dp} tp{tp} pp{pp}")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("variant", [
    dict(schedule="gpipe", micro_batches=2),
    dict(grad_accum=2, micro_batches=1),
    dict(zero=1, optimizer="adamw", grad_clip=0.5),
    dict(zero=2, grad_accum=2),
    dict(allreduce="ring", bucket_mb=0.01),
    dict(allreduce="rhd"),
    dict(allreduce="ps"),
    dict(optimizer="adamw", grad_clip=0.5),
], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_variants_on_hybrid_layouts(comm, variant):
    """Each feature on a pure-dp layout and on the most mixed layout of this world."""
    kw = dict(variant)
    opt, clip = kw.get("optimizer", "sgd"), kw.get("grad_clip", 0.0)
    mixed = max(filter(lambda l: fits(*l), layouts(comm.size)), key=lambda l: (sum(v > 1 for v in l), l[1], l[2]))
    for dp, tp, pp in {(comm.size, 1, 1), mixed}:
        if B % (dp * kw.get("grad_accum", 1) * kw.get("micro_batches", 1)):
            continue
        assert_matches(comm, run_layout(comm, dp, tp, pp, **kw), opt, clip,
                       what=f"{variant} dp{dp} tp{tp} pp{pp}")


def test_bad_layouts_are_clear_errors():
    with pytest.raises(LayoutError, match="does not divide"):
        check_batch(10, 4, 1, 1)
    with pytest.raises(LayoutError, match="does not divide"):
        check_batch(8, 2, 2, 3)
    check_batch(24, 2, 3, 4)


def test_choose_layout_prefers_data_parallel():
    assert choose_layout(8, PRESETS["tiny"], 16)[:3] == (8, 1, 1)
    assert choose_layout(8, PRESETS["tiny"], 4)[:3] == (4, 2, 1)
    dp, tp, pp, why = choose_layout(8, PRESETS["tiny"].replace(n_head=2, n_embd=16), 2)
    assert (dp, tp, pp) == (2, 2, 2) and "pp=2" in why
