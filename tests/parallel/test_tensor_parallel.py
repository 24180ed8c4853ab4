"""Megatron tensor parallelism equals the single process: loss, every gradient, SGD steps.

Serial tests run the tp ranks as threads around an in-process group (``ThreadGroup``);
MPI tests run every layout of the world (tp-only, then dp x tp x pp with a naive
sequential pipeline written here). Differences are measured per tensor as
max |a - b| / max |b| against ``GPT(config, seed).loss_and_grads`` in float64; they come
from the order of partial sums (row-parallel products, the sum of exponentials, dh in the
head, the data-parallel mean), not from any approximation, and stay near 1e-15.
"""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from mpipar.backend import array_module, synchronize, to_host
from mpipar.nn.gpt import GPT, PRESETS, GPTConfig, param_shapes
from mpipar.parallel.layout import LayoutError, layouts
from mpipar.parallel.mesh import make_mesh
from mpipar.parallel.model import (allreduce_tied_grads, build_local_model, gather_full_state_dict,
                                   local_shards, tied_embedding_group)
from mpipar.parallel.tensor_parallel import TPHeadStage, vocab_counts
from mpipar.testing.arrays import arrays_in

TINY = PRESETS["tiny"]
TOL = 1e-10
B, T = 8, 8                     # serial tests' batch; MPI tests use global_batch(world)
STEPS, LR = 3, 0.5


def batch(cfg: GPTConfig, Bg: int = B, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (Bg, T)), rng.integers(0, cfg.vocab_size, (Bg, T))


def global_batch(world: int) -> int:
    """Rows of the global batch: divisible by every dp of the world (4 at 1, 2, 4 ranks)."""
    return math.lcm(4, world)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.max(np.abs(b))) or 1.0
    return float(np.max(np.abs(a - b))) / scale


def reference(cfg: GPTConfig, Bg: int, steps: int = STEPS) -> tuple[list[float], dict, dict]:
    """Single-process losses per step, first-step gradients and final weights (plain SGD)."""
    model = GPT(cfg, seed=0, dtype="float64")
    idx, tgt = batch(cfg, Bg)
    losses, grads0 = [], None
    for _ in range(steps):
        loss, grads = model.loss_and_grads(idx, tgt)
        losses.append(loss)
        if grads0 is None:
            grads0 = {k: v.copy() for k, v in grads.items()}
        model.param_buffer -= LR * model.grad_buffer
    return losses, grads0, {k: v.copy() for k, v in model.params.items()}


_MESHES: dict = {}


# The groups use mpipar's ring (point-to-point) rather than MPI's native collectives: MPICH
# switches a communicator to shared-memory collectives after a few calls, and those spin so
# hard with 8 ranks on 2 cores that this file would take minutes instead of seconds.
ALG = "ring"


def mesh_for(comm, dp: int, tp: int, pp: int):
    """One mesh per layout for the whole file (each costs six communicators)."""
    key = (comm.size, dp, tp, pp)
    if key not in _MESHES:
        _MESHES[key] = make_mesh(comm, dp, tp, pp, algorithms={"dp": ALG, "tp": ALG, "pp": ALG})
    return _MESHES[key]


# ---- one training step of any layout (a naive pipeline: one micro-batch, stage by stage) ----

def local_step(local, mesh, idx, tgt, tied) -> float:
    """Forward and backward of this rank's data slice through its stages; gradients averaged
    over dp and tied wte gradients summed. Returns the global mean loss (every rank)."""
    local.zero_grad()
    b = idx.shape[0] // mesh.dp
    idx, tgt = idx[mesh.dp_rank * b:(mesh.dp_rank + 1) * b], tgt[mesh.dp_rank * b:(mesh.dp_rank + 1) * b]
    C, pg = local.config.n_embd, mesh.pp_group
    body = local.stages[:-1] if local.last_stage else local.stages
    x = idx if local.first_stage else pg.recv(mesh.pp_rank - 1, out=np.empty((b, T, C)))
    caches = []
    for st in body:
        x, c = st.forward(x)
        caches.append(c)
    loss = np.zeros(1)
    if local.last_stage:
        _, lo, hc = local.stages[-1].forward(x, tgt)
        loss[0] = lo
        dx = local.stages[-1].backward(1.0, hc)
    else:
        pg.send(np.ascontiguousarray(x), mesh.pp_rank + 1)
        dx = pg.recv(mesh.pp_rank + 1, out=np.empty((b, T, C)))
    for st, c in zip(reversed(body), reversed(caches)):
        dx = st.backward(dx, c)
    if not local.first_stage:
        pg.send(np.ascontiguousarray(dx), mesh.pp_rank - 1)
    allreduce_tied_grads(local, tied)
    if mesh.dp > 1:
        local.grad_buffer[...] = mesh.dp_group.allreduce(local.grad_buffer, op="avg")
    loss = pg.broadcast(loss, root=mesh.pp - 1)
    return float(mesh.dp_group.allreduce(loss, op="avg")[0])


