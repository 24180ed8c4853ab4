"""The numerics guard (parallel/numerics.py) through the library: a gradient made infinite on
one rank, after its backward and before its reduction, stops the step before the optimiser,
naming the step, the tensor and the rank that holds it; the model and the optimiser are as the
previous step left them. A policy that skips instead drops the step and training goes on.

(Named test_nonfinite.py: tests/test_numerics.py is the command line's.)
"""

import numpy as np
import pytest

from mpipar.nn.gpt import PRESETS, param_shapes
from mpipar.optim import OptimizerSpec
from mpipar.parallel.layout import Layout
from mpipar.parallel.numerics import SKIP, NonFiniteError, first_nonfinite
from mpipar.parallel.trainer import ParallelTrainer

CONFIG = PRESETS["tiny"].replace(block_size=8)
B, T = 12, 8
TARGET = "transformer.h.6.attn.c_attn.weight"      # on the last stage when pp > 1


def batch(step, trainer):
    rng = np.random.default_rng(step)
    x, y = (rng.integers(0, CONFIG.vocab_size, (B, T)) for _ in range(2))
    rows = B // trainer.mesh.dp
    lo = trainer.mesh.dp_rank * rows
    return x[lo:lo + rows], y[lo:lo + rows]


def poison_on(trainer, world_rank, at_step):
    """Before the GradSync sees them, set TARGET's gradient to inf on ``world_rank`` during
    step ``at_step`` (0-based: the trainer's step() calls)."""
    calls = [trainer.step]

    def counted_step(*args, **kwargs):
        calls.append(None)
        return calls[0](*args, **kwargs)

    def hook(stage, names):
        if len(calls) - 2 == at_step and trainer.mesh.world.rank == world_rank and TARGET in names:
            trainer.local.grads[TARGET][...] = np.inf
    trainer.step = counted_step
    trainer.pipe.on_stage_backward_done.insert(0, hook)       # before mark_ready


def layouts_of(size):
    out = [dict(dp=size)]
    if size > 1:
        out += [dict(dp=1, pp=size), dict(dp=size, zero=1)]
    return [kw for kw in out if B % kw.get("dp", 1) == 0 and kw.get("pp", 1) <= CONFIG.n_layer]


def lowest_holder(comm, trainer):
    mine = comm.rank if TARGET in trainer.local.params else comm.size
    return int(comm.allreduce(np.array([mine]), op="min")[0])


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_non_finite_gradient_stops_before_the_update_naming_tensor_and_rank(comm, optimizer):
    for kw in layouts_of(comm.size):
        trainer = ParallelTrainer(comm, CONFIG, Layout(**kw), OptimizerSpec(optimizer, lr=1e-2),
                                  dtype="float64", grad_clip=1.0)
        poisoner = lowest_holder(comm, trainer) if "pp" in kw else comm.size - 1
        poison_on(trainer, poisoner, at_step=1)
        trainer.step(*batch(0, trainer), lr=1e-2)
        before = trainer.full_state_dict()
        opt_before = trainer.full_optimizer_state()
        with pytest.raises(NonFiniteError) as err:
            trainer.step(*batch(1, trainer), lr=1e-2)
        report = err.value.report
        assert (report.step, report.what, report.tensor) == (1, "gradient", TARGET), (kw, str(err.value))
        if not kw.get("zero"):
            # plain dp: the all-reduce spreads it over the dp group, whose lowest rank is named
            assert str(err.value) == f"step 1: non-finite gradient in {TARGET} (rank {lowest_holder(comm, trainer)})"
        assert trainer.sync.step_count == 1
        after = trainer.full_state_dict()
        for name in before:
            np.testing.assert_array_equal(after[name], before[name], err_msg=f"{kw} {name}")
        opt_after = trainer.full_optimizer_state()
        for name in opt_before:
            np.testing.assert_array_equal(opt_after[name], opt_before[name], err_msg=f"{kw} {name}")
        assert trainer.nonfinite_state(1) is None                  # nothing corrupt to save


class SkipStep:
    """What loss scaling will do: skip the step (and lower its scale)."""

    def __init__(self):
        self.reports = []

    def on_nonfinite(self, report):
        self.reports.append(report)
        return SKIP


@pytest.mark.mpi(min_size=1)
def test_a_skipping_policy_drops_the_step_and_training_goes_on(comm):
    policy = SkipStep()
    layout = Layout(dp=comm.size) if B % comm.size == 0 else Layout(pp=comm.size)
    trainer = ParallelTrainer(comm, CONFIG, layout, OptimizerSpec("adamw", lr=1e-2),
                              dtype="float64", numerics=policy)
    poison_on(trainer, lowest_holder(comm, trainer), at_step=1)
    trainer.step(*batch(0, trainer), lr=1e-2)
    before = trainer.full_state_dict()
    result = trainer.step(*batch(1, trainer), lr=1e-2)
    assert result.skipped and [r.tensor for r in policy.reports] == [TARGET]
    after = trainer.full_state_dict()
    assert all(np.array_equal(after[k], before[k]) for k in before)
    result = trainer.step(*batch(2, trainer), lr=1e-2)
    assert not result.skipped and np.isfinite(result.loss) and trainer.sync.step_count == 2


def test_first_nonfinite_counts_pieces_as_their_tensor_in_nanogpt_order():
    order = list(param_shapes(CONFIG))
    grads = {"transformer.h.3.mlp.c_fc.weight[0:4]": np.array([1.0, np.nan]),
             "transformer.h.1.ln_1.weight": np.array([np.inf]),
             "transformer.wte.weight": np.zeros(3)}
    assert order[first_nonfinite(grads, order)] == "transformer.h.1.ln_1.weight"
    assert first_nonfinite({"transformer.wte.weight": np.zeros(3)}, order) == len(order)


@pytest.mark.mpi(min_size=1)
def test_state_that_is_not_finite_is_found_parameters_first_then_optimiser_state(comm):
    """What a checkpoint must not be written with (``nonfinite_state``, collective): an
    infinite second moment with finite parameters is found too."""
    layout = Layout(dp=comm.size) if B % comm.size == 0 else Layout(pp=comm.size)
    trainer = ParallelTrainer(comm, CONFIG, layout, OptimizerSpec("adamw", lr=1e-2), dtype="float64")
    trainer.step(*batch(0, trainer), lr=1e-2)
    assert trainer.nonfinite_state(1) is None
    holder = lowest_holder(comm, trainer)
    if comm.rank == holder:
        trainer.sync.state_tensors()["exp_avg_sq"][TARGET][0, 0] = np.inf
    report = trainer.nonfinite_state(1)
    assert str(report) == f"step 1: non-finite optimiser state exp_avg_sq in {TARGET} (rank {holder})"
    # parameters come first, wherever the bad state sits: NaN in wpe on its first holder
    owner = int(comm.allreduce(np.array([comm.rank if "transformer.wpe.weight" in trainer.local.params
                                         else comm.size]), op="min")[0])
    if comm.rank == owner:
        trainer.local.params["transformer.wpe.weight"][0, 0] = np.nan
    assert str(trainer.nonfinite_state(1)) == f"step 1: non-finite parameter in transformer.wpe.weight (rank {owner})"
