"""python -m mpipar.train: train a byte-level GPT, on one process or data-parallel over MPI.

Examples::

    python -m mpipar.train                                 # default: about 1-2 min on 2 cores
    python -m mpipar.train --model tiny --steps 50 --log run.jsonl
    python -m mpipar.train --model shakespeare --data input.txt --device auto --sample 500
    python -m mpipar.train --steps 400 --save ck.safetensors
    python -m mpipar.train --steps 800 --resume ck.safetensors   # continues at step 400
    mpirun -n 8 python -m mpipar.train                     # chooses a layout itself, says which
    mpirun -n 8 python -m mpipar.train --dp 2 --tp 2 --pp 2 --micro-batches 4 --schedule 1f1b
    mpirun -n 4 python -m mpipar.train --dp 4 --zero 1 --bucket-mb 0.5 --allreduce ring

``--batch-size`` is the GLOBAL batch (sequences per optimiser step, as Megatron's global
batch size). Data-parallel rank r takes rows [r B/D, (r+1) B/D) of every global batch (see
mpipar.data.sampler), ``--grad-accum K`` cuts them into K accumulation steps and
``--micro-batches M`` each of those into M pipeline micro-batches, so every layout trains on
exactly the batches of the single-process run; only floating-point summation order
differs. A batch that does not divide is an error before any collective. With
``--dp/--tp/--pp`` (product = world size) the run uses mpipar.parallel; with several ranks
and no layout flags it picks one itself (data parallel first) and prints it.

Losses are nats per byte token; the final validation loss is also given in bits per byte
(loss / ln 2). Data: the pydoc help topics every CPython ships (``--data`` for a UTF-8 text
file, a 1-D ``.npy`` token array or a nanoGPT-style ``.bin`` of uint16).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import glob
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

from mpipar import backend, runtime
from mpipar.data import VOCAB_SIZE, BatchSampler, decode, load_tokens, split_train_val
from mpipar.data.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mpipar.optim import OPTIMIZERS, clip_grad_norm, cosine_lr

# The default run (no flags) is sized to use about a minute of this 2-core machine and to
# lower the validation loss visibly (measured on a quiet machine: 600 steps of 8 x 64 tokens
# take 48 s and bring the validation loss from 7.80 to 2.89 bits/byte).
DEFAULTS = dict(model="small", steps=600, batch_size=8, lr=2e-3, min_lr=2e-4, warmup=20,
                weight_decay=0.1, grad_clip=1.0, eval_interval=100, eval_batches=8)


class UsageError(ValueError):
    """A bad argument or input file, reported before any training (and any collective)."""


# ---------------------------------------------------------------------------- BLAS threads
@functools.lru_cache(maxsize=1)
def _openblas() -> Any:
    """NumPy's bundled OpenBLAS as a ctypes library, or None (then threads are not managed)."""
    libdir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libdir, "*openblas*.so*"))):
        with contextlib.suppress(OSError):
            return ctypes.CDLL(path)
    return None


_BLAS_SET = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
             "openblas_set_num_threads")
_BLAS_GET = ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
             "openblas_get_num_threads")


def blas_threads() -> int | None:
    """Threads NumPy's BLAS uses now (None where that cannot be asked)."""
    lib = _openblas()
    for name in _BLAS_GET if lib is not None else ():
        if hasattr(lib, name):
            return int(getattr(lib, name)())
    return None


def set_blas_threads(n: int) -> bool:
    """Use ``n`` threads per rank: NumPy's BLAS (set at run time; returns False where the BLAS
    is not OpenBLAS) and mpipar's blocked elementwise chains (GELU, softmax)."""
    from mpipar.nn import blocking  # noqa: PLC0415

    blocking.set_threads(n)
    lib = _openblas()
    for name in _BLAS_SET if lib is not None else ():
        if hasattr(lib, name):
            getattr(lib, name)(int(n))
            return True
    return False


