"""python -m mpipar.train: train a byte-level GPT on one process or any dp x tp x pp layout.

Examples::

    python -m mpipar.train                                 # default: about 1-2 min on 2 cores
    python -m mpipar.train --model tiny --steps 50 --log run.jsonl
    python -m mpipar.train --model shakespeare --data input.txt --device auto --sample 500
    python -m mpipar.train --steps 400 --lr-decay-steps 800 --ckpt-dir ck   # first leg
    python -m mpipar.train --steps 800 --resume ck     # steps 400..799: the straight run's
    python -m mpipar.train --steps 800 --ckpt-dir ck --ckpt-every 100 --resume auto  # requeue
    python -m mpipar.train --steps 50 --export gpt.safetensors   # one file, nanoGPT names
    mpirun -n 8 python -m mpipar.train                     # chooses a layout itself, says which
    mpirun -n 8 python -m mpipar.train --dp 2 --tp 2 --pp 2 --micro-batches 4 --schedule 1f1b
    mpirun -n 4 python -m mpipar.train --dp 4 --zero 1 --bucket-mb 0.5 --allreduce ring

``--batch-size`` is the GLOBAL batch (sequences per optimiser step, as Megatron's global
batch size). Data-parallel rank r takes rows [r B/D, (r+1) B/D) of every global batch (see
mpipar.data.sampler), ``--grad-accum K`` cuts them into K accumulation steps and
``--micro-batches M`` each of those into M pipeline micro-batches, so every layout trains on
exactly the batches of the single-process run; only floating-point summation order
differs. One process is the layout 1 x 1 x 1 of the same trainer, so every flag means the
same on one rank as on many. With several ranks and no layout flags the layout is chosen
(data parallel first) and printed.

Checkpoints (``--ckpt-dir``) are sharded: every rank writes what it owns, and any layout
resumes from them (see docs/training.md, "Checkpoints"). A resumed run keeps the saved
learning-rate horizon unless ``--lr-decay-steps`` is given, and refuses a changed seed,
data, batch, dtype, optimiser or schedule unless ``--resume-override`` names it. With a
lossy ``--compress`` the checkpoint holds every rank's error-feedback residuals; a resume
restores them under the same scheme, world and bucket layout, and refuses another unless
``--resume-override compression`` (residuals start at zero).

Every check of the flags, the data, the layout, a checkpoint to resume and the output files
happens before MPI is started: bad input ends with one ``mpipar.train: error: ...`` line from
rank 0 and exit code 2, never a traceback.

SIGTERM, SIGINT and SIGUSR1 (``sbatch --signal=B:USR1@120``) ask the run to stop: every rank
agrees at the next step boundary, a checkpoint is written to ``--ckpt-dir``, rank 0 says
where and how to resume, and the run exits. A second signal (more than a second after the
first) exits at once. A loss or gradient norm that is not finite stops the run before the
update, naming the step and the first tensor affected.

Exit status: 0 the run finished, or it was stopped by a signal and its checkpoint is saved
(``--preempt-status N`` to tell the two apart, as slurm/train.sbatch does); 2 bad input,
nothing trained; 3 a non-finite loss or gradient (nothing of that step applied or saved);
128 + the signal's number: a second signal, or a signal without ``--ckpt-dir`` (nothing
saved).

Losses are nats per byte token; the final validation loss is also given in bits per byte
(loss / ln 2). Data: the pydoc help topics every CPython ships (``--data`` for a UTF-8 text
file, a 1-D ``.npy`` token array or a nanoGPT-style ``.bin`` of uint16).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shlex
import sys
import time
from typing import Any, Callable

import numpy as np

from mpipar import backend, runtime, trace
from mpipar.cli import (COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT, Parser, UsageError,
                        check_output_path)
from mpipar.comm import (GPUSelectionError, make_communicator, nccl, select_gpu,
                         set_collective_timeout, watchdog_summary)
from mpipar.comm.mpi_env import GPU_ENV, gpu_choice, parse_gpu_choice
from mpipar.data import BatchSampler, decode, load_tokens, split_train_val, vocab_size_of
from mpipar.data import ckpt_dir
from mpipar.data.checkpoint import (CheckpointError, TrainingCheckpoint, run_differences,
                                    save_training_checkpoint, training_meta)
from mpipar.data.corpus import VOCAB_SIZE
from mpipar.nn.gpt import GPT, PRESETS, GPTConfig, count_parameters, flops_per_token, param_shapes
from mpipar.optim import OPTIMIZERS, PRECISIONS, OptimizerSpec, Precision, cosine_lr
from mpipar.parallel.checkpoint import (NonFiniteStateError, compression_signature,
                                        load_compression, refuse_nonfinite, save_sharded)
from mpipar.parallel.data_parallel import REDUCE_DTYPES
from mpipar.parallel.grad_sync import OVERLAP_CHOICES, resolve_overlap
from mpipar.parallel.layout import Layout, LayoutError, choose_layout
from mpipar.parallel.model import load_full_state_dict
from mpipar.parallel.numerics import NonFiniteError
from mpipar.parallel.param_server import MODES, ParamServerTrainer, PSConfigError, check_ps
from mpipar.parallel.trainer import ParallelTrainer
from mpipar.sim.plan import describe, plan
from mpipar.sim.spec import TrainSpec

PROG = "mpipar.train"

NONFINITE_STATUS = 3          # exit status of a run stopped by the numerics guard

# The default run (no flags) is sized to use about a minute of this 2-core machine and to
# lower the validation loss visibly (measured on a quiet machine: 600 steps of 8 x 64 tokens
# take 48 s and bring the validation loss from 7.80 to 2.89 bits/byte).
DEFAULTS = dict(model="small", steps=600, batch_size=8, lr=2e-3, min_lr=2e-4, warmup=20,
                weight_decay=0.1, grad_clip=1.0, eval_interval=100, eval_batches=8)

# --trace without --trace-steps: this many steps after the run's first (which builds buffers,
# pools and the communication thread, and so is not what the run's other steps look like)
TRACE_STEPS = 3

# the flag behind each part of a Layout (LayoutError.field)
LAYOUT_FLAGS = {"dp": "--dp", "tp": "--tp", "pp": "--pp", "grid": "--dp/--tp/--pp",
                "micro_batches": "--micro-batches", "grad_accum": "--grad-accum",
                "schedule": "--schedule", "stage_layers": "--stage-layers", "zero": "--zero",
                "bucket_mb": "--bucket-mb", "allreduce": "--allreduce", "compress": "--compress",
                "batch_size": "--batch-size"}

# the flag behind each quantity of a parameter-server configuration (PSConfigError.field)
PS_FLAGS = {"servers": "--ps-servers", "mode": "--ps-mode", "tp": "--tp", "pp": "--pp",
            "zero": "--zero", "compress": "--compress", "slow_rank": "--slow-rank",
            "slow_factor": "--slow-factor", "batch_size": "--batch-size",
            "precision": "--precision"}


def _block_counts(text: str) -> tuple[int, ...]:
    """``--stage-layers 3,3,2``: blocks per pipeline stage."""
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected blocks per stage as comma-separated "
                                         f"integers, such as 3,3,2") from None


def _gpu_id(text: str) -> str | int:
    """``--gpu-id auto|shared|N``: which GPU each rank uses (``mpi_env.choose_gpu``)."""
    try:
        return parse_gpu_choice(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# what --resume-override may allow to differ from the checkpoint (run_differences' groups)
OVERRIDABLE = ("seed", "data", "batch_size", "dtype", "optimizer", "schedule", "grad_clip", "model",
               "compression")       # not of the identity: the residuals' scheme and layout


def _override_keys(text: str) -> frozenset[str]:
    """``--resume-override seed,data``: the run-identity groups allowed to differ."""
    keys = frozenset(k.strip() for k in text.split(",") if k.strip())
    unknown = sorted(keys - set(OVERRIDABLE))
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of "
                                         f"{', '.join(OVERRIDABLE)}")
    return keys


_override_keys.to_text = lambda keys: ",".join(sorted(keys))  # type: ignore[attr-defined]


def _step_range(text: str) -> tuple[int, int]:
    """``--trace-steps A:B``: steps A to B - 1 (0-based, as a Python slice)."""
    try:
        a, b = (int(p) for p in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected A:B, the first step and the one "
                                         f"after the last, such as 2:5") from None
    if not 0 <= a < b:
        raise argparse.ArgumentTypeError(f"{text!r}: needs 0 <= A < B")
    return a, b


_step_range.to_text = lambda r: f"{r[0]}:{r[1]}"  # type: ignore[attr-defined]


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = Parser(prog=f"python -m {PROG}", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d["model"], help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--steps", type=POSITIVE_INT, default=d["steps"], help="optimiser steps in total")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=d["batch_size"],
                   help="GLOBAL batch: sequences per optimiser step, over all ranks")
    p.add_argument("--micro-batches", type=POSITIVE_INT, default=1,
                   help="pipeline micro-batches per accumulation step (one stage: a plain split)")
    p.add_argument("--grad-accum", type=POSITIVE_INT, default=1,
                   help="gradient-accumulation steps per optimiser step (one reduction per step)")
    p.add_argument("--dp", type=POSITIVE_INT, default=None, help="data-parallel degree")
    p.add_argument("--tp", type=POSITIVE_INT, default=None, help="tensor-parallel degree (adjacent ranks)")
    p.add_argument("--pp", type=POSITIVE_INT, default=None, help="pipeline stages")
    p.add_argument("--schedule", default="1f1b", choices=("gpipe", "1f1b"), help="pipeline schedule")
    p.add_argument("--stage-layers", type=_block_counts, default=None,
                   help="blocks per pipeline stage, e.g. 3,3,2 (default: balanced by FLOPs)")
    p.add_argument("--bucket-mb", type=POSITIVE, default=1.0, help="gradient bucket size in MiB")
    p.add_argument("--allreduce", default=None,
                   help="collective algorithm of the data-parallel group (native, ring, rhd, "
                        "tree, dbtree, ps, hier, auto; nccl on --device gpu)")
    p.add_argument("--compress", default="none", metavar="SPEC",
                   help="data-parallel gradient compression with error feedback: none, fp16, "
                        "bf16, int8, topk:RATIO (e.g. topk:0.01), powersgd:RANK (e.g. "
                        "powersgd:4); not with --zero; checkpoints hold its residuals")
    p.add_argument("--ps-servers", type=COUNT, default=0, metavar="K",
                   help="parameter-server training: the last K ranks serve the parameters and "
                        "the optimiser state, the others are data-parallel workers (0: none)")
    p.add_argument("--ps-mode", default=None, metavar="MODE",
                   help=f"with --ps-servers: {', '.join(MODES)} (default sync; ssp:S lets a "
                        f"worker run at most S steps ahead of the slowest)")
    p.add_argument("--slow-rank", type=COUNT, default=None, metavar="R",
                   help="experiments: parameter-server worker R sleeps (--slow-factor - 1) "
                        "times its compute time each step")
    p.add_argument("--slow-factor", type=POSITIVE, default=1.0, metavar="F",
                   help="how many times slower --slow-rank's steps are (>= 1; default 1)")
    p.add_argument("--plan", action="store_true",
                   help="train with the planner's first choice of layout for this machine")
    p.add_argument("--zero", type=int, default=0, choices=(0, 1, 2),
                   help="ZeRO stage: 1 shards optimiser state, 2 also gradients")
    p.add_argument("--block-size", type=POSITIVE_INT, default=None, help="context length (preset's)")
    p.add_argument("--lr", type=POSITIVE, default=d["lr"], help="peak learning rate")
    p.add_argument("--min-lr", type=NON_NEGATIVE, default=d["min_lr"], help="learning rate at the end")
    p.add_argument("--warmup", type=COUNT, default=d["warmup"], help="linear warm-up steps")
    p.add_argument("--lr-decay-steps", type=POSITIVE_INT, default=None,
                   help="step where the cosine reaches --min-lr (default: --steps)")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=d["weight_decay"])
    p.add_argument("--grad-clip", type=NON_NEGATIVE, default=d["grad_clip"], help="0 disables")
    p.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZERS))
    p.add_argument("--seed", type=COUNT, default=0, help="initialisation and batches")
    p.add_argument("--device", default="cpu", choices=backend.DEVICES)
    p.add_argument("--gpu-id", type=_gpu_id, default=None, metavar="auto|shared|N",
                   help="each rank's GPU: auto, its node-local rank (more ranks on a node than "
                        "GPUs is an error); shared, node-local rank modulo the GPUs; N, GPU N "
                        f"(default: {GPU_ENV} or auto)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16/fp16: 16-bit parameters, activations and gradients, float32 "
                        "master weights and optimiser state; fp16 with dynamic loss scaling "
                        "(as python -m mpipar.sim train --precision)")
    p.add_argument("--loss-scale", type=float, default=Precision.loss_scale, metavar="S",
                   help="--precision fp16: the initial dynamic loss scale (default 2^16)")
    p.add_argument("--loss-scale-interval", type=int, default=Precision.loss_scale_interval,
                   metavar="N", help="--precision fp16: clean steps before the loss scale "
                                     "doubles (default 2000)")
    p.add_argument("--loss-scale-backoff", type=float, default=Precision.loss_scale_backoff,
                   metavar="F", help="--precision fp16: the loss scale's factor after an "
                                     "overflow, which skips the step (default 0.5)")
    p.add_argument("--grad-reduce-dtype", default="grad", choices=tuple(REDUCE_DTYPES),
                   help="the data-parallel gradients on the wire: in their own dtype (grad: "
                        "16-bit under --precision bf16/fp16) or cast to fp32")
    p.add_argument("--threads", type=POSITIVE_INT, default=1,
                   help="CPU threads per rank (BLAS and elementwise chains; see backend.py)")
    p.add_argument("--overlap", default="auto", choices=OVERLAP_CHOICES,
                   help="all-reduce gradient buckets during backward (auto: on a GPU, or where "
                        "every rank has a CPU core for it beside its threads)")
    p.add_argument("--eval-interval", type=COUNT, default=d["eval_interval"],
                   help="steps between validation evaluations (0: only before and after)")
    p.add_argument("--eval-batches", type=POSITIVE_INT, default=d["eval_batches"],
                   help="global batches per validation estimate")
    p.add_argument("--data", default=None, help="text / .npy / .bin file (default: pydoc topics)")
    p.add_argument("--log", default=None, help="JSON-lines log file (rank 0)")
    p.add_argument("--sample", type=COUNT, default=0, help="print N generated bytes at the end")
    p.add_argument("--ckpt-dir", default=None,
                   help="sharded checkpoints: every rank writes what it owns (at the end, and "
                        "every --ckpt-every steps)")
    p.add_argument("--ckpt-every", type=COUNT, default=0, help="steps between checkpoints")
    p.add_argument("--keep", type=POSITIVE_INT, default=2,
                   help="complete checkpoints kept in --ckpt-dir (default 2: the newest, and "
                        "the previous one in case the newest is found corrupt)")
    p.add_argument("--export", "--save", dest="export", default=None,
                   help="single file (nanoGPT names, full tensors) to write at the end "
                        "(--save is the older name)")
    p.add_argument("--save-interval", type=COUNT, default=0,
                   help="also write --export every N steps")
    p.add_argument("--resume", default=None,
                   help="continue from a --ckpt-dir root (its latest), one step-N directory, "
                        "a single-file checkpoint, or 'auto': the newest in --ckpt-dir if any")
    p.add_argument("--resume-override", type=_override_keys, default=frozenset(),
                   help=f"let these differ from the checkpoint: {','.join(OVERRIDABLE)}")
    p.add_argument("--trace", default=None, metavar="FILE.json",
                   help="write a Chrome/Perfetto trace of some steps (every rank; rank 0 writes)")
    p.add_argument("--trace-steps", type=_step_range, default=None, metavar="A:B",
                   help=f"steps A to B-1 to trace (default: the {TRACE_STEPS} after the run's first)")
    p.add_argument("--collective-timeout", type=NON_NEGATIVE, default=None, metavar="S",
                   help="abort when one collective or message wait lasts longer than S seconds, "
                        "naming the ranks that had not reached it (default: "
                        "MPIPAR_COLLECTIVE_TIMEOUT or 300; 0 disables)")
    p.add_argument("--preempt-status", type=COUNT, default=0,
                   help="exit status after a stop signal's checkpoint is saved (default 0)")
    p.add_config_arguments()
    return p


# ---------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Run:
    """Everything a run needs, checked: made without MPI, so bad input stops every rank
    before any collective."""

    args: argparse.Namespace
    config: GPTConfig
    layout: Layout
    why: str
    optimizer: OptimizerSpec
    xp: Any
    train: BatchSampler
    val: BatchSampler
    resume: TrainingCheckpoint | ckpt_dir.ShardedCheckpoint | None
    decay_steps: int = 0                       # where the cosine reaches --min-lr
    identity: dict = dataclasses.field(default_factory=dict)   # what a resume must match
    ckpt_bytes: int = 0                        # about one checkpoint's size
    notes: list = dataclasses.field(default_factory=list)      # said in the run's header
    trace_steps: tuple[int, int] | None = None     # [A, B) of --trace
    gpu: str | int = "auto"             # --gpu-id or MPIPAR_GPU: mpi_env.select_gpu's choice
    argv: tuple[str, ...] = ()          # the command line, for the resume command a stop prints
    restore_compression: bool = False   # the resumed checkpoint's residuals are this run's
    ps: dict | None = None              # parameter servers: ParamServerTrainer's keywords


def _planned_layout(args: argparse.Namespace, world_size: int, config: GPTConfig) -> tuple[Layout, str]:
    """The planner's first choice for this machine (the ``local`` profile)."""
    if args.dp is not None or args.tp is not None or args.pp is not None:
        raise UsageError("--plan chooses the layout: give it without --dp, --tp or --pp")
    base = TrainSpec(n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head,
                     block_size=config.block_size, vocab_size=config.vocab_size,
                     global_batch=args.batch_size, bias=config.bias, bucket_mb=args.bucket_mb,
                     allreduce=args.allreduce or "native", precision=args.precision)
    try:                # compression composes only with zero 0 (Layout.check): plan among those
        only = {"zero": (0,)} if Layout(compress=args.compress).compressed else {}
    except ValueError:  # a bad spec: the layout check below names it
        only = {}
    try:
        rows = plan(base, "local", world_size, top=1, **only)
    except KeyError as e:   # the profile has no compute section for --precision's dtype
        raise UsageError(f"--plan with --precision {args.precision}: {e.args[0]}") from None
    if not rows:
        raise UsageError(f"--plan: no layout of {world_size} ranks fits --batch-size {args.batch_size}")
    best = rows[0]
    layout = best.spec.layout.replace(compress=args.compress)
    try:
        layout.check(world_size, config, args.batch_size)
    except LayoutError as e:
        raise UsageError(f"--plan chose {layout}: {LAYOUT_FLAGS[e.field]}: {e}") from e
    return layout, (f"planned: {describe(best.spec)}, predicted {best.step_time_s * 1e3:.1f} ms "
                    f"a step on this machine (python -m mpipar.plan --cluster local)")


