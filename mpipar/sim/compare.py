"""Predicted beside measured: simulate every row of a ``bench collectives --json`` file.

    mpiexec -n 2 python -m mpipar.bench collectives --sizes 4K:16M --json measured.json
    python -m mpipar.bench calibrate --out here.json          # under mpiexec -n 2
    python -m mpipar.sim compare measured.json --profile here.json

For each measured (collective, algorithm, size) the same algorithm runs on as many virtual
ranks as the benchmark had, and the table shows both times and predicted / measured.
``native`` is MPI's own code, which the simulator cannot run: it is left out.
"""

from __future__ import annotations

import json
from typing import Any

from mpipar.bench.report import format_size


def compare(bench: dict[str, Any], profile: Any, min_bytes: int = 0) -> list[dict[str, Any]]:
    from mpipar.sim.run import simulate_collective

    rows = []
    p = int(bench["meta"]["ranks"])
    for r in bench["rows"]:
        if r["algorithm"] in ("native", "auto") or r["size"] < min_bytes:
            continue
        sim = simulate_collective(r["collective"], r["algorithm"], p, int(r["count"]), dtype=r["type"],
                                  op=r.get("op", "sum"), profile=profile, data=False)
        measured = r["time_us"] * 1e-6
        rows.append({"collective": r["collective"], "algorithm": r["algorithm"], "size": r["size"],
                     "ranks": p, "measured_us": measured * 1e6, "predicted_us": sim.time * 1e6,
                     "ratio": sim.time / measured if measured > 0 else float("nan")})
    return rows


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
    from mpipar.bench.report import parse_size

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
