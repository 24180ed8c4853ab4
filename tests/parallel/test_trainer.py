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
from mpipar.optim import OptimizerSpec, clip_grad_norm
from mpipar.parallel.layout import Layout, layouts
from mpipar.parallel.model import load_full_state_dict
from mpipar.parallel.trainer import ParallelTrainer

CONFIG = PRESETS["tiny"].replace(block_size=8)
B, T, STEPS, LR = 8, 8, 2, 0.05
TOL = 1e-10


def _batches(rows=B):
    rng = np.random.default_rng(5)
    return [(rng.integers(0, CONFIG.vocab_size, (rows, T)),
             rng.integers(0, CONFIG.vocab_size, (rows, T))) for _ in range(STEPS)]


def spec(optimizer: str) -> OptimizerSpec:
    return OptimizerSpec(optimizer, lr=LR, weight_decay=0.1)


def _reference(optimizer, grad_clip, rows=B):
    model = GPT(CONFIG, seed=0, dtype="float64")
    opt = spec(optimizer).build(model.state_dict())
    losses = []
    for x, y in _batches(rows):
        loss, grads = model.loss_and_grads(x, y)
        clip_grad_norm(grads, grad_clip)
        opt.step(grads, lr=LR)
        losses.append(loss)
    return losses, {k: v.copy() for k, v in model.state_dict().items()}


_REF = {}


def reference(optimizer="sgd", grad_clip=0.0, rows=B):
    key = (optimizer, grad_clip, rows)
    if key not in _REF:
        _REF[key] = _reference(optimizer, grad_clip, rows)
    return _REF[key]


def fits(dp, tp, pp):
    """Layouts the tiny model takes (tp must divide its 8 heads); the others are errors,
    tested in test_tensor_parallel.py."""
    return CONFIG.n_head % tp == 0 and pp <= CONFIG.n_layer


def run_layout(comm, dp, tp, pp, rows=B, trainer_out=None, config=CONFIG, **kw):
    opt = kw.pop("optimizer", "sgd")
    clip = kw.pop("grad_clip", 0.0)
    trainer = ParallelTrainer(comm, config, Layout(dp, tp, pp, **kw), spec(opt), dtype="float64",
                              grad_clip=clip)
    if trainer_out is not None:
        trainer_out.append(trainer)
    mine = rows // dp
    losses = []
    for x, y in _batches(rows):
        lo = trainer.mesh.dp_rank * mine
        losses.append(trainer.step(x[lo:lo + mine], y[lo:lo + mine], lr=LR).loss)
    return losses, trainer.full_state_dict()


def assert_matches(comm, got, optimizer="sgd", grad_clip=0.0, what="", rows=B):
    ref_losses, ref_sd = reference(optimizer, grad_clip, rows)
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
    dict(zero=2, micro_batches=2, grad_accum=2, optimizer="adamw", grad_clip=0.5),
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


