"""fp32 master weights and the loss scale (optim/mixed.py), without a trainer."""

from __future__ import annotations

import numpy as np
import pytest

from mpipar.optim import DynamicLossScaler, NoLossScaling, OptimizerSpec, Precision
from mpipar.parallel.numerics import NonFinite, NonFiniteError, StopOnNonFinite

OVERFLOW = NonFinite(step=3, what="gradient", tensor="w", rank=0, loss=2.5, norm=float("inf"))
BAD_LOSS = NonFinite(step=3, what="gradient", tensor=None, rank=None, loss=float("nan"),
                     norm=float("nan"))


def test_dynamic_scale_backs_off_grows_and_leaves_bad_losses_to_the_policy():
    s = DynamicLossScaler(StopOnNonFinite(), growth_interval=3)
    assert s.scale == 2.0 ** 16
    assert s.on_nonfinite(OVERFLOW) is True and s.scale == 2.0 ** 15 and s.good_steps == 0
    for _ in range(2):
        s.on_finite()
    assert s.scale == 2.0 ** 15 and s.good_steps == 2
    s.on_finite()                                     # the 3rd clean step in a row
    assert s.scale == 2.0 ** 16 and s.good_steps == 0
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        s.on_nonfinite(BAD_LOSS)                      # a forward overflow: no scale cures it
    assert s.scale == 2.0 ** 16
    fresh = DynamicLossScaler(StopOnNonFinite())
    fresh.load_state_dict({k: np.float32(v) for k, v in s.state_dict().items()})
    assert (fresh.scale, fresh.good_steps) == (s.scale, s.good_steps)


def test_no_scaling_is_the_policy_alone():
    s = NoLossScaling(StopOnNonFinite())
    assert s.scale == 1.0 and s.state_dict() == {}
    with pytest.raises(NonFiniteError):
        s.on_nonfinite(OVERFLOW)


@pytest.mark.parametrize("precision,dtype", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_master_weights_update_is_the_fp32_update_of_the_unscaled_gradient(precision, dtype):
    """The 16-bit parameters are the masters rounded; the masters take exactly the update an
    fp32 AdamW makes from the 16-bit gradient divided by the scale (a power of two: exact)."""
    rng = np.random.default_rng(0)
    p32 = {"w": rng.standard_normal((6, 5)).astype(np.float32),
           "b": rng.standard_normal(5).astype(np.float32)}
    spec = OptimizerSpec("adamw", lr=1e-2, weight_decay=0.1)
    prec = Precision(precision)
    scaler = prec.loss_scaler(StopOnNonFinite())
    params = {k: v.astype(dtype) for k, v in p32.items()}
    opt = prec.optimizer(spec, scaler).build(params)
    ref = spec.build({k: v.astype(dtype).astype(np.float32) for k, v in p32.items()})
    for step in range(3):
        g = {k: (rng.standard_normal(v.shape) * 1e-3 * scaler.scale).astype(dtype)
             for k, v in p32.items()}
        opt.step(g)
        ref.step({k: v.astype(np.float32) / np.float32(scaler.scale) for k, v in g.items()})
        for k in p32:
            assert opt.master[k].dtype == np.float32
            assert np.array_equal(opt.master[k], ref.params[k]), (step, k)
            assert np.array_equal(params[k], ref.params[k].astype(dtype)), (step, k)
    sd = opt.state_dict()
    assert set(sd) == {"step"} | {f"{s}.{k}" for s in ("exp_avg", "exp_avg_sq", "master") for k in p32}
    again = prec.optimizer(spec, scaler).build({k: np.zeros_like(v) for k, v in params.items()})
    again.load_state_dict(sd)
    assert all(np.array_equal(again.params[k], params[k]) for k in p32)


def test_precision_refuses_float64_masters_and_bf16_on_a_gpu_module():
    with pytest.raises(ValueError, match="keeps float32 master weights; dtype float64"):
        Precision("fp16").model_dtype("float64")
    assert Precision("fp32").model_dtype("float64") == np.float64
    Precision("bf16").check_device(np)
    with pytest.raises(ValueError, match="precision 'fp8' is not one of fp32, bf16, fp16"):
        Precision("fp8")
