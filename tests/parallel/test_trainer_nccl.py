"""Training with ``nccl`` as the world's algorithm on the strict CuPy double: every layout
(its data-parallel buckets on the communication thread, tensor-parallel all-reduces,
sequence-parallel gathers and scatters, the pipeline's tied-embedding sum, all through the
double's NCCL, each rank on its own GPU) trains as NumPy does; and a step synchronises the
host at most MAX_SYNCS times, the Communicator's collectives included, at any depth: NCCL
queues its collectives on the stream, where staged MPI must wait for every buffer it copies
(a pipeline's stage-to-stage messages still go by staged MPI: a sync per message)."""

import numpy as np
import pytest

from mpipar.comm.communicator import Communicator
from mpipar.comm.transport.mpi import MPITransport
from mpipar.parallel.layout import Layout, layouts

from test_trainer_strict_cupy import (CONFIG, B, MAX_SYNCS, _step_counts,  # noqa: E402
                                      _train)  # (tests/parallel is on sys.path)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("strict_cupy", [dict(devices=8)], indirect=True)
def test_tp_and_pp_layouts_train_through_nccl_as_numpy(comm, strict_cupy):
    strict_cupy.xp.cuda.Device(comm.rank).use()          # one GPU per rank
    p2p = MPITransport(comm.p2p.comm.Dup(), owned=True)
    world = Communicator(p2p, p2p.dup(), algorithm="nccl", name="world")
    ran = []
    with strict_cupy.counting() as c:
        _layouts(comm, world, strict_cupy, ran)
    assert ran
    # the collectives went through NCCL, not a fallback (on some rank: with pp = 3 the middle
    # stage is in no group that reduces device arrays)
    mine = any(site.startswith("mpipar/comm/nccl.py:") for site in c.kernels)
    assert comm.size == 1 or comm.allreduce(np.array([int(mine)]), op="max")[0] == 1, c.kernels
    world.free()
    strict_cupy.xp.cuda.Device(0).use()


def _layouts(comm, world, strict_cupy, ran):
    for dp, tp, pp in layouts(comm.size):
        if B % (dp * 2) or CONFIG.n_head % tp or pp > CONFIG.n_layer:
            continue
        for sp in ([False, True] if tp > 1 else [False]):
            layout = Layout(dp, tp, pp, micro_batches=2, sequence_parallel=sp)
            ref_losses, ref_sd = _train(comm, layout, np)
            losses, sd = _train(world, layout, strict_cupy.xp)
            # NCCL sums tp partials in rank order, MPI in its own: at tp > 2 the first loss
            # may differ in the last bit, so all compare to float64 rounding, not bitwise
            np.testing.assert_allclose(losses, ref_losses, rtol=1e-10, atol=0, err_msg=str((tp, pp, sp)))
            for name, ref in ref_sd.items():
                np.testing.assert_allclose(sd[name], ref, rtol=1e-9, atol=1e-12, err_msg=name)
            ran.append((dp, tp, pp, sp))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("strict_cupy", [dict(devices=8)], indirect=True)
def test_a_step_through_nccl_synchronises_the_host_at_most_five_times_in_all(comm, strict_cupy):
    strict_cupy.xp.cuda.Device(comm.rank).use()
    p2p = MPITransport(comm.p2p.comm.Dup(), owned=True)
    world = Communicator(p2p, p2p.dup(), algorithm="nccl", name="world")
    seen = []
    for dp, tp, pp in layouts(comm.size):
        if B % (dp * 4) or CONFIG.n_head % tp or pp > 2:
            continue
        layout = Layout(dp, tp, pp, micro_batches=2, grad_accum=2, zero=1 if dp > 1 else 0,
                        allreduce="nccl")
        counts = {n_layer: _step_counts(world, strict_cupy, layout, n_layer).syncs for n_layer in (2, 4)}
        assert counts[2] == counts[4], (dp, tp, pp, counts)     # nothing grows with depth
        # pipeline activations and their gradients go stage to stage by MPI point-to-point
        # (staged: a sync per message, per micro-batch, not per block); all else is bounded
        rest = sum(n for site, n in counts[2].items() if "comm/transport/" not in site)
        assert rest <= MAX_SYNCS, (dp, tp, pp, counts[2])
        assert pp > 1 or rest == sum(counts[2].values()), (dp, tp, pp, counts[2])
        seen.append((dp, tp, pp))
    world.free()
    strict_cupy.xp.cuda.Device(0).use()
    if not seen:
        pytest.skip(f"no layout of {comm.size} ranks fits a batch of {B} in 2 x 2 parts")
