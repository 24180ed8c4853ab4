"""``python -m mpipar.bench calibrate --compute``: this machine's compute curve, for the
simulator's compute model (``mpipar.sim.compute.ComputeModel``).

    python -m mpipar.bench calibrate --compute                  # -> comm/profiles/local.json
    python -m mpipar.bench calibrate --compute --threads 2 --output my-profile.json

One process, no MPI. At the thread count the runs will use (``--threads``, default 1, as
the trainer and the benchmarks run each rank: ``backend.set_cpu_threads``), it times

* NumPy matmuls over a grid of (m, n, k) from 64 to 4096 (those of at most 2^29
  multiply-adds, so the largest take about 15 ms), in float32 and float64, and the
  batched matmuls of attention (T x T scores over hs, and back, for B x NH heads);
* memory-bound kernels by kind, over operands from 4 KiB (cache) to 16 MiB (memory: three of them overflow the 32 MiB
  L3 here):
  ``add``/``multiply`` (elementwise), ``exp``, ``tanh``, a last-axis ``sum``/``max``
  (reduction), an assignment (copy), ``fill``, a row gather ``w[idx]``, ``np.add.at``
  (scatter) and ``Generator.random`` (rng), each with the bytes the symbolic namespace counts
  for it (every operand read and every output written);
* the per-call overhead of a one-element ``np.add`` (the launch of the model).

``--compute-check`` also times a real GPT step once per measurement round (``RealStep``)
and prints it beside its prediction from the new section (``check_step``): on a shared
machine the state drifts by 2x within minutes here, so figures and step share the rounds.

Each figure is the median of ``--compute-repeats`` samples (read on ``clock_for``'s clock:
with one thread, its CPU time), each sample timing as many calls
as fill about 2 ms (one call for the large ones), all sizes of a kind interleaved in each
round. It writes the ``"compute"`` section (top-level key) of the JSON at ``--output``
(default: the shipped ``local`` profile), keeping everything else in the file. The local
"peak" of a dtype is the best GEMM throughput measured, so the curve's efficiencies are
fractions of what this machine reaches, not of a datasheet number.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mpipar import backend
from mpipar.comm.network import PROFILE_DIR
from mpipar.nn.gpt import GPT, PRESETS
from mpipar.optim import OptimizerSpec
from mpipar.sim.compute import ComputeModel
from mpipar.sim.symbolic import SymbolicNamespace

DIMS = (64, 128, 256, 512, 1024, 2048, 4096)
MAX_MACS = 1 << 29                       # multiply-adds of the largest GEMM timed
# (T, hs, B*NH) of the attention products timed as batched matmuls
ATTENTION = ((64, 32, 32), (64, 64, 16), (128, 32, 32), (128, 64, 16), (256, 64, 24))
MEM_BYTES = tuple(4096 << (2 * i) for i in range(7))  # 4 KiB .. 16 MiB per operand
SAMPLE_S = 2e-3                          # each sample times calls for about this long


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compute", action="store_true",
                   help="measure this machine's compute curve (GEMMs by shape, memory-bound "
                        "kernels by kind and size, per-call overhead) instead of the network; "
                        "one process, writes the 'compute' section of the profile")
    p.add_argument("--threads", type=int, default=1,
                   help="--compute: CPU threads per rank to measure at (default 1, as training runs)")
    p.add_argument("--compute-repeats", type=int, default=5,
                   help="--compute: samples per figure (median; default 5)")
    p.add_argument("--compute-check", action="store_true",
                   help="--compute: then time a real GPT step on NumPy and print it beside the "
                        "step predicted from the section just measured")


def clock_for(threads: int) -> Callable[[], float]:
    """The clock figures are read with: this thread's CPU time when it does all the work (one
    thread: BLAS and the elementwise chains run on the caller), so that other processes'
    time slices on a shared machine are not counted (on this 2-core VM, with other test runs
    beside it, wall time per step came out 2-4x the CPU time); wall time with more threads."""
    return time.thread_time if threads == 1 else time.perf_counter


_clock: Callable[[], float] = time.perf_counter


def _timer(fn: Callable[[], Any]) -> Callable[[], float]:
    """A sampler of ``fn``'s seconds per call: as many calls as fill SAMPLE_S (found once)."""
    clock = _clock
    fn()
    t0 = clock()
    fn()
    once = clock() - t0
    n = max(1, min(10_000, int(SAMPLE_S / max(once, 1e-9))))

    def sample() -> float:
        t0 = clock()
        for _ in range(n):
            fn()
        return (clock() - t0) / n

    return sample


