"""python -m mpipar.bench train: training throughput beside PyTorch, one process or dp ranks.

Examples::

    python -m mpipar.bench train --model shakespeare            # B=8, T=256, all cores
    python -m mpipar.bench train --model small --batch-size 16 --steps 10 --threads 1
    python -m mpipar.bench train --model shakespeare --torch-attention manual
    mpiexec -n 2 python -m mpipar.bench train --ranks 2         # dp=2 beside torch DDP (gloo)

Both sides train the same GPT (same config, same initial weights copied from mpipar, float32,
the same batches from the default corpus) with AdamW, and a step is forward + backward +
optimiser update. Steps alternate mpipar / torch after the warm-up, so both see the same
machine load, and each side reports the MEDIAN step time. Achieved FLOP/s count
``model.flops_per_token()`` (6 N plus the attention matmuls, no recomputation) per token.
With ``--threads`` N > 1, torch runs its ops on N intra-op threads and mpipar runs the
batch's rows on N batch threads (``nn.batch_threads``), each with one-thread BLAS.

The torch model is a minimal nanoGPT-style GPT written here (not imported from anywhere), with
``--torch-attention sdpa`` (torch's fused scaled_dot_product_attention, the default and the
stronger baseline) or ``manual`` (the same four ops as mpipar: matmul, mask, softmax, matmul).
Without torch installed the torch column is skipped.

``--ranks N`` (under ``mpiexec -n N``) compares data-parallel training instead: every rank
runs mpipar's ``ParallelTrainer`` with the layout dp=N and, in the same process, the torch
GPT wrapped in ``DistributedDataParallel`` over a gloo process group (rendezvous on
127.0.0.1, a port rank 0 picked), 1 thread each by default, each on its rows of the same
global batch with the same AdamW. Steps alternate mpipar / torch after a barrier, so both
sides see the same machine; a step's time is the slowest rank's.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import time
from typing import Any

import numpy as np

from mpipar import backend
from mpipar.comm import make_communicator
from mpipar.data import VOCAB_SIZE, BatchSampler, load_tokens, split_train_val
from mpipar.nn.batch_threads import BatchThreads
from mpipar.nn.gpt import GPT, PRESETS, flops_per_token
from mpipar.optim import OptimizerSpec
from mpipar.parallel.grad_sync import OVERLAP_CHOICES, resolve_overlap
from mpipar.parallel.layout import Layout
from mpipar.parallel.trainer import ParallelTrainer
from mpipar.runtime import print0

# what a step's time is read from: elapsed time, or the process's CPU time (on a machine other
# jobs share, with 1 thread per process, the work done without the waits for a free core;
# with more threads it also counts threads spinning while they wait for work)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

# both sides: AdamW with these numbers (betas and eps are OptimizerSpec's defaults)
OPTIMIZER = OptimizerSpec("adamw", lr=1e-3, weight_decay=0.1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="shakespeare", help="GPT preset (tiny, small, shakespeare)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (B)")
    p.add_argument("--block-size", type=int, default=None, help="T (default: the preset's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS / torch intra-op threads per process, both sides (default: all "
                        "cores; 1 with --ranks)")
    p.add_argument("--ranks", type=int, default=1,
                   help="data-parallel ranks (run under mpiexec -n RANKS): mpipar dp=RANKS "
                        "beside torch DDP with gloo")
    p.add_argument("--torch-attention", choices=("sdpa", "manual"), default="sdpa")
    p.add_argument("--overlap", default="auto", choices=OVERLAP_CHOICES,
                   help="with --ranks: mpipar all-reduces gradient buckets during backward "
                        "(auto: where every rank has a core for it; see mpipar.train)")
    p.add_argument("--no-torch", action="store_true", help="time mpipar only")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (all its threads), "
                        "which leaves out time spent waiting for a core on a shared machine")
    p.add_argument("--seed", type=int, default=0)


# ---------------------------------------------------------------------------- torch GPT
def build_torch_gpt(config: Any, attention: str) -> Any:
    """A minimal GPT-2 in torch with nanoGPT's parameter names (so state dicts map 1:1)."""
    import torch  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415
    from torch.nn import functional as F  # noqa: PLC0415

    C, NH = config.n_embd, config.n_head
    bias = config.bias

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = nn.Linear(C, 3 * C, bias=bias)
            self.c_proj = nn.Linear(C, C, bias=bias)

        def forward(self, x: Any) -> Any:
            B, T, _ = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in (q, k, v))  # (B,NH,T,hs)
            if attention == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))      # (B,NH,T,T)
                mask = torch.ones(T, T, dtype=torch.bool).triu(1)
                y = att.masked_fill(mask, float("-inf")).softmax(dim=-1) @ v
            return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc = nn.Linear(C, 4 * C, bias=bias)
            self.c_proj = nn.Linear(4 * C, C, bias=bias)

        def forward(self, x: Any) -> Any:
            return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.attn = nn.LayerNorm(C, bias=bias), Attention()
            self.ln_2, self.mlp = nn.LayerNorm(C, bias=bias), MLP()

        def forward(self, x: Any) -> Any:
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(config.vocab_size, C), wpe=nn.Embedding(config.block_size, C),
                h=nn.ModuleList(Block() for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(C, bias=bias)))
            self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
            self.lm_head.weight = self.transformer.wte.weight          # tied, as in GPT-2

        def forward(self, idx: Any, targets: Any) -> Any:
            T = idx.shape[1]
            x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T, device=idx.device))
            for blk in self.transformer.h:
                x = blk(x)
            logits = self.lm_head(self.transformer.ln_f(x))
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    return GPT()


