"""python -m mpipar.bench gpu: what one GPU gives mpipar, beside PyTorch on the same GPU.

Examples::

    python -m mpipar.bench gpu                                  # GPT-2 small, < 5 minutes
    python -m mpipar.bench gpu --json gpu.json --batch-size 4 --steps 5

Four tables, printed on rank 0 (and all of it as JSON with ``--json``):

* **matmul** TFLOP/s of an n x n x n product by dtype: CuPy in float32 (TF32 when CuPy was
  started with ``CUPY_TF32=1``: the row says which) and float16 (CuPy has no bfloat16), and
  torch in float32, tf32, float16 and bfloat16 where torch sees the GPU;
* **training**: tokens/s and MFU of one optimiser step (forward, backward, AdamW, the
  trainer's norm and numerics check) of a GPT-2 small shape (12 layers, 12 heads, width 768,
  vocabulary 50304, block 1024: 124M parameters) through ``ParallelTrainer`` in float32, beside
  the same shape in torch eager (AdamW). mpipar trains in float32 (and float64) only today,
  so no 16-bit row is measured for it: the table says so. MFU is model FLOPs
  (``flops_per_token``: 6 N plus attention, no recomputation) per second over the GPU's
  dense peak for the precision (a table of known GPUs, or ``--peak-tflops``);
* **transfers** GB/s: device -> pageable host (``.get()``), device -> pinned host, pinned host
  -> device, the staged round trip device -> pinned -> device (what a collective on a
  non-CUDA-aware MPI pays) and a direct device -> device copy;
* **host synchronisations per step**, where the GPU module counts them (``measure``'s
  ``count_syncs``: the strict CuPy double of the tests does, by call site); CuPy cannot be
  counted from Python (its synchronising calls are C), and the table says so.

Times are medians of ``--steps`` after ``--warmup``, each bracketed by a stream
synchronisation. The same code runs on the strict CuPy double with ``--model tiny``
(tests/bench/test_gpu_bench.py), which exercises every line but the timings' meaning.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from typing import Any, Callable

import numpy as np

from mpipar import backend
from mpipar.bench.train import OPTIMIZER, build_torch_gpt
from mpipar.comm import make_communicator
from mpipar.nn.gpt import PRESETS, GPTConfig, count_parameters, flops_per_token
from mpipar.parallel.layout import Layout
from mpipar.parallel.trainer import ParallelTrainer
from mpipar.runtime import print0

GPT2_SMALL = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
MODELS = {"gpt2": GPT2_SMALL, "tiny": PRESETS["tiny"]}

# dense peak TFLOP/s by precision (vendor data sheets, SXM parts), by a word of the name
PEAKS = {"H200": {"float32": 67.0, "tf32": 495.0, "float16": 989.0, "bfloat16": 989.0},
         "H100": {"float32": 67.0, "tf32": 495.0, "float16": 989.0, "bfloat16": 989.0},
         "A100": {"float32": 19.5, "tf32": 156.0, "float16": 312.0, "bfloat16": 312.0}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gpt2", choices=sorted(MODELS),
                   help="gpt2: the 124M GPT-2 small shape; tiny: for tests")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (B)")
    p.add_argument("--block-size", type=int, default=None, help="T (default: the model's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--matmul-n", type=int, default=8192, help="n of the n x n x n products")
    p.add_argument("--transfer-mb", type=float, default=256.0, help="MiB per transfer")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense float32 peak for MFU (default: from a table by name)")
    p.add_argument("--no-torch", action="store_true", help="measure mpipar only")
    p.add_argument("--json", metavar="FILE", help="write every measurement as JSON")
    p.add_argument("--seed", type=int, default=0)


def _median_s(fn: Callable[[], Any], sync: Callable[[], Any], steps: int, warmup: int) -> float:
    """Median seconds of ``fn()``, each call bracketed by ``sync()`` (the stream's
    synchronisation: ``backend.synchronize`` for mpipar's arrays, ``torch.cuda.synchronize``)."""
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _torch_cuda() -> Any:
    """torch where it imports and sees a GPU, else None."""
    try:
        import torch  # noqa: PLC0415  (optional)
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def matmul_rows(xp: Any, torch: Any, n: int, steps: int, warmup: int) -> list[dict]:
    """TFLOP/s of n x n x n products: CuPy by dtype, then torch by dtype."""
    flop = 2.0 * n ** 3
    tf32 = os.environ.get("CUPY_TF32", "0") == "1"
    rows = []
    for dtype in ("float32", "float16"):
        a = xp.ones((n, n), dtype=dtype)
        b = xp.ones((n, n), dtype=dtype)
        s = _median_s(lambda: xp.matmul(a, b), lambda: backend.synchronize(xp), steps, warmup)
        name = "tf32" if dtype == "float32" and tf32 else dtype
        rows.append({"library": "cupy", "dtype": name, "tflops": flop / s / 1e12, "seconds": s})
    rows.append({"library": "cupy", "dtype": "bfloat16", "tflops": None,
                 "note": "CuPy has no bfloat16"})
    if not tf32:
        rows.append({"library": "cupy", "dtype": "tf32", "tflops": None,
                     "note": "start with CUPY_TF32=1 for TF32 matmuls"})
    if torch is None:
        return rows
    for name, dtype, allow in (("float32", torch.float32, False), ("tf32", torch.float32, True),
                               ("float16", torch.float16, False), ("bfloat16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = allow
        a = torch.ones((n, n), dtype=dtype, device="cuda")
        b = torch.ones((n, n), dtype=dtype, device="cuda")
        s = _median_s(lambda: a @ b, torch.cuda.synchronize, steps, warmup)
        rows.append({"library": "torch", "dtype": name, "tflops": flop / s / 1e12, "seconds": s})
    torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def _peak(name: str, precision: str, given: float | None) -> float | None:
    if given is not None and precision in ("float32", "tf32"):
        return given
    for word, peaks in PEAKS.items():
        if word in name:
            return peaks[precision]
    return None


def train_rows(xp: Any, torch: Any, config: GPTConfig, B: int, steps: int, warmup: int,
               seed: int, gpu: str, peak_tflops: float | None,
               count_syncs: Callable[[], Any] | None) -> tuple[list[dict], dict]:
    """One optimiser step's tokens/s and MFU, mpipar's trainer then torch eager; and the host
    synchronisations of one mpipar step (where ``count_syncs`` gives a counting context)."""
    T = config.block_size
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, config.vocab_size, size=(B, T), dtype=np.int64)
    tgt = rng.integers(0, config.vocab_size, size=(B, T), dtype=np.int64)
    flop_tok = flops_per_token(config)
    precision = "tf32" if os.environ.get("CUPY_TF32", "0") == "1" else "float32"
    peak = _peak(gpu, precision, peak_tflops)

    def row(library: str, prec: str, s: float, pk: float | None) -> dict:
        tps = B * T / s
        return {"library": library, "precision": prec, "ms_per_step": 1e3 * s, "tokens_per_s": tps,
                "tflops": tps * flop_tok / 1e12, "mfu": (tps * flop_tok / 1e12 / pk) if pk else None}

    world = make_communicator(abort_on_exception=False)
    trainer = ParallelTrainer(world, config, Layout(), OPTIMIZER, seed=seed, dtype="float32", xp=xp)
    d_idx, d_tgt = xp.asarray(idx), xp.asarray(tgt)
    sync = lambda: backend.synchronize(xp)  # noqa: E731
    rows = [row("mpipar", precision, _median_s(lambda: trainer.step(d_idx, d_tgt), sync, steps, warmup),
                peak)]
    syncs: dict = {"per_step": None, "how": "not counted: CuPy's synchronising calls are C, out of "
                   "Python's reach; tests/bench/test_gpu_bench.py counts them on the strict CuPy "
                   "double"}
    if count_syncs is not None:
        with count_syncs() as c:
            trainer.step(d_idx, d_tgt)
        syncs = {"per_step": c.total("syncs"), "d2h": c.total("d2h"),
                 "by_site": dict(c.syncs.most_common()),
                 "how": "counted by the GPU module (the strict CuPy double), one trainer step"}
    trainer.close()
    rows.append({"library": "mpipar", "precision": "float16/bfloat16", "ms_per_step": None,
                 "note": "mpipar trains in float32 and float64 only today: not measured"})
    if torch is not None:
        model = build_torch_gpt(config, "sdpa").to("cuda")
        params = list(model.parameters())
        opt = torch.optim.AdamW(
            [{"params": [p for p in params if p.dim() >= 2], "weight_decay": OPTIMIZER.weight_decay},
             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
            lr=OPTIMIZER.lr, betas=OPTIMIZER.betas, eps=OPTIMIZER.eps)
        t_idx, t_tgt = torch.from_numpy(idx).cuda(), torch.from_numpy(tgt).cuda()

        def torch_step(autocast: Any = None) -> None:
            opt.zero_grad(set_to_none=True)
            with autocast if autocast is not None else contextlib.nullcontext():
                loss = model(t_idx, t_tgt)
            loss.backward()
            opt.step()
        tsync = torch.cuda.synchronize
        rows.append(row("torch eager", "float32", _median_s(torch_step, tsync, steps, warmup),
                        _peak(gpu, "float32", peak_tflops)))
        bf16 = lambda: torch_step(torch.autocast("cuda", dtype=torch.bfloat16))  # noqa: E731
        rows.append(row("torch eager", "bfloat16 autocast", _median_s(bf16, tsync, steps, warmup),
                        _peak(gpu, "bfloat16", None)))
    return rows, syncs


def transfer_rows(xp: Any, mib: float, steps: int, warmup: int) -> list[dict]:
    """GB/s of the copies a collective's staging makes, and a direct device copy."""
    n = max(int(mib * 2 ** 20) // 4, 1)
    x = xp.ones(n, dtype=np.float32)
    y = xp.empty(n, dtype=np.float32)
    pinned = backend.pinned_empty(n, np.float32)
    x.get(out=pinned)      # touched once, as a pooled staging buffer is

    def staged() -> None:
        x.get(out=pinned)
        y.set(pinned)
    cases = [("device -> pageable host", lambda: backend.to_host(x)),
             ("device -> pinned host", lambda: x.get(out=pinned)),
             ("pinned host -> device", lambda: y.set(pinned)),
             ("staged: device -> pinned -> device", staged),
             ("direct: device -> device", lambda: xp.copyto(y, x))]
    return [{"copy": name, "bytes": 4 * n, "gb_per_s": 4 * n / s / 1e9, "seconds": s}
            for name, fn in cases for s in [_median_s(fn, lambda: backend.synchronize(xp), steps, warmup)]]


def measure(args: argparse.Namespace, count_syncs: Callable[[], Any] | None = None) -> dict:
    """Every table's rows, as one dict (what ``--json`` writes). ``count_syncs``: a context
    manager factory whose value has ``total("syncs")`` (the strict double's ``counting``)."""
    xp = backend.get_xp("gpu")
    torch = None if args.no_torch else _torch_cuda()
    config = MODELS[args.model]
    if args.block_size:
        config = config.replace(block_size=args.block_size)
    gpu = backend.gpu_name()
    train, syncs = train_rows(xp, torch, config, args.batch_size, args.steps, args.warmup,
                              args.seed, gpu, args.peak_tflops, count_syncs)
    return {"gpu": gpu, "model": args.model, "parameters": count_parameters(config),
            "batch": [args.batch_size, config.block_size],
            "torch": None if torch is None else torch.__version__,
            "matmul": matmul_rows(xp, torch, args.matmul_n, args.steps, args.warmup),
            "train": train, "transfers": transfer_rows(xp, args.transfer_mb, args.steps, args.warmup),
            "host_syncs": syncs}


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report(r: dict) -> str:
    """The tables as text."""
    B, T = r["batch"]
    lines = [f"bench gpu | {r['gpu'] or 'GPU'} | model {r['model']} ({r['parameters']:,} params), "
             f"B={B} T={T} | torch {r['torch'] or 'not on this GPU'}",
             f"{'matmul':<8} {'dtype':<10} {'TFLOP/s':>9}  note"]
    lines += [f"{m['library']:<8} {m['dtype']:<10} {_fmt(m['tflops'], '9.1f'):>9}  {m.get('note', '')}"
              for m in r["matmul"]]
    lines.append(f"{'training':<12} {'precision':<18} {'ms/step':>9} {'tokens/s':>10} "
                 f"{'TFLOP/s':>8} {'MFU':>6}  note")
    lines += [f"{t['library']:<12} {t['precision']:<18} {_fmt(t['ms_per_step'], '9.1f'):>9} "
              f"{_fmt(t.get('tokens_per_s'), '10,.0f'):>10} {_fmt(t.get('tflops'), '8.1f'):>8} "
              f"{_fmt(t.get('mfu') and 100 * t['mfu'], '5.1f') + ('%' if t.get('mfu') else ''):>6}  "
              f"{t.get('note', '')}"
              for t in r["train"]]
    lines.append(f"{'transfer':<36} {'MiB':>7} {'GB/s':>8}")
    lines += [f"{x['copy']:<36} {x['bytes'] / 2 ** 20:>7.1f} {x['gb_per_s']:>8.2f}" for x in r["transfers"]]
    s = r["host_syncs"]
    lines.append(f"host synchronisations per mpipar step: {_fmt(s['per_step'], 'd')} ({s['how']})")
    return "\n".join(lines)


def main(args: argparse.Namespace, count_syncs: Callable[[], Any] | None = None) -> int:
    if min(args.batch_size, args.steps, args.matmul_n) < 1 or args.warmup < 0 or args.transfer_mb <= 0:
        raise SystemExit("bench gpu: --batch-size, --steps, --matmul-n must be >= 1, "
                         "--warmup >= 0, --transfer-mb > 0")
    try:
        r = measure(args, count_syncs)
    except RuntimeError as e:
        if backend.cupy_available():
            raise
        raise SystemExit(f"bench gpu: {e}") from None
    print0(report(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0
