"""python -m mpipar.plot: pictures of what mpipar writes, as PNG (matplotlib, the ``plot`` extra).

    python -m mpipar.plot run.jsonl -o loss.png                   # a --log: loss, val_loss, tokens/s
    python -m mpipar.plot a.jsonl b.jsonl --labels dp2,pp2 -o cmp.png   # several logs overlaid
    python -m mpipar.plot coll.json -o busbw.png                  # bench collectives --json
    python -m mpipar.plot step.trace.json -o timeline.png         # train --trace / sim train --trace

What an input is, is read from its content, not its name:

* a **run log** (``python -m mpipar.train --log``): JSON lines, each with a ``step`` and a
  ``loss`` (a training step) or a ``val_loss`` (an evaluation). Two panels: loss and val_loss
  against the step, tokens/s against the step; one colour per log;
* a **benchmark** (``python -m mpipar.bench collectives --json``): an object with ``meta`` and
  ``rows`` of ``collective``, ``algorithm``, ``size``, ``busbw``: one panel per collective,
  busbw against the message size (log x), a line per algorithm (the benchmark's own chart,
  ``bench.collectives.plot``);
* a **trace** (the Trace Event Format of ``mpipar.trace``): a timeline, one row per rank and
  thread (``main``, ``comm``), each complete event a bar coloured by its kind (compute, pipeline
  message, collective, wait, optimiser, evaluation); nested events are drawn thinner on top
  of the ones that contain them, and forwards and backwards are labelled ``F``/``B`` with
  their micro-batch, so a pipeline schedule reads as a picture.

All inputs of one call are of one kind. Bad input (a missing file, one that is none of
these, kinds mixed, a label count that does not match) is one ``mpipar.plot: error: ...``
line and exit code 2, as is a missing matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mpipar import runtime
from mpipar.bench.collectives import plot as plot_collectives
from mpipar.cli import Parser, UsageError, check_output_path

PROG = "mpipar.plot"

# a trace event's kind -> (colour, legend label); the kind is its "cat" or, for traces whose
# categories are the names' first words (the simulator's), found from the name
KINDS = {"compute": ("#4C72B0", "forward / backward"), "p2p": ("#DD8452", "pipeline send / recv"),
         "collective": ("#55A868", "collective"), "wait": ("#C44E52", "wait"),
         "optimizer": ("#8172B3", "clip / optimiser"), "evaluate": ("#937860", "evaluation"),
         "step": ("#DDDDDD", "step")}
_WORDS = {"forward": "compute", "backward": "compute", "recv": "p2p", "send": "p2p",
          "recv_wait": "p2p", "clip": "optimizer", "optimizer": "optimizer", "wait": "wait",
          "evaluate": "evaluate", "step": "step"}
_COLLECTIVES = ("allreduce", "reduce_scatter", "allgather", "broadcast", "reduce", "alltoall")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=f"python -m {PROG}", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="FILE", help="run logs, a benchmark JSON or a trace")
    p.add_argument("-o", "--output", default=None,
                   help="the PNG to write (default: the first input's name with .png)")
    p.add_argument("--labels", default=None, help="comma-separated legend labels, one per run log")
    p.add_argument("--title", default=None, help="the figure's title")
    return p


# ---------------------------------------------------------------------------- reading
def read_input(path: str) -> tuple[str, Any]:
    """(kind, content) of ``path``: ("log", [entries]), ("bench", {...}) or ("trace", {...});
    UsageError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{path}: {'is a directory' if p.is_dir() else 'no such file'}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot be read ({e})") from None
    what = ("not a run log (JSON lines of train --log), a benchmark (bench collectives --json) "
            "or a trace (--trace)")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        if isinstance(doc.get("traceEvents"), list):
            if not any(e.get("ph") == "X" for e in doc["traceEvents"] if isinstance(e, dict)):
                raise UsageError(f"{path}: a trace without events")
            return "trace", doc
        rows = doc.get("rows")
        if (isinstance(rows, list) and rows and isinstance(doc.get("meta"), dict)
                and all(isinstance(r, dict) and {"collective", "algorithm", "size", "busbw"} <= set(r)
                        for r in rows)):
            return "bench", doc
        if not ("step" in doc and ("loss" in doc or "val_loss" in doc)):
            raise UsageError(f"{path}: {what}")
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except ValueError:
            raise UsageError(f"{path} line {n}: {what}") from None
        if not (isinstance(e, dict) and "step" in e and ("loss" in e or "val_loss" in e)):
            raise UsageError(f"{path} line {n}: {what}")
        entries.append(e)
    if not entries:
        raise UsageError(f"{path}: empty, {what}")
    return "log", entries


# ---------------------------------------------------------------------------- drawing
def _pyplot() -> Any:
    try:
        import matplotlib  # noqa: PLC0415  (optional dependency: the plot extra)
    except ImportError:
        raise UsageError("matplotlib is not installed: pip install 'mpipar[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_logs(logs: list[tuple[str, list[dict]]], path: str, title: str | None = None) -> None:
    """Loss and val_loss against the step, and tokens/s against the step, one colour per
    (label, entries) of ``logs``."""
    plt = _pyplot()
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, (label, entries) in enumerate(logs):
        colour = f"C{k % 10}"
        steps = [e for e in entries if "loss" in e]
        evals = [e for e in entries if "val_loss" in e]
        if steps:
            ax_loss.plot([e["step"] for e in steps], [e["loss"] for e in steps], color=colour,
                         lw=1.2, label=f"{label} loss")
        if evals:
            ax_loss.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], color=colour,
                         ls="--", marker="o", ms=4, label=f"{label} val_loss")
        tps = [e for e in steps if "tokens_per_s" in e]
        if tps:
            ax_tps.plot([e["step"] for e in tps], [e["tokens_per_s"] for e in tps], color=colour,
                        lw=1.2, label=label)
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_tps.set(xlabel="step", ylabel="tokens/s", title="throughput")
    for ax in (ax_loss, ax_tps):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def kind_of(event: dict) -> str:
    """The kind (a key of KINDS) of a complete trace event."""
    if event.get("cat") in KINDS:
        return event["cat"]
    words = str(event.get("name", "")).split()
    for w in words:
        if w in _WORDS:
            return _WORDS[w]
        if w in _COLLECTIVES:
            return "collective"
    return "wait" if "wait" in str(event.get("name", "")) else "collective"


