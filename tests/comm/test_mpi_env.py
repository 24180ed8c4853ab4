"""Each rank's GPU (``mpi_env.select_gpu``, issue 15 item 2), on the strict CuPy double under
``mpiexec``: the node-local rank from MPI's shared-memory split, ``auto`` / ``shared`` / a
device number, more ranks than GPUs refused on every rank with the counts, ranks bound to a
GPU each by CUDA_VISIBLE_DEVICES, and the trainer's arrays on the chosen device (the
communication thread's too: it runs on its submitter's device)."""

import numpy as np
import pytest

from mpipar import backend
from mpipar.comm import mpi_env
from mpipar.comm.mpi_env import GPUSelectionError, choose_gpu, parse_gpu_choice, select_gpu
from mpipar.nn.gpt import PRESETS
from mpipar.optim import OptimizerSpec
from mpipar.parallel.layout import Layout
from mpipar.parallel.trainer import ParallelTrainer

DEVICES = [1, 2, 3, 4, 8]


def test_choices_parse_and_bad_ones_are_named():
    assert parse_gpu_choice("auto") == "auto" and parse_gpu_choice(" shared") == "shared"
    assert parse_gpu_choice("3") == 3
    with pytest.raises(ValueError, match="'gpu2' is not a GPU choice"):
        parse_gpu_choice("gpu2")


def test_choose_gpu_without_mpi(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [choose_gpu(r, 4, 4) for r in range(4)] == [0, 1, 2, 3]
    assert [choose_gpu(r, 6, 4, "shared") for r in range(6)] == [0, 1, 2, 3, 0, 1]
    assert choose_gpu(5, 6, 4, 2) == 2
    with pytest.raises(GPUSelectionError, match=r"6 ranks on this node see the same 4 GPU\(s\)"):
        choose_gpu(0, 6, 4)
    with pytest.raises(GPUSelectionError, match=r"GPU 4 asked for, but this rank sees 4 GPU"):
        choose_gpu(0, 1, 4, 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(GPUSelectionError, match=r"CUDA_VISIBLE_DEVICES=2,3"):
        choose_gpu(0, 3, 2)


@pytest.mark.mpi(min_size=1)
def test_node_local_rank_is_the_shared_memory_split(comm):
    """One node here: the node-local rank is the world rank, the node every rank."""
    assert mpi_env.node_local_rank() == (comm.rank, comm.size)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("strict_cupy", [dict(devices=n) for n in DEVICES], ids=lambda p: f"{p['devices']}gpu",
                         indirect=True)
def test_each_rank_uses_its_local_rank_modulo_the_gpus(comm, strict_cupy, monkeypatch):
    monkeypatch.delenv(mpi_env.GPU_ENV, raising=False)
    n = strict_cupy.devices
    assert select_gpu(choice="shared") == comm.rank % n
    assert backend.current_device() == comm.rank % n
    if comm.size <= n:        # one GPU each: auto gives the same
        assert select_gpu() == comm.rank
    else:                     # more ranks than GPUs: refused on every rank, with the counts
        with pytest.raises(GPUSelectionError,
                           match=fr"rank 0: {comm.size} ranks on this node see the same {n} GPU"):
            select_gpu()
    monkeypatch.setenv(mpi_env.GPU_ENV, str(n - 1))     # the override: one device for all
    assert select_gpu() == n - 1 and backend.current_device() == n - 1


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("strict_cupy", [dict(devices=1)], indirect=True)
def test_ranks_bound_to_a_gpu_each_by_the_launcher(comm, strict_cupy, monkeypatch):
    """A launcher that sets CUDA_VISIBLE_DEVICES per rank (Slurm's --gpu-bind) leaves each
    rank one visible GPU of its own: no sharing, so auto gives each its device 0."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", str(comm.rank))
    assert mpi_env.node_local_rank() == (0, 1)
    assert select_gpu(choice="auto") == 0


@pytest.mark.mpi(min_size=1)
def test_a_bad_choice_on_one_rank_stops_every_rank(comm, strict_cupy):
    """Rank 0 asks for a GPU that does not exist: every rank raises its message."""
    choice = strict_cupy.devices if comm.rank == 0 else "shared"
    with pytest.raises(GPUSelectionError, match=fr"rank 0: GPU {strict_cupy.devices} asked for"):
        select_gpu(choice=choice)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("strict_cupy", [dict(devices=3)], indirect=True)
def test_every_array_the_trainer_makes_lives_on_the_rank_gpu(comm, strict_cupy):
    config = PRESETS["tiny"].replace(block_size=8)
    device = select_gpu(choice="shared")
    trainer = ParallelTrainer(comm, config, Layout(comm.size, 1, 1, bucket_mb=0.01),
                              OptimizerSpec("adamw", lr=0.01), dtype="float32", xp=strict_cupy.xp)
    rng = np.random.default_rng(0)
    x = rng.integers(0, config.vocab_size, (2, 8))
    trainer.step(x, x, lr=0.01)           # buckets all-reduced on the comm thread
    arrays = {**trainer.local.params, **{f"grad.{k}": g for k, g in trainer.local.grads.items()}}
    arrays |= {f"{s}.{k}": a for s, t in trainer.sync.state_tensors().items() for k, a in t.items()}
    assert arrays and {name: a.device.id for name, a in arrays.items()} == dict.fromkeys(arrays, device)