def check_layout(comm, cfg, dp, tp, pp, ref, check_grads: bool) -> float:
    """Run STEPS SGD steps of layout (dp, tp, pp); assert equality with ``ref``; return the
    largest relative difference seen."""
    ref_losses, ref_grads, ref_final = ref
    mesh = mesh_for(comm, dp, tp, pp)
    local = build_local_model(cfg, mesh, seed=0, dtype="float64")
    tied = tied_embedding_group(mesh.pp_group)
    idx, tgt = batch(cfg, global_batch(comm.size))
    worst = 0.0
    for step in range(STEPS):
        loss = local_step(local, mesh, idx, tgt, tied)
        d = abs(loss - ref_losses[step]) / abs(ref_losses[step])
        assert d <= TOL, (dp, tp, pp, step, loss, ref_losses[step])
        worst = max(worst, d)
        if step == 0 and check_grads:
            full = gather_full_state_dict(local, mesh, grads=True, algorithm=ALG)
            for name, g in ref_grads.items():
                d = rel(full[name], g)
                assert d <= TOL, (dp, tp, pp, name, d)
                worst = max(worst, d)
        local.param_buffer -= LR * local.grad_buffer
    full = gather_full_state_dict(local, mesh, algorithm=ALG)
    for name, w in ref_final.items():
        d = rel(full[name], w)
        assert d <= TOL, (dp, tp, pp, name, d)
        worst = max(worst, d)
    return worst


# ---- MPI tests ---------------------------------------------------------------------------------