Beside = Sequence[Callable[[], Any]]


def _medians(samplers: dict[Any, Callable[[], float]], repeats: int,
             beside: Beside = ()) -> dict[Any, float]:
    """Median seconds per call of every sampler, the keys interleaved in each round; each
    of ``beside`` (the check's real step) runs once per round too, in the same state."""
    got: dict[Any, list[float]] = {k: [] for k in samplers}
    for _ in range(repeats):
        for k, s in samplers.items():
            got[k].append(s())
        for fn in beside:
            fn()
    return {k: statistics.median(v) for k, v in got.items()}


def gemm_shapes() -> list[tuple[int, int, int, int]]:
    """(m, n, k, batch) timed: the grid, then attention's batched products."""
    grid = [(m, n, k, 1) for m in DIMS for n in DIMS for k in DIMS if m * n * k <= MAX_MACS]
    att = []
    for T, hs, b in ATTENTION:
        att += [(T, T, hs, b), (T, hs, T, b)]      # scores q k^T; att v (and the backward's)
    return grid + att


def measure_gemms(dtype: str, repeats: int, beside: Beside = ()) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    samplers = {}
    for m, n, k, b in gemm_shapes():
        lead = (b,) if b > 1 else ()
        a = rng.standard_normal(lead + (m, k)).astype(dtype)
        w = rng.standard_normal(lead + (k, n)).astype(dtype)
        out = np.empty(lead + (m, n), dtype=dtype)
        samplers[(m, n, k, b)] = _timer(lambda a=a, w=w, out=out: np.matmul(a, w, out=out))
    med = _medians(samplers, repeats, beside)
    return [{"m": m, "n": n, "k": k, "batch": b,
             "tflops": round(2 * m * n * k * b / t / 1e12, 6)} for (m, n, k, b), t in med.items()]


