"""Optimisers over dicts of arrays, gradient clipping and learning-rate schedules.

Every optimiser takes ``params`` (name -> array, usually the model's per-tensor views into
its flat parameter buffer) and updates them in place from ``grads`` (same names)::

    from mpipar.optim import OptimizerSpec, clip_grad_norm, cosine_lr
    opt = OptimizerSpec("adamw", lr=1e-3, weight_decay=0.1).build(model.state_dict())
    loss, grads = model.loss_and_grads(x, y)
    norm = clip_grad_norm(grads, 1.0)
    opt.step(grads, lr=cosine_lr(step, 1e-3, 1e-4, warmup=10, total=100))

``state_dict()`` holds plain arrays and integers only, so checkpoints never need pickle.
"""

from mpipar.optim.adamw import AdamW
from mpipar.optim.base import Optimizer, decays_by_default
from mpipar.optim.mixed import (COMPUTE_DTYPE, PRECISIONS, DynamicLossScaler, MasterWeights,
                                MasterWeightsSpec, NoLossScaling, Precision)
from mpipar.optim.clip import clip_grad_norm, global_norm, norm_of, scale_to, squares
from mpipar.optim.schedule import cosine_lr
from mpipar.optim.sgd import SGD
from mpipar.optim.spec import OPTIMIZERS, OptimizerSpec

__all__ = ["AdamW", "SGD", "Optimizer", "OPTIMIZERS", "OptimizerSpec", "clip_grad_norm",
           "global_norm", "norm_of", "scale_to", "squares", "cosine_lr", "decays_by_default",
           "COMPUTE_DTYPE", "PRECISIONS", "DynamicLossScaler", "MasterWeights", "MasterWeightsSpec",
           "NoLossScaling", "Precision"]
