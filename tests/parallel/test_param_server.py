"""Parameter-server training (parallel/param_server.py).

* sync equals the single process within a relative 1e-10 in float64 (losses and weights),
  for 1 and 2 servers and every number of workers that divides the batch, on sub-worlds of
  2, 3, 4 and 5 ranks and on the whole world: 1 server + 1 worker, 1 + 2, 2 + 1, 1 + 3,
  2 + 2, 1 + 4, 2 + 3, 2 + 6 ...; with AdamW and clipping too (the servers add their
  ranges' squares for the global norm);
* the recorded staleness: sync 0 everywhere; with worker 1 slowed, async applies stale
  gradients (the same run with the bound enforced must then differ, so the bound test can
  fail) and ssp:S never applies one with a clock lag above S;
* resume: a sync run stopped after 2 steps and continued from its gathered state (into new
  trainers) equals the straight run to the bit; the gathered state loads into an ordinary
  trainer, which then equals the single process;
* the configuration check names the quantity.
"""

import math

import numpy as np
import pytest

from mpipar.parallel.layout import Layout
from mpipar.parallel.model import load_full_state_dict
from mpipar.parallel.param_server import (ParamServerTrainer, PSConfigError, SSPMode, Staleness,
                                          check_ps, parse_mode, ps_roles, server_ranges)
from mpipar.parallel.trainer import ParallelTrainer
from test_trainer import CONFIG, LR, STEPS, T, TOL, reference, spec

B = 12                     # 12 rows: 1, 2, 3, 4 and 6 workers take equal shares


def _batches(steps, rows=B):
    """test_trainer's batches (its reference trains on the first STEPS), ``steps`` of them."""
    rng = np.random.default_rng(5)
    return [(rng.integers(0, CONFIG.vocab_size, (rows, T)),
             rng.integers(0, CONFIG.vocab_size, (rows, T))) for _ in range(steps)]


def free(ps):
    """The PS trainer's own communicators (its inner trainer is closed by conftest)."""
    ps.close()