def _memory_kernels(nbytes: int) -> dict[str, tuple[Callable[[], Any], int]]:
    """kind -> (one call on operands of ``nbytes`` float32, the bytes the symbolic namespace
    charges for that call)."""
    n = max(1, nbytes // 4)
    a, b, c = (np.full(n, 0.5, dtype=np.float32) for _ in range(3))
    rows = max(1, n // 256)
    a2, r2 = a[:rows * 256].reshape(rows, 256), np.empty((rows, 1), dtype=np.float32)
    C = 64
    w = np.zeros((1024, C), dtype=np.float32)
    idx = np.random.default_rng(0).integers(0, 1024, max(1, n // C))
    g = np.ones((idx.size, C), dtype=np.float32)
    gen = np.random.default_rng(1)
    return {
        "add": (lambda: np.add(a, b, out=c), 3 * a.nbytes),
        "multiply": (lambda: np.multiply(a, b, out=c), 3 * a.nbytes),
        "exp": (lambda: np.exp(a, out=c), 2 * a.nbytes),
        "tanh": (lambda: np.tanh(a, out=c), 2 * a.nbytes),
        "sum": (lambda: a2.sum(axis=-1, keepdims=True, out=r2), a2.nbytes + r2.nbytes),
        "max": (lambda: a2.max(axis=-1, keepdims=True, out=r2), a2.nbytes + r2.nbytes),
        "copy": (lambda: np.copyto(c, a), 2 * a.nbytes),
        "fill": (lambda: c.fill(0.0), c.nbytes),
        "gather": (lambda: w[idx], idx.nbytes + 2 * g.nbytes),
        "scatter": (lambda: np.add.at(w, idx, g), idx.nbytes + 3 * g.nbytes),
        "rng": (lambda: gen.random(n, dtype=np.float32), a.nbytes),
    }


# measured name -> the model's kind (several measured names average into one kind)
KIND_OF = {"add": "elementwise", "multiply": "elementwise", "exp": "exp", "tanh": "tanh",
           "sum": "reduction", "max": "reduction", "copy": "copy", "fill": "fill",
           "gather": "gather", "scatter": "scatter", "rng": "rng"}


def measure_memory(repeats: int, beside: Beside = ()) -> tuple[dict[str, list[dict[str, float]]], float]:
    """kind -> points {bytes, gbps} (the bytes the namespace charges, over the median time),
    and the fastest median (seconds)."""
    samplers, charged = {}, {}
    for size in MEM_BYTES:
        for name, (fn, nbytes) in _memory_kernels(size).items():
            samplers[(name, size)] = _timer(fn)
            charged[(name, size)] = nbytes
    med = _medians(samplers, repeats, beside)
    by_kind: dict[str, dict[int, list[float]]] = {}
    for (name, size), t in med.items():
        by_kind.setdefault(KIND_OF[name], {}).setdefault(charged[(name, size)], []).append(t)
    out = {}
    for kind, per in by_kind.items():
        out[kind] = [{"bytes": nb, "gbps": round(nb / statistics.mean(ts) / 1e9, 4)}
                     for nb, ts in sorted(per.items())]
    out["transcendental"] = out["exp"]         # log and powers: priced as exp
    return out, min(med.values())


def measure_launch(repeats: int) -> float:
    """Seconds of a one-element ``np.add`` into an output: NumPy's fixed cost per call."""
    a, b, c = np.ones(1, np.float32), np.ones(1, np.float32), np.empty(1, np.float32)
    return _medians({0: _timer(lambda: np.add(a, b, out=c))}, max(repeats, 5))[0]


# a GPT too small to compute anything: its step time is the code's own cost per kernel
DISPATCH_CONFIG = PRESETS["tiny"].replace(vocab_size=16, block_size=4, n_layer=2, n_head=2, n_embd=8)


def measure_dispatch(section: dict[str, Any], repeats: int) -> float:
    """Seconds per kernel that the section's prices miss at negligible sizes: the measured
    step of ``DISPATCH_CONFIG`` (batch 2) less its predicted step, over the kernels it runs
    (counted on the symbolic namespace). What remains is the interpreter's time between two
    NumPy calls in mpipar's layers, which the per-kernel launch of a bare ``np.add`` does not
    include."""
    spec = OptimizerSpec("adamw", lr=1e-3, weight_decay=0.1)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, DISPATCH_CONFIG.vocab_size, (2, DISPATCH_CONFIG.block_size))
    model = GPT(DISPATCH_CONFIG, dtype="float32")
    opt = spec.build(model.state_dict())
    for _ in range(3):                                       # untimed: state made
        _phases(model, opt, idx, idx, _clock)
    real = min(_phases(model, opt, idx, idx, _clock)["step"] for _ in range(max(repeats, 5) * 4))
    spent = [0.0]
    ns = SymbolicNamespace(ComputeModel.from_json(dict(section, dispatch_s=0.0), "local"),
                           lambda kind, seconds: spent.__setitem__(0, spent[0] + seconds))
    sym = GPT(DISPATCH_CONFIG, dtype="float32", xp=ns)
    sopt = spec.build(sym.state_dict())
    x = ns.asarray(idx)
    _phases(sym, sopt, x, x, lambda: spent[0])               # a first step: state made
    ns.reset_counts()
    predicted = _phases(sym, sopt, x, x, lambda: spent[0])["step"]
    kernels = sum(ns.kernels.values())
    return max(real - predicted, 0.0) / max(kernels, 1)


def _mix_seconds(iterations: int) -> float:
    """CPU seconds per iteration of a fixed mix of kernels (a 256^3 float32 matmul and two
    elementwise passes over 4 MiB), after a warm-up."""
    rng = np.random.default_rng(0)
    a, b = rng.random((256, 256), dtype=np.float32), rng.random((256, 256), dtype=np.float32)
    x, y = np.ones(1 << 20, np.float32), np.ones(1 << 20, np.float32)
    o = np.empty_like(x)

    def mix() -> None:
        a @ b
        np.add(x, y, out=o)
        np.multiply(o, x, out=o)

    for _ in range(3):
        mix()
    t0 = time.process_time()
    for _ in range(iterations):
        mix()
    return (time.process_time() - t0) / iterations


def _mix_worker(start: Any, out: Any, iterations: int) -> None:
    start.wait()
    out.put(_mix_seconds(iterations))


def measure_concurrency(repeats: int, processes: int | None = None) -> dict[str, float]:
    """How much slower one process computes while k processes compute at once on this host
    (shared cores, caches and memory bandwidth), k = 1 .. the CPU count: the median time of
    the kernel mix with k processes over its time alone. The simulator scales every kernel
    of a rank by the factor for the ranks that share its host."""
    n = processes or os.cpu_count() or 1
    iterations = 40
    alone = statistics.median(_mix_seconds(iterations) for _ in range(max(repeats, 3)))
    out = {"1": 1.0}
    ctx = mp.get_context("fork")
    for k in range(2, n + 1):
        samples = []
        for _ in range(max(repeats, 3)):
            start, q = ctx.Barrier(k), ctx.Queue()
            procs = [ctx.Process(target=_mix_worker, args=(start, q, iterations)) for _ in range(k)]
            for p in procs:
                p.start()
            samples += [q.get(timeout=120) for _ in procs]
            for p in procs:
                p.join(timeout=60)
        out[str(k)] = statistics.median(samples) / alone
    return out


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


def build_section(threads: int, repeats: int, beside: Beside = ()) -> dict[str, Any]:
    """Measure and return the ``"compute"`` section (see the module docstring); ``beside``
    run once per measurement round (``RealStep``)."""
    global _clock
    backend.set_cpu_threads(threads)
    _clock = clock_for(threads)
    t0 = time.perf_counter()
    launch = measure_launch(repeats)
    curves, peaks = {}, {}
    for dtype in ("float32", "float64"):
        pts = measure_gemms(dtype, repeats, beside)
        peaks[dtype] = max(p["tflops"] for p in pts) * 1e12
        curves[dtype] = {"includes_launch": True, "points": pts}
    memory, fastest = measure_memory(repeats, beside)
    # the fixed cost is at most what the fastest kernel took (a fill or a small copy can
    # dispatch faster than a ufunc with an output argument): below it no curve could pass
    # through that kernel's time
    launch = min(launch, 0.9 * fastest)
    stream = max(p["gbps"] for kind in ("elementwise", "copy") for p in memory[kind]
                 if p["bytes"] >= MEM_BYTES[-1]) * 1e9
    section = {
        "name": "local",
        "launch_s": launch,
        "memory_bytes_per_s": stream,
        "peak_flops": peaks,
        "gemm": {"batched": "loop", "curves": curves},
        "memory": {kind: {"points": pts} for kind, pts in memory.items()},
        # NumPy runs a fusion region's passes one by one, cache block by cache block
        # (nn/blocking.py): each pass priced at the block's size (sim/symbolic.py)
        "fusion": "blocked",
        "threads": threads,
        "sources": {
            "all": "measured by python -m mpipar.bench calibrate --compute (NumPy, one process, "
                   f"{threads} thread(s); medians of {repeats} samples)",
            "peak_flops": "the best GEMM throughput measured in the grid, per dtype",
            "memory_bytes_per_s": "the best of add/multiply/copy bandwidth at 16 MiB operands",
            "launch_s": "a one-element np.add into an output array (at most 0.9 x the "
                        "fastest memory-bound kernel measured)",
            "fusion": "how NumPy runs mpipar's fusion regions (nn/blocking.py): every pass, "
                      "block by block"},
        "metadata": {
            "host": platform.node(), "cpu": _cpu(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "blas_threads": backend.blas_threads(),
            "clock": "thread CPU time" if threads == 1 else "wall time",
            "libraries": {"python": platform.python_version(), "numpy": np.__version__},
            "seconds": round(time.perf_counter() - t0, 1)},
    }
    section["dispatch_s"] = measure_dispatch(section, repeats)
    section["concurrency"] = measure_concurrency(repeats)
    section["sources"]["concurrency"] = (
        "a fixed kernel mix (256^3 matmul, two 4 MiB elementwise passes) run by k processes at "
        "once over its time alone, per k up to the CPU count (medians)")
    section["sources"]["dispatch_s"] = (
        "a real AdamW step of a GPT too small to compute anything (2 layers, width 8, block 4, "
        "batch 2) less its prediction from the other numbers, per kernel it runs: the Python "
        "between two NumPy calls in mpipar's layers")
    ComputeModel.from_json(section, "local")   # it loads: a model can be built from it
    return section


def write_section(path: str | Path, section: dict[str, Any]) -> None:
    """Put ``section`` under the top-level key "compute" of the JSON at ``path`` (made if
    absent), keeping the rest of the file."""
    path = Path(path)
    d = json.loads(path.read_text()) if path.exists() else {}
    d["compute"] = section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d, indent=2) + "\n")


def summary(section: dict[str, Any]) -> str:
    """A few lines of what was measured: the GEMM curve at square sizes, bandwidths."""
    cm = ComputeModel.from_json(section, "local")
    lines = [f"# calibrate --compute: {section['metadata']['cpu']}, numpy "
             f"{section['metadata']['libraries']['numpy']}, {section['threads']} thread(s), "
             f"{section['metadata']['seconds']} s",
             f"# per-call overhead {section['launch_s'] * 1e6:.2f} us; peak float32 "
             f"{section['peak_flops']['float32'] / 1e9:.1f} GFLOP/s, float64 "
             f"{section['peak_flops']['float64'] / 1e9:.1f} GFLOP/s",
             f"#{'m=n=k':>7} {'float32 GFLOP/s':>16} {'float64 GFLOP/s':>16}"]
    for d in DIMS:
        if d ** 3 > MAX_MACS:
            break
        f = cm.flops(d, d, d)
        lines.append(f"{d:8d} {f / cm.gemm_time(d, d, d, 1, 'float32') / 1e9:16.1f} "
                     f"{f / cm.gemm_time(d, d, d, 1, 'float64') / 1e9:16.1f}")
    kinds = list(section["memory"])
    lines.append(f"#{'bytes':>9} " + " ".join(f"{k[:11]:>11}" for k in kinds) + "   (GB/s)")
    for nb in (16 << 10, 1 << 20, 16 << 20, 192 << 20):
        lines.append(f"{nb:10d} " + " ".join(f"{cm.memory_bandwidth(nb, k) / 1e9:11.2f}" for k in kinds))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    real = [RealStep(args.threads)] if args.compute_check else []
    section = build_section(args.threads, args.compute_repeats, real)
    out = args.output or PROFILE_DIR / "local.json"
    write_section(out, section)
    print(summary(section))
    print(f"# saved the compute section of {out}")
    if args.compute_check:
        print(format_check(check_step(section, real[0])))
    return 0


# -- the check: a real training step beside its prediction ---------------------------------------

CHECK_BATCH = 8


def _phases(model: GPT, opt: Any, x: Any, y: Any, clock: Callable[[], float]) -> dict[str, float]:
    """One training step of ``model``, timed on ``clock`` by part."""
    t0 = clock()
    model.zero_grad()
    _, _, cache = model.forward(x, y)
    t1 = clock()
    model.backward(cache)
    del cache
    t2 = clock()
    opt.step(model.grads)
    t3 = clock()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0}


class RealStep:
    """A real GPT step on NumPy, for the check: the ``small`` preset (4 layers, width 128, 4
    heads, block 64), batch 8, float32, AdamW. Each call runs and times one step (on
    ``clock_for(threads)``); ``runs`` keeps them. Run between the measurement rounds, it
    meets the machine in the state the figures were measured in."""

    config = PRESETS["small"]
    spec = OptimizerSpec("adamw", lr=1e-3, weight_decay=0.1)

    def __init__(self, threads: int) -> None:
        backend.set_cpu_threads(threads)
        self.clock = clock_for(threads)
        rng = np.random.default_rng(0)
        shape = (CHECK_BATCH, self.config.block_size)
        self.idx = rng.integers(0, self.config.vocab_size, shape)
        self.tgt = rng.integers(0, self.config.vocab_size, shape)
        self.model = GPT(self.config, dtype="float32")
        self.opt = self.spec.build(self.model.state_dict())
        for _ in range(2):                                  # untimed: state made, pages touched
            _phases(self.model, self.opt, self.idx, self.tgt, self.clock)
        self.runs: list[dict[str, float]] = []

    def __call__(self) -> None:
        self.runs.append(_phases(self.model, self.opt, self.idx, self.tgt, self.clock))

    def predict(self, section: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
        """The same step on the symbolic namespace priced by ``section``: seconds by part,
        and by kernel kind."""
        spent = [0.0]

        def charge(kind: str, seconds: float) -> None:
            spent[0] += seconds

        ns = SymbolicNamespace(ComputeModel.from_json(section, "local"), charge)
        sym = GPT(self.config, dtype="float32", xp=ns)
        opt = self.spec.build(sym.state_dict())
        x, y = ns.asarray(self.idx), ns.asarray(self.tgt)
        _phases(sym, opt, x, y, lambda: spent[0])           # a first step: optimiser state made
        ns.reset_counts()
        return _phases(sym, opt, x, y, lambda: spent[0]), dict(ns.seconds)


def check_step(section: dict[str, Any], real: RealStep) -> dict[str, dict[str, float]]:
    """{"measured": medians of ``real.runs`` by part (forward, backward, optimizer, step),
    "predicted": the same from ``section``, "predicted_kinds": seconds per kernel kind}."""
    if not real.runs:
        real()
    measured = {k: statistics.median(r[k] for r in real.runs) for k in real.runs[0]}
    predicted, kinds = real.predict(section)
    return {"measured": measured, "predicted": predicted, "predicted_kinds": kinds,
            "steps": {"timed": float(len(real.runs))}}


def format_check(check: dict[str, dict[str, float]]) -> str:
    m, p = check["measured"], check["predicted"]
    lines = [f"# a real GPT step (small preset, batch {CHECK_BATCH}, float32; median of "
             f"{int(check['steps']['timed'])} run between the measurement rounds) beside its "
             f"prediction on this compute section",
             f"#{'part':>9} {'measured(ms)':>13} {'predicted(ms)':>14} {'error':>7}"]
    for k in ("forward", "backward", "optimizer", "step"):
        lines.append(f"{k:>10} {m[k] * 1e3:13.2f} {p[k] * 1e3:14.2f} {(p[k] / m[k] - 1) * 100:+6.1f}%")
    kinds = check["predicted_kinds"]
    lines.append("# predicted step by kernel kind (ms): " + ", ".join(
        f"{k} {v * 1e3:.2f}" for k, v in kinds.items() if v > 0))
    return "\n".join(lines)
