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

Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", section 4.2.2) keeps what lies between the regions (layer norms, bias
adds, dropout, residuals) split along the sequence, (B, T/t, C) on each of t ranks, and
``SequenceParallelRegion(group)`` swaps the operators::

    f   forward: all-gather along the sequence   backward: reduce-scatter along the sequence
    g   forward: reduce-scatter along the sequence   backward: all-gather along the sequence

(the same bytes as f and g's all-reduce, which is a reduce-scatter and an all-gather). Both
regions also say how the embedding's output enters the layout kept between regions
(``shard_forward`` / ``shard_backward``): as it is under tensor parallelism; under sequence
parallelism this rank's slice of positions (no communication), whose backward all-gathers
the gradient. The Communicator gathers and scatters along axis 0; activations stay
(B, T, C) everywhere else (every layer, cache and pipeline message assumes it), so the
sequence axis is moved to the front for the collective and back after
(``_sequence_first``): one copy each way, none when B = 1, Megatron's micro-batch of its
published runs (Megatron instead keeps every activation [s, b, h]).

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

    def shard_forward(self, x: Any) -> Any:
        """The embedding's output between regions: whole, replicated."""
        return x

    def shard_backward(self, dx: Any) -> Any:
        return dx


# ---- sequence parallel ------------------------------------------------------------------

def _sequence_first(x: Any) -> Any:
    """(B, T, C) -> a (T, B, C) view, so that axis 0 of a collective is the sequence."""
    return x.transpose(1, 0, 2)


def gather_sequence(x: Any, group: Any) -> Any:
    """Every rank's (B, T/t, C) concatenated along the sequence, in rank order: (B, T, C)."""
    if _alone(group):
        return x
    xp = array_module(x)
    full = group.allgather(_sequence_first(x))                   # (T, B, C)
    return xp.ascontiguousarray(_sequence_first(full))           # (B, T, C)


def reduce_scatter_sequence(x: Any, group: Any) -> Any:
    """The sum over ranks of (B, T, C), this rank's block of T/t positions: (B, T/t, C)."""
    if _alone(group):
        return x
    xp = array_module(x)
    part = group.reduce_scatter(_sequence_first(x), op="sum")     # (T/t, B, C)
    return xp.ascontiguousarray(_sequence_first(part))            # (B, T/t, C)


def sequence_slice(T: int, group: Any) -> slice:
    """Positions of this rank's part of a sequence of T (T divisible by the group size)."""
    t = 1 if _alone(group) else group.size
    if T % t:
        raise ValueError(f"sequence length {T} does not split into {t} sequence-parallel "
                         f"slices (tp {t} must divide it)")
    n = T // t
    r = 0 if _alone(group) else group.rank
    return slice(r * n, (r + 1) * n)


class SequenceParallelRegion:
    """f and g of sequence parallelism over ``group`` (see the module docstring): between
    regions each rank holds (B, T/t, C), inside them (B, T, C)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def copy_forward(self, x: Any) -> Any:
        """f: all-gather the sequence (a column-parallel layer needs every position)."""
        return gather_sequence(x, self.group)

    def copy_backward(self, dx: Any) -> Any:
        """f: reduce-scatter in backward (each rank's input gradient is a partial sum over
        its shard; each keeps the sum for its positions)."""
        return reduce_scatter_sequence(dx, self.group)

    def reduce_forward(self, x: Any) -> Any:
        """g: reduce-scatter (a row-parallel layer's output is a partial sum)."""
        return reduce_scatter_sequence(x, self.group)

    def reduce_backward(self, dx: Any) -> Any:
        """g: all-gather in backward (the output gradient of every position)."""
        return gather_sequence(dx, self.group)

    def shard_forward(self, x: Any) -> Any:
        """The embedding's output between regions: this rank's positions (no communication)."""
        return x[:, sequence_slice(x.shape[1], self.group)]

    def shard_backward(self, dx: Any) -> Any:
        """The gradient of every position, for the embedding's lookup: an all-gather."""
        return gather_sequence(dx, self.group)


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
