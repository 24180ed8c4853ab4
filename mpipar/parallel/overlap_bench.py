"""How much of the data-parallel gradient all-reduce backward hides: exposed / total time.

    mpiexec -n 2 python -m mpipar.parallel.overlap_bench                     # small model
    mpiexec -n 2 python -m mpipar.parallel.overlap_bench --bucket-mb 0.5 --steps 10
    mpiexec -n 4 python -m mpipar.parallel.overlap_bench --allreduce ring --zero 2

Every rank trains the same GPT (the ``small`` preset by default, float32, AdamW) on its
slice of the global batch. Per step, ``total`` is the time the background thread spent in
the gradient collectives and ``exposed`` the time the main thread waited for them after
backward (see ``data_parallel.GradBuckets``). The same steps are also run with the buckets
started only after backward (``hooks=False``, no overlap) as the baseline, interleaved
step by step so that both see the same machine load. ``measure_overlap`` returns the numbers
for ``python -m mpipar.bench parallel``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from mpipar import runtime
from mpipar.data import BatchSampler, load_tokens, split_train_val
from mpipar.nn.gpt import GPT, PRESETS
from mpipar.optim import AdamW
from mpipar.parallel.data_parallel import GradBuckets, dp_train_step
from mpipar.parallel.zero import ZeroOptimizer


def _setup(comm: Any, model: str, dtype: str, bucket_mb: float | None, algorithm: str | None,
           zero: int) -> tuple[GPT, Any, Any]:
    m = GPT(PRESETS[model], seed=0, dtype=dtype)
    hyper = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    if zero:
        opt = ZeroOptimizer(m.param_buffer, m.grad_buffer, m.layout, comm, "adamw", stage=zero,
                            bucket_mb=bucket_mb, algorithm=algorithm, **hyper)
        return m, opt.buckets, opt
    return m, GradBuckets(m.grad_buffer, m.layout, comm, bucket_mb, algorithm), AdamW(m.state_dict(), **hyper)


def measure_overlap(comm: Any, model: str = "small", batch_size: int = 8, block_size: int | None = None,
                    bucket_mb: float | None = 0.5, algorithm: str | None = None, zero: int = 0,
                    steps: int = 6, warmup: int = 1, dtype: str = "float32", grad_accum: int = 1,
                    seed: int = 0) -> dict[str, Any]:
    """Overlapped vs non-overlapped steps; medians over ``steps`` after ``warmup``.

    Returns ``{"overlap": {...}, "no_overlap": {...}, "buckets": n}``, each side with
    ``step_s``, ``comm_total_s``, ``comm_exposed_s`` (medians per step) and
    ``exposed_fraction`` (sum of exposed / sum of total over the timed steps).
    """
    T = block_size or PRESETS[model].block_size
    train, _ = split_train_val(load_tokens(None))
    sampler = BatchSampler(train, batch_size, T, seed=seed)
    sides = {name: _setup(comm, model, dtype, bucket_mb, algorithm, zero)
             for name in ("overlap", "no_overlap")}
    rec: dict[str, list[tuple[float, float, float]]] = {k: [] for k in sides}
    for step in range(warmup + steps):
        mbs = [sampler.batch(step, comm.rank, comm.size, k, grad_accum) for k in range(grad_accum)]
        for name, (m, buckets, opt) in sides.items():
            comm.barrier()
            t0 = time.perf_counter()
            res = dp_train_step(m, buckets, opt, mbs, hooks=name == "overlap")
            dt = time.perf_counter() - t0
            if step >= warmup:
                rec[name].append((dt, res.comm.total_s, res.comm.exposed_s))
    out: dict[str, Any] = {"buckets": len(sides["overlap"][1].buckets), "dp": comm.size,
                           "model": model, "bucket_mb": bucket_mb, "zero": zero}
    for name, rows in rec.items():
        a = np.array(rows)
        # every rank's numbers, then the slowest rank's median (the step waits for it)
        allr = comm.allgather(a.reshape(1, -1)).reshape(comm.size, -1, 3)
        total, exposed = allr[:, :, 1].sum(axis=1), allr[:, :, 2].sum(axis=1)
        out[name] = {
            "step_s": float(max(statistics.median(allr[r, :, 0]) for r in range(comm.size))),
            "comm_total_s": float(np.median(allr[:, :, 1])),
            "comm_exposed_s": float(np.median(allr[:, :, 2])),
            "exposed_fraction": float((exposed / np.maximum(total, 1e-12)).max()),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.parallel.overlap_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--batch-size", type=int, default=8, help="GLOBAL batch")
    p.add_argument("--bucket-mb", type=float, default=0.5, help="<= 0: one bucket")
    p.add_argument("--allreduce", default=None, help="algorithm (default: native)")
    p.add_argument("--zero", type=int, default=0, choices=(0, 1, 2))
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    from mpipar.comm import make_communicator

    comm = make_communicator()
    r = measure_overlap(comm, args.model, args.batch_size, bucket_mb=args.bucket_mb,
                        algorithm=args.allreduce, zero=args.zero, steps=args.steps,
                        dtype=args.dtype, grad_accum=args.grad_accum)
    runtime.print0(f"overlap bench: model {args.model}, dp {comm.size}, {r['buckets']} buckets of "
                   f"~{args.bucket_mb} MiB, zero {args.zero}, allreduce {args.allreduce or 'native'}, "
                   f"{args.steps} timed steps (medians; exposed fraction = slowest rank's sum)")
    for name in ("overlap", "no_overlap"):
        s = r[name]
        runtime.print0(f"  {name:>10}: step {s['step_s'] * 1e3:8.1f} ms | comm total "
                       f"{s['comm_total_s'] * 1e3:7.1f} ms | exposed {s['comm_exposed_s'] * 1e3:7.1f} ms "
                       f"| exposed/total {100 * s['exposed_fraction']:5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
