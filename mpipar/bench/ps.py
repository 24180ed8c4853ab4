"""Parameter-server training with a slowed worker: sync vs async vs ssp:S, beside all-reduce
data parallelism over the same workers, measured in one run.

    mpiexec -n 3 python -m mpipar.bench ps                       # 1 server + 2 workers, worker 1 2x slow
    mpiexec -n 3 python -m mpipar.bench ps --steps 60 --ssp 1,4 --json ps.json
    mpiexec -n 5 python -m mpipar.bench ps --servers 2 --model small --batch-size 12

Each configuration trains the same model from the same seed on the same global batches
(worker w of W takes rows [w B/W, (w+1) B/W) of batch c at its step c) for ``--steps`` steps
per worker, AdamW at ``--lr`` (constant), one after the other on the same world; worker
``--slow-rank`` sleeps (``--slow-factor`` - 1) times its compute time every step
(``param_server.Slowdown``; under all-reduce after its step, whose time is then its compute
plus its wait for the others). The all-reduce baseline is ``ParallelTrainer`` with dp = W
on the worker ranks; the servers wait in a barrier meanwhile.

Columns, per configuration:

* ``step ms``: median over the timed steps (after ``--warmup``) of each worker's step
  (compute, sleep, push and pull), the list over workers;
* ``samples/s``: sum over workers of (B / W) / its median step: the rate the workers
  process samples while all of them run; ``x sync``: that over sync's;
* ``wall s`` and ``wall samples/s``: until the last worker's last step, and B x steps over it
  (every worker takes ``--steps`` steps, so a fast worker that runs ahead then waits: this
  rate cannot beat the slowed worker's);
* ``val loss`` after the steps (``--eval-batches`` global batches) and ``vs sync``: its
  relative difference from sync's (the loss-vs-steps penalty of staleness);
* ``lag max/mean``: the staleness in clocks of the applied gradients (SSP's bound is S),
  ``upd max``: in missed updates;
* ``cpu%``: per rank, CPU seconds (``time.process_time``) over wall seconds of the run: what
  a rank takes from the machine's cores (a sleeping server or slowed worker takes little).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import numpy as np

from mpipar import backend, runtime
from mpipar.bench.collectives import header
from mpipar.comm import make_communicator
from mpipar.data import BatchSampler, load_tokens, split_train_val
from mpipar.nn.gpt import PRESETS
from mpipar.optim import OptimizerSpec
from mpipar.parallel.layout import Layout
from mpipar.parallel.param_server import ParamServerTrainer, Slowdown, check_ps, ps_roles
from mpipar.parallel.trainer import ParallelTrainer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="preset (tiny, small, shakespeare)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=30, help="steps per worker")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--ssp", default="2", help="staleness bounds S to run, comma-separated")
    p.add_argument("--slow-rank", type=int, default=1, help="the slowed worker (-1: none)")
    p.add_argument("--slow-factor", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    p.add_argument("--json", default=None, help="write every measurement here (rank 0)")


def _cpu_share(world: Any, t_wall: float, t_cpu: float) -> list[float]:
    return [float(x) for x in world.allgather_json((time.process_time() - t_cpu)
                                                     / max(time.perf_counter() - t_wall, 1e-9))]


def _run_ps(world: Any, args: argparse.Namespace, config: Any, mode: str, train: BatchSampler,
            val: BatchSampler) -> dict:
    slow = args.slow_rank if args.slow_rank >= 0 else None
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    ps = ParamServerTrainer(world, config, Layout(), OptimizerSpec("adamw", lr=args.lr),
                            servers=args.servers, mode=mode, seed=args.seed, dtype=args.dtype,
                            slow_rank=slow, slow_factor=args.slow_factor if slow is not None else 1.0)
    world.barrier()
    t0, times = time.perf_counter(), []
    for step in range(args.steps):
        x, y = train.batch(step, ps.mesh.dp_rank, ps.mesh.dp)
        s0 = time.perf_counter()
        ps.step(x, y, lr=args.lr)
        times.append(time.perf_counter() - s0)
    done = time.perf_counter() - t0        # this rank's last step (a server: its serving)
    val_loss = sum(ps.evaluate(*val.batch(k, ps.mesh.dp_rank, ps.mesh.dp))
                   for k in range(args.eval_batches)) / args.eval_batches
    st = ps.staleness_summary().summary()
    cpu = _cpu_share(world, t_wall, t_cpu)
    rows = world.allgather_json([ps.is_server, times, done])
    ps.close()
    if ps.inner is not None:
        ps.inner.close()
    return _row(f"ps {mode}", args, rows, val_loss, cpu, st)


def _run_allreduce(world: Any, args: argparse.Namespace, config: Any, train: BatchSampler,
                   val: BatchSampler) -> dict:
    workers, _ = ps_roles(world.size, args.servers)
    W = len(workers)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    group = world.split(color=0 if world.rank < W else None, key=world.rank)
    times, done, val_loss = [], 0.0, 0.0
    if group is not None:
        tr = ParallelTrainer(group, config, Layout(dp=W), OptimizerSpec("adamw", lr=args.lr),
                             seed=args.seed, dtype=args.dtype)
        slow = Slowdown(args.slow_factor if world.rank == args.slow_rank else 1.0)
        group.barrier()
        t0 = time.perf_counter()
        for step in range(args.steps):
            x, y = train.batch(step, tr.mesh.dp_rank, W)
            s0 = time.perf_counter()
            tr.step(x, y, lr=args.lr)
            slow.after(time.perf_counter() - s0)
            times.append(time.perf_counter() - s0)
        done = time.perf_counter() - t0
        val_loss = sum(tr.evaluate(*val.batch(k, tr.mesh.dp_rank, W))
                       for k in range(args.eval_batches)) / args.eval_batches
        tr.close()
        group.free()
    world.barrier()                     # the servers wait here (MPI's waits back off)
    val_loss = float(world.allreduce(np.array([val_loss if world.rank == 0 else 0.0]))[0])
    cpu = _cpu_share(world, t_wall, t_cpu)
    rows = world.allgather_json([world.rank >= W, times, done])
    return _row(f"all-reduce dp={W}", args, rows, val_loss, cpu, None)


def _row(name: str, args: argparse.Namespace, rows: list, val_loss: float, cpu: list[float],
         staleness: dict | None) -> dict:
    W = sum(1 for server, _, _ in rows if not server)
    medians = [statistics.median(t[args.warmup:] or t) for server, t, _ in rows if not server]
    wall = max(d for server, _, d in rows if not server)
    return {"name": name, "step_ms": [m * 1e3 for m in medians],
            "samples_per_s": sum(args.batch_size / W / m for m in medians),
            "wall_s": wall, "wall_samples_per_s": args.batch_size * args.steps / wall,
            "val_loss": val_loss, "staleness": staleness, "cpu_share": cpu,
            "step_s": [t for server, t, _ in rows if not server]}


def main(args: argparse.Namespace, comm: Any = None) -> int:
    backend.set_cpu_threads(args.threads)
    world = comm if comm is not None else make_communicator()
    config = PRESETS[args.model].replace(block_size=args.block_size)
    modes = ["sync", "async"] + [f"ssp:{s.strip()}" for s in args.ssp.split(",") if s.strip()]
    slow = args.slow_rank if args.slow_rank >= 0 else None
    try:
        for m in modes:
            check_ps(world.size, args.servers, m, Layout(), args.batch_size, slow,
                     args.slow_factor)
    except ValueError as e:
        runtime.print0(f"bench ps: {e}")
        return 2
    tokens = load_tokens(None)
    train_tokens, val_tokens = split_train_val(tokens)
    config = config.replace(vocab_size=256)
    train = BatchSampler(train_tokens, args.batch_size, args.block_size, seed=args.seed, stream=0)
    val = BatchSampler(val_tokens, args.batch_size, args.block_size, seed=args.seed, stream=1)
    meta = {**header(world), "loadavg_start": list(os.getloadavg()), "cores": os.cpu_count(),
            "args": vars(args) | {"_main": None}}
    W = world.size - args.servers
    runtime.print0(f"bench ps | {args.model}, B={args.batch_size} T={args.block_size} "
                   f"{args.dtype}, AdamW lr {args.lr:g}, {args.steps} steps per worker | "
                   f"{W} workers + {args.servers} server(s) = {world.size} ranks on "
                   f"{os.cpu_count()} cores | worker {args.slow_rank} slowed "
                   f"{args.slow_factor:g}x | {meta['mpi_library'].splitlines()[0]}")
    results = [_run_allreduce(world, args, config, train, val)]
    for m in modes:
        results.append(_run_ps(world, args, config, m, train, val))
    sync = next(r for r in results if r["name"] == "ps sync")
    lines = [f"{'config':<18} {'step ms (per worker)':>22} {'samples/s':>10} {'x sync':>7} "
             f"{'wall s':>7} {'wall smp/s':>10} {'val loss':>9} {'vs sync':>8} "
             f"{'lag max/mean':>13} {'upd max':>8}  cpu% per rank"]
    for r in results:
        st = r["staleness"]
        lag = f"{st['lag']['max']}/{st['lag']['mean']:.2f}" if st else "-"
        upd = f"{st['updates']['max']}" if st else "-"
        lines.append(f"{r['name']:<18} {' '.join(f'{m:.1f}' for m in r['step_ms']):>22} "
                     f"{r['samples_per_s']:>10.1f} {r['samples_per_s'] / sync['samples_per_s']:>7.2f} "
                     f"{r['wall_s']:>7.2f} {r['wall_samples_per_s']:>10.1f} {r['val_loss']:>9.4f} "
                     f"{100 * (r['val_loss'] / sync['val_loss'] - 1):>+7.2f}% {lag:>13} {upd:>8}  "
                     + " ".join(f"{100 * c:.0f}" for c in r["cpu_share"]))
    best = max((r for r in results if r["name"] != "ps sync" and r["name"].startswith("ps")),
               key=lambda r: r["samples_per_s"])
    lines.append(f"goal: async/SSP samples/s >= 1.5x sync's with worker {args.slow_rank} "
                 f"{args.slow_factor:g}x slow: best {best['name']} "
                 f"{best['samples_per_s'] / sync['samples_per_s']:.2f}x "
                 f"({'met' if best['samples_per_s'] >= 1.5 * sync['samples_per_s'] else 'missed'}), "
                 f"val loss {100 * (best['val_loss'] / sync['val_loss'] - 1):+.2f}% vs sync")
    runtime.print0("\n".join(lines))
    if args.json and world.rank == 0:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    return 0
