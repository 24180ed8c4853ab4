"""Predicted beside measured: simulate every row of a ``bench collectives --json`` file.

    mpiexec -n 2 python -m mpipar.bench collectives --sizes 4K:16M --json measured.json
    mpiexec -n 2 python -m mpipar.bench calibrate --output here.json
    python -m mpipar.sim compare measured.json --profile here.json

(``bench calibrate --check ring,rhd,...`` does both in one run, interleaved, and prints this
table: on a shared machine, two runs a minute apart can differ by tens of percent.)

For each measured (collective, algorithm, size) the same algorithm runs on as many virtual
ranks as the benchmark had, and the table shows both times and predicted / measured.
``native`` is MPI's own code, which the simulator cannot run: it is left out.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from mpipar.sim.report import format_size, parse_size
from mpipar.sim.run import simulate_collective


def _row(collective: str, algorithm: str, p: int, nbytes: int, count: int, dtype: str, op: str,
         measured: float, profile: Any) -> dict[str, Any]:
    sim = simulate_collective(collective, algorithm, p, count, dtype=dtype, op=op, profile=profile, data=False)
    return {"collective": collective, "algorithm": algorithm, "size": nbytes, "ranks": p,
            "measured_us": measured * 1e6, "predicted_us": sim.time * 1e6,
            "ratio": sim.time / measured if measured > 0 else float("nan")}


def compare(bench: dict[str, Any], profile: Any, min_bytes: int = 0) -> list[dict[str, Any]]:
    """Rows of a ``bench collectives --json`` file (seconds per call as measured there)."""
    p = int(bench["meta"]["ranks"])
    return [_row(r["collective"], r["algorithm"], p, r["size"], int(r["count"]), r["type"], r.get("op", "sum"),
                 r["time_us"] * 1e-6, profile)
            for r in bench["rows"] if r["algorithm"] not in ("native", "auto") and r["size"] >= min_bytes]


def predicted_rows(measured: dict[str, dict[int, float]], p: int, profile: Any,
                   dtype: str = "float32") -> list[dict[str, Any]]:
    """{algorithm: {bytes: measured seconds}} of float32 sum all-reduces -> comparison rows,
    by size then algorithm."""
    itemsize = np.dtype(dtype).itemsize
    sizes = sorted({n for per in measured.values() for n in per})
    return [_row("allreduce", alg, p, n, n // itemsize, dtype, "sum", measured[alg][n], profile)
            for n in sizes for alg in measured if n in measured[alg]]


def format_comparison(rows: list[dict[str, Any]], tolerance: float = 0.25) -> str:
    lines = [f"#{'collective':>14} {'algorithm':>9} {'size':>7} {'ranks':>5} {'measured(us)':>13} "
             f"{'predicted(us)':>14} {'pred/meas':>9}  within {tolerance:.0%}"]
    for r in rows:
        ok = abs(r["ratio"] - 1.0) <= tolerance
        lines.append(f"{r['collective']:>15} {r['algorithm']:>9} {format_size(r['size']):>7} {r['ranks']:>5} "
                     f"{r['measured_us']:>13.1f} {r['predicted_us']:>14.1f} {r['ratio']:>9.2f}  "
                     f"{'yes' if ok else 'NO'}")
    within = sum(abs(r["ratio"] - 1.0) <= tolerance for r in rows)
    lines.append(f"# {within} of {len(rows)} predictions within {tolerance:.0%} of the measured median")
    return "\n".join(lines)


def main(args: Any) -> int:
    with open(args.bench) as f:
        bench = json.load(f)
    rows = compare(bench, args.profile, parse_size(args.min_bytes))
    print(f"# predicted ({args.profile or 'local'} profile) vs measured ({bench['meta'].get('mpi_library')}, "
          f"{bench['meta'].get('ranks')} ranks, {bench['meta'].get('host')}); sizes >= {args.min_bytes}")
    print(format_comparison(rows, args.tolerance))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