@pytest.mark.mpi(min_size=2)
def test_interleaved_virtual_stages_equal_single_process(comm):
    """pp x virtual_stages 2 (interleaved 1F1B over the model chunks the builder makes), every
    layout of the world with pp > 1: losses and weights equal the single process's within
    TOL, and equal those of the same layout with one chunk per rank to the bit: each
    gradient accumulates the same micro-batches in the same order and the tied wte sums the
    same two parts, so only where the blocks run differs. The state dict round-trips: loaded
    into a trainer of the same layout, and of pure dp, it is given back bitwise."""
    for dp, tp, pp in layouts(comm.size):
        if pp == 1 or pp * 2 > CONFIG.n_layer or not fits(dp, tp, pp):
            continue
        M = pp                                  # interleaving needs a multiple of pp
        rows = 2 * dp * M
        what = f"dp{dp} tp{tp} pp{pp} v2 M{M}"
        trainers = []
        got = run_layout(comm, dp, tp, pp, rows=rows, micro_batches=M, virtual_stages=2,
                         trainer_out=trainers)
        assert len(trainers[0].local.chunks) == 2 and trainers[0].pipe.V == 2
        assert_matches(comm, got, what=what, rows=rows)
        plain = run_layout(comm, dp, tp, pp, rows=rows, micro_batches=M)
        assert got[0] == plain[0], what
        for name, w in plain[1].items():
            assert np.array_equal(got[1][name], w), (what, name)
        sd = got[1]
        for layout in (Layout(dp, tp, pp, micro_batches=M, virtual_stages=2), Layout(dp=comm.size)):
            other = ParallelTrainer(comm, CONFIG, layout, spec("sgd"), dtype="float64")
            load_full_state_dict(other.local, sd)
            back = other.full_state_dict()
            assert all(np.array_equal(back[n], w) for n, w in sd.items()), (what, layout)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_recompute_trains_the_bits_of_keeping_activations(comm, dropout):
    """recompute "selective" and "full" train exactly (to the bit: losses and weights) what
    "none" trains, on one process and under tp 2, pp 2 and tp 2 x pp 2 where the world
    allows, also with dropout (the masks are redrawn from the generator state saved in
    forward); tensor parallelism's reruns of f and g give the same bits as the first run."""
    cfg = CONFIG.replace(dropout=dropout)
    solo = comm.split(color=comm.rank, key=0)
    cases = [(solo, 1, 1, 1)]
    n = comm.size
    if n % 2 == 0:
        cases += [(comm, n // 2, 2, 1), (comm, n // 2, 1, 2)]
    if n % 4 == 0:
        cases += [(comm, n // 4, 2, 2)]
    for world, dp, tp, pp in cases:
        what = f"dp{dp} tp{tp} pp{pp} dropout {dropout}"
        kw = dict(config=cfg, micro_batches=2, optimizer="adamw", grad_clip=0.5)
        losses, sd = run_layout(world, dp, tp, pp, recompute="none", **kw)
        for mode in ("selective", "full"):
            got_losses, got_sd = run_layout(world, dp, tp, pp, recompute=mode, **kw)
            assert got_losses == losses, (what, mode)
            for name, w in sd.items():
                assert np.array_equal(got_sd[name], w), (what, mode, name)


@pytest.mark.mpi(min_size=2)
def test_sequence_parallel_equals_single_process(comm):
    """Sequence parallelism at tp 2 (and tp 2 x pp 2, dp 2 x tp 2 at 4 ranks, with 1F1B
    micro-batches and ZeRO-1): losses and weights equal the single process within TOL
    (1e-10 relative, float64; the reduce-scatters and the tp sum of the layer norms'
    partial gradients add in other orders: measured ~1e-15 (SGD) to 1e-12 (AdamW)).
    Between the regions every tp rank holds (B, T/t, C): the embedding's output and each
    block's, which is also what the pipeline sends."""
    n = comm.size
    if n % 2:
        pytest.skip("needs an even world")
    cases = [(n // 2, 2, 1, {}), (n // 2, 2, 1, dict(optimizer="adamw", grad_clip=0.5, zero=1))]
    if n % 4 == 0:
        cases += [(n // 4, 2, 2, dict(micro_batches=2)), (n // 4, 2, 2, dict(recompute="full"))]
    for dp, tp, pp, kw in cases:
        what = f"sequence parallel dp{dp} tp{tp} pp{pp} {kw}"
        trainers = []
        got = run_layout(comm, dp, tp, pp, trainer_out=trainers, sequence_parallel=True, **kw)
        assert_matches(comm, got, kw.get("optimizer", "sgd"), kw.get("grad_clip", 0.0), what)
        local = trainers[0].local
        b = B // dp // kw.get("micro_batches", 1)
        assert trainers[0].pipe.act_shape == (b, T // tp, CONFIG.n_embd)
        if local.first_stage:
            x, _ = local.stages[0].forward(_batches()[0][0][:b])
            y, _ = local.stages[1].forward(x)
            assert x.shape == y.shape == (b, T // tp, CONFIG.n_embd), what


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_zero2_trainer_frees_gradients_between_micro_batches(comm, micro_batches):
    """On one pipeline stage ZeRO-2 reduce-scatters after each micro-batch: the gradient
    storage held at once stays near one block + the tied wte, also with micro_batches > 1
    (the executor alone would accumulate all of them in a full buffer first)."""
    if B % comm.size or (B // comm.size) % micro_batches:
        pytest.skip("the batch does not split into this many ranks and micro-batches")
    tr = ParallelTrainer(comm, CONFIG, Layout(dp=comm.size, zero=2, micro_batches=micro_batches,
                                              bucket_mb=0.01), spec("adamw"), dtype="float64")
    rows = B // comm.size
    x, y = _batches()[0]
    tr.step(x[comm.rank * rows:(comm.rank + 1) * rows], y[comm.rank * rows:(comm.rank + 1) * rows])
    store, full = tr.local.grads, tr.local.layout.numel * 8
    assert tr.local.grad_buffer is None and 0 < store.peak_bytes < full / 4
    assert tr.memory_report()["grads"] == store.peak_bytes + tr.sync.buckets.shard_grad.nbytes


def _step_all(trainer, batches):
    rows = B // trainer.mesh.dp
    lo = trainer.mesh.dp_rank * rows
    return [trainer.step(x[lo:lo + rows], y[lo:lo + rows], lr=LR).loss for x, y in batches]


def _reference_optimizer_state():
    """A single process's AdamW state after STEPS steps: the checkpoint's keys and shapes."""
    model = GPT(CONFIG, seed=0, dtype="float64")
    opt = spec("adamw").build(model.state_dict())
    for x, y in _batches():
        _, grads = model.loss_and_grads(x, y)
        opt.step(grads, lr=LR)
    return opt.state_dict()


def _assert_close_states(got, want, what):
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:4]}"
    assert int(got["step"]) == int(want["step"]), what
    for k, ref in want.items():
        if k == "step":
            continue
        assert got[k].shape == ref.shape, f"{what}: {k} {got[k].shape} vs {ref.shape}"
        diff = np.max(np.abs(got[k] - ref)) / max(np.max(np.abs(ref)), 1e-300)
        assert diff <= TOL, f"{what}: {k} differs by {diff:.2e} (relative)"


@pytest.mark.mpi(min_size=2)
def test_optimizer_state_is_the_single_process_one_in_every_layout(comm):
    """full_optimizer_state() of every layout (ZeRO 1 and 2 where dp > 1) holds the keys and
    shapes a single process's optimiser saves, and its values within TOL (the layouts sum
    gradients in other orders, see the module docstring); a trainer of ANOTHER layout loaded
    from it (and from full_state_dict) then trains exactly as the original does."""
    want = _reference_optimizer_state()
    fitting = [l for l in layouts(comm.size) if fits(*l) and B % l[0] == 0]
    sharded = [l for l in fitting if l[0] > 1]
    mixed = max(sharded, key=lambda l: (sum(v > 1 for v in l), l[1], l[2]), default=None)
    # every layout once, and ZeRO 1 and 2 on pure dp and on the most mixed layout with dp > 1
    cases = [(l, 0) for l in fitting] + [(l, z) for l in dict.fromkeys([l for l in sharded if l[1] == l[2] == 1][:1] + [mixed])
                                         if l is not None for z in (1, 2)]
    more = _batches()[:1]
    for i, ((dp, tp, pp), zero) in enumerate(cases):
        what = f"dp{dp} tp{tp} pp{pp} zero{zero}"
        a = ParallelTrainer(comm, CONFIG, Layout(dp, tp, pp, zero=zero, bucket_mb=0.01),
                            spec("adamw"), dtype="float64")
        _step_all(a, _batches())
        state = a.full_optimizer_state()
        _assert_close_states(state, want, what)
        # resume in the next case's layout (a different dp/tp/pp or ZeRO stage)
        (dp2, tp2, pp2), zero2 = cases[(i + 1) % len(cases)]
        b = ParallelTrainer(comm, CONFIG, Layout(dp2, tp2, pp2, zero=zero2), spec("adamw"),
                            dtype="float64")
        load_full_state_dict(b.local, a.full_state_dict())
        b.load_full_optimizer_state(state)
        _assert_close_states(b.full_optimizer_state(), state, f"{what} -> dp{dp2} tp{tp2} pp{pp2} zero{zero2}")
        la, lb = _step_all(a, more), _step_all(b, more)
        np.testing.assert_allclose(lb, la, rtol=TOL, atol=0, err_msg=what)
        sa, sb = a.full_state_dict(), b.full_state_dict()
        for name, ref in sa.items():
            diff = np.max(np.abs(sb[name] - ref)) / max(np.max(np.abs(ref)), 1e-300)
            assert diff <= TOL, f"{what}: after resuming, {name} differs by {diff:.2e}"


@pytest.mark.mpi(min_size=1)
def test_a_bad_optimizer_state_is_refused_before_any_change(comm):
    """Missing or misshapen tensors raise on every rank (no collective is involved) and
    leave the optimiser as it was."""
    t = ParallelTrainer(comm, CONFIG, Layout(dp=comm.size, zero=1 if comm.size > 1 else 0),
                        spec("adamw"), dtype="float64")
    _step_all(t, _batches()[:1])
    good = t.full_optimizer_state()
    missing = {k: v for k, v in good.items() if k != "exp_avg.transformer.h.0.attn.c_attn.weight"}
    with pytest.raises(KeyError, match="exp_avg.transformer.h.0.attn.c_attn.weight"):
        t.load_full_optimizer_state(missing)
    bent = dict(good, **{"exp_avg_sq.transformer.ln_f.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="ln_f.weight: shape"):
        t.load_full_optimizer_state(bent)
    with pytest.raises(KeyError, match="step"):
        t.load_full_optimizer_state({k: v for k, v in good.items() if k != "step"})
    after = t.full_optimizer_state()
    assert all(np.array_equal(after[k], good[k]) for k in good if k != "step")


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("variant", [dict(), dict(zero=1), dict(zero=2), dict(schedule="gpipe")],
                         ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) or "plain")
def test_one_rank_is_the_single_process_bitwise(comm, variant):
    """The layout 1 x 1 x 1 (here a group of one rank per rank) is the single process: the
    same losses and weights to the bit, with any flag (ZeRO over one rank, a schedule)."""
    solo = comm.split(color=comm.rank, key=0)
    for opt, clip in (("sgd", 0.0), ("adamw", 0.5)):
        losses, sd = run_layout(solo, 1, 1, 1, optimizer=opt, grad_clip=clip, **variant)
        ref_losses, ref_sd = reference(opt, clip)
        assert losses == ref_losses, (variant, opt)
        for name, ref in ref_sd.items():
            assert np.array_equal(sd[name], ref), (variant, opt, name)


@pytest.mark.mpi(min_size=1)
def test_evaluation_runs_the_forward_only_schedule_in_every_layout(comm):
    """``evaluate`` (the forward-only schedule through the same executor, averaged over dp)
    gives the single process's loss of the whole batch, and changes nothing."""
    x, y = _batches()[0]
    model = GPT(CONFIG, seed=0, dtype="float64").eval()
    _, want, _ = model.forward(x, y)
    for dp, tp, pp in layouts(comm.size):
        if B % (dp * 2) or not fits(dp, tp, pp):
            continue
        t = ParallelTrainer(comm, CONFIG, Layout(dp, tp, pp, micro_batches=2), spec("sgd"),
                            dtype="float64")
        before = t.local.param_buffer.copy()
        rows = B // dp
        lo = t.mesh.dp_rank * rows
        got = t.evaluate(x[lo:lo + rows], y[lo:lo + rows])
        assert abs(got - float(want)) <= TOL * abs(float(want)), (dp, tp, pp, got, float(want))
        assert np.array_equal(t.local.param_buffer, before)
        assert t.local.state.training                    # dropout back on afterwards
