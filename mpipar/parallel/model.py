"""This rank's part of the GPT under any dp x tp x pp layout: stages, flat buffers, shards.

    from mpipar.parallel.mesh import make_mesh
    from mpipar.parallel.model import build_local_model, gather_full_state_dict
    mesh = make_mesh(comm, dp=2, tp=2, pp=2)
    local = build_local_model(PRESETS["tiny"], mesh, seed=0, dtype="float64",
                              layout=Layout(dp=2, tp=2, pp=2))   # default: the mesh's degrees
    local.stages            # [TPEmbeddingStage?, BlockStage..., TPHeadStage?] of this rank
    local.chunks            # the same stages per model chunk (one unless virtual_stages > 1)
    local.param_buffer      # flat: only this rank's tensors (its layers, its tp shards)
    local.params["transformer.h.0.attn.c_attn.weight"].shape   # (3C/tp, C)
    sd = gather_full_state_dict(local, mesh)                   # full nanoGPT dict, every rank

What a rank holds: pipeline stage s owns a contiguous slice of the blocks, ``stage_layers[s]``
of them (default: a split balanced by estimated FLOPs, ``Layout.stage_ranges``); stage 0
also owns the embeddings (wte, wpe), the last stage ln_f and the head. With
``layout.virtual_stages`` v > 1 the blocks are cut into pp v contiguous virtual stages and
rank r builds v model chunks, ``local.chunks[c]`` being virtual stage c pp + r (interleaved
1F1B, Narayanan et al. 2021); the embedding is the start of rank 0's chunk 0, the head the
end of rank pp-1's chunk v-1. ``local.stages`` is every chunk's stages in chunk order. The head is tied to wte (Press & Wolf 2017), so with pp > 1 **wte lives on both the
first and the last stage** (Megatron's "embedding group"): both start from the same slice
of the same init, and the executor must all-reduce the gradient of every name in
``local.tied_names`` between the two (``tied_embedding_group`` + ``allreduce_tied_grads``)
before the optimiser step, so that both copies stay equal. With tp > 1 each tensor is this
rank's shard (see ``tensor_parallel.py`` for the split; ``shard_spec`` says where it sits),
and the blocks are the single process's ``BlockStage`` given this rank's weight slices and
the tp group's communication points (``tp_comm.TensorParallelRegion``).

Flat layout (``local.layout``, a ``FlatLayout``): the single-process order (nanoGPT's:
wte, wpe, h.0 ..., ln_f) restricted to this rank's tensors, at shard shapes. With tp = pp = 1
the buffers are laid out exactly as ``GPT``'s. Backward produces gradients roughly from the
end of the buffer towards its start (ln_f and the last block first; wte, at the start, is
complete last), so data-parallel buckets are best cut from the end backwards using
``layout.offsets``.

Gradient reductions a trainer owes (nothing here communicates after construction):
* over ``mesh.dp_group``: every gradient (the data-parallel sum or mean);
* over the tied group (pp > 1): the names in ``tied_names``;
* over ``mesh.tp_group``: nothing, except under sequence parallelism the layer norms'
  (``sequence_parallel_names``, ``allreduce_sequence_parallel_grads``). Replicated tensors
  (``shard_spec[name] is None``) otherwise get identical gradients on every tp rank;
  sharded ones are distinct pieces. A global gradient
  norm sums squares over the tp and pp groups and counts each parameter once
  (``counts_in_norm``).

Initialisation slices ``mpipar.nn.gpt.init_host`` (the single process's float64 init) so
every layout starts from exactly the bits of ``GPT(config, seed, dtype)``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Collection, NamedTuple, Sequence

import numpy as np

from mpipar.backend import resolve_dtype, to_device, to_host
from mpipar.nn.attention import qkv_rows
from mpipar.nn.flat import FlatLayout
from mpipar.nn.block import RECOMPUTE, SERIAL
from mpipar.nn.grads import GradStore
from mpipar.nn.gpt import GPTConfig, init_host, param_shapes
from mpipar.nn.stages import BlockStage, EmbeddingStage, HeadStage, RunState
from mpipar.parallel.layout import Layout
from mpipar.parallel.tensor_parallel import TPEmbeddingStage, TPHeadStage, ffn_range, head_range, vocab_range
from mpipar.parallel.tp_comm import SequenceParallelRegion, TensorParallelRegion

WTE = "transformer.wte.weight"
WPE = "transformer.wpe.weight"


class Shard(NamedTuple):
    """A local tensor is ``full.take(index, axis=axis)``: ``index`` (int array) lists the
    positions along ``axis`` of the full tensor, in local order (c_attn's head shard is three
    ranges: its q, k and v rows)."""

    axis: int
    index: np.ndarray

    def take(self, full: Any) -> Any:
        return np.take(full, self.index, axis=self.axis)

    def put(self, full: np.ndarray, local: Any) -> None:
        """Write ``local`` into its place in ``full`` (in place)."""
        sl: list[Any] = [slice(None)] * full.ndim
        sl[self.axis] = self.index
        full[tuple(sl)] = local


# ---- which tensors, and which slice of each, this rank holds --------------------------------

def local_shards(config: GPTConfig, tp: int, tp_rank: int, first: bool, last: bool,
                 layers: Collection[int]) -> dict[str, Shard | None]:
    """name -> Shard (or None: the full tensor) for every tensor of this rank, in the
    single-process order. Pure: no communication, usable without MPI."""
    C, NH, V = config.n_embd, config.n_head, config.vocab_size
    hs = C // NH
    h0, h1 = head_range(NH, tp, tp_rank)
    f0, f1 = ffn_range(4 * C, tp, tp_rank)
    v0, v1 = vocab_range(V, tp, tp_rank)
    split = tp > 1

    def rows(idx: np.ndarray) -> Shard | None:
        return Shard(0, idx) if split else None

    def cols(idx: np.ndarray) -> Shard | None:
        return Shard(1, idx) if split else None

    per_block = {
        "attn.c_attn.weight": rows(qkv_rows(C, NH, h0, h1)),
        "attn.c_attn.bias": rows(qkv_rows(C, NH, h0, h1)),
        "attn.c_proj.weight": cols(np.arange(h0 * hs, h1 * hs)),
        "mlp.c_fc.weight": rows(np.arange(f0, f1)),
        "mlp.c_fc.bias": rows(np.arange(f0, f1)),
        "mlp.c_proj.weight": cols(np.arange(f0, f1)),
    }
    out: dict[str, Shard | None] = {}
    for name in param_shapes(config):
        if name == WTE:
            keep = first or last
            spec = rows(np.arange(v0, v1))
        elif name == WPE:
            keep, spec = first, None
        elif name.startswith("transformer.ln_f."):
            keep, spec = last, None
        else:
            i, rest = name[len("transformer.h."):].split(".", 1)
            keep, spec = int(i) in layers, per_block.get(rest)
        if keep:
            out[name] = spec
    return out


def _local_shape(full: tuple[int, ...], spec: Shard | None) -> tuple[int, ...]:
    if spec is None:
        return full
    shape = list(full)
    shape[spec.axis] = len(spec.index)
    return tuple(shape)


def shard_layout(full_layout: FlatLayout, shard_spec: dict[str, Shard | None]) -> FlatLayout:
    """The flat layout of this rank's tensors (``local_shards``) at their shard shapes, in
    the single-process order: ``LocalModel.layout``, computable without building the model
    (the memory model sizes every buffer from it)."""
    return FlatLayout((n, _local_shape(full_layout.shapes[n], s)) for n, s in shard_spec.items())


# ---- the local model --------------------------------------------------------------------------

class LocalModel:
    """This rank's stages and flat parameter/gradient buffers (see the module docstring)."""

    def __init__(self, config: GPTConfig, mesh: Any, seed: int, dtype: Any, xp: ModuleType,
                 layout: Layout | None, init: bool = True):
        dp = 1 if mesh is None else mesh.dp
        tp = 1 if mesh is None else mesh.tp
        pp = 1 if mesh is None else mesh.pp
        tp_rank = 0 if mesh is None else mesh.tp_rank
        pp_rank = 0 if mesh is None else mesh.pp_rank
        dp_rank = 0 if mesh is None else mesh.dp_rank
        layout = Layout(dp, tp, pp) if layout is None else layout
        if (layout.dp, layout.tp, layout.pp) != (dp, tp, pp):
            raise ValueError(f"layout {layout} does not match the mesh dp={dp} x tp={tp} x pp={pp}")
        layout.check(layout.world_size, config)
        self.stage_layers = layout.stage_ranges(config)      # every virtual stage's blocks
        self.chunk_layers = layout.chunk_ranges(config, pp_rank)
        self.config, self.mesh, self.xp, self.seed = config, mesh, xp, seed
        self.dtype = resolve_dtype(dtype)
        self.tp, self.pp, self.tp_rank, self.pp_rank = tp, pp, tp_rank, pp_rank
        self.first_stage, self.last_stage = pp_rank == 0, pp_rank == pp - 1
        self.layers: tuple[int, ...] = tuple(i for r in self.chunk_layers for i in r)
        self.vocab = vocab_range(config.vocab_size, tp, tp_rank)
        self.tp_group = None if mesh is None else mesh.tp_group

        # ---- tensors: full layout (single process) -> this rank's slices
        self.full_layout = FlatLayout(param_shapes(config).items())
        self.shard_spec = local_shards(config, tp, tp_rank, self.first_stage, self.last_stage,
                                       self.layers)
        self.layout = shard_layout(self.full_layout, self.shard_spec)
        if init:
            full = self.full_layout.views(init_host(config, self.full_layout, seed))  # float64 host
            host = np.empty(self.layout.numel, dtype=np.float64)
            for name, v in self.layout.views(host).items():
                spec = self.shard_spec[name]
                v[...] = full[name] if spec is None else spec.take(full[name])
            self.param_buffer = to_device(host.astype(self.dtype), xp)
        else:
            # zeros, and no host copy of the whole model: for the simulator (whose arrays hold
            # no data) and for a run whose parameters are loaded next
            self.param_buffer = xp.zeros(self.layout.numel, dtype=self.dtype)
        self.params = self.layout.views(self.param_buffer)
        self.grads = GradStore(self.layout, self.dtype, xp)   # views of grads.buffer
        self.tied_names: list[str] = [WTE] if pp > 1 and WTE in self.params else []

        # ---- stages
        rng = None
        if config.dropout > 0.0:
            # identical across the tp group (replicated activations must drop the same
            # entries), distinct across dp and pp; masks differ from the single process's
            rng = xp.random.default_rng([seed + 1, dp_rank, pp_rank])
        self.state = RunState(training=True, dropout=config.dropout, rng=rng)
        # ---- stages: the single process's, with tp > 1 the block given this rank's slices
        # and the tp group's f and g, and the vocabulary-parallel embedding and head
        P, G, st, grp = self.params, self.grads, self.state, self.tp_group
        region = (SequenceParallelRegion(grp) if layout.sequence_parallel else
                  TensorParallelRegion(grp) if tp > 1 else SERIAL)
        recompute = RECOMPUTE[layout.recompute]             # what every block's forward keeps
        # chunk c (virtual stage c * pp + pp_rank): the embedding leads the first virtual
        # stage (chunk 0 of pp rank 0), the head ends the last (chunk v-1 of rank pp-1)
        v = len(self.chunk_layers)
        self.chunks: list[list[Any]] = []
        for c, layers in enumerate(self.chunk_layers):
            chunk: list[Any] = []
            if self.first_stage and c == 0:
                chunk.append(TPEmbeddingStage(P, G, st, grp, self.vocab, region) if tp > 1
                             else EmbeddingStage(P, G, st))
            chunk += [BlockStage(i, P, G, config.n_head // tp, st, region, recompute)
                      for i in layers]
            if self.last_stage and c == v - 1:
                chunk.append(TPHeadStage(P, G, grp, self.vocab, config.vocab_size, region)
                             if tp > 1 else HeadStage(P, G))
            self.chunks.append(chunk)
        self.stages: list[Any] = [st_ for chunk in self.chunks for st_ in chunk]
        # under sequence parallelism the layer norms see T/t positions per rank: their
        # gradients are partial sums, owed a sum over the tp group
        self.sequence_parallel_names: frozenset[str] = frozenset(
            n for n in self.params if layout.sequence_parallel and _is_layer_norm(n))
        self.sequence_split = tp if layout.sequence_parallel else 1   # T / positions per rank

    def activation_shape(self, B: int, T: int) -> tuple[int, int, int]:
        """The shape of what passes between this model's stages (and pipeline ranks) for
        B sequences of T positions: (B, T/tp, C) under sequence parallelism, else (B, T, C)."""
        return B, T // self.sequence_split, self.config.n_embd

    @property
    def grad_buffer(self) -> Any:
        """The flat gradient buffer (``grads`` are views of it); None once ZeRO-2 has moved
        the gradients into storage per tensor (``GradStore.use_buckets``)."""
        return self.grads.buffer

    def zero_grad(self) -> None:
        self.grads.zero()

    def train(self, mode: bool = True) -> "LocalModel":
        self.state.training = mode
        return self

    def eval(self) -> "LocalModel":
        return self.train(False)

    def counts_in_norm(self, name: str) -> bool:
        """Whether this rank's gradient of ``name`` counts in the global gradient norm, so
        that every parameter is counted once over the tp and pp groups: not the tied wte's
        second copy (on the last stage), and a tensor replicated over tp only on tp rank 0."""
        if name in self.tied_names and not self.first_stage:
            return False
        return not (self.shard_spec[name] is None and self.tp_rank != 0)

    def num_parameters(self) -> int:
        """Elements held by this rank (tied wte counted on each stage that holds it)."""
        return self.layout.numel

    def __repr__(self) -> str:
        blocks = ", ".join(f"{r.start}..{r.stop - 1}" for r in self.chunk_layers)
        return (f"LocalModel(tp {self.tp_rank}/{self.tp}, pp {self.pp_rank}/{self.pp}, "
                f"layers {blocks}, "
                f"{self.layout.numel:,} params, {self.dtype.name})")


def build_local_model(config: GPTConfig, mesh: Any, seed: int = 0, dtype: Any = "float64",
                      xp: ModuleType = np, layout: Layout | None = None,
                      init: bool = True) -> LocalModel:
    """This rank's part of ``GPT(config, seed, dtype)`` under ``mesh`` (None: one process).

    ``layout`` (default: the mesh's degrees and nothing else) says what the model is built
    with beyond the mesh: ``stage_layers`` (blocks per virtual stage; default balanced by
    FLOPs), ``virtual_stages`` (``local.chunks``: one list of stages per model chunk, what
    ``PipelineExecutor(chunks=...)`` runs) and ``recompute`` (every block's
    ``block.RECOMPUTE`` policy); its dp, tp and pp must be the mesh's. ``init=False`` leaves
    the parameters zero instead of initialising the whole model on the host first (which a
    model that does not fit one process cannot afford).
    Raises LayoutError (``Layout.check``), identically on every rank and before any
    communication, when the layout does not fit the model. Collective only in that every
    rank should call it (it communicates nothing itself).
    """
    return LocalModel(config, mesh, seed, dtype, xp, layout, init)


# ---- tied embedding (pp > 1) --------------------------------------------------------------

def tied_embedding_group(pp_group: Any) -> Any:
    """A Communicator joining the first and last stage of the pipeline group ``pp_group``
    (Megatron's "embedding group"), or None for the other ranks and for a pipeline of one
    stage. Collective over ``pp_group``: every rank calls it."""
    if pp_group is None or pp_group.size == 1:
        return None
    member = pp_group.rank in (0, pp_group.size - 1)
    group = pp_group.split(color=0 if member else None, key=pp_group.rank)
    if group is not None:
        group.name = "tied"                        # what the trace calls its all-reduce
    return group


def allreduce_tied_grads(local: LocalModel, group: Any) -> None:
    """Sum the gradients of ``local.tied_names`` over ``group`` (from
    ``tied_embedding_group``), in place; a no-op where there is none."""
    if group is None:
        return
    for name in local.tied_names:
        local.grads[name][...] = group.allreduce(local.grads[name])


# ---- sequence-parallel layer norms ------------------------------------------------------------

def _is_layer_norm(name: str) -> bool:
    return ".ln_" in name or name.startswith("transformer.ln_f.")


def allreduce_sequence_parallel_grads(local: LocalModel, names: Sequence[str]) -> None:
    """Sum over the tp group, in place, the gradients among ``names`` that sequence
    parallelism leaves partial (``local.sequence_parallel_names``: the layer norms, which
    each rank applies to its own positions), so that every tp rank holds the whole gradient,
    as the replicated parameters it updates need (Megatron all-reduces its
    sequence-parallel parameters' gradients likewise). Called with a stage's names once they
    are final for the step, before the data-parallel reduction takes them (one message per
    stage); a no-op without sequence parallelism. Collective over the tp group."""
    mine = [n for n in names if n in local.sequence_parallel_names]
    if not mine:
        return
    xp = local.xp
    flat = xp.concatenate([local.grads[n].reshape(-1) for n in mine])
    flat = local.tp_group.allreduce(flat)
    start = 0
    for n in mine:
        g = local.grads[n]
        g[...] = flat[start:start + g.size].reshape(g.shape)
        start += g.size


# ---- full state dict <-> local buffers ----------------------------------------------------------

def owns(local: LocalModel, name: str, every_dp_rank: bool = False) -> bool:
    """One canonical holder per element: dp rank 0, tp rank 0 for replicated tensors, and
    the first stage for the tied wte. ``every_dp_rank``: for what differs over the dp group
    (ZeRO's optimiser shards), each dp rank holds its own, so only the tp and pp rules apply."""
    mesh = local.mesh
    if mesh is None:
        return True
    if mesh.dp_rank != 0 and not every_dp_rank:
        return False
    if local.shard_spec[name] is None and mesh.tp_rank != 0:
        return False
    return not (name == WTE and not local.first_stage)


def gather_full_state_dict(local: LocalModel, mesh: Any, grads: bool = False,
                           algorithm: str | None = None,
                           tensors: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The full nanoGPT state dict (host numpy, the local dtype; ``tensors``: theirs) on EVERY rank.

    Each element is written by exactly one rank (``owns``) into a zero buffer of the full
    layout and the buffers are summed over the world: x + 0 is exact, so the result is the
    bits the owners hold. ``grads=True`` gathers gradients instead; tied gradients must
    already have been summed (wte's is taken from the first stage). ``tensors`` gathers any
    other per-parameter tensors laid out like the parameters (an optimiser's moments: the same
    names and local shapes, the same on every dp rank). Collective over ``mesh.world`` (with
    its default algorithm unless ``algorithm`` names one).
    """
    fl = local.full_layout
    src = tensors if tensors is not None else local.grads if grads else local.params
    # the tensors' own dtype: a mixed-precision optimiser's state is float32, its model 16-bit
    dtype = local.dtype if tensors is None else np.dtype(next(iter(tensors.values())).dtype)
    buf = np.zeros(fl.numel, dtype=dtype)
    views = fl.views(buf)
    for name, spec in local.shard_spec.items():
        if owns(local, name):
            val = to_host(src[name])
            if spec is None:
                views[name][...] = val
            else:
                spec.put(views[name], val)
    if mesh is not None and mesh.world.size > 1:
        buf = mesh.world.allreduce(buf, algorithm=algorithm)
    return fl.views(buf)


def load_full_state_dict(local: LocalModel, sd: dict[str, Any]) -> None:
    """Copy this rank's slices of a full state dict ``sd`` (nanoGPT names and shapes; host or
    device arrays) into ``local.params``. ``lm_head.weight`` and other unknown keys are
    ignored; a missing or misshapen tensor of this rank is an error."""
    for name, piece in local_pieces(local, sd).items():
        local.params[name][...] = to_device(piece.astype(local.dtype), local.xp)


def local_pieces(local: LocalModel, sd: dict[str, Any], prefix: str = "",
                 what: str = "the state dict") -> dict[str, np.ndarray]:
    """This rank's slice (host numpy) of every tensor of its model in ``sd``, whose keys are
    ``prefix`` + nanoGPT names and whose tensors have the full shapes. Local: no collective, so
    a missing or misshapen tensor raises on every rank alike before anything is sent."""
    out = {}
    for name, spec in local.shard_spec.items():
        key = prefix + name
        if key not in sd:
            raise KeyError(f"{key} missing from {what}")
        full = to_host(sd[key])
        if tuple(full.shape) != local.full_layout.shapes[name]:
            raise ValueError(f"{key}: shape {tuple(full.shape)} in {what}, expected "
                             f"{local.full_layout.shapes[name]}")
        out[name] = np.asarray(full if spec is None else spec.take(full))
    return out