def run(world, servers, mode="sync", steps=2, optimizer="sgd", grad_clip=0.0, batches=None,
        trainer=None, **kw):
    ps = trainer or ParamServerTrainer(world, CONFIG, Layout(**kw.pop("layout", {})),
                                       spec(optimizer), servers=servers, mode=mode,
                                       dtype="float64", grad_clip=grad_clip, **kw)
    W, w = ps.mesh.dp, ps.mesh.dp_rank
    losses = []
    for x, y in batches or _batches(steps):
        lo = w * (B // W)
        losses.append(ps.step(x[lo:lo + B // W], y[lo:lo + B // W], lr=LR).loss)
    return ps, losses


def relative(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


def assert_equals_reference(ps, losses, optimizer, grad_clip, what):
    """The single process's STEPS steps on the same B rows (test_trainer's reference)."""
    ref_losses, ref_sd = reference(optimizer, grad_clip, rows=B)
    sd = ps.full_state_dict()
    if not ps.is_server:          # a worker's reported loss: the global batch's mean
        np.testing.assert_allclose(losses, ref_losses, rtol=TOL, atol=0, err_msg=what)
    for name, ref in ref_sd.items():
        assert relative(sd[name], ref) <= TOL, f"{what}: {name} differs"


def sub_worlds(comm):
    """(sub-communicator or None, its size) for sizes 2..5 that fit, then the whole world."""
    sizes = [n for n in (2, 3, 4, 5) if n <= comm.size]
    if comm.size not in sizes and comm.size >= 2:
        sizes.append(comm.size)
    for n in sizes:
        sub = comm if n == comm.size else comm.split(color=0 if comm.rank < n else None,
                                                     key=comm.rank)
        yield sub, n
        if sub is not None and sub is not comm:
            sub.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("optimizer,grad_clip", [("sgd", 0.0), ("adamw", 0.5)])
def test_sync_equals_single_process(comm, optimizer, grad_clip):
    tried = 0
    for sub, n in sub_worlds(comm):
        for servers in (1, 2):
            W = n - servers
            if W < 1 or B % W:
                continue
            tried += 1
            if sub is None:
                continue
            what = f"{servers} server(s) + {W} worker(s), {optimizer}, clip {grad_clip}"
            ps, losses = run(sub, servers, "sync", steps=STEPS, optimizer=optimizer,
                             grad_clip=grad_clip)
            assert_equals_reference(ps, losses, optimizer, grad_clip, what)
            st = ps.staleness_summary()
            assert st.lag and set(st.lag) == {0} and set(st.updates) == {0}, what
            assert sum(st.lag.values()) == servers * W * STEPS, what
            free(ps)
    assert tried >= 1


@pytest.mark.mpi(min_size=3)
def test_sync_with_grad_accum_and_micro_batches(comm):
    sub = comm if comm.size == 3 else comm.split(color=0 if comm.rank < 3 else None, key=comm.rank)
    if sub is not None:
        ps, losses = run(sub, 1, "sync", steps=STEPS, layout=dict(grad_accum=2, micro_batches=3))
        assert_equals_reference(ps, losses, "sgd", 0.0, "1 + 2, grad-accum 2, M 3")
        free(ps)
        if sub is not comm:
            sub.free()


def slowed_run(world, mode, steps=8):
    """1 server (the last rank) and 2 workers; worker 1 ten times as slow."""
    ps, _ = run(world, 1, mode, steps=steps, optimizer="sgd", slow_rank=1, slow_factor=10.0)
    st = ps.staleness_summary()
    free(ps)
    return st


@pytest.mark.mpi(min_size=3)
def test_staleness_bounds_with_a_slowed_worker(comm):
    """async: worker 0 runs ahead of worker 1 (ten times its step time), so gradients are
    applied with a clock lag > 0 and missed updates; ssp:1 with the same straggler never
    exceeds lag 1; ssp:0 and sync never exceed 0. Every push is recorded."""
    sub = comm if comm.size == 3 else comm.split(color=0 if comm.rank < 3 else None, key=comm.rank)
    if sub is None:
        return
    steps = 8
    lax = slowed_run(sub, "async", steps)
    assert sum(lax.lag.values()) == 2 * steps
    assert max(lax.lag) > 1, f"async with a straggler applied nothing stale: {lax}"
    assert max(lax.updates) > 0
    for mode, bound in (("ssp:1", 1), ("ssp:0", 0), ("sync", 0)):
        st = slowed_run(sub, mode, steps)
        assert sum(st.lag.values()) == 2 * steps, mode
        assert max(st.lag) <= bound, f"{mode}: {st}"
    if sub is not comm:
        sub.free()


@pytest.mark.mpi(min_size=3)
def test_resume_keeps_server_state(comm):
    """2 steps, gather (model + AdamW state + version), new trainers load it and take 2
    more: equal to the straight 4 steps to the bit. The gathered state also loads into an
    ordinary one-process trainer on every rank (a PS checkpoint in a normal run), which
    after the same 2 more steps equals the straight run within TOL (summation order)."""
    sub = comm if comm.size == 3 else comm.split(color=0 if comm.rank < 3 else None, key=comm.rank)
    if sub is None:
        return
    batches = _batches(4)
    straight, _ = run(sub, 1, "sync", optimizer="adamw",
                      batches=batches)
    want = straight.full_state_dict()
    free(straight)
    first, _ = run(sub, 1, "sync", optimizer="adamw",
                   batches=batches[:2])
    model, optim = first.full_state_dict(), first.full_optimizer_state()
    assert optim["step"] == 2
    free(first)
    second = ParamServerTrainer(sub, CONFIG, Layout(), spec("adamw"), servers=1, mode="sync",
                                dtype="float64")
    second.load_full(model, optim, 2)
    second.clock = 2
    run(sub, 1, trainer=second, batches=batches[2:])
    got = second.full_state_dict()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    free(second)
    # into an ordinary trainer: two more steps of the single process's
    solo = sub.split(color=sub.rank, key=0)
    plain = ParallelTrainer(solo, CONFIG, Layout(), spec("adamw"), dtype="float64")
    load_full_state_dict(plain.local, model)
    plain.load_full_optimizer_state(optim)
    for x, y in batches[2:]:
        plain.step(x, y, lr=LR)
    for name, ref in want.items():
        assert relative(plain.full_state_dict()[name], ref) <= TOL, name
    if sub is not comm:
        sub.free()


def test_modes_and_checks():
    assert parse_mode("sync").bound == 0 and parse_mode("async").bound is None
    assert parse_mode("ssp:3") == SSPMode(3) and parse_mode("ssp:3").bound == 3
    for bad in ("ssp", "ssp:-1", "ssp:x", "bsp", ""):
        with pytest.raises(ValueError, match="sync, async, ssp:S"):
            parse_mode(bad)
    assert ps_roles(5, 2) == ([0, 1, 2], [3, 4])
    ranges = server_ranges(10, 3)
    assert ranges == [(0, 3), (3, 6), (6, 10)]
    cases = [((3, 3, "sync", Layout()), "servers"), ((3, 0, "sync", Layout()), "servers"),
             ((3, 1, "ssp:x", Layout()), "mode"), ((4, 1, "sync", Layout(tp=2)), "tp"),
             ((4, 1, "sync", Layout(pp=2)), "pp"), ((3, 1, "sync", Layout(zero=1)), "zero"),
             ((3, 1, "sync", Layout(compress="fp16")), "compress")]
    for args, field in cases:
        with pytest.raises(PSConfigError) as e:
            check_ps(*args)
        assert e.value.field == field
    with pytest.raises(PSConfigError, match="does not split into 3 workers") as e:
        check_ps(4, 1, "sync", Layout(), batch_size=8)
    with pytest.raises(PSConfigError, match="rank 2 is not a worker") as e:
        check_ps(3, 1, "sync", Layout(), slow_rank=2)
    with pytest.raises(PSConfigError, match="slow factor 0.5") as e:
        check_ps(3, 1, "sync", Layout(), slow_factor=0.5)
    assert check_ps(3, 1, "async", Layout(), batch_size=8, slow_rank=1, slow_factor=2).name == "async"


def test_staleness_summary():
    st = Staleness.empty()
    for lag, upd in ((0, 0), (2, 3), (2, 1)):
        st.add(lag, upd)
    s = st.summary()
    assert s["lag"] == {"applied": 3, "max": 2, "mean": 4 / 3, "counts": {0: 1, 2: 2}}
    assert s["updates"]["max"] == 3 and math.isclose(s["updates"]["mean"], 4 / 3)