def _base_layout(args: argparse.Namespace) -> Layout:
    return Layout(micro_batches=args.micro_batches, grad_accum=args.grad_accum,
                  schedule=args.schedule, stage_layers=args.stage_layers, zero=args.zero,
                  bucket_mb=args.bucket_mb, allreduce=args.allreduce, compress=args.compress)


def _ps_layout(args: argparse.Namespace, world_size: int,
               config: GPTConfig) -> tuple[Layout, str, dict | None]:
    """The workers' layout (dp = the ranks the servers leave) and ParamServerTrainer's
    keywords under ``--ps-servers``; (layout, why, None) without it. Refuses what does not
    compose (``param_server.check_ps``)."""
    slowed = args.slow_rank is not None or args.slow_factor != 1.0
    if not args.ps_servers:
        if args.ps_mode is not None or slowed:
            given = "--ps-mode" if args.ps_mode is not None else "--slow-rank/--slow-factor"
            raise UsageError(f"{given} is for parameter-server training: give --ps-servers K")
        layout, why = _layout(args, world_size, config)
        return layout, why, None
    if args.plan:
        raise UsageError("--plan chooses an all-reduce layout: not with --ps-servers")
    K, mode = args.ps_servers, args.ps_mode or "sync"
    base = _base_layout(args).replace(tp=args.tp or 1, pp=args.pp or 1)
    try:
        check_ps(world_size, K, mode, base, args.batch_size, args.slow_rank, args.slow_factor,
                 args.precision)
    except PSConfigError as e:
        raise UsageError(f"{PS_FLAGS[e.field]}: {e}") from e
    W = world_size - K
    if args.dp is not None and args.dp != W:
        raise UsageError(f"--dp {args.dp}: with --ps-servers {K} of {world_size} ranks the "
                         f"workers are the other {W}; give --dp {W} or no --dp")
    layout = base.replace(dp=W)
    try:
        layout.check(W, config, args.batch_size)
    except LayoutError as e:
        raise UsageError(f"{LAYOUT_FLAGS[e.field]}: {e}") from e
    return layout, f"{W} worker(s) + {K} parameter server(s)", dict(
        servers=K, mode=mode, slow_rank=args.slow_rank, slow_factor=args.slow_factor)