def torch_side(model: Any, config: Any, attention: str) -> tuple[Any, Any]:
    """The torch model with mpipar's initial weights, and its AdamW (same decay groups)."""
    import torch  # noqa: PLC0415

    tm = build_torch_gpt(config, attention)
    sd = {k: torch.from_numpy(np.array(backend.to_host(v), dtype=np.float32))
          for k, v in model.state_dict().items()}
    missing, unexpected = tm.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]        # tied to wte
    if missing or unexpected:
        raise RuntimeError(f"torch GPT names differ from mpipar's: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    params = [p for p in tm.parameters()]
    spec = OPTIMIZER
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": spec.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return tm, torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps)


# ---------------------------------------------------------------------------- timing
def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def _quartiles(xs: list[float]) -> tuple[float, float]:
    """The 25th and 75th percentiles (the spread reported beside a median)."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def _report(sides: list[str], times: dict[str, list[float]], first_loss: dict[str, float],
            tokens: int, flops_tok: float) -> None:
    """The table: per side the median, fastest and slowest step, tokens/s and GFLOP/s; then
    mpipar/torch ratios (of medians, the median of paired steps with its quartiles, of the
    fastest steps)."""
    print0(f"{'implementation':<24} {'ms/step':>9} {'min':>9} {'max':>9} {'tokens/s':>10} "
           f"{'GFLOP/s':>9} {'loss@0':>8}")
    med = {}
    for name in sides:
        med[name] = _median_ms(times[name])
        tps = tokens / (med[name] / 1e3)
        print0(f"{name:<24} {med[name]:>9.1f} {1e3 * min(times[name]):>9.1f} "
               f"{1e3 * max(times[name]):>9.1f} {tps:>10,.0f} {tps * flops_tok / 1e9:>9.2f} "
               f"{first_loss[name]:>8.4f}")
    if len(sides) == 2:
        mname, tname = sides
        ratio = med[tname] / med[mname]
        # steps alternate, so each (mpipar, torch) pair saw about the same machine load: the
        # median of per-pair ratios is the figure least disturbed by other jobs
        pairs = [t / m for m, t in zip(times[mname], times[tname])]
        lo, hi = _quartiles(pairs)
        best = min(times[tname]) / min(times[mname])
        print0(f"ratio mpipar/torch (tokens/s): {ratio:.2f}x of medians | "
               f"{statistics.median(pairs):.2f}x median of paired steps (quartiles {lo:.2f}-"
               f"{hi:.2f}, range {min(pairs):.2f}-{max(pairs):.2f}) | {best:.2f}x of fastest steps")


def _import_torch(threads: int) -> Any:
    """torch with ``threads`` intra-op threads, or None (and a line saying so) without it."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        print0("torch is not installed: timing mpipar only (pip install torch for the baseline)")
        return None
    torch.set_num_threads(threads)
    return torch


def _check(args: argparse.Namespace) -> None:
    if args.model not in PRESETS:
        raise SystemExit(f"bench train: --model {args.model!r} is not one of "
                         f"{', '.join(sorted(PRESETS))}")
    if args.threads is None:
        args.threads = 1 if args.ranks > 1 else (os.cpu_count() or 1)
    if min(args.batch_size, args.steps, args.threads, args.ranks) < 1 or args.warmup < 0:
        raise SystemExit("bench train: --batch-size, --steps, --threads, --ranks must be >= 1")
    if args.batch_size % args.ranks:
        raise SystemExit(f"bench train: --batch-size {args.batch_size} does not split over "
                         f"--ranks {args.ranks}")


def main(args: argparse.Namespace) -> int:
    _check(args)
    if args.ranks > 1:
        return main_ranks(args)
    backend.set_cpu_threads(args.threads)
    torch = None if args.no_torch else _import_torch(args.threads)
    config = PRESETS[args.model].replace(vocab_size=VOCAB_SIZE)
    if args.block_size:
        config = config.replace(block_size=args.block_size)
    B, T = args.batch_size, config.block_size

    model = GPT(config, seed=args.seed, dtype="float32", xp=np)
    params = model.state_dict()
    opt = OPTIMIZER.build(params)
    if torch is not None:
        tmodel, topt = torch_side(model, config, args.torch_attention)
    train, _ = split_train_val(load_tokens(None))
    sampler = BatchSampler(train, B, T, seed=args.seed)
    batches = [sampler.batch(s) for s in range(args.warmup + args.steps)]

    runner = BatchThreads(model)           # more than one thread: rows split over them

    def mp_step(x: np.ndarray, y: np.ndarray) -> float:
        loss, grads = runner.loss_and_grads(x, y)
        opt.step(grads)
        return float(loss)

    sides = [("mpipar", mp_step)] + ([(f"torch eager ({args.torch_attention})",
                                       _torch_step(torch, tmodel, topt))]
                                     if torch is not None else [])
    times, first_loss = _alternate(sides, batches, args.warmup, CLOCKS[args.clock])

    flops_tok = model.flops_per_token()
    print(f"bench train | model {args.model}: {config.n_layer}L {config.n_head}H "
          f"C={config.n_embd} T={T} V={config.vocab_size}, {model.num_parameters():,} params | "
          f"B={B} T={T} ({B * T:,} tokens/step) | float32 | threads {args.threads} "
          f"(numpy BLAS reports {backend.blas_threads()}"
          f"{f', torch {torch.get_num_threads()}' if torch is not None else ''}"
          f"{'; mpipar: batch threads, BLAS 1 each' if args.threads > 1 else ''}) | "
          f"median of {args.steps} steps after {args.warmup} warm-up, {args.clock} clock | "
          f"{flops_tok / 1e6:.1f} MFLOP/token")
    _report([name for name, _ in sides], times, first_loss, B * T, flops_tok)
    return 0



def _torch_step(torch: Any, model: Any, opt: Any) -> Any:
    """One torch training step on a batch of numpy tokens: the loss, as a float."""
    def step(x: np.ndarray, y: np.ndarray) -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step


def _alternate(sides: list[tuple[str, Any]], batches: Any, warmup: int, clock: Any,
               before: Any = None) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each batch through every side in turn (the same machine load for both), ``before()``
    ahead of each step: the step times after ``warmup`` and each side's first loss."""
    times: dict[str, list[float]] = {name: [] for name, _ in sides}
    first_loss: dict[str, float] = {}
    for s, (x, y) in enumerate(batches):
        for name, fn in sides:
            if before is not None:
                before()
            t0 = clock()
            loss = fn(x, y)
            dt = clock() - t0
            first_loss.setdefault(name, loss)
            if s >= warmup:
                times[name].append(dt)
    return times, first_loss

# ---------------------------------------------------------------------------- --ranks N
def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for torch's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sk:
        sk.bind(("127.0.0.1", 0))
        return int(sk.getsockname()[1])


def main_ranks(args: argparse.Namespace) -> int:
    """dp=N training of mpipar beside torch DDP (gloo) on the same N processes."""
    world = make_communicator()
    if world.size != args.ranks:
        if world.rank == 0:
            raise SystemExit(f"bench train: --ranks {args.ranks} runs under mpiexec with "
                             f"{args.ranks} ranks (this job has {world.size}): mpiexec -n "
                             f"{args.ranks} python -m mpipar.bench train --ranks {args.ranks}")
        raise SystemExit(2)
    backend.set_cpu_threads(args.threads)
    torch = None if args.no_torch else _import_torch(args.threads)
    config = PRESETS[args.model].replace(vocab_size=VOCAB_SIZE)
    if args.block_size:
        config = config.replace(block_size=args.block_size)
    B, T, N = args.batch_size, config.block_size, args.ranks

    overlap = resolve_overlap(args.overlap, world, args.threads)
    trainer = ParallelTrainer(world, config, Layout(dp=N), OPTIMIZER, seed=args.seed,
                              hooks=overlap)
    if torch is not None:
        import torch.distributed as dist  # noqa: PLC0415
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        port = world.allgather_json(_free_port() if world.rank == 0 else None)[0]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=world.rank, world_size=N)
        # the same initial weights: the single-process model of the same seed (every layout
        # of mpipar starts from it)
        tmodel, topt = torch_side(GPT(config, seed=args.seed, dtype="float32", xp=np), config,
                                  args.torch_attention)
        ddp = DistributedDataParallel(tmodel)
    train, _ = split_train_val(load_tokens(None))
    sampler = BatchSampler(train, B, T, seed=args.seed)
    batches = [sampler.batch(s, world.rank, N) for s in range(args.warmup + args.steps)]

    def mp_step(x: np.ndarray, y: np.ndarray) -> float:
        return trainer.step(x, y).loss

    sides = [(f"mpipar dp={N}", mp_step)] + ([(f"torch DDP gloo ({args.torch_attention})",
                                                _torch_step(torch, ddp, topt))]
                                              if torch is not None else [])
    # DDP all-reduces the gradient buckets during backward; a barrier starts each step alike
    times, first_loss = _alternate(sides, batches, args.warmup, CLOCKS[args.clock], world.barrier)
    # a step lasts as long as its slowest rank; torch's loss is this rank's rows', so its
    # mean over ranks is the global batch's (mpipar's already is)
    times = {k: [float(t) for t in world.allreduce(np.array(v), op="max")]
             for k, v in times.items()}
    first_loss = {k: float(world.allreduce(np.array([v]), op="avg")[0])
                  for k, v in first_loss.items()}
    if torch is not None:
        dist.destroy_process_group()
    trainer.close()

    flops_tok = flops_per_token(config)
    print0(f"bench train --ranks {N} | model {args.model}: {config.n_layer}L {config.n_head}H "
           f"C={config.n_embd} T={T} V={config.vocab_size} | global B={B} T={T} "
           f"({B * T:,} tokens/step, {B // N} sequences per rank) | float32 | {N} ranks x "
           f"{args.threads} thread(s) (numpy BLAS reports {backend.blas_threads()}"
           f"{f', torch {torch.get_num_threads()}' if torch is not None else ''}) | AdamW | "
           f"mpipar overlap {'on' if overlap else 'off'} ({args.overlap}) | "
           f"median of {args.steps} steps after {args.warmup} warm-up, slowest rank per step, "
           f"{args.clock} clock")
    _report([name for name, _ in sides], times, first_loss, B * T, flops_tok)
    return 0
