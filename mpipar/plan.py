"""python -m mpipar.plan: the best layouts of a GPT on a cluster, predicted by the simulator.

Examples::

    python -m mpipar.plan --cluster dgx-a100 --gpus 512 --model megatron-1t --global-batch 512 \\
        --precision fp16
    python -m mpipar.plan --cluster local --gpus 2 --model small --global-batch 8 --json plan.json
    mpirun -n 2 python -m mpipar.train --plan          # trains with the first choice for here

Every layout of ``--gpus`` that the trainer can run and whose memory fits the profile's GPU is
ranked by the closed-form step time; the ``--simulate`` best are simulated by running the
trainer on virtual ranks (``python -m mpipar.sim train``), and the ``--top`` best are printed
with the predicted step time, MFU and memory (``mpipar/sim/plan.py`` says how). ``--json``
writes every layout considered.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mpipar.cli import (POSITIVE_INT, Parser, UsageError, add_model_arguments, check_output_path,
                        load_cluster, model_from_args)
from mpipar.sim.plan import PlanRow, describe, plan
from mpipar.sim.spec import PRECISIONS, TrainSpec

PROG = "mpipar.plan"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m mpipar.plan", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster", required=True, help="cluster profile: a name or a JSON path")
    p.add_argument("--gpus", type=POSITIVE_INT, required=True)
    add_model_arguments(p)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--allreduce", default="native", help="data-parallel all-reduce algorithm")
    p.add_argument("--top", type=POSITIVE_INT, default=10, help="layouts printed")
    p.add_argument("--simulate", type=POSITIVE_INT, default=10,
                   help="layouts simulated (the best by the closed form)")
    p.add_argument("--json", default=None, help="write every layout considered")
    p.add_config_arguments()
    return p


def print_rows(rows: list[PlanRow], top: int) -> None:
    print(f"{'#':>3s}  {'layout':42s} {'step s':>10s} {'tok/s':>12s} {'MFU %':>6s} {'mem GiB':>8s}  source")
    for i, r in enumerate(rows[:top], 1):
        p = r.prediction
        tps = f"{p.tokens_per_s:12.1f}" if p else f"{'-':>12s}"
        mfu = f"{100 * p.mfu:6.1f}" if p else f"{'-':>6s}"
        print(f"{i:3d}  {describe(r.spec):42s} {r.step_time_s:10.4f} {tps} {mfu} "
              f"{r.memory_bytes / 2**30:8.2f}  {'simulated' if p else 'closed form'}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        model = model_from_args(args)
        prof = load_cluster(args.cluster)
        if args.json:
            check_output_path(args.json, "--json")
        base = TrainSpec(**model, global_batch=args.global_batch, precision=args.precision,
                         allreduce=args.allreduce)
        try:
            base.check()
        except ValueError as e:
            raise UsageError(str(e)) from None
        rows = plan(base, prof, args.gpus, top=0, simulate=args.simulate)
        if not rows:
            raise UsageError(f"no layout of {args.gpus} GPUs fits this model and batch "
                             f"(memory included) on {prof.name}")
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"# mpipar.plan: {args.gpus} GPUs of {prof.name}; {len(rows)} layouts fit, "
          f"{min(args.simulate, len(rows))} simulated")
    print_rows(rows, args.top)
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_json() for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