def _layout(args: argparse.Namespace, world_size: int, config: GPTConfig) -> tuple[Layout, str]:
    if args.plan:
        return _planned_layout(args, world_size, config)
    base = _base_layout(args)
    try:
        if args.dp is None and args.tp is None and args.pp is None:
            layout, why = choose_layout(world_size, config, args.batch_size, base)
            return layout, "1 process" if world_size == 1 else "chosen automatically: " + why
        # as Megatron: --tp and --pp default to 1, --dp to what the world leaves
        tp, pp = args.tp or 1, args.pp or 1
        dp = args.dp if args.dp is not None else max(world_size // (tp * pp), 1)
        layout = base.replace(dp=dp, tp=tp, pp=pp)
        layout.check(world_size, config, args.batch_size)
    except LayoutError as e:
        raise UsageError(f"{LAYOUT_FLAGS[e.field]}: {e}") from e
    return layout, "as given"


def prepare(args: argparse.Namespace, world_size: int) -> Run:
    """Check every flag, read the data and the checkpoint to resume, and fix the layout, for
    a world of ``world_size`` ranks; UsageError naming the flag or file otherwise. No MPI."""
    if args.model not in PRESETS:
        raise UsageError(f"--model {args.model!r} is not a preset; choose from {', '.join(PRESETS)}")
    if args.min_lr > args.lr:
        raise UsageError(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}")
    if args.log:
        check_output_path(args.log, "--log")
    if args.preempt_status > 255:
        raise UsageError(f"--preempt-status {args.preempt_status}: an exit status is 0 to 255")
    try:
        optimizer = OptimizerSpec(args.optimizer, lr=args.lr, weight_decay=args.weight_decay)
    except ValueError as e:
        raise UsageError(f"--optimizer {args.optimizer}: {e}") from e
    try:
        xp = backend.get_xp(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device}: {e}") from e
    gpu = _gpu_of(args, xp)
    precision = _precision(args)
    try:
        precision.model_dtype(args.dtype)
        precision.check_device(xp)
    except ValueError as e:
        raise UsageError(f"--precision {args.precision}: {e}") from e
    if args.grad_reduce_dtype == "fp32" and not precision.mixed:
        raise UsageError(f"--grad-reduce-dtype fp32 casts 16-bit gradients for the reduction: "
                         f"it needs --precision bf16 or fp16 (the run is {args.precision}, "
                         f"its gradients {args.dtype})")
    state_names = precision.state_names(optimizer)
    if args.allreduce == "nccl":
        if xp is np:
            raise UsageError(f"--allreduce nccl reduces GPU memory: it needs --device gpu "
                             f"(the run is on --device {args.device})")
        try:
            backend.nccl_module()
        except RuntimeError as e:
            raise UsageError(f"--allreduce nccl: {e}") from e
    where = f"--data {args.data}" if args.data else "the default corpus"
    try:
        tokens = load_tokens(args.data)
        vocab = vocab_size_of(tokens)
    except (OSError, ValueError) as e:
        raise UsageError(f"{where}: {e}") from e
    config = PRESETS[args.model].replace(vocab_size=vocab)
    if args.block_size is not None:
        config = config.replace(block_size=args.block_size)
    layout, why, ps = _ps_layout(args, world_size, config)
    samplers = []
    for stream, (part, tokens_of_part) in enumerate(zip(("training", "validation"),
                                                        split_train_val(tokens))):
        try:
            samplers.append(BatchSampler(tokens_of_part, args.batch_size, config.block_size,
                                         seed=args.seed, stream=stream))
        except ValueError as e:
            raise UsageError(f"{where}, {part} part, with --block-size {config.block_size}: "
                             f"{e}") from e
    resume, notes = _open_resume(args)
    saved = resume.run if resume is not None else None   # None also: a file from before it was recorded
    decay_steps = args.lr_decay_steps or (saved["schedule"]["decay_steps"] if saved else args.steps)
    identity = run_identity(args, config, optimizer, decay_steps, tokens)
    restore = False
    if resume is not None:
        try:
            resume.check(dataclasses.asdict(config), args.optimizer, param_shapes(config),
                         state_names)
        except CheckpointError as e:
            raise UsageError(f"--resume: {e}") from e
        differ = run_differences(saved, identity, args.resume_override) if saved else {}
        if differ:
            groups = sorted({key.split(".")[0] for key in differ})
            raise UsageError(f"--resume: {'; '.join(differ.values())} (--resume-override "
                             f"{','.join(groups)} allows it)")
        if args.steps <= resume.step:
            raise UsageError(f"--steps {args.steps} is not beyond the step of --resume "
                             f"{resume.path!r} ({resume.step}): nothing to train")
        notes.append(f"resuming from {resume.path} at step {resume.step}" +
                     ("" if args.lr_decay_steps or not saved else
                      f" (its learning-rate horizon: cosine to step {decay_steps})"))
        restore = _compression_resume(args, resume, layout, world_size)
        if layout.compressed:
            notes.append("error-feedback residuals: " + ("restored" if restore else "from zero"))
    itemsize = 8 if args.dtype == "float64" else 4
    ckpt_bytes = ckpt_dir.estimate_bytes(sum(math.prod(v) for v in param_shapes(config).values()),
                                         itemsize, len(state_names), world_size)
    if args.ckpt_dir:
        free = _check_ckpt_dir(args.ckpt_dir, ckpt_bytes)
        held = ckpt_dir.step_dirs(args.ckpt_dir)
        if held and not args.resume:
            raise UsageError(f"--ckpt-dir {args.ckpt_dir} holds checkpoints of another run (up to "
                             f"step {held[0][0]}): continue it with --resume {args.ckpt_dir} or "
                             f"--resume auto, or choose another directory")
        notes.append(f"checkpoints: {args.ckpt_dir} at the end"
                     + (f" and every {args.ckpt_every} steps" if args.ckpt_every else "")
                     + f", keeping {args.keep}, about {ckpt_bytes / 2**20:.1f} MiB each "
                     f"({free / 2**30:.1f} GiB free)")
    elif args.ckpt_every:
        raise UsageError("--ckpt-every needs --ckpt-dir (where to write)")
    if args.export:
        check_output_path(args.export, "--export")
    return Run(args, config, layout, why, optimizer, xp, *samplers, resume, decay_steps,
               identity, ckpt_bytes, notes, _trace_steps(args, resume.step if resume else 0),
               gpu=gpu, restore_compression=restore, ps=ps)


def _precision(args: argparse.Namespace) -> Precision:
    """--precision and fp16's loss-scale flags, as the library checks them."""
    scaling = {"loss_scale": args.loss_scale, "loss_scale_interval": args.loss_scale_interval,
               "loss_scale_backoff": args.loss_scale_backoff}
    try:
        return Precision(args.precision, **scaling)
    except ValueError as e:
        given = [f"--{k.replace('_', '-')} {v:g}" for k, v in scaling.items()
                 if v != getattr(Precision, k)]
        raise UsageError(f"{', '.join(given) or '--precision ' + args.precision}: {e}") from e


def _loss_scale_note(args: argparse.Namespace) -> str:
    """fp16's loss scale for the run header; nothing for the other precisions."""
    if args.precision != "fp16":
        return ""
    return (f" (initial loss scale {args.loss_scale:g}, x2 after "
            f"{args.loss_scale_interval} clean steps, x{args.loss_scale_backoff:g} on overflow)")


def _gpu_of(args: argparse.Namespace, xp: Any) -> str | int:
    """The GPU choice (``--gpu-id``, else MPIPAR_GPU, else auto), checked where it can be
    without MPI: a device number against the GPUs this machine shows."""
    if backend.device_name(xp) != "gpu":
        if args.gpu_id is not None:
            raise UsageError(f"--gpu-id {args.gpu_id}: no GPU in use (--device {args.device})")
        return "auto"                  # MPIPAR_GPU means nothing to a CPU run
    source = f"--gpu-id {args.gpu_id}" if args.gpu_id is not None else GPU_ENV
    try:
        gpu = gpu_choice(args.gpu_id)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if isinstance(gpu, int) and gpu >= backend.device_count():
        raise UsageError(f"{source}: GPU {gpu} asked for, but this machine shows "
                         f"{backend.device_count()} GPU(s)")
    return gpu


def run_identity(args: argparse.Namespace, config: GPTConfig, optimizer: OptimizerSpec,
                 decay_steps: int, tokens: np.ndarray) -> dict:
    """What a resumed run must share with the run that saved (``run_differences``): the
    model, the optimiser and its hyper-parameters, the schedule and its horizon, the seed,
    the data (by content: SHA-256 and length; the path is recorded only), the global batch,
    the dtype and the clipping norm. The layout is not part of it: any layout resumes."""
    return {"model": {"preset": args.model, "config": dataclasses.asdict(config)},
            "optimizer": {"name": optimizer.name,
                          **{k: v for k, v in optimizer.hyper().items() if k != "lr"}},
            "schedule": {"lr": args.lr, "min_lr": args.min_lr, "warmup": args.warmup,
                         "decay_steps": decay_steps},
            "seed": args.seed,
            "data": {"path": args.data, "tokens": int(len(tokens)),
                     "sha256": hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()},
            "batch_size": args.batch_size, "dtype": args.dtype, "grad_clip": args.grad_clip}


def _compression_resume(args: argparse.Namespace, resume: Any, layout: Layout,
                        world_size: int) -> bool:
    """Whether the checkpoint's gradient-compression residuals are restored: when its
    ``compression_signature`` is this run's (a single file holds none) and the residuals
    are not reset. ``--resume-override compression`` resets them: they start at zero (what
    is dropped is the gradient not yet sent, a few steps' worth), whatever the checkpoint
    holds. Otherwise a difference is one line naming what differs."""
    saved = resume.manifest.get("compression") if isinstance(resume, ckpt_dir.ShardedCheckpoint) else None
    mine = compression_signature(layout, world_size)
    if "compression" in args.resume_override:
        return False
    if saved == mine:
        return saved is not None
    if saved is None or mine is None:
        what = (f"the checkpoint holds no gradient-compression residuals for --compress "
                f"{layout.compress}" if saved is None else
                f"the checkpoint holds error-feedback residuals of {saved['scheme']} that "
                f"--compress none would drop")
    else:
        what = "the checkpoint's error-feedback residuals are not this run's: " + "; ".join(
            f"its {k} {saved.get(k)} differs from this run's {mine[k]}"
            for k in mine if saved.get(k) != mine[k])
    raise UsageError(f"--resume: {what} (--resume-override compression starts them at zero)")


def _open_resume(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The checkpoint ``--resume`` names, opened and verified (None: a fresh start), and
    what to say about it. ``auto``: the newest complete one in ``--ckpt-dir``, if any."""
    if not args.resume:
        return None, []
    source, notes = args.resume, []
    if args.resume == "auto":
        if not args.ckpt_dir:
            raise UsageError("--resume auto needs --ckpt-dir (where to look)")
        source = ckpt_dir.newest_complete(args.ckpt_dir)
        if source is None:
            return None, [f"--resume auto: no checkpoint in {args.ckpt_dir}, starting at step 0"]
        notes.append(f"--resume auto: the newest checkpoint in {args.ckpt_dir}")
    try:
        return ckpt_dir.open_checkpoint(source), notes
    except CheckpointError as e:
        raise UsageError(f"--resume: {e}") from e


def _check_ckpt_dir(path: str, needed: int) -> int:
    """Create ``--ckpt-dir`` or check it is a writable directory with room for one
    checkpoint of about ``needed`` bytes; returns the free bytes."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--ckpt-dir {path}: cannot create it ({e.strerror})") from None
    if not os.path.isdir(path):
        raise UsageError(f"--ckpt-dir {path}: not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--ckpt-dir {path}: not writable")
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise UsageError(f"--ckpt-dir {path}: {free / 2**20:.1f} MiB free, one checkpoint needs "
                         f"about {needed / 2**20:.1f} MiB")
    return free


def _trace_steps(args: argparse.Namespace, start: int) -> tuple[int, int] | None:
    """The steps ``--trace`` records, [A, B) within this run's [start, --steps); its file
    checked writable now, before any step."""
    if args.trace is None:
        if args.trace_steps is not None:
            raise UsageError("--trace-steps needs --trace FILE.json")
        return None
    check_output_path(args.trace, "--trace")
    if args.trace_steps is None:
        first = start + 1 if args.steps - start > 1 else start
        return first, min(first + TRACE_STEPS, args.steps)
    a, b = args.trace_steps
    if a < start or b > args.steps:
        raise UsageError(f"--trace-steps {a}:{b} is not within the run's steps {start}:{args.steps}")
    return a, b


class Runner:
    """The trainer of any layout, its data and its checkpoints, for one run."""

    def __init__(self, run: Run, comm: Any) -> None:
        args = run.args
        self.run, self.comm = run, comm
        self.trainer = self.make_trainer(run, comm)
        self.mesh = self.trainer.mesh
        self.start = 0
        self.saved: tuple[int, str] | None = None          # the latest sharded checkpoint
        self.say: Callable[[str], None] = runtime.print0  # the loop's progress.write once it runs
        if run.resume is not None:        # checked against this model in prepare()
            self.load(run.resume)
            run.resume.close()
            self.start = run.resume.step
        if args.ckpt_dir and comm.rank == 0:
            removed = ckpt_dir.clean_temporaries(args.ckpt_dir)
            if removed:
                runtime.print0(f"removed what crashed saves left in {args.ckpt_dir}: "
                               f"{', '.join(removed)}")

    def make_trainer(self, run: Run, comm: Any) -> Any:
        a = run.args
        return ParallelTrainer(comm, run.config, run.layout, run.optimizer, seed=a.seed,
                               dtype=a.dtype, xp=run.xp, grad_clip=a.grad_clip,
                               hooks=resolve_overlap(a.overlap, comm, a.threads, run.xp),
                               precision=_precision(a), grad_reduce_dtype=a.grad_reduce_dtype)

    def load(self, resume: Any) -> None:
        """Resume: a sharded checkpoint assembles each tensor on access, so this rank reads
        the files holding pieces of its own tensors, one tensor at a time."""
        load_full_state_dict(self.trainer.local, resume.model)
        self.trainer.load_full_optimizer_state(resume.optim)
        if self.run.restore_compression:     # the same scheme, world and buckets: prepare()
            load_compression(self.trainer, resume.compression)

    def checkpointable(self) -> Any:
        """What ``save_sharded`` writes: the trainer (each rank its own pieces)."""
        return self.trainer

    def summary(self) -> dict:
        """What the run's end reports beyond the losses (collective; nothing here)."""
        return {}

    def describe(self) -> str:
        lay, m = self.run.layout, self.mesh
        return (f"{lay.world_size} rank(s) as {lay} ({self.run.why}); schedule {lay.schedule}, "
                f"{lay.micro_batches} micro-batches, grad-accum {lay.grad_accum}, buckets "
                f"{lay.bucket_mb:g} MiB, all-reduce {lay.allreduce or 'native'}, ZeRO {lay.zero}"
                + (f", compression {lay.compress}" if lay.compressed else "") + f"\n{m}")

    def step(self, step: int, lr: float) -> float:
        rec = trace.recorder()
        t0 = rec.now()
        x, y = self.run.train.batch(step, self.mesh.dp_rank, self.mesh.dp)
        loss = self.trainer.step(x, y, lr=lr).loss
        rec.add("step", t0, rec.now(), "step", step=step)
        return loss

    def evaluate(self, n_batches: int) -> float:
        total = 0.0
        for k in range(n_batches):
            x, y = self.run.val.batch(k, self.mesh.dp_rank, self.mesh.dp)
            total += self.trainer.evaluate(x, y)
        return total / n_batches

    def save(self, path: str, step: int) -> None:
        """The file one process writes (full tensors, nanoGPT names), whatever the layout:
        any layout, or one process, resumes from it. Collective; rank 0 writes. Refused
        (NonFiniteStateError) when a parameter or optimiser state is not finite."""
        a = self.run.args
        refuse_nonfinite(self.trainer, step)
        sd = self.trainer.full_state_dict()
        osd = self.trainer.full_optimizer_state()
        if self.comm.rank == 0:
            meta = training_meta(step=step, model=a.model, config=dataclasses.asdict(self.run.config),
                                 optimizer=a.optimizer, dtype=a.dtype, seed=a.seed,
                                 run=self.run.identity)
            save_training_checkpoint(path, sd, osd, meta)

    def save_checkpoint(self, step: int) -> str | None:
        """A sharded checkpoint of ``step`` in ``--ckpt-dir`` (each rank writes what it owns;
        ``parallel.checkpoint.save_sharded``); returns its directory, None without
        ``--ckpt-dir``. Collective: every rank calls it at the same step. A step already
        saved is not written again."""
        a = self.run.args
        if not a.ckpt_dir:
            return None
        if self.saved is not None and self.saved[0] == step:
            return self.saved[1]
        layout = json.loads(json.dumps(dataclasses.asdict(self.run.layout), default=str))
        path = save_sharded(a.ckpt_dir, step, self.checkpointable(), self.run.identity, layout,
                            a.keep)
        self.say(f"checkpoint of step {step}: {path}")
        self.saved = (step, path)
        return path

    def agree_stop(self, signum: int) -> int:
        """The stop signal any rank has received (0: none): one all-reduce of one integer over
        the world, so every rank stops at the same step boundary. Collective."""
        if self.comm.size == 1:
            return signum
        return int(self.comm.allreduce(np.array([signum], dtype=np.int64), op="max")[0])

    def generator(self) -> GPT | None:
        """A single-process GPT with the trained weights, on world rank 0 (None elsewhere).
        Collective."""
        sd = self.trainer.full_state_dict()
        if self.comm.rank != 0:
            return None
        a = self.run.args
        model = GPT(self.run.config, seed=a.seed, dtype=a.dtype, xp=self.run.xp)
        model.load_state_dict(sd)
        return model


class PSRunner(Runner):
    """``--ps-servers K``: the same run with a ``ParamServerTrainer``. World rank 0 is worker
    0, so the progress line and the log are rank 0's as always (the loss: the global batch's
    under sync, worker 0's rows' under async and SSP). A stop signal is agreed at every step
    boundary under sync (the steps are in lock-step anyway), and under async and SSP only at
    boundaries after an evaluation or a checkpoint (the points where every rank meets), so
    that no step is a barrier for the workers."""

    def make_trainer(self, run: Run, comm: Any) -> Any:
        a = run.args
        return ParamServerTrainer(comm, run.config, run.layout, run.optimizer, seed=a.seed,
                                  dtype=a.dtype, xp=run.xp, grad_clip=a.grad_clip,
                                  **(run.ps or {}))

    def load(self, resume: Any) -> None:
        self.trainer.load_full(resume.model, resume.optim, resume.step)

    def checkpointable(self) -> Any:
        return self.trainer.gathered()

    def describe(self) -> str:
        lay = self.run.layout
        return (f"{self.comm.size} ranks: {self.trainer.describe()}; per worker grad-accum "
                f"{lay.grad_accum}, {lay.micro_batches} micro-batches")

    def agree_stop(self, signum: int) -> int:
        if self.trainer.mode.averages or self.trainer.at_sync_point:
            return super().agree_stop(signum)
        return 0

    def summary(self) -> dict:
        st = self.trainer.staleness_summary()
        runtime.print0(f"parameter servers, {self.trainer.mode}: {st}")
        return {"staleness": st.summary()}


class Tracing:
    """``--trace``: records steps [A, B) of the run (with the evaluations and saves that
    follow them), then, collective over the world, gathers every rank's spans to rank 0,
    which writes the trace. The spans live only from A to B, at most ``trace.SpanRecorder``'s
    limit of them per rank."""

    def __init__(self, path: str, steps: tuple[int, int], runner: Runner,
                 say: Callable[[str], None]) -> None:
        self.path, (self.first, self.end), self.runner, self.say = path, steps, runner, say
        self.rec = trace.SpanRecorder()

    def before(self, step: int) -> None:
        if step == self.first:
            trace.install(self.rec)

    def after(self, step: int) -> None:
        """After step ``step`` and what follows it (evaluation, checkpoint)."""
        if step + 1 != self.end:
            return
        trace.install(None)
        m = self.runner.mesh
        got = trace.gather_timelines(self.runner.comm, m.rank, (m.dp_rank, m.tp_rank, m.pp_rank),
                                     self.rec.spans, self.rec.dropped)
        self.rec = trace.SpanRecorder()
        if got is not None:
            timelines, other = got
            other.update(steps=[self.first, self.end], layout=str(self.runner.run.layout),
                         schedule=self.runner.run.layout.schedule,
                         micro_batches=self.runner.run.layout.micro_batches)
            trace.write_trace(self.path, timelines, other)
            bound = max(other["clock"]["bound_us"].values())
            self.say(f"trace of steps {self.first}:{self.end} written to {self.path} "
                     f"({sum(len(t.spans) for t in timelines):,} events; clocks aligned "
                     f"within {bound:.0f} us)")


class NoTracing:
    """No ``--trace``: nothing to do around a step."""

    def before(self, step: int) -> None:
        pass

    def after(self, step: int) -> None:
        pass


# ---------------------------------------------------------------------------- training
def resume_command(run: Run, path: str, world_size: int) -> str:
    """The command that continues this run from the checkpoint ``path``: this one's, with
    ``--resume path`` in place of any ``--resume``."""
    argv, rest = list(run.argv), []
    while argv:
        a = argv.pop(0)
        if a == "--resume":
            argv[:1] = []
        elif not a.startswith("--resume="):
            rest.append(a)
    launcher = ["mpiexec", "-n", str(world_size)] if world_size > 1 else []
    return shlex.join(launcher + ["python", "-m", PROG, *rest, "--resume", path])


def stop_for_signal(runner: Runner, run: Run, signum: int, step: int) -> int:
    """After an agreed stop signal at the boundary before ``step``: save, say where and how
    to resume, and return the exit status. Collective."""
    name = runtime.signal_name(signum)
    path = runner.save_checkpoint(step)
    if path is None:
        runtime.print0(f"{PROG}: {name} at step {step}: no --ckpt-dir, nothing saved; "
                       f"exiting with status {128 + signum}", file=sys.stderr)
        return 128 + signum
    runtime.print0(f"{PROG}: {name} at step {step}: checkpoint saved to {path}\n"
                   f"  resume with: {resume_command(run, path, runner.comm.size)}")
    return run.args.preempt_status


def train(run: Run, stop: runtime.StopRequest | None = None) -> dict:
    """Run training; returns {"val_loss_before", "val_loss", "steps", ..., "status"}.
    ``stop``: the signal flag read at every step boundary (None: never stop early)."""
    args, config = run.args, run.config
    backend.set_cpu_threads(args.threads)
    if args.collective_timeout is not None:
        set_collective_timeout(args.collective_timeout)
    comm = make_communicator()                      # MPI starts here, after every check
    if backend.device_name(run.xp) == "gpu":
        select_gpu(choice=run.gpu)      # collective; before the trainer makes any array
    if args.allreduce == "nccl":                    # NCCL: one rank per GPU (an all-gather)
        nccl.check_one_rank_per_gpu(comm.transport)
    runner = (PSRunner if run.ps else Runner)(run, comm)
    start, T, B = runner.start, config.block_size, args.batch_size
    decay_steps = run.decay_steps
    runtime.print0(
        f"{PROG} | model {args.model}: {config.n_layer} layers, {config.n_head} heads, "
        f"width {config.n_embd}, block {T}, vocab {config.vocab_size} | "
        f"{count_parameters(config):,} parameters\n"
        f"  layout: {runner.describe()}\n"
        f"  global batch {B} x {T} = {B * T:,} tokens/step | grad-accum {args.grad_accum} x "
        f"micro-batches {args.micro_batches}\n"
        f"  device {backend.device_name(run.xp)} | dtype {args.dtype} | precision "
        f"{args.precision}{_loss_scale_note(args)} | BLAS threads per rank "
        f"{backend.blas_threads() or args.threads} | {args.optimizer} lr {args.lr:g} -> "
        f"{args.min_lr:g} (warm-up {args.warmup}, cosine to step {decay_steps}) | steps "
        f"{start} -> {args.steps}\n"
        f"  data {args.data or 'pydoc topics'}: {len(run.train.tokens):,} train / "
        f"{len(run.val.tokens):,} val tokens | {flops_per_token(config) * B * T / 1e9:.2f} "
        f"GFLOP/step\n"
        f"  {watchdog_summary()}" + "".join(f"\n  {n}" for n in run.notes))

    log = open(args.log, "a" if run.resume is not None else "w") if (args.log and comm.rank == 0) else None

    def record(entry: dict) -> None:
        if log is not None:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    val_before = runner.evaluate(args.eval_batches)
    record({"step": start, "val_loss": val_before})
    runtime.print0(f"step {start}: val loss {val_before:.4f} ({val_before / math.log(2):.3f} "
                   f"bits/byte)")
    progress = runtime.Progress(start, args.steps)
    runner.say = progress.write
    tracing = Tracing(args.trace, run.trace_steps, runner, progress.write) if run.trace_steps else NoTracing()
    t_start = time.perf_counter()
    val_loss, loss = val_before, float("nan")
    for step in range(start, args.steps):
        if stop is not None:
            signum = runner.agree_stop(stop.signum)
            if signum:
                progress.close()
                if log is not None:
                    log.close()
                return {"val_loss_before": val_before, "val_loss": val_loss, "last_loss": loss,
                        "steps": step - start, "seconds": time.perf_counter() - t_start,
                        "status": stop_for_signal(runner, run, signum, step)}
        tracing.before(step)
        t0 = time.perf_counter()
        lr = cosine_lr(step, args.lr, args.min_lr, args.warmup, decay_steps)
        loss = runner.step(step, lr)
        dt = time.perf_counter() - t0
        tps = B * T / dt
        record({"step": step, "loss": loss, "lr": lr, "tokens_per_s": tps,
                "time": time.perf_counter() - t_start})
        progress.update(step, args.steps, loss, lr, tps, dt)
        done = step + 1
        if args.eval_interval and done % args.eval_interval == 0 and done < args.steps:
            val_loss = runner.evaluate(args.eval_batches)
            record({"step": done, "val_loss": val_loss})
            progress.write(f"step {done}: val loss {val_loss:.4f}")
        if args.ckpt_every and done % args.ckpt_every == 0 and done < args.steps:
            runner.save_checkpoint(done)
        if args.export and args.save_interval and done % args.save_interval == 0:
            runner.save(args.export, done)
        tracing.after(step)
    progress.close()
    elapsed = time.perf_counter() - t_start

    val_loss = runner.evaluate(args.eval_batches)
    record({"step": args.steps, "val_loss": val_loss})
    runner.save_checkpoint(args.steps)
    extra = runner.summary()                      # collective
    if extra:
        record({"step": args.steps, **extra})
    if args.export:
        runner.save(args.export, args.steps)
        runtime.print0(f"exported {args.export}")
    if log is not None:
        log.close()
    bpb = 1.0 / math.log(2)
    runtime.print0(f"done: {args.steps - start} steps in {elapsed:.1f} s | val loss "
                   f"{val_before:.4f} -> {val_loss:.4f} nats = {val_before * bpb:.3f} -> "
                   f"{val_loss * bpb:.3f} bits/byte")
    if args.sample:
        model = runner.generator()                 # collective
        if model is not None:
            prompt = run.xp.asarray(np.array([[10]], dtype=np.int64))   # a newline
            out = model.generate(prompt, args.sample, temperature=0.8, top_k=None, seed=args.seed)
            new = backend.to_host(out)[0, 1:]
            text = decode(new) if config.vocab_size == VOCAB_SIZE else " ".join(map(str, new))
            runtime.print0("--- sample ---\n" + text)
    return {"val_loss_before": val_before, "val_loss": val_loss, "last_loss": loss,
            "steps": args.steps - start, "seconds": elapsed, "status": 0}


def main(argv: list[str] | None = None) -> int:
    """The command line (``python -m mpipar.train``), callable in-process: returns the exit
    status (see the module's docstring)."""
    runtime.install_abort_handler()
    command_line = argv is None                 # not an in-process call (tests)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run = prepare(build_parser().parse_args(argv), runtime.world_size())
    except UsageError as e:
        runtime.print0(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if command_line:
        # under Hydra, a parent process that names this rank if it is killed (runtime.supervise)
        runtime.supervise()
    run.argv = tuple(argv)
    with runtime.StopRequest() as stop:
        try:
            return train(run, stop)["status"]
        except (NonFiniteError, NonFiniteStateError) as e:   # on every rank alike, before
            runtime.print0(f"{PROG}: stopped: {e}", file=sys.stderr)   # the update or the save
            return NONFINITE_STATUS
        except GPUSelectionError as e:     # ranks vs GPUs: raised on every rank alike
            runtime.print0(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        except nccl.SharedGPUError as e:   # found by an all-gather: on every rank alike
            runtime.print0(f"{PROG}: error: --allreduce nccl: {e}", file=sys.stderr)
            return 2
        except CheckpointError as e:       # a refused save: raised on every rank alike
            runtime.print0(f"{PROG}: error: {e}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
