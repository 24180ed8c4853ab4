"""Global-norm gradient clipping (Pascanu et al., 2013), as torch.nn.utils.clip_grad_norm_.

One function serves every layout. On one process the norm is that of every gradient. When
the gradients are spread over ranks (tensor-parallel shards, pipeline stages, ZeRO's
data-parallel shards), each rank sums the squares of the tensors it ``count``s (each
parameter counted on exactly one rank of its group: a tensor replicated over tp counts on
one tp rank, the tied embedding's second copy not at all), the sums are added over
``groups``, and every rank scales its own gradients by the same factor::

    norm = clip_grad_norm(grads, 1.0)                                          # one process
    norm = clip_grad_norm(grads, 1.0, count=mine, groups=(tp_group, pp_group))  # sharded

On a GPU nothing here waits for the device per tensor: ``squares`` leaves each tensor's sum
of squares on the device, the host reads all of them in one copy (``backend.host_scalars``;
the trainer adds the step's losses to the same copy), adds them in float64 in the order of
``grads`` and over the groups on the host (``norm_of``), and the clip factor is a number the
scaling kernels take (``scale_to``). The bits are those of a float64 sum of per-tensor dots,
in the same order on every device, so a step's norm does not depend on where it ran.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from mpipar import backend


class SumGroup(Protocol):
    """What the norm needs of a group of ranks (a Communicator)."""

    size: int

    def allreduce(self, x: Any, op: str = "sum") -> Any: ...


def squares(grads: Mapping[str, Any], count: Collection[str] | None = None) -> list[Any]:
    """The sum of squares of each gradient in ``count`` (None: all), in the order of
    ``grads``: one dot per tensor, each a 0-d array of the gradients' module (on a GPU a
    device value: nothing is read here). 16-bit gradients are summed in float32."""
    out = []
    for key, g in grads.items():
        if count is None or key in count:
            flat = g.reshape(-1)
            if backend.is_half(flat.dtype):       # in float32: fp16's squares overflow at 256
                flat = flat.astype(backend.compute_dtype(flat.dtype))
            out.append(flat @ flat)               # one BLAS dot per tensor
    return out


def norm_of(sums: Sequence[float], groups: Sequence[SumGroup] = ()) -> float:
    """sqrt of ``sums`` (host numbers: ``squares`` read) accumulated in float64 in order, then
    summed over each group of ``groups`` (the same value on every rank of them)."""
    total = 0.0
    for s in sums:
        total += s
    for group in groups:
        if group.size > 1:
            total = float(group.allreduce(np.array([total], dtype=np.float64), op="sum")[0])
    return math.sqrt(total)


def scale_to(grads: Mapping[str, Any], norm: float, max_norm: float) -> None:
    """Scale every gradient in place so that a global norm of ``norm`` becomes at most
    ``max_norm`` (``max_norm <= 0``: no clipping). A non-finite norm leaves the gradients as
    they are (scaling by 1/inf would turn an inf into a NaN and hide which tensor held it):
    the caller's numerics guard handles that step."""
    if not math.isfinite(max_norm):
        raise ValueError(f"the clipping norm must be finite, got {max_norm}")
    if max_norm > 0 and norm > max_norm and math.isfinite(norm):
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= scale


def global_norm(grads: Mapping[str, Any], count: Collection[str] | None = None,
                groups: Sequence[SumGroup] = ()) -> float:
    """sqrt of the sum of squares of the gradients in ``count`` (None: all), accumulated in
    float64 on the host in the order of ``grads``, then summed over each group of
    ``groups`` (the same value on every rank of them). One device read on a GPU."""
    return norm_of(backend.host_scalars(squares(grads, count)), groups)


def clip_grad_norm(grads: Mapping[str, Any], max_norm: float, count: Collection[str] | None = None,
                   groups: Sequence[SumGroup] = ()) -> float:
    """Scale ``grads`` in place so the global norm (``global_norm``) is at most ``max_norm``.

    Returns the norm before clipping (for logging). ``max_norm <= 0`` disables clipping.
    Every rank of ``groups`` computes the same norm and so the same scale. A non-finite norm
    leaves the gradients as they are (``scale_to``).
    """
    if not math.isfinite(max_norm):
        raise ValueError(f"the clipping norm must be finite, got {max_norm}")
    norm = global_norm(grads, count, groups)
    scale_to(grads, norm, max_norm)
    return norm
