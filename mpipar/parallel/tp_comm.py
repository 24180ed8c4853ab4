"""The collectives tensor-parallel layers call, and nothing else (the maths is in
``tensor_parallel.py``).

Megatron-LM (Shoeybi et al. 2019, section 3) names two conjugate operators around each
parallel region of a transformer block::

    f   forward: identity            backward: all-reduce over the tp group
    g   forward: all-reduce          backward: identity

An attention or MLP branch is ``g(row_parallel(column_parallel(f(x))))``: one all-reduce in
forward (g) and one in backward (f). ``TensorParallelRegion(group)`` is the pair for one tp
group, in the shape of ``nn.block.ParallelRegion``: the transformer block (``nn/block.py``)
calls its four methods at its communication points, and the single process gives it
``nn.block.SERIAL`` instead (picotron's ``CopyToModelParallelRegion`` /
``ReduceFromModelParallelRegion`` are the same idea as autograd functions).

The vocabulary-parallel cross-entropy needs two reductions of per-position numbers, never
the (N, V) logits: the running max (``allreduce_max``) and, in one message, the sum of
exponentials and the target logit (``allreduce_sum``). ``gather_last_axis`` assembles full
logits for sampling only.

``group`` is a Communicator (``mesh.tp_group``) or None; a group of one short-circuits every
call and returns its input unchanged (no copy). The Communicator gives every rank the same
bits, so replicated activations stay identical across the tp group.
"""

from __future__ import annotations

from typing import Any, Sequence

from mpipar.backend import array_module


def _alone(group: Any) -> bool:
    return group is None or group.size == 1


def allreduce_sum(x: Any, group: Any) -> Any:
    """Elementwise sum over the tp group (a new array unless the group has one rank)."""
    return x if _alone(group) else group.allreduce(x, op="sum")


def allreduce_max(x: Any, group: Any) -> Any:
    """Elementwise max over the tp group (exact: a max is one of its inputs)."""
    return x if _alone(group) else group.allreduce(x, op="max")


# ---- Megatron's f and g ----------------------------------------------------------------

class TensorParallelRegion:
    """f and g over ``group`` (a Communicator, or None for no group)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def copy_forward(self, x: Any) -> Any:
        """f: identity in forward (the input of a column-parallel layer is replicated)."""
        return x

    def copy_backward(self, dx: Any) -> Any:
        """f: all-reduce in backward (each rank's input gradient is a partial sum over its
        shard)."""
        return allreduce_sum(dx, self.group)

    def reduce_forward(self, x: Any) -> Any:
        """g: all-reduce in forward (a row-parallel layer's output is a partial sum)."""
        return allreduce_sum(x, self.group)

    def reduce_backward(self, dx: Any) -> Any:
        """g: identity in backward (the output gradient is replicated)."""
        return dx


# ---- vocabulary parallel ------------------------------------------------------------------

def gather_last_axis(x: Any, group: Any, counts: Sequence[int]) -> Any:
    """Concatenate every rank's ``x`` (..., n_r) along the last axis, ``counts[r] = n_r``.

    Used only to hand full logits to sampling; the loss never gathers them. The
    Communicator gathers rows (axis 0), so the last axis is moved to the front and back.
    """
    if _alone(group):
        return x
    xp = array_module(x)
    lead, n = x.shape[:-1], x.shape[-1]
    rows = xp.ascontiguousarray(x.reshape(-1, n).T)          # (n_r, N)
    full = group.allgather(rows, counts=list(counts))        # (sum n_r, N)
    return xp.ascontiguousarray(full.T).reshape(*lead, full.shape[0])
