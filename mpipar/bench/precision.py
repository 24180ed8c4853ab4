"""python -m mpipar.bench precision: fp32 beside bf16 and fp16 mixed precision, in one run.

Examples::

    python -m mpipar.bench precision                         # mpipar.train's default model
    mpiexec -n 2 python -m mpipar.bench precision            # dp=2: bytes counted on the wire
    python -m mpipar.bench precision --model tiny --steps 40 --json out.json

Each precision trains the same GPT (mpipar.train's default model, ``--model``, from the same
seed, on the same batches of the default corpus, AdamW with mpipar.train's defaults and
cosine schedule) for ``--steps`` steps, then reports, beside fp32's and as ratios to it:

* gradient bytes per step on the wire: the trainer's ``CommStats`` of the data-parallel
  reduction, counted as it is handed to the collectives, at dp = the world size (under
  mpiexec); in one process nothing is sent, and the column is the bytes the gradient buffer
  would hand to the reduction (its size in its dtype, or fp32's with --grad-reduce-dtype
  fp32), marked "(would be)";
* step time: the median of the training steps after the first two;
* memory per rank by kind: ``memory_report`` (parameters, gradients, optimiser state with the
  fp32 masters), and the activations as ``bench.parallel.ActivationMeter`` measures them
  (the peak bytes the stages' caches hold during one step); "p+g+a" is parameters +
  gradients + activations + the masters (the goal's sum: master weights counted);
* the validation loss after the steps (``--eval-batches`` batches of the validation part),
  and after a fixed wall time: T = fp32's training time for the steps, and for each
  precision the loss of its last evaluation (after every ``--eval-every`` steps, untimed)
  within T of its own training (``bench.report.loss_within``): a slower precision has taken
  fewer steps by then.

The goals of issue 16 are printed under the table: bytes halved, p+g+a at most 0.6x fp32's,
validation loss within 3%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np

from mpipar import backend
from mpipar.bench.parallel import ActivationMeter
from mpipar.bench.report import eval_steps, loss_within
from mpipar.comm import make_communicator
from mpipar.data import BatchSampler, load_tokens, split_train_val, vocab_size_of
from mpipar.nn.attention import causal_mask
from mpipar.nn.gpt import PRESETS
from mpipar.optim import PRECISIONS, OptimizerSpec, cosine_lr
from mpipar.parallel.data_parallel import REDUCE_DTYPES
from mpipar.parallel.layout import Layout
from mpipar.parallel.trainer import ParallelTrainer
from mpipar.runtime import print0

# mpipar.train's defaults for the model and its training (a command line, a layer above this
# one, so not imported: tests/bench/test_bench_precision.py checks that they agree)
DEFAULTS = dict(model="small", batch_size=8, lr=2e-3, min_lr=2e-4, warmup=20, weight_decay=0.1,
                grad_clip=1.0, eval_batches=8)
GOALS = {"bytes": 0.5, "p+g+a": 0.6, "val_loss": 0.03}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULTS["model"], choices=sorted(PRESETS),
                   help="preset (default: mpipar.train's)")
    p.add_argument("--steps", type=int, default=100, help="training steps per precision")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help="global batch (sequences)")
    p.add_argument("--block-size", type=int, default=None, help="context (preset's)")
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help="comma-separated, fp32 first (the baseline)")
    p.add_argument("--grad-reduce-dtype", default="grad", choices=tuple(REDUCE_DTYPES))
    p.add_argument("--eval-batches", type=int, default=DEFAULTS["eval_batches"])
    p.add_argument("--eval-every", type=int, default=10,
                   help="steps between the evaluations that give the loss after fp32's "
                        "training time (0: the end only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows here (rank 0)")


def _train(world: Any, config: Any, precision: str, args: argparse.Namespace,
           train: BatchSampler, val: BatchSampler) -> dict[str, Any]:
    d = DEFAULTS
    tr = ParallelTrainer(world, config, Layout(dp=world.size),
                         OptimizerSpec("adamw", lr=d["lr"], weight_decay=d["weight_decay"]),
                         seed=args.seed, precision=precision, grad_clip=d["grad_clip"],
                         grad_reduce_dtype=args.grad_reduce_dtype if precision != "fp32" else "grad")
    mesh, local = tr.mesh, tr.local
    exclude = [local.param_buffer, local.grad_buffer,
               causal_mask(config.block_size, local.param_buffer.dtype, tr.xp)]
    times, wire, skipped = [], [], 0
    meter = None
    evals, at = {}, eval_steps(args.steps, args.eval_every)

    def val_loss() -> float:
        return float(np.mean([tr.evaluate(*val.batch(k, mesh.dp_rank, mesh.dp))
                              for k in range(args.eval_batches)]))

    for s in range(args.steps):
        if s in at:         # untimed: evaluation is not training time
            evals[s] = val_loss()
        if s == 1:          # the second step, its buffers made: what caches hold at their peak
            meter = ActivationMeter(list(tr.pipe.stages), exclude)
        x, y = train.batch(s, mesh.dp_rank, mesh.dp)
        lr = cosine_lr(s, d["lr"], d["min_lr"], d["warmup"], args.steps)
        world.barrier()
        t0 = time.perf_counter()
        r = tr.step(x, y, lr=lr)
        times.append(time.perf_counter() - t0)
        if meter is not None:
            meter.remove()
            activations, meter = int(meter.peak), None
        wire.append(r.comm.bytes)
        skipped += r.skipped
    evals[args.steps] = val_loss()
    mem = tr.memory_report()
    master = 4 * local.layout.numel if precision != "fp32" else 0   # in optimizer_state
    if world.size > 1:
        per_step, counted = statistics.median(wire), True
    else:
        itemsize = 4 if args.grad_reduce_dtype == "fp32" and precision != "fp32" else \
            local.grad_buffer.itemsize
        per_step, counted = local.layout.numel * itemsize, False
    slowest = [float(world.allreduce(np.array([t]), op="max")[0]) for t in times]
    tr.close()
    return {"precision": precision, "bytes_per_step": int(per_step), "bytes_counted": counted,
            "step_ms": 1e3 * statistics.median(slowest[2:] or slowest),
            "params": mem["params"], "grads": mem["grads"],
            "optimizer": mem["optimizer_state"], "master": master, "activations": activations,
            "pga": mem["params"] + mem["grads"] + activations + master,
            "val_loss": evals[args.steps], "skipped": int(skipped),
            "step_seconds": slowest, "evals": evals}


def _table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]
    mib = 2 ** 20
    head = (f"{'precision':<9} {'grad bytes/step':>16} {'x':>5} {'ms/step':>8} {'x':>5} "
            f"{'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'p+g+a':>7} {'x':>5} "
            f"{'val loss':>8} {'x':>6} {'skipped':>7} {'steps@T':>7} {'loss@T':>9} {'x':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = "" if r["bytes_counted"] else "*"
        lines.append(
            f"{r['precision']:<9} {r['bytes_per_step'] / mib:>14.2f}M{mark:1} "
            f"{r['bytes_per_step'] / base['bytes_per_step']:>5.2f} {r['step_ms']:>8.1f} "
            f"{r['step_ms'] / base['step_ms']:>5.2f} {r['params'] / mib:>6.2f}M "
            f"{r['grads'] / mib:>6.2f}M {r['optimizer'] / mib:>6.2f}M {r['activations'] / mib:>6.2f}M "
            f"{r['pga'] / mib:>6.2f}M {r['pga'] / base['pga']:>5.2f} {r['val_loss']:>8.4f} "
            f"{r['val_loss'] / base['val_loss']:>6.3f} {r['skipped']:>7} "
            f"{r['steps_in_budget']:>7} {r['val_loss_in_budget']:>9.4f} "
            f"{r['val_loss_in_budget'] / base['val_loss_in_budget']:>6.3f}")
    if not base["bytes_counted"]:
        lines.append("* one process sends nothing: the bytes its gradient buffer would hand to "
                     "the dp reduction")
    lines.append("MiB per rank; optim = AdamW moments + fp32 masters; p+g+a = params + grads + "
                 "activations + masters")
    lines.append(f"T = fp32's training time, {base['budget_s']:.1f} s: steps@T, loss@T = the "
                 f"last evaluation (every --eval-every steps) within T of training")
    for r in rows[1:]:
        ok = {"bytes": r["bytes_per_step"] / base["bytes_per_step"] <= GOALS["bytes"],
              "p+g+a": r["pga"] / base["pga"] <= GOALS["p+g+a"],
              "val_loss": abs(r["val_loss"] / base["val_loss"] - 1) <= GOALS["val_loss"]}
        lines.append(f"goals {r['precision']}: bytes <= 0.5x {'met' if ok['bytes'] else 'NOT met'}"
                     f", p+g+a <= 0.6x {'met' if ok['p+g+a'] else 'NOT met'}, val loss within "
                     f"3% {'met' if ok['val_loss'] else 'NOT met'}")
    return "\n".join(lines)


def main(args: argparse.Namespace, comm: Any = None) -> int:
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions or precisions[0] != "fp32":
        raise SystemExit(f"--precisions {args.precisions!r}: a comma-separated list of "
                         f"{', '.join(PRECISIONS)}, fp32 first (the baseline)")
    backend.set_cpu_threads(1)
    world = comm if comm is not None else make_communicator()
    tokens = load_tokens(None)
    config = PRESETS[args.model].replace(vocab_size=vocab_size_of(tokens))
    if args.block_size:
        config = config.replace(block_size=args.block_size)
    train_tokens, val_tokens = split_train_val(tokens)
    train = BatchSampler(train_tokens, args.batch_size, config.block_size, seed=args.seed, stream=0)
    val = BatchSampler(val_tokens, args.batch_size, config.block_size, seed=args.seed, stream=1)
    print0(f"mpipar.bench precision | model {args.model} ({config.n_layer} layers, width "
           f"{config.n_embd}, block {config.block_size}) | batch {args.batch_size} | "
           f"{args.steps} steps | dp {world.size} | grad reduce dtype {args.grad_reduce_dtype}")
    rows = [_train(world, config, p, args, train, val) for p in precisions]
    budget = sum(rows[0]["step_seconds"])       # fp32's training time: the fixed wall time
    for r in rows:
        r["budget_s"] = budget
        r["steps_in_budget"], r["val_loss_in_budget"] = loss_within(r.pop("step_seconds"),
                                                                    r["evals"], budget)
    print0(_table(rows))
    if args.json and world.rank == 0:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "steps": args.steps, "batch_size": args.batch_size,
                       "dp": world.size, "rows": rows}, f, indent=1)
    return 0
