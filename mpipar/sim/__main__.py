"""python -m mpipar.sim: predict collective times on a simulated network, running the real
algorithm code on thousands of virtual ranks in one process.

Examples::

    python -m mpipar.sim collectives --ranks 64 --profile local
    python -m mpipar.sim collectives --ranks 1024 --profile dgx-h100 --algorithms rhd,tree,hier \\
        --sizes 4K:64M
    python -m mpipar.sim collectives --ranks 4096 --profile dgx-h100 --algorithms rhd --sizes 64M \\
        --ranks-per-node 8 --model
    python -m mpipar.sim collectives --ranks 16 --profile ./profile-myhost.json \\
        --collective allgather --algorithms ring,rhd --dtype float64
    python -m mpipar.sim collectives --ranks 256 --profile dgx-h100 --algorithms ps \\
        --option servers=4
    python -m mpipar.sim profiles                      # the shipped profiles

Tables have the columns of ``python -m mpipar.bench collectives`` (nccl-tests style: size,
count, type, time, algbw, busbw); ``--model`` adds the closed-form cost model's time beside
the simulated one. A profile is a name from ``mpipar/comm/profiles/`` or a path to a JSON file
written by ``python -m mpipar.bench calibrate``. The time is that of one collective starting
with every rank at time 0; the simulator's own wall and CPU time per table follow it.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from mpipar import backend
from mpipar.comm import cost_model
from mpipar.comm.algorithms import algorithm_names
from mpipar.comm.network import PROFILE_DIR, load_profile, profile_names
from mpipar.sim.compare import main as compare_main
from mpipar.sim.report import format_table, parse_sizes, row
from mpipar.sim.run import load_algorithm, resolve_profile, simulate_collective


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def add_collectives_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", "-n", type=int, required=True, help="virtual ranks")
    p.add_argument("--profile", default=None, help="profile name or JSON path (default: local)")
    p.add_argument("--collective", default="allreduce",
                   choices=("allreduce", "reduce_scatter", "allgather", "broadcast", "reduce"))
    p.add_argument("--algorithms", default=None,
                   help="comma-separated (default: every simulated algorithm with this collective)")
    p.add_argument("--sizes", default="4K:64M", help="bytes: a:b = powers of two between (default 4K:64M)")
    p.add_argument("--dtype", default="float32", choices=backend.SUPPORTED_DTYPES)
    p.add_argument("--op", default="sum", choices=("sum", "max", "min"))
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="override the profile's node size (1: flat network on its inter link)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="algorithm option, e.g. servers=4, segment_bytes=65536 (repeatable)")
    p.add_argument("--no-port-serialization", action="store_true",
                   help="let a rank send/receive any number of messages at once")
    p.add_argument("--model", action="store_true", help="add the cost model's time (us) as a column")


def _default_algorithms(collective: str) -> list[str]:
    names = [n for n in dict.fromkeys(list(cost_model.ALGORITHMS) + algorithm_names()) if n != "native"]
    out = []
    for n in names:
        try:
            if load_algorithm(n).supports(collective):
                out.append(n)
        except (ValueError, ImportError):
            continue
    return out


def collectives(args: argparse.Namespace) -> int:
    prof = resolve_profile(args.profile, args.ranks_per_node)
    p = args.ranks
    itemsize = backend.resolve_dtype(args.dtype).itemsize
    options = dict(kv.split("=", 1) for kv in args.option)
    options = {k: _value(v) for k, v in options.items()}
    algorithms = args.algorithms.split(",") if args.algorithms else _default_algorithms(args.collective)
    rpn, intra, inter = prof.levels(p)
    src = prof.metadata.get("source", "")
    print(f"# mpipar.sim {args.collective}: {p} virtual ranks, profile {prof.name!r}"
          + (f" ({src.split(' (')[0].split(':')[0]})" if src else ""))
    if rpn > 1:
        print(f"# topology: {rpn} ranks per node, {-(-p // rpn)} nodes; intra {intra.time(1 << 20) * 1e6:.1f} us/MiB, "
              f"inter {inter.time(1 << 20) * 1e6:.1f} us/MiB")
    else:
        extra = ""
        if prof.oneway_link is not None:
            extra += f"; one-way {prof.oneway_link.time(1 << 20) * 1e6:.1f} us/MiB"
        if prof.transfers_need_cpu:
            extra += "; transfers stall while the receiver reduces"
        print(f"# flat network: {inter.time(1 << 20) * 1e6:.1f} us/MiB, alpha {inter.params(8)[0] * 1e6:.2f} us{extra}")
    red = (f"reduce {prof.reduce_time(1 << 20) * 1e6:.1f} us/MiB (size classes)" if prof.reduce_link is not None
           else f"gamma {prof.gamma:.3e} s/B")
    print(f"# {red}; ports {'unlimited' if args.no_port_serialization else 'one send + one receive per rank'}")
    sizes = parse_sizes(args.sizes)
    for alg in algorithms:
        rows = []
        t0, c0 = time.perf_counter(), time.process_time()
        run_opts = dict(options)
        if alg == "hier" and "ranks_per_node" not in run_opts and rpn > 1:
            run_opts["ranks_per_node"] = rpn
        for nbytes in sizes:
            count = max(1, nbytes // itemsize)
            if args.collective in ("reduce_scatter", "allgather"):
                count = max(p, count - count % p)  # whole blocks per rank, as nccl-tests
            res = simulate_collective(args.collective, alg, p, count, args.dtype, args.op, prof,
                                      data=False,  # time only: size-only buffers
                                      nic_serialization=not args.no_port_serialization,
                                      options=run_opts)
            extra: dict[str, Any] = {}
            if args.model:
                try:
                    extra["model"] = cost_model.predict(alg, args.collective, p, count * itemsize,
                                                        prof, itemsize=itemsize, **run_opts) * 1e6
                except ValueError:
                    extra["model"] = "-"
            rows.append(row(args.collective, p, count * itemsize, count, args.dtype, res.time, **extra))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        extra_cols = [("model(us)", "model", 12)] if args.model else []
        print()
        print(format_table(rows, title=f"{alg}", extra_columns=extra_cols))
        print(f"# {alg}: simulated in {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    return 0


def profiles(args: argparse.Namespace) -> int:
    for name in profile_names():
        prof = load_profile(name)
        rpn = prof.ranks_per_node or 1
        src = prof.metadata.get("source", "").split(" (")[0].split(":")[0]
        print(f"{name:12s} {'%d ranks/node' % rpn if rpn > 1 else 'flat':14s} {src}  "
              f"({PROFILE_DIR / (name + '.json')})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m mpipar.sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collectives", help="predicted time and busbw per size and algorithm")
    add_collectives_arguments(c)
    c.set_defaults(_main=collectives)
    sub.add_parser("profiles", help="list the shipped network profiles").set_defaults(_main=profiles)
    cmp_ = sub.add_parser("compare", help="predicted beside measured, from a bench collectives --json file")
    cmp_.add_argument("bench", help="JSON written by python -m mpipar.bench collectives --json")
    cmp_.add_argument("--profile", default=None, help="profile name or path (default: local)")
    cmp_.add_argument("--min-bytes", default="64K", help="leave out smaller messages (default 64K)")
    cmp_.add_argument("--tolerance", type=float, default=0.25)
    cmp_.add_argument("--json", default=None, help="save the comparison")
    cmp_.set_defaults(_main=compare_main)
    args = parser.parse_args(argv)
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
