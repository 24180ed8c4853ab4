"""Sharded checkpoints of a parallel run (mpipar.parallel.checkpoint): each rank writes what
it owns, and a trainer of ANY layout loads back exactly the bits that were saved.

Run at every world size of the MPI suite: layouts of the world (pure dp with and without
ZeRO, pure tensor/pipeline splits, a hybrid under ZeRO) save after two AdamW steps; the
checkpoint is loaded into trainers of other layouts (ZeRO-2 over the whole world, and a
tensor/pipeline split), whose whole model and optimiser state then equal the saving
trainer's to the bit (loading moves bits, it does no arithmetic). A non-finite tensor on one
rank refuses the save on every rank, naming it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from mpipar.data import ckpt_dir
from mpipar.data.checkpoint import CheckpointError
from mpipar.nn.gpt import PRESETS
from mpipar.optim import OptimizerSpec
from mpipar.parallel.checkpoint import NonFiniteStateError, save_sharded
from mpipar.parallel.layout import Layout, layouts
from mpipar.parallel.model import load_full_state_dict
from mpipar.parallel.trainer import ParallelTrainer

CONFIG = PRESETS["tiny"].replace(block_size=8)
B, T = 8, 8
SPEC = OptimizerSpec("adamw", lr=0.01, weight_decay=0.1)


def shared_dir(comm, tmp_path) -> str:
    """Rank 0's ``tmp_path`` on every rank (one directory all ranks write into)."""
    text = str(tmp_path).encode().ljust(1024, b"\0")
    words = comm.broadcast(np.frombuffer(text, dtype=np.int64).copy(), root=0)
    return words.tobytes().rstrip(b"\0").decode()


def trained(comm, layout: Layout, steps: int = 2) -> ParallelTrainer:
    tr = ParallelTrainer(comm, CONFIG, layout, SPEC, dtype="float64", grad_clip=1.0)
    rng = np.random.default_rng(3)
    mine = B // layout.dp
    for _ in range(steps):
        x, y = (rng.integers(0, CONFIG.vocab_size, (B, T)) for _ in range(2))
        lo = tr.mesh.dp_rank * mine
        tr.step(x[lo:lo + mine], y[lo:lo + mine], lr=0.01)
    return tr


def fits(dp, tp, pp):
    return CONFIG.n_head % tp == 0 and pp <= CONFIG.n_layer and B % dp == 0


def assert_same_state(a: ParallelTrainer, b: ParallelTrainer, what: str) -> None:
    got = b.full_state_dict()
    for name, want in a.full_state_dict().items():
        np.testing.assert_array_equal(got[name], want, err_msg=f"{what}: {name}")
    sa, sb = a.full_optimizer_state(), b.full_optimizer_state()
    assert sa["step"] == sb["step"], what
    for key, want in sa.items():
        np.testing.assert_array_equal(sb[key], want, err_msg=f"{what}: {key}")


@pytest.mark.mpi(min_size=1)
def test_layouts_save_and_other_layouts_load_the_same_bits(comm, tmp_path):
    root = shared_dir(comm, tmp_path)
    n = comm.size
    fitting = [lay for lay in layouts(n) if fits(*lay)]
    splits = [Layout(1, tp, pp) for dp, tp, pp in fitting if dp == 1]
    targets = [Layout(dp=n, zero=2)] + splits[-1:]      # sharded state; tp/pp shards
    # what to save from: pure dp (replicated state, and ZeRO), the first and last pure
    # tp/pp split, and one hybrid under ZeRO (every layout at 8 ranks would take minutes)
    savers = [Layout(n, 1, 1, zero=z) for z in (0, 1) if (n, 1, 1) in fitting and n > 1]
    savers += splits[:1] + splits[1:][-1:]
    hybrids = sorted((lay for lay in fitting if lay[0] > 1 and lay[1] * lay[2] > 1),
                     key=lambda lay: (-(lay[1] > 1) - (lay[2] > 1), -lay[1]))   # tp and pp first
    savers += [Layout(dp, tp, pp, zero=1) for dp, tp, pp in hybrids[:1]]
    step = 0
    for saved_as in savers:
        dp, tp, pp, zero = saved_as.dp, saved_as.tp, saved_as.pp, saved_as.zero
        step += 1
        saver = trained(comm, saved_as)
        what = f"saved as dp{dp} tp{tp} pp{pp} zero{zero}"
        path = save_sharded(root, step, saver, run={}, layout={}, keep=2)
        assert path == os.path.join(root, f"step-{step}"), what
        files = os.listdir(path)
        # a rank writes only if it owns something; dp ranks > 0 own only ZeRO shards
        assert len(files) - 1 <= n and "manifest.json" in files, (what, files)
        for target in targets:
            ck = ckpt_dir.open_checkpoint(root)      # verified, via latest
            assert ck.step == step
            loader = ParallelTrainer(comm, CONFIG, target, SPEC, dtype="float64", init=False)
            load_full_state_dict(loader.local, ck.model)
            loader.load_full_optimizer_state(ck.optim)
            ck.close()
            assert_same_state(saver, loader, f"{what}, loaded as {target}")
    if comm.rank == 0:
        kept = sorted(d for d in os.listdir(root) if d.startswith("step-"))
        assert kept == sorted(f"step-{s}" for s in range(max(step - 1, 1), step + 1))   # keep 2


@pytest.mark.mpi(min_size=1)
def test_a_non_finite_tensor_on_one_rank_refuses_the_save_everywhere(comm, tmp_path):
    root = shared_dir(comm, tmp_path)
    tr = trained(comm, Layout(pp=comm.size), steps=1)      # the last rank holds ln_f alone
    save_sharded(root, 1, tr, run={}, layout={}, keep=2)
    name = "transformer.ln_f.weight"
    if comm.rank == comm.size - 1:
        tr.local.params[name][3] = np.inf
    with pytest.raises(NonFiniteStateError, match=f"non-finite parameter in {name} "):
        save_sharded(root, 2, tr, run={}, layout={}, keep=2)
    comm.barrier()
    assert sorted(os.listdir(root)) == ["latest", "step-1"]          # nothing new, nothing left
    assert ckpt_dir.open_checkpoint(root).step == 1


@pytest.mark.mpi(min_size=1)
def test_a_write_failing_on_one_rank_fails_the_save_everywhere(comm, tmp_path, monkeypatch):
    """The disk fills while the last rank writes its file: every rank raises the same error
    naming that rank, the temporary directory is removed, the previous checkpoint stays."""
    root = shared_dir(comm, tmp_path)
    tr = trained(comm, Layout(pp=comm.size), steps=1)
    save_sharded(root, 1, tr, run={}, layout={}, keep=2)
    if comm.rank == comm.size - 1:
        def full(path, arrays):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(ckpt_dir, "write_shard_file", full)
    with pytest.raises(CheckpointError, match=f"rank {comm.size - 1} could not write .*"
                                              f"No space left on device"):
        save_sharded(root, 2, tr, run={}, layout={}, keep=2)
    comm.barrier()
    assert sorted(os.listdir(root)) == ["latest", "step-1"]
