"""Megatron-LM tensor parallelism (Shoeybi et al. 2019): what one tp shard holds, and the
stages whose maths differ from the single process's.

Tensor parallelism is a substitution, not a copy of the model: the transformer block is
``nn.block`` itself, given this rank's slices of its weights and the tp group's
communication points (``BlockStage(..., region=TensorParallelRegion(group))``, see
``tp_comm.py``). Only the embedding and the head compute something else when the vocabulary
is split, and they have the interface of ``mpipar.nn.stages``, so a pipeline executor runs
both alike::

    TPEmbeddingStage   forward(idx) -> (x, cache)             backward(dx, cache) -> None
    TPHeadStage        forward(x, targets) -> (None, loss, cache) | (logits, None, None)
                       backward(dloss, cache) -> dx

What each of T tp ranks holds (rank r; C = n_embd, NH heads of size hs, F = 4C, V vocab)::

    wte                rows [v0, v1) of (V, C)       vocabulary parallel, v1 - v0 ~ V / T
    c_attn  w, b       rows qkv_rows(C, NH, h0, h1)  heads h0..h1-1 (NH / T of them), column parallel
    attn.c_proj w      columns [h0 hs, h1 hs)        row parallel; its bias is replicated
    mlp.c_fc w, b      rows [f0, f1) of F            column parallel
    mlp.c_proj w       columns [f0, f1)              row parallel; its bias is replicated
    wpe, ln_1, ln_2, ln_f, biases of row-parallel layers: replicated

Communication per block (``tp_comm.TensorParallelRegion``): attention =
g(row(column(f(ln_1(x))))) and likewise the MLP, so one all-reduce in forward (g) and one
in backward (f) per branch. The
embedding all-reduces the looked-up rows (each token's row lives on one rank, the others
contribute zeros); the head all-reduces the logit max, then the sum of exponentials with
the target logit in one message, and in backward the partial dh (f). Full logits are
gathered only without targets (sampling).

Sequence parallelism (``tp_comm.SequenceParallelRegion``) swaps f and g for all-gathers and
reduce-scatters along the sequence: the embedding hands on this rank's positions, each
block's layer norms, bias adds, dropout and residuals run on (B, T/t, C), and the head's
final layer norm too, its f gathering the sequence before the logits. The layer norms'
weight gradients are then partial sums over each rank's positions, which
``model.allreduce_sequence_parallel_grads`` sums over the tp group.

Every activation between branches is replicated and bit-identical across the tp group (an
all-reduce gives every rank the same bits), so the replicated parameters' gradients are
identical on every tp rank and need no tp reduction (except the layer norms' under
sequence parallelism, above).

Relation to the single process (float64): the embedding, max and target-logit reductions
are exact (one non-zero term, or a max). Row-parallel products, the sum of exponentials
and dh in the head add partial sums in another order than one GEMM does, so results differ
in the last bits (relative ~1e-15 per op), not bitwise.
"""

from __future__ import annotations

from typing import Any

from mpipar.backend import array_module, as_compute
from mpipar.comm.communicator import split_counts
from mpipar.nn import dropout, embedding, layernorm, linear
from mpipar.nn.stages import RunState
from mpipar.parallel import tp_comm


# ---- which slice of each tensor a tp rank holds ---------------------------------------------

def head_range(NH: int, tp: int, r: int) -> tuple[int, int]:
    """Heads [h0, h1) of tp rank r (NH divisible by tp)."""
    n = NH // tp
    return r * n, (r + 1) * n


def ffn_range(F: int, tp: int, r: int) -> tuple[int, int]:
    """Hidden units [f0, f1) of the MLP on tp rank r (F divisible by tp)."""
    n = F // tp
    return r * n, (r + 1) * n


def vocab_counts(V: int, tp: int) -> list[int]:
    """Rows of wte per tp rank. V need not divide by tp: the first V % tp ranks hold one row
    more (as ``numpy.array_split``), so no padding of the vocabulary is needed."""
    return split_counts(V, tp)


def vocab_range(V: int, tp: int, r: int) -> tuple[int, int]:
    """Vocabulary rows [v0, v1) of tp rank r."""
    counts = vocab_counts(V, tp)
    v0 = sum(counts[:r])
    return v0, v0 + counts[r]


# ---- stages ---------------------------------------------------------------------------------

