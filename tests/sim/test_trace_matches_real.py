"""A real step and its simulation have the same timeline: the same events in the same order.

Under mpiexec, every layout of the world (the tiny model, 1F1B with micro-batches, tensor and
data parallelism, ZeRO-1) trains one real step with the simulator's observer installed
(``sim.train.instrument``: the same spans the simulation records, timed by the wall clock),
and ``simulate_train`` runs the same step on as many virtual ranks. Per rank and per track
(the main thread, the communication stream), the sequence of event names is compared.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpipar.comm import make_communicator
from mpipar.nn.gpt import PRESETS
from mpipar.parallel.layout import layouts
from mpipar.parallel.trainer import ParallelTrainer
from mpipar.sim.spec import TrainSpec
from mpipar.trace import TRACKS
from mpipar.sim.train import Observer, instrument, observed_step, simulate_train

CONFIG = PRESETS["tiny"]
B = 8


@pytest.fixture(scope="module")
def comm():  # type: ignore[no-untyped-def]
    return make_communicator(abort_on_exception=False)


def sequences(spans) -> dict[str, list[str]]:
    """Per track, the names in order: the executor's events (forward, backward, waits per
    micro-batch) and the observer's spans (collectives, optimiser) each in their own order
    (the two are timed from starts a few microseconds apart in a real step, so events that
    close may interleave either way when merged)."""
    out = {}
    for track in TRACKS:
        mine = [s for s in spans if s.track == track]
        out[track] = [s.name for s in mine if "mb" in s.args]
        out[track + " collectives"] = [s.name for s in mine if "mb" not in s.args]
    return out


def kinds_of_layout(n: int) -> list[tuple[int, int, int]]:
    """Pure data, pure pipeline and the most mixed layout of ``n`` ranks that fit (each
    trainer makes a handful of MPI communicators, which a whole-suite process has only ~2000
    of, so not every layout)."""
    fit = [l for l in layouts(n) if CONFIG.n_head % l[1] == 0 and l[2] <= CONFIG.n_layer
           and B % (l[0] * 2) == 0]
    mixed = max(fit, key=lambda l: (sum(v > 1 for v in l), l[1], l[2]))
    return list(dict.fromkeys([l for l in fit if l in ((n, 1, 1), (1, 1, n))] + [mixed]))


@pytest.mark.mpi(min_size=1)
def test_simulated_timeline_has_the_real_steps_events_in_order(comm):
    checked = 0
    for dp, tp, pp in kinds_of_layout(comm.size):
        spec = TrainSpec(n_layer=CONFIG.n_layer, n_embd=CONFIG.n_embd, n_head=CONFIG.n_head,
                         block_size=CONFIG.block_size, vocab_size=CONFIG.vocab_size,
                         global_batch=B, micro_batch=B // (dp * 2), dp=dp, tp=tp, pp=pp,
                         zero=1 if dp > 1 else 0, bucket_mb=0.01, allreduce="ring")
        tr = ParallelTrainer(comm, spec.gpt_config, spec.layout, grad_clip=1.0, dtype="float32")
        obs = Observer(None, comm.clock)
        instrument(tr, obs)
        rng = np.random.default_rng(0)
        x = rng.integers(0, CONFIG.vocab_size, (B // dp, CONFIG.block_size))
        tr.step(x, x, lr=1e-3)                    # a first step: state made
        observed_step(tr, obs, x, x, comm.barrier)
        real = sequences(obs.spans)
        sim = simulate_train(spec, "local", reduced=False, memoize=False)
        mine = next(r for r in sim.ranks if r.rank == comm.rank)
        assert sequences(mine.spans) == real, f"dp{dp} tp{tp} pp{pp}"
        assert real["main"], "the step recorded no events"
        checked += 1
    assert checked