# ---------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="python -m mpipar.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d["model"], help="preset: tiny | small | shakespeare ...")
    p.add_argument("--steps", type=int, default=d["steps"], help="optimiser steps in total")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="GLOBAL batch: sequences per optimiser step, over all ranks")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="pipeline micro-batches per accumulation step (one stage: a plain split)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="gradient-accumulation steps per optimiser step (one reduction per step)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel degree")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (adjacent ranks)")
    p.add_argument("--pp", type=int, default=None, help="pipeline stages")
    p.add_argument("--schedule", default="1f1b", choices=("gpipe", "1f1b"), help="pipeline schedule")
    p.add_argument("--stage-layers", default=None,
                   help="layers per pipeline stage, e.g. 3,3,2 (default: balanced by FLOPs)")
    p.add_argument("--bucket-mb", type=float, default=1.0, help="gradient bucket size in MiB")
    p.add_argument("--allreduce", default=None,
                   help="collective algorithm of the data-parallel group (native, ring, rhd, "
                        "tree, dbtree, ps, hier, auto)")
    p.add_argument("--zero", type=int, default=0, choices=(0, 1, 2),
                   help="ZeRO stage: 1 shards optimiser state, 2 also gradients")
    p.add_argument("--block-size", type=int, default=None, help="context length (preset's)")
    p.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=d["min_lr"], help="learning rate at the end")
    p.add_argument("--warmup", type=int, default=d["warmup"], help="linear warm-up steps")
    p.add_argument("--lr-decay-steps", type=int, default=None,
                   help="step where the cosine reaches --min-lr (default: --steps)")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--grad-clip", type=float, default=d["grad_clip"], help="0 disables")
    p.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZERS))
    p.add_argument("--seed", type=int, default=0, help="initialisation and batches")
    p.add_argument("--device", default="cpu", choices=backend.DEVICES)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    # One BLAS thread per rank by default: mpipar uses more cores through more ranks, and
    # OpenBLAS threads spin while they wait, so on a shared machine (or with more ranks than
    # cores) a second thread per rank made a small-model step 2.5x SLOWER (measured on 2
    # busy cores: 265 ms with 1 thread, 715 ms with 2).
    p.add_argument("--threads", type=int, default=1, help="BLAS threads per rank")
    p.add_argument("--eval-interval", type=int, default=d["eval_interval"],
                   help="steps between validation evaluations (0: only before and after)")
    p.add_argument("--eval-batches", type=int, default=d["eval_batches"],
                   help="global batches per validation estimate")
    p.add_argument("--data", default=None, help="text / .npy / .bin file (default: pydoc topics)")
    p.add_argument("--log", default=None, help="JSON-lines log file (rank 0)")
    p.add_argument("--sample", type=int, default=0, help="print N generated bytes at the end")
    p.add_argument("--save", default=None, help="checkpoint to write at the end")
    p.add_argument("--save-interval", type=int, default=0, help="also save every N steps")
    p.add_argument("--resume", default=None, help="checkpoint to continue from")
    return p