class TPEmbeddingStage:
    """Vocabulary-parallel token embedding plus replicated position embedding, then dropout.

    A token outside [v0, v1) looks up 0 here; the all-reduce then gives every rank the full
    row (exactly: one non-zero term per element). ``region`` says what leaves the stage: the
    whole (B, T, C) (``TensorParallelRegion``), or under sequence parallelism this rank's
    (B, T/t, C) positions, whose gradient backward all-gathers before the lookup's
    scatter-add (every rank's wte rows take gradient from every position)."""

    names = ("transformer.wte.weight", "transformer.wpe.weight")

    def __init__(self, params: dict, grads: dict, state: RunState, group: Any,
                 vocab: tuple[int, int], region: Any = None):
        self.params, self.grads, self.state, self.group = params, grads, state, group
        self.region = tp_comm.TensorParallelRegion(group) if region is None else region
        self.v0, self.v1 = vocab

    def forward(self, idx: Any) -> tuple[Any, tuple]:
        xp = array_module(idx)
        wte, wpe = self.params["transformer.wte.weight"], self.params["transformer.wpe.weight"]
        B, T = idx.shape
        if T > wpe.shape[0]:
            raise ValueError(f"sequence length {T} exceeds block_size {wpe.shape[0]}")
        mine = (idx >= self.v0) & (idx < self.v1)            # (B, T) tokens of this shard
        local = xp.where(mine, idx - self.v0, 0)             # (B, T) row in the shard
        x = wte[local]                                       # (B, T, C) gather
        x *= mine[..., None]                                 # zero rows of other shards
        x = tp_comm.allreduce_sum(x, self.group)             # (B, T, C) full token rows
        x += wpe[:T]
        x = self.region.shard_forward(x)                     # (B, T, C) or (B, T/t, C)
        x, drop = dropout.forward(xp.ascontiguousarray(x), self.state.p, self.state.rng)
        return x, (local, mine, drop)

    def backward(self, dx: Any, cache: tuple) -> None:
        local, mine, drop = cache
        xp = array_module(dx)
        dx = self.region.shard_backward(dropout.backward(dx, drop))  # (B, T, C), replicated
        C = dx.shape[-1]
        # every token, other shards' as exact zeros into row 0 (no boolean-mask gather: its
        # size is data-dependent, a host synchronisation on a GPU); the rows of this shard
        # take their tokens in the single process's order, so the bits are the same
        rows = xp.where(mine.reshape(-1, 1), dx.reshape(-1, C), 0)  # (B*T, C)
        embedding.accumulate_rows(self.grads["transformer.wte.weight"], local.reshape(-1),
                                  rows)                      # (v1 - v0, C)
        T = dx.shape[1]
        self.grads["transformer.wpe.weight"][:T] += dx.sum(axis=0)  # (T, C)


class TPHeadStage:
    """Final layer norm (replicated), logits against this rank's wte rows (tied), and the
    vocabulary-parallel cross-entropy, mean over all positions.

    Per position n with target t (Megatron's parallel cross-entropy)::

        m  = max over ranks of max_j z[n, j]                 all-reduce max
        s  = sum over ranks of sum_j exp(z[n, j] - m)        } one all-reduce (2, N)
        zt = z[n, t] - m on the rank holding t, 0 elsewhere  }
        loss = mean_n (log s - zt)      p = exp(z - m) / s   (this rank's columns)
        dz = dloss (p - onehot(t)) / N                       no communication
    """

    def __init__(self, params: dict, grads: dict, group: Any, vocab: tuple[int, int], V: int,
                 region: Any = None):
        self.names = tuple(k for k in params if k.startswith("transformer.ln_f."))
        self.params, self.grads, self.group = params, grads, group
        # f around the logits: under sequence parallelism the final layer norm runs on this
        # rank's positions and f all-gathers them (backward: reduce-scatter of the partial
        # dh), Megatron's gather_from_sequence_parallel_region before its output layer
        self.region = tp_comm.TensorParallelRegion(group) if region is None else region
        self.v0, self.v1 = vocab
        self.counts = vocab_counts(V, 1 if group is None else group.size)

    def forward(self, x: Any, targets: Any = None) -> tuple[Any, Any, tuple | None]:
        """``(None, loss, cache)`` with targets; ``(logits (B, T, V), None, None)`` without
        (the full logits gathered from every tp rank, for sampling)."""
        P, G = self.params, self.group
        xp = array_module(x)
        h, ln = layernorm.forward(x, P["transformer.ln_f.weight"], P.get("transformer.ln_f.bias"))
        h = self.region.copy_forward(h)
        logits, lin = linear.forward(h, P["transformer.wte.weight"])  # (B, T, Vr)
        if targets is None:
            return tp_comm.gather_last_axis(logits, G, self.counts), None, None  # (B, T, V)
        Vr = logits.shape[-1]
        p = logits.reshape(-1, Vr)                           # (N, Vr), becomes p in place
        z = as_compute(p)                                    # float32 for 16-bit logits
        t = targets.reshape(-1)                              # (N,)
        N = z.shape[0]
        m = tp_comm.allreduce_max(z.max(axis=-1), G)         # (N,) global max
        z -= m[:, None]
        mine = (t >= self.v0) & (t < self.v1)                # (N,) targets on this rank
        tl = xp.where(mine, t - self.v0, 0)                  # (N,) local column
        st = xp.empty((2, N), dtype=z.dtype)                 # (2, N): [sum exp, target logit]
        st[1] = xp.where(mine, z[xp.arange(N), tl], 0.0)
        xp.exp(z, out=z)
        z.sum(axis=-1, out=st[0])
        st = tp_comm.allreduce_sum(st, G)                    # (2, N) over the vocabulary
        s, zt = st[0], st[1]
        loss = (xp.log(s) - zt).mean()                       # ()
        z *= (1.0 / s)[:, None]                              # (N, Vr) probabilities
        if z is not p:
            p[...] = z                                       # stored rounded to 16 bits
        return None, loss, (ln, lin, p, tl, mine)

    def backward(self, dloss: float, cache: tuple) -> Any:
        """dx (B, T, C) of ``dloss * loss``; accumulates into ln_f and this rank's wte rows."""
        ln, lin, p, tl, mine = cache
        G = self.grads
        xp = array_module(p)
        N = p.shape[0]
        dlogits = p * (float(dloss) / N)                     # (N, Vr)
        # minus dloss/N at each target this rank holds, 0 elsewhere (no nonzero(): its size
        # is data-dependent, a host synchronisation on a GPU); in p's dtype, as before
        hit = xp.where(mine, float(dloss) / N, 0.0).astype(p.dtype)   # (N,)
        dlogits[xp.arange(N), tl] -= hit
        dh = linear.backward(dlogits, lin, G["transformer.wte.weight"])  # (B, T, C) partial
        dh = self.region.copy_backward(dh)                  # (B, T, C) full
        return layernorm.backward(dh, ln, G["transformer.ln_f.weight"],
                                  G.get("transformer.ln_f.bias"))