def plot_trace(doc: dict, path: str, title: str | None = None) -> None:
    """The timeline of a trace: a row per (process, thread), bars coloured by kind."""
    plt = _pyplot()
    events = [e for e in doc["traceEvents"] if isinstance(e, dict)]
    names = {(e["pid"], 0): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    spans = [e for e in events if e.get("ph") == "X"]
    rows = sorted({(e["pid"], e.get("tid", 0)) for e in spans})
    row_of = {r: i for i, r in enumerate(rows)}
    t_min = min(e["ts"] for e in spans)
    scale = 1e-3                                   # microseconds -> milliseconds
    fig, ax = plt.subplots(figsize=(14, 0.9 + 0.55 * len(rows)))
    # outer events first: an event's depth is how many events of its row contain it
    by_row: dict[tuple, list[dict]] = {}
    for e in spans:
        by_row.setdefault((e["pid"], e.get("tid", 0)), []).append(e)
    drawn: set[str] = set()
    for row, evs in by_row.items():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[float] = []
        for e in evs:
            while stack and stack[-1] <= e["ts"]:
                stack.pop()
            depth = len(stack)
            stack.append(e["ts"] + e["dur"])
            kind = kind_of(e)
            colour, label = KINDS[kind]
            h = max(0.8 - 0.18 * depth, 0.25)
            y = row_of[row]
            x0, w = (e["ts"] - t_min) * scale, e["dur"] * scale
            ax.broken_barh([(x0, w)], (y - h / 2, h), facecolors=colour,
                           edgecolor="none" if kind == "step" else "white", linewidth=0.3,
                           label=None if label in drawn else label, zorder=1 + depth)
            drawn.add(label)
            words = str(e.get("name", "")).split()
            if kind == "compute" and words and words[0] in ("forward", "backward"):
                mb = e.get("args", {}).get("mb", next((w[2:] for w in words if w.startswith("mb")), ""))
                ax.text(x0 + w / 2, y, f"{words[0][0].upper()}{mb}", ha="center", va="center",
                        fontsize=6, color="white", zorder=10, clip_on=True)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{names.get((pid, 0), f'rank {pid}')}  {threads.get((pid, tid), tid)}"
                        for pid, tid in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("time (ms)")
    ax.grid(True, axis="x", alpha=0.3)
    order = [label for _, label in KINDS.values() if label in drawn]
    handles, labels = ax.get_legend_handles_labels()
    by_label = dict(zip(labels, handles))
    ax.legend([by_label[k] for k in order], order, fontsize=7, loc="upper left",
              bbox_to_anchor=(1.005, 1.0), frameon=False)
    other = doc.get("otherData", {})
    ax.set_title(title or " | ".join(str(v) for v in (other.get("layout"), other.get("schedule") and
                                                    f"schedule {other['schedule']}",
                                                    other.get("micro_batches") and
                                                    f"{other['micro_batches']} micro-batches",
                                                    other.get("steps") and
                                                    f"steps {other['steps'][0]}:{other['steps'][1]}")
                                     if v) or "trace", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- the command
def plot(inputs: list[str], output: str, labels: list[str] | None = None, title: str | None = None) -> str:
    """Draw ``inputs`` (all of one kind) into the PNG ``output``; returns the kind.
    UsageError for bad input."""
    read = [(path, *read_input(path)) for path in inputs]
    kinds = {kind for _, kind, _ in read}
    if len(kinds) > 1:
        raise UsageError("inputs of different kinds (" + ", ".join(f"{p}: {k}" for p, k, _ in read)
                         + "): plot one kind at a time")
    kind = kinds.pop()
    if kind != "log" and len(read) > 1:
        raise UsageError(f"one {kind} at a time (got {len(read)} files); several run logs overlay")
    if labels is not None and len(labels) != len(read):
        raise UsageError(f"--labels gives {len(labels)} label(s) for {len(read)} input(s)")
    check_output_path(output, "--output")
    if kind == "log":
        names = labels or [Path(p).stem for p, _, _ in read]
        plot_logs([(n, content) for n, (_, _, content) in zip(names, read)], output, title)
    elif kind == "bench":
        _pyplot()
        doc = read[0][2]
        meta = {"ranks": "?", "mpi_library": "?", "thread_level": "?", "host": "?", **doc["meta"]}
        plot_collectives(doc["rows"], meta, output)
    else:
        plot_trace(read[0][2], output, title)
    return kind


def main(argv: list[str] | None = None) -> int:
    """The command line (``python -m mpipar.plot``), callable in-process: returns 0 or 2."""
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        output = args.output or str(Path(args.inputs[0]).with_suffix(".png"))
        labels = args.labels.split(",") if args.labels is not None else None
        kind = plot(args.inputs, output, labels, args.title)
    except UsageError as e:
        runtime.print0(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    runtime.print0(f"{PROG}: {kind} -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