@pytest.mark.mpi(min_size=1)
def test_tensor_parallel_equals_single_process(comm):
    """Every tp dividing the world (dp = world / tp, pp = 1): loss, every gradient and the
    weights after STEPS SGD steps match the single process within 1e-10 (relative)."""
    ref = reference(TINY, global_batch(comm.size))
    tps = [t for t in (1, 2, 4, 8) if comm.size % t == 0 and TINY.n_head % t == 0]
    worst = {tp: check_layout(comm, TINY, comm.size // tp, tp, 1, ref, True) for tp in tps}
    if comm.rank == 0:
        print(f"\n[tp] world {comm.size}: max relative difference per tp {worst}")


@pytest.mark.mpi(min_size=2)
def test_every_layout_equals_single_process(comm):
    """Every dp x tp x pp layout of the world with pp > 1 (tp must divide n_head), through a
    naive pipeline with the tied wte gradient summed between first and last stage."""
    ref = reference(TINY, global_batch(comm.size))
    worst = {}
    for dp, tp, pp in layouts(comm.size):
        if pp == 1 or TINY.n_head % tp:
            continue
        worst[(dp, tp, pp)] = check_layout(comm, TINY, dp, tp, pp, ref, True)
    if comm.rank == 0:
        print(f"\n[tp] world {comm.size}: max relative difference per (dp, tp, pp) {worst}")


@pytest.mark.mpi(min_size=1)
def test_local_slices_reassemble_the_single_process_init_bitwise(comm):
    """For every layout (pp > 1 included), the union of all ranks' local tensors is the
    single-process init, bit for bit; wte on the last stage is the first stage's slice."""
    full_ref = GPT(TINY, seed=0, dtype="float64").params
    for dp, tp, pp in layouts(comm.size):
        if TINY.n_head % tp:
            continue
        mesh = mesh_for(comm, dp, tp, pp)
        local = build_local_model(TINY, mesh, seed=0, dtype="float64")
        full = gather_full_state_dict(local, mesh, algorithm=ALG)
        assert set(full) == set(full_ref)
        for name, w in full_ref.items():
            assert np.array_equal(full[name], w), (dp, tp, pp, name)
        for name, spec in local.shard_spec.items():
            want = full_ref[name] if spec is None else spec.take(full_ref[name])
            assert np.array_equal(local.params[name], want), (dp, tp, pp, name)
        assert local.tied_names == (["transformer.wte.weight"] if pp > 1 and
                                    (local.first_stage or local.last_stage) else [])
        assert list(local.layers) == list(local.stage_layers[mesh.pp_rank])


@pytest.mark.mpi(min_size=4)
def test_tp_not_dividing_heads_is_a_clear_error_before_communicating(comm):
    cfg = TINY.replace(n_head=6, n_embd=48)
    mesh = make_mesh(comm, comm.size // 4, 4, 1)
    with pytest.raises(LayoutError, match="degree 4 does not divide the 6 attention heads"):
        build_local_model(cfg, mesh)
    comm.barrier()


@pytest.mark.mpi(min_size=3)
def test_tp_three_on_eight_heads_is_an_error(comm):
    if comm.size % 3:
        pytest.skip("needs a world divisible by 3")
    mesh = make_mesh(comm, comm.size // 3, 3, 1)
    with pytest.raises(LayoutError, match="degree 3 does not divide the 8 attention heads"):
        build_local_model(TINY, mesh)
    comm.barrier()


@pytest.mark.mpi(min_size=2)
def test_pp_beyond_layers_is_an_error(comm):
    mesh = make_mesh(comm, 1, 1, comm.size)
    with pytest.raises(LayoutError, match="pipeline stages for 1 blocks"):
        build_local_model(TINY.replace(n_layer=1), mesh)
    comm.barrier()


# ---- serial tests: tp ranks as threads around an in-process group -------------------------------

class ThreadGroup:
    """The Communicator calls the tp layers use (allreduce sum/max, allgather with counts),
    for ``size`` threads in one process. Reductions add in rank order."""

    def __init__(self, size: int):
        self.size = size
        self.slots: list = [None] * size
        self.barrier = threading.Barrier(size)

    def member(self, rank: int) -> SimpleNamespace:
        return SimpleNamespace(size=self.size, rank=rank,
                               allreduce=lambda x, op="sum": self._allreduce(rank, x, op),
                               allgather=lambda x, counts=None: self._allgather(rank, x),
                               reduce_scatter=lambda x, op="sum": self._reduce_scatter(rank, x))

    def _exchange(self, rank: int, x) -> list:
        self.slots[rank] = array_module(x).array(x, copy=True)
        synchronize(x)   # the copy done before another thread (rank) reads it, as MPI would
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()
        return got

    def _allreduce(self, rank, x, op):
        got = self._exchange(rank, x)
        xp = array_module(x)
        out = got[0].copy()
        for y in got[1:]:
            out = xp.maximum(out, y) if op == "max" else out + y
        return out

    def _allgather(self, rank, x):
        return array_module(x).concatenate(self._exchange(rank, x), axis=0)

    def _reduce_scatter(self, rank, x):
        total = self._allreduce(rank, x, "sum")
        n = x.shape[0] // self.size                      # the callers split evenly
        return total[rank * n:(rank + 1) * n]


def run_threads(tp: int, fn) -> list:
    group = ThreadGroup(tp)
    out: list = [None] * tp
    errors: list = []

    def body(r):
        try:
            out[r] = fn(r, group.member(r))
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def fake_mesh(tp: int, r: int, group) -> SimpleNamespace:
    return SimpleNamespace(dp=1, tp=tp, pp=1, dp_rank=0, tp_rank=r, pp_rank=0, tp_group=group)


def assemble(cfg: GPTConfig, tp: int, locals_: list, which: str) -> dict:
    full = {k: np.zeros(v.shape) for k, v in GPT(cfg, 0, "float64").params.items()}
    for local in locals_:
        src = getattr(local, which)
        for name, spec in local.shard_spec.items():
            if spec is None:
                full[name][...] = to_host(src[name])
            else:
                spec.put(full[name], to_host(src[name]))
    return full


@pytest.mark.parametrize("cfg", [TINY, TINY.replace(vocab_size=203, bias=False)],
                         ids=["tiny", "odd-vocab-nobias"])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_threaded_tp_loss_and_grads(cfg, tp, xp):
    """tp ranks as threads: loss and every gradient within 1e-10 of the single process
    (vocab 203 is split unevenly: no padding); replicated gradients agree bitwise."""
    ref = GPT(cfg, seed=0, dtype="float64")
    idx, tgt = batch(cfg)
    ref_loss, ref_grads = ref.loss_and_grads(idx, tgt)

    def rank(r, group):
        local = build_local_model(cfg, fake_mesh(tp, r, group), xp=xp)
        xs, caches = xp.asarray(idx), []
        for st in local.stages[:-1]:
            xs, c = st.forward(xs)
            caches.append(c)
        _, loss, hc = local.stages[-1].forward(xs, xp.asarray(tgt))
        dx = local.stages[-1].backward(1.0, hc)
        for st, c in zip(reversed(local.stages[:-1]), reversed(caches)):
            dx = st.backward(dx, c)
        logits, _, _ = local.stages[-1].forward(xs)      # gathered for sampling
        return local, float(loss), to_host(logits)

    res = run_threads(tp, rank)
    for _, loss, _ in res:
        assert abs(loss - ref_loss) <= TOL * abs(ref_loss)
    locals_ = [r[0] for r in res]
    full = assemble(cfg, tp, locals_, "grads")
    for name, g in ref_grads.items():
        assert rel(full[name], g) <= TOL, name
    for name, spec in locals_[0].shard_spec.items():
        if spec is None:                                  # replicated: same bits everywhere
            first = to_host(locals_[0].grads[name])
            assert all(np.array_equal(to_host(lo.grads[name]), first) for lo in locals_), name
    ref_logits, _, _ = ref.forward(idx)
    for *_, logits in res:
        assert logits.shape == (B, T, cfg.vocab_size)
        assert rel(logits, ref_logits) <= TOL


def _root(a):
    while getattr(a, "base", None) is not None:
        a = a.base
    return a


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_threaded_sequence_parallel(tp, recompute, xp):
    """Sequence parallelism, tp ranks as threads: every stage hands on (B, T/t, C); the loss
    and every gradient (the layer norms' after ``allreduce_sequence_parallel_grads``) are the
    single process's within 1e-10, and replicated gradients agree bitwise across ranks; a
    block keeps the bytes ``nn/block.py`` states for sequence parallelism."""
    from mpipar.parallel.layout import Layout
    from mpipar.parallel.model import allreduce_sequence_parallel_grads

    cfg = TINY
    ref = GPT(cfg, seed=0, dtype="float64")
    idx, tgt = batch(cfg)
    ref_loss, ref_grads = ref.loss_and_grads(idx, tgt)
    C, a = cfg.n_embd, cfg.n_head // tp
    lay = Layout(tp=tp, sequence_parallel=True, recompute=recompute)

    def rank(r, group):
        local = build_local_model(cfg, fake_mesh(tp, r, group), xp=xp, layout=lay)
        assert local.activation_shape(B, T) == (B, T // tp, C)
        xs, caches = xp.asarray(idx), []
        for st in local.stages[:-1]:
            xs, c = st.forward(xs)
            assert xs.shape == (B, T // tp, C)
            caches.append(c)
        params = {id(_root(v)) for v in local.params.values()}
        kept = sum(r_.size for r_ in {id(_root(x)): _root(x) for x in arrays_in(caches[1])
                                      if id(_root(x)) not in params}.values())
        _, loss, hc = local.stages[-1].forward(xs, xp.asarray(tgt))
        dx = local.stages[-1].backward(1.0, hc)
        for st, c in zip(reversed(local.stages[:-1]), reversed(caches)):
            dx = st.backward(dx, c)
        allreduce_sequence_parallel_grads(local, list(local.params))
        return local, float(loss), kept

    res = run_threads(tp, rank)
    want = {"none": B * T * (2 * C + 18 * C // tp) + 4 * B * T // tp + a * B * T * T,
            "full": B * T * C // tp}[recompute]
    for _, loss, kept in res:
        assert abs(loss - ref_loss) <= TOL * abs(ref_loss)
        assert kept == want, (kept, want)
    locals_ = [r[0] for r in res]
    assert locals_[0].sequence_parallel_names == {n for n in locals_[0].params if ".ln_" in n
                                                  or n.startswith("transformer.ln_f")}
    full = assemble(cfg, tp, locals_, "grads")
    for name, g in ref_grads.items():
        assert rel(full[name], g) <= TOL, name
    for name, spec in locals_[0].shard_spec.items():
        if spec is None:
            first = to_host(locals_[0].grads[name])
            assert all(np.array_equal(to_host(lo.grads[name]), first) for lo in locals_), name


def test_shards_partition_every_tensor():
    """Across tp ranks, sharded tensors' indices are disjoint and cover the full axis."""
    for tp in (2, 4, 8):
        specs = [local_shards(TINY, tp, r, True, True, range(TINY.n_layer)) for r in range(tp)]
        for name, spec in specs[0].items():
            if spec is None:
                assert all(s[name] is None for s in specs)
                continue
            idx = np.concatenate([s[name].index for s in specs])
            n = param_shapes(TINY)[name][specs[0][name].axis]
            assert sorted(idx.tolist()) == list(range(n)), name
    assert vocab_counts(203, 4) == [51, 51, 51, 50]


def test_head_without_group_is_the_plain_head():
    """The TP head with no group (tp = 1) gives the single process's loss bitwise."""
    ref = GPT(TINY, seed=0, dtype="float64")
    idx, tgt = batch(TINY)
    ref_loss, _ = ref.loss_and_grads(idx, tgt)
    x = idx
    for st in ref.stages[:-1]:
        x, _ = st.forward(x)
    head = TPHeadStage(ref.params, ref.grads, None, (0, TINY.vocab_size), TINY.vocab_size)
    _, loss, _ = head.forward(x, tgt)
    assert float(loss) == ref_loss


def test_bad_layouts_are_clear_errors():
    with pytest.raises(LayoutError, match="does not divide the 6 attention heads"):
        build_local_model(TINY.replace(n_head=6, n_embd=48), fake_mesh(4, 0, None))
    with pytest.raises(LayoutError, match="at least one block"):
        build_local_model(TINY.replace(n_layer=2),
                          SimpleNamespace(dp=1, tp=1, pp=3, dp_rank=0, tp_rank=0, pp_rank=0, tp_group=None))
