"""``python -m mpipar.train --allreduce nccl`` in-process on the strict CuPy double (the only
way the double reaches a run): two ranks on one GPU are one ``mpipar.train: error:`` line from
rank 0 and exit 2, before the model is built; one GPU per rank (each rank's own, picked from
its node-local rank) passes the check and trains.
(Without ``--device gpu`` the refusal comes before MPI: tests/test_train_errors.py.)"""

import pytest

from mpipar import train

FAST = ["--model", "tiny", "--block-size", "16", "--batch-size", "4", "--threads", "1",
        "--eval-batches", "1", "--eval-interval", "0", "--steps", "2", "--device", "gpu",
        "--allreduce", "nccl"]
EIGHT = [dict(devices=8)]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("strict_cupy", EIGHT, indirect=True)
def test_ranks_sharing_a_gpu_are_one_clean_error(comm, strict_cupy, capsys):
    # every rank told to use device 0 (an explicit --gpu-id is obeyed; NCCL then refuses it)
    assert train.main(FAST + ["--gpu-id", "0", "--dp", str(comm.size),
                              "--batch-size", str(2 * comm.size)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mpipar.train: error: ")]
    if comm.rank == 0:
        assert len(lines) == 1, err
        assert "--allreduce nccl: ranks 0 and 1 share GPU 0 (0000:01:00.0) on node " in lines[0]
        assert "NCCL needs one rank per GPU" in lines[0]
    else:
        assert lines == [], err
    assert "Traceback" not in err
    strict_cupy.xp.cuda.Device(0).use()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("strict_cupy", EIGHT, indirect=True)
def test_one_gpu_per_rank_passes_the_check_and_trains(comm, strict_cupy, capsys):
    tp = comm.size & -comm.size       # tiny: 8 heads, 8 blocks; tp a power of two, pp the rest
    assert train.main(FAST + ["--dp", "1", "--tp", str(tp), "--pp", str(comm.size // tp)]) == 0
    out = capsys.readouterr().out
    if comm.rank == 0:
        assert "mpipar.train |" in out and "step 2" in out, out
    assert strict_cupy.xp.cuda.Device().id == comm.rank     # --gpu-id auto: the node-local rank
    strict_cupy.xp.cuda.Device(0).use()
