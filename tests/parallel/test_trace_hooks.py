"""What the parallel layers report to ``mpipar.trace`` during a real step, under MPI.

With a ``SpanRecorder`` installed, one step of the tiny model: under interleaved 1F1B (two
model chunks per pipeline rank) each rank's forwards and backwards name the virtual stage
they ran (chunk x P + rank) in the order ``Layout.schedule_for`` gives; under ZeRO-1 the
buckets' reduce-scatters run on the comm thread, named by the dp group, and the parameters'
all-gather after the update; with no recorder installed nothing is kept and the step's loss
is the same number to the bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpipar import trace
from mpipar.nn.gpt import PRESETS
from mpipar.parallel.layout import Layout
from mpipar.parallel.schedules import Backward, Forward
from mpipar.parallel.trainer import ParallelTrainer

CONFIG = PRESETS["tiny"].replace(block_size=8)
B, T = 8, 8


def _step(comm, layout: Layout, recorder: trace.Recorder | None) -> float:
    tr = ParallelTrainer(comm, CONFIG, layout, dtype="float64", grad_clip=1.0)
    x = np.random.default_rng(3).integers(0, CONFIG.vocab_size, (B // layout.dp, T))
    before = trace.install(recorder)
    try:
        return tr.step(x, x, lr=1e-3).loss
    finally:
        trace.install(before)


@pytest.mark.mpi(min_size=2)
def test_interleaved_stages_are_named_by_virtual_stage_in_schedule_order(comm):
    if comm.size % 2:
        pytest.skip("a pipeline of 2 stages with dp filling the rest needs an even world")
    layout = Layout(dp=comm.size // 2, pp=2, micro_batches=2, virtual_stages=2)
    rec = trace.SpanRecorder()
    loss = _step(comm, layout, rec)
    assert _step(comm, layout, None) == loss                    # reporting changes nothing
    pp_rank = comm.rank // layout.dp
    want = [("forward" if isinstance(i, Forward) else "backward", i.mb, i.chunk * 2 + pp_rank)
            for i in layout.schedule_for(pp_rank) if isinstance(i, (Forward, Backward))]
    got = [(s.name.split()[0], s.args["mb"], s.args["stage"]) for s in rec.spans
           if s.name.startswith(("forward", "backward"))]
    assert got == want and len(want) == 2 * 2 * 2
    assert all(s.track == "main" for s in rec.spans if s.cat in ("compute", "p2p"))
    sends = [s for s in rec.spans if s.name.startswith("send")]
    assert sends and all(s.args["bytes"] == (B // layout.dp // 2) * T * CONFIG.n_embd * 8 for s in sends)


@pytest.mark.mpi(min_size=2)
def test_zero_reduce_scatters_run_on_the_comm_thread(comm):
    layout = Layout(dp=comm.size, zero=1, bucket_mb=0.05)
    rec = trace.SpanRecorder()
    _step(comm, layout, rec)
    comm_thread = [s for s in rec.spans if s.track == "comm"]
    assert comm_thread and {s.name for s in comm_thread} <= {"dp reduce_scatter", "dp allgather"}
    assert any(s.name == "dp reduce_scatter" for s in comm_thread)
    assert all(s.args["size"] == comm.size and s.args["algorithm"] and s.args["bytes"] > 0
               for s in comm_thread)
    main = [s.name for s in rec.spans if s.track == "main"]
    assert main.count("clip") == 1 and main.count("optimizer") == 1 and "dp wait" in main


@pytest.mark.mpi(min_size=1)
def test_nothing_is_kept_without_a_recorder(comm):
    assert type(trace.recorder()) is trace.Recorder
    _step(comm, Layout(dp=comm.size), None)
    assert type(trace.recorder()) is trace.Recorder