def validate(args: argparse.Namespace, presets: dict) -> None:
    if args.model not in presets:
        raise UsageError(f"--model {args.model!r} is not a preset; choose from "
                         f"{', '.join(sorted(presets))}")
    for name in ("steps", "batch_size", "micro_batches", "grad_accum", "eval_batches"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("warmup", "eval_interval", "save_interval", "sample"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
    if args.block_size is not None and args.block_size < 1:
        raise UsageError("--block-size must be >= 1")
    if args.threads < 1:
        raise UsageError("--threads must be >= 1")
    if not (args.lr > 0 and 0 <= args.min_lr <= args.lr):
        raise UsageError(f"need --lr > 0 and 0 <= --min-lr <= --lr, got {args.lr}, {args.min_lr}")
    if args.weight_decay < 0 or args.grad_clip < 0:
        raise UsageError("--weight-decay and --grad-clip must be >= 0")


# ---------------------------------------------------------------------------- helpers
def model_config(args: argparse.Namespace, presets: dict, vocab_size: int = VOCAB_SIZE) -> Any:
    """The preset, with --block-size and the data's vocabulary (256 bytes, or more for token
    files whose ids go beyond 255)."""
    cfg = presets[args.model]
    changes = {"vocab_size": vocab_size}
    if args.block_size is not None:
        changes["block_size"] = args.block_size
    return cfg.replace(**changes)


class Communication:
    """World communicator, or None-like behaviour for one process."""

    def __init__(self) -> None:
        self.comm = None
        self.rank, self.size = 0, 1
        if runtime.world_size() > 1:
            from mpipar.comm import make_communicator  # noqa: PLC0415  (initialises MPI)

            self.comm = make_communicator()
            self.rank, self.size = self.comm.rank, self.comm.size


def checkpoint_meta(args: argparse.Namespace, config: Any, step: int) -> dict:
    return {"format": "mpipar-checkpoint", "version": 1, "step": step, "model": args.model,
            "config": dataclasses.asdict(config), "optimizer": args.optimizer,
            "dtype": args.dtype, "seed": args.seed}


def save(path: str, model_sd: dict, optim_sd: dict, meta: dict) -> None:
    """One checkpoint: full model tensors under nanoGPT names and the optimiser's state as one
    process keeps it (``Optimizer.state_dict()``: ``step`` and ``<state>.<name>`` arrays)."""
    arrays = {f"model.{k}": backend.to_host(v) for k, v in model_sd.items()}
    arrays.update({f"optim.{k}": backend.to_host(v) for k, v in optim_sd.items() if k != "step"})
    save_checkpoint(path, arrays, {**meta, "optim_step": int(optim_sd["step"])})


def read_resume(path: str, args: argparse.Namespace, config: Any) -> tuple[dict, dict, dict]:
    """(model arrays, optimiser state, meta), checked against this run before any training."""
    try:
        arrays, meta = load_checkpoint(path)
    except CheckpointError as e:
        raise UsageError(f"--resume: {e}") from e
    if meta.get("config") != dataclasses.asdict(config):
        raise UsageError(f"--resume: {path!r} holds a model with config {meta.get('config')}, "
                         f"but this run builds {dataclasses.asdict(config)}")
    if meta.get("optimizer") != args.optimizer:
        raise UsageError(f"--resume: {path!r} was trained with --optimizer "
                         f"{meta.get('optimizer')}, not {args.optimizer}")
    model_sd = {k[6:]: v for k, v in arrays.items() if k.startswith("model.")}
    optim_sd = {k[6:]: v for k, v in arrays.items() if k.startswith("optim.")}
    optim_sd["step"] = int(meta["optim_step"])
    return model_sd, optim_sd, meta


class Progress:
    """tqdm bar on a terminal, else a plain line every ``every`` steps (rank 0 only)."""

    def __init__(self, start: int, total: int, enabled: bool) -> None:
        self.bar = None
        self.enabled = enabled
        self.every = max(1, (total - start) // 20)
        if enabled and sys.stdout.isatty():
            with contextlib.suppress(ImportError):
                from tqdm import tqdm  # noqa: PLC0415

                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                                file=sys.stdout)

    def update(self, step: int, total: int, loss: float, lr: float, tps: float, dt: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} | {tps:,.0f} tok/s", refresh=False)
            self.bar.update(1)
        elif (step + 1) % self.every == 0 or step + 1 == total:
            runtime.print0(f"step {step + 1:>6}/{total} | loss {loss:.4f} | lr {lr:.2e} | "
                           f"{tps:>9,.0f} tok/s | {dt * 1e3:7.1f} ms/step")

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            runtime.print0(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------- runners
class SingleRunner:
    """One process: the reference every parallel layout must reproduce."""

    def __init__(self, args: argparse.Namespace, config: Any, xp: Any, resume: Any) -> None:
        from mpipar.nn.gpt import GPT  # noqa: PLC0415

        self.args, self.xp = args, xp
        self.model = GPT(config, seed=args.seed, dtype=args.dtype, xp=xp)
        self.opt = OPTIMIZERS[args.optimizer](self.model.state_dict(), **optimizer_kwargs(args))
        self.start = 0
        if resume is not None:
            model_sd, optim_sd, meta = resume
            self.model.load_state_dict(model_sd)
            self.opt.load_state_dict(optim_sd)
            self.start = int(meta["step"])
        self.n_params = self.model.num_parameters()
        self.flops_per_token = self.model.flops_per_token()

    def describe(self) -> str:
        return "1 process"

    def step(self, sampler: BatchSampler, step: int, lr: float) -> float:
        xp, M = self.xp, self.args.micro_batches * self.args.grad_accum
        loss = 0.0
        for m in range(M):
            x, y = sampler.batch(step, 0, 1, m, M)
            # dloss = 1/M: the accumulated gradient is the mean over micro-batches
            loss_m, grads = self.model.loss_and_grads(xp.asarray(x), xp.asarray(y),
                                                      accumulate=m > 0, dloss=1.0 / M)
            loss += loss_m / M
        clip_grad_norm(self.model.grads, self.args.grad_clip)
        self.opt.step(self.model.grads, lr=lr)
        backend.synchronize(xp)
        return loss

    def evaluate(self, sampler: BatchSampler, n_batches: int) -> float:
        total = 0.0
        self.model.eval()                                  # dropout off
        for k in range(n_batches):
            x, y = sampler.batch(k, 0, 1)
            _, loss, _ = self.model.forward(self.xp.asarray(x), self.xp.asarray(y))
            total += float(loss)
        self.model.train()
        return total / n_batches

    def generator(self) -> Any:
        return self.model

    def save(self, path: str, meta: dict) -> None:
        save(path, self.model.state_dict(), self.opt.state_dict(), meta)


class ParallelRunner:
    """Any dp x tp x pp layout through mpipar.parallel.trainer.ParallelTrainer."""

    def __init__(self, args: argparse.Namespace, config: Any, xp: Any, resume: Any, comm: Any,
                 layout: tuple[int, int, int], why: str) -> None:
        from mpipar.parallel.model import load_full_state_dict  # noqa: PLC0415
        from mpipar.parallel.trainer import ParallelTrainer  # noqa: PLC0415

        self.args, self.xp, self.comm, self.why = args, xp, comm, why
        dp, tp, pp = layout
        self.trainer = ParallelTrainer(
            comm, config, dp=dp, tp=tp, pp=pp, seed=args.seed, dtype=args.dtype, xp=xp,
            micro_batches=args.micro_batches, schedule=args.schedule, grad_accum=args.grad_accum,
            bucket_mb=args.bucket_mb, allreduce=args.allreduce, zero=args.zero,
            optimizer=args.optimizer, grad_clip=args.grad_clip, stage_layers=args.stage_layers,
            **optimizer_kwargs(args))
        self.mesh = self.trainer.mesh
        self.config = config
        self.start = 0
        if resume is not None:
            model_sd, optim_sd, meta = resume
            try:  # local on every rank: the same file fails the same way everywhere
                load_full_state_dict(self.trainer.local, model_sd)
                self.trainer.load_full_optimizer_state(optim_sd)
            except (KeyError, ValueError) as e:
                raise UsageError(f"--resume: {e.args[0] if e.args else e}") from e
            self.start = int(meta["step"])
        from mpipar.nn.gpt import count_parameters, flops_per_token  # noqa: PLC0415

        self.n_params = count_parameters(config)
        self.flops_per_token = flops_per_token(config)

    def describe(self) -> str:
        m = self.mesh
        return (f"{m.dp * m.tp * m.pp} ranks as dp={m.dp} x tp={m.tp} x pp={m.pp} ({self.why}); "
                f"schedule {self.args.schedule}, {self.args.micro_batches} micro-batches, "
                f"grad-accum {self.args.grad_accum}, buckets {self.args.bucket_mb:g} MiB, "
                f"all-reduce {self.args.allreduce or 'native'}, ZeRO {self.args.zero}\n"
                f"{m}")

    def step(self, sampler: BatchSampler, step: int, lr: float) -> float:
        m = self.mesh
        x, y = sampler.batch(step, m.dp_rank, m.dp)
        return self.trainer.step(x, y, lr=lr).loss

    def evaluate(self, sampler: BatchSampler, n_batches: int) -> float:
        m = self.mesh
        total = 0.0
        for k in range(n_batches):
            x, y = sampler.batch(k, m.dp_rank, m.dp)
            total += self.trainer.evaluate(x, y)
        return total / n_batches

    def generator(self) -> Any:
        """A single-process GPT with the trained weights, on world rank 0 (None elsewhere)."""
        from mpipar.nn.gpt import GPT  # noqa: PLC0415

        sd = self.trainer.full_state_dict()       # collective: every rank calls it
        if self.comm.rank != 0:
            return None
        model = GPT(self.config, seed=self.args.seed, dtype=self.args.dtype, xp=self.xp)
        model.load_state_dict(sd)
        return model

    def save(self, path: str, meta: dict) -> None:
        """The same file one process writes (full tensors, nanoGPT names), whatever the
        layout: any layout, or one process, resumes from it."""
        sd = self.trainer.full_state_dict()       # collective
        osd = self.trainer.full_optimizer_state()  # collective
        if self.comm.rank == 0:
            save(path, sd, osd, meta)


def optimizer_kwargs(args: argparse.Namespace) -> dict:
    kw: dict[str, Any] = dict(lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == "adamw":
        kw["betas"] = (0.9, 0.95)
    return kw


def choose_runner_layout(args: argparse.Namespace, W: int, config: Any) -> tuple[tuple, str] | None:
    """None for the single-process path; else ((dp, tp, pp), why). Raises UsageError for a
    layout that does not fit the world, the model or the batch, on every rank alike."""
    from mpipar.parallel.mesh import LayoutError, check_layout  # noqa: PLC0415
    from mpipar.parallel.trainer import check_batch, choose_layout  # noqa: PLC0415

    given = [args.dp, args.tp, args.pp]
    if W == 1 and all(v is None for v in given) and not args.zero:
        return None
    try:
        if all(v is None for v in given):
            dp, tp, pp, why = choose_layout(W, config, args.batch_size, args.micro_batches,
                                            args.grad_accum)
            why = "chosen automatically: " + why
        else:
            # as Megatron: --tp and --pp default to 1, --dp to what the world leaves
            tp, pp = args.tp or 1, args.pp or 1
            dp = args.dp if args.dp is not None else max(W // (tp * pp), 1)
            why = "as given"
        check_layout(W, dp, tp, pp)
        check_batch(args.batch_size, dp, args.grad_accum, args.micro_batches)
        if tp > 1 or pp > 1:
            from mpipar.parallel.model import check_model_layout  # noqa: PLC0415

            check_model_layout(config, tp, pp)
    except LayoutError as e:
        raise UsageError(str(e)) from e
    return (dp, tp, pp), why


# ---------------------------------------------------------------------------- training
def train(args: argparse.Namespace) -> dict:
    """Run training as ``args`` say; returns {"val_loss_before", "val_loss", "steps", ...}."""
    from mpipar.nn.gpt import PRESETS  # noqa: PLC0415  (keeps --help fast)

    validate(args, PRESETS)
    comm = Communication()
    W, rank = comm.size, comm.rank
    try:
        xp = backend.get_xp(args.device)
    except RuntimeError as e:
        raise UsageError(str(e)) from e
    threads = args.threads
    set_blas_threads(threads)
    try:
        tokens = load_tokens(args.data)
    except (OSError, ValueError) as e:
        raise UsageError(f"--data: {e}") from e
    if int(tokens.min()) < 0:
        raise UsageError("--data holds negative token ids")
    config = model_config(args, PRESETS, max(VOCAB_SIZE, int(tokens.max()) + 1))
    chosen = choose_runner_layout(args, W, config)   # every check before any collective
    if chosen is None and args.batch_size % (args.micro_batches * args.grad_accum):
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by --grad-accum "
                         f"{args.grad_accum} x --micro-batches {args.micro_batches}")
    train_tokens, val_tokens = split_train_val(tokens)
    T, B = config.block_size, args.batch_size
    try:
        train_s = BatchSampler(train_tokens, B, T, seed=args.seed, stream=0)
        val_s = BatchSampler(val_tokens, B, T, seed=args.seed, stream=1)
    except ValueError as e:
        raise UsageError(str(e)) from e
    resume = read_resume(args.resume, args, config) if args.resume else None

    if chosen is None:
        runner: Any = SingleRunner(args, config, xp, resume)
    else:
        runner = ParallelRunner(args, config, xp, resume, comm.comm, *chosen)
    start = runner.start
    decay_steps = args.lr_decay_steps or args.steps
    meta = checkpoint_meta(args, config, start)

    runtime.print0(
        f"mpipar.train | model {args.model}: {config.n_layer} layers, {config.n_head} heads, "
        f"width {config.n_embd}, block {T}, vocab {config.vocab_size} | {runner.n_params:,} parameters\n"
        f"  layout: {runner.describe()}\n"
        f"  global batch {B} x {T} = {B * T:,} tokens/step | grad-accum {args.grad_accum} x "
        f"micro-batches {args.micro_batches}\n"
        f"  device {backend.device_name(xp)} | dtype {args.dtype} | BLAS threads per rank "
        f"{blas_threads() or threads} | {args.optimizer} lr {args.lr:g} -> {args.min_lr:g} "
        f"(warm-up {args.warmup}, cosine to step {decay_steps}) | steps {start} -> {args.steps}\n"
        f"  data {args.data or 'pydoc topics'}: {len(train_tokens):,} train / "
        f"{len(val_tokens):,} val tokens | {runner.flops_per_token * B * T / 1e9:.2f} "
        f"GFLOP/step")

    log = open(args.log, "a" if args.resume else "w") if (args.log and rank == 0) else None

    def record(entry: dict) -> None:
        if log is not None:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    val_before = runner.evaluate(val_s, args.eval_batches)
    record({"step": start, "val_loss": val_before})
    runtime.print0(f"step {start}: val loss {val_before:.4f} ({val_before / math.log(2):.3f} "
                   f"bits/byte)")
    progress = Progress(start, args.steps, rank == 0)
    t_start = time.perf_counter()
    val_loss, loss = val_before, float("nan")
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        lr = cosine_lr(step, args.lr, args.min_lr, args.warmup, decay_steps)
        loss = runner.step(train_s, step, lr)
        dt = time.perf_counter() - t0
        tps = B * T / dt
        record({"step": step, "loss": loss, "lr": lr, "tokens_per_s": tps,
                "time": time.perf_counter() - t_start})
        progress.update(step, args.steps, loss, lr, tps, dt)
        done = step + 1
        if args.eval_interval and done % args.eval_interval == 0 and done < args.steps:
            val_loss = runner.evaluate(val_s, args.eval_batches)
            record({"step": done, "val_loss": val_loss})
            progress.write(f"step {done}: val loss {val_loss:.4f}")
        if args.save and args.save_interval and done % args.save_interval == 0:
            runner.save(args.save, {**meta, "step": done})
    progress.close()
    elapsed = time.perf_counter() - t_start

    if args.steps > start:
        val_loss = runner.evaluate(val_s, args.eval_batches)
        record({"step": args.steps, "val_loss": val_loss})
    if args.save:
        runner.save(args.save, {**meta, "step": max(start, args.steps)})
        runtime.print0(f"saved {args.save}")
    if log is not None:
        log.close()
    bpb = 1.0 / math.log(2)
    runtime.print0(f"done: {args.steps - start} steps in {elapsed:.1f} s | val loss "
                   f"{val_before:.4f} -> {val_loss:.4f} nats = {val_before * bpb:.3f} -> "
                   f"{val_loss * bpb:.3f} bits/byte")
    if args.sample:
        model = runner.generator()                 # collective for parallel layouts
        if model is not None:
            prompt = xp.asarray(np.array([[10]], dtype=np.int64))   # a newline
            out = model.generate(prompt, args.sample, temperature=0.8, top_k=None, seed=args.seed)
            new = backend.to_host(out)[0, 1:]
            text = decode(new) if config.vocab_size == VOCAB_SIZE else " ".join(map(str, new))
            runtime.print0("--- sample ---\n" + text)
    return {"val_loss_before": val_before, "val_loss": val_loss, "last_loss": loss,
            "steps": args.steps - start, "seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    """The command line (``python -m mpipar.train``), callable in-process: returns 0 or 2."""
    runtime.install_abort_handler()
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        train(args)
    except UsageError as e:
        runtime.print0(f"mpipar.train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
