"""Pipeline schedules as data: per rank, a list of small instruction records.

    for ins in one_f_one_b(num_stages=4, stage=1, micro_batches=8):
        print(ins)                    # RecvActivation(mb=0, chunk=0), Forward(mb=0, chunk=0), ...
    lists = all_ranks("1f1b", 4, 8)   # one list per pipeline rank
    check_schedule(lists)             # raises ScheduleError: unmatched send, deadlock, order ...
    simulate(lists, f=1.0, b=2.0)     # step time, bubble and peak activations per rank

The executor (``pipeline.py``) runs these lists, ``check_schedule`` runs them without MPI, and
``simulate`` times the very same lists, so what is tested is what runs.

Instructions (``mb``: micro-batch, ``chunk``: which of this rank's model chunks, 0 unless
interleaved). Rank ``r`` with chunk ``c`` is virtual stage ``c * P + r`` of ``P * chunks``:

    RecvActivation  wait for the activation (B, T, C) coming from the previous virtual stage
    Forward         run the chunk's layers forward (first virtual stage: the embedding of idx;
                    last: the head and loss); ``keep_cache=False`` (evaluation) keeps nothing
                    for a backward
    SendActivation  start sending the output to the next virtual stage (non-blocking)
    RecvGrad        wait for d(output) from the next virtual stage
    Backward        run the chunk backward, accumulating parameter gradients; ``sync=True``
                    on the chunk's last backward of a step whose gradients are synchronised:
                    its stages' gradients are final, so their reduction may start
    SendGrad        start sending d(input) to the previous virtual stage (non-blocking)
    OptimizerStep   end of the step: every gradient of this rank is complete; ``sync=True``
                    when this step's gradients are synchronised (the tied embedding's two
                    copies are summed then). A step of gradient accumulation that is not the
                    last runs with ``sync=False`` everywhere.

``make_schedule(..., sync=True)`` sets the ``sync`` fields; the schedule generators below
yield plain instructions. ``forward_only`` is the evaluation schedule: forwards only.

Schedules:

* ``gpipe`` (Huang et al. 2019, "GPipe"): all M forwards, then all M backwards. Holds M
  micro-batches' activations.
* ``one_f_one_b`` (Narayanan et al. 2019, PipeDream; the flush variant of Megatron-LM):
  stage s runs ``P - s - 1`` warm-up forwards, then alternates one forward and one backward,
  then drains. Same bubble as GPipe, at most ``P - s`` activations held.
* ``interleaved_1f1b`` (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training
  on GPU Clusters", section 2.2): each rank holds ``chunks`` non-contiguous model chunks;
  the bubble shrinks to ``(P-1) / (chunks*M + P-1)``. Needs M to be a multiple of P, as in
  the paper.

Both non-interleaved bubbles are ``(P-1)/(M+P-1)`` of the step (``bubble_fraction_theory``)
when forward and backward times are the same on every stage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Sequence


# ---- instruction records -------------------------------------------------------------------
@dataclass(frozen=True)
class Instruction:
    mb: int = 0
    chunk: int = 0


@dataclass(frozen=True)
class RecvActivation(Instruction):
    pass


@dataclass(frozen=True)
class Forward(Instruction):
    keep_cache: bool = True        # False: evaluation, no backward follows


@dataclass(frozen=True)
class SendActivation(Instruction):
    pass


@dataclass(frozen=True)
class RecvGrad(Instruction):
    pass


@dataclass(frozen=True)
class Backward(Instruction):
    sync: bool = False             # the chunk's gradients are final: start their reduction


@dataclass(frozen=True)
class SendGrad(Instruction):
    pass


@dataclass(frozen=True)
class OptimizerStep(Instruction):
    sync: bool = False             # gradients are synchronised after this step's work


SENDS = (SendActivation, SendGrad)
RECVS = (RecvActivation, RecvGrad)


class ScheduleError(RuntimeError):
    """A schedule that cannot run: unmatched message, deadlock, wrong order."""


# ---- message routing -----------------------------------------------------------------------
def peer(ins: Instruction, stage: int, num_stages: int) -> tuple[int, int]:
    """(pipeline rank, chunk) at the other end of a send or receive on rank ``stage``."""
    vs = ins.chunk * num_stages + stage
    other = vs + 1 if isinstance(ins, (SendActivation, RecvGrad)) else vs - 1
    return other % num_stages, other // num_stages


def message_key(ins: Instruction, stage: int, num_stages: int) -> tuple[str, int, int]:
    """What a send and its receive agree on: (kind, micro-batch, receiving virtual stage)."""
    kind = "act" if isinstance(ins, (SendActivation, RecvActivation)) else "grad"
    vs = ins.chunk * num_stages + stage
    if isinstance(ins, SENDS):
        dest_rank, dest_chunk = peer(ins, stage, num_stages)
        return kind, ins.mb, dest_chunk * num_stages + dest_rank
    return kind, ins.mb, vs


def message_tag(ins: Instruction, stage: int, num_stages: int, chunks: int = 1) -> int:
    """MPI tag of the message: distinct per micro-batch, direction and receiving chunk (so
    several messages between one pair of ranks can be in flight and matched by tag)."""
    kind, mb, dest_vs = message_key(ins, stage, num_stages)
    return (mb * chunks + dest_vs // num_stages) * 2 + (0 if kind == "act" else 1)


# ---- schedules -----------------------------------------------------------------------------
def _check_args(num_stages: int, stage: int, micro_batches: int) -> None:
    if num_stages < 1 or not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not a stage of a {num_stages}-stage pipeline")
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")


def _forward(P: int, s: int, mb: int, chunk: int = 0, chunks: int = 1) -> Iterator[Instruction]:
    vs = chunk * P + s
    if vs > 0:
        yield RecvActivation(mb, chunk)
    yield Forward(mb, chunk)
    if vs < P * chunks - 1:
        yield SendActivation(mb, chunk)


def _backward(P: int, s: int, mb: int, chunk: int = 0, chunks: int = 1) -> Iterator[Instruction]:
    vs = chunk * P + s
    if vs < P * chunks - 1:
        yield RecvGrad(mb, chunk)
    yield Backward(mb, chunk)
    if vs > 0:
        yield SendGrad(mb, chunk)


def gpipe(num_stages: int, stage: int, micro_batches: int) -> Iterator[Instruction]:
    """All forwards, then all backwards (in micro-batch order), then the optimiser step."""
    _check_args(num_stages, stage, micro_batches)
    for mb in range(micro_batches):
        yield from _forward(num_stages, stage, mb)
    for mb in range(micro_batches):
        yield from _backward(num_stages, stage, mb)
    yield OptimizerStep()


def one_f_one_b(num_stages: int, stage: int, micro_batches: int) -> Iterator[Instruction]:
    """1F1B with a flush: warm-up forwards, one-forward-one-backward, drain."""
    _check_args(num_stages, stage, micro_batches)
    P, M = num_stages, micro_batches
    warmup = min(P - stage - 1, M)
    for mb in range(warmup):
        yield from _forward(P, stage, mb)
    for i in range(M - warmup):
        yield from _forward(P, stage, warmup + i)
        yield from _backward(P, stage, i)
    for mb in range(M - warmup, M):
        yield from _backward(P, stage, mb)
    yield OptimizerStep()


def interleaved_1f1b(num_stages: int, stage: int, micro_batches: int,
                     chunks: int = 2) -> Iterator[Instruction]:
    """Interleaved 1F1B: ``chunks`` model chunks per rank, forward units in groups of P
    micro-batches per chunk; backward units likewise with the chunks in reverse."""
    _check_args(num_stages, stage, micro_batches)
    P, M, v = num_stages, micro_batches, chunks
    if v < 1:
        raise ValueError(f"chunks must be at least 1, got {v}")
    if v > 1 and P < 2:
        raise ValueError("interleaving needs at least 2 pipeline stages")
    if v > 1 and M % P:
        raise ValueError(f"interleaved 1F1B needs micro_batches ({M}) to be a multiple of the "
                         f"number of pipeline stages ({P})")
    if v == 1:
        yield from one_f_one_b(P, stage, M)
        return
    total = M * v

    def unit(k: int, backward: bool) -> tuple[int, int]:
        chunk = (k // P) % v
        return (k // (P * v)) * P + k % P, (v - 1 - chunk if backward else chunk)

    warmup = min((P - stage - 1) * 2 + (v - 1) * P, total)
    for k in range(warmup):
        mb, c = unit(k, False)
        yield from _forward(P, stage, mb, c, v)
    for k in range(total - warmup):
        mb, c = unit(k + warmup, False)
        yield from _forward(P, stage, mb, c, v)
        mb, c = unit(k, True)
        yield from _backward(P, stage, mb, c, v)
    for k in range(total - warmup, total):
        mb, c = unit(k, True)
        yield from _backward(P, stage, mb, c, v)
    yield OptimizerStep()


def forward_only(num_stages: int, stage: int, micro_batches: int) -> Iterator[Instruction]:
    """Evaluation: every micro-batch forward through the pipeline, no caches kept."""
    _check_args(num_stages, stage, micro_batches)
    for mb in range(micro_batches):
        for ins in _forward(num_stages, stage, mb):
            yield replace(ins, keep_cache=False) if isinstance(ins, Forward) else ins


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved": interleaved_1f1b}


def make_schedule(name: str, num_stages: int, stage: int, micro_batches: int,
                  chunks: int = 1, sync: bool = True) -> list[Instruction]:
    """The instruction list of ``stage`` for schedule ``name``. ``sync``: this step's
    gradients are synchronised, so each chunk's last Backward and the OptimizerStep carry
    ``sync=True`` (False: an accumulation step that is not the last)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    if name == "interleaved":
        lst = list(interleaved_1f1b(num_stages, stage, micro_batches, chunks))
    elif chunks != 1:
        raise ValueError(f"schedule {name!r} runs one model chunk per rank (chunks=1)")
    else:
        lst = list(SCHEDULES[name](num_stages, stage, micro_batches))
    if sync:
        last = {ins.chunk: i for i, ins in enumerate(lst) if isinstance(ins, Backward)}
        for i in last.values():
            lst[i] = replace(lst[i], sync=True)
        lst[-1] = replace(lst[-1], sync=True)                 # the OptimizerStep
    return lst


def all_ranks(name: str, num_stages: int, micro_batches: int, chunks: int = 1) -> list[list[Instruction]]:
    return [make_schedule(name, num_stages, s, micro_batches, chunks) for s in range(num_stages)]


def bubble_fraction_theory(P: int, M: int, chunks: int = 1) -> float:
    """Idle fraction of a step with uniform stage times: (P-1) / (chunks*M + P-1)."""
    return (P - 1) / (chunks * M + P - 1)


# ---- checks and timing ---------------------------------------------------------------------
@dataclass
class SimResult:
    step_time: float
    busy: list[float]           # compute time per rank
    finish: list[float]         # when each rank's last instruction ended
    peak_activations: list[int]  # most (micro-batch, chunk) forwards awaiting backward

    @property
    def bubble(self) -> list[float]:
        """Idle fraction of the step per rank: 1 - busy / step time."""
        return [1.0 - b / self.step_time for b in self.busy]


def _static_checks(lists: Sequence[Sequence[Instruction]]) -> tuple[int, int]:
    """Per-rank order rules; returns (micro_batches, chunks)."""
    P = len(lists)
    fwd_units = {(i.mb, i.chunk) for i in lists[0] if isinstance(i, Forward)} if P else set()
    M = 1 + max((mb for mb, _ in fwd_units), default=-1)
    v = 1 + max((c for _, c in fwd_units), default=-1)
    want = {(mb, c) for mb in range(M) for c in range(v)}
    # forward-only (evaluation): no Forward keeps a cache, and no backward work at all
    evaluation = any(isinstance(i, Forward) and not i.keep_cache for L in lists for i in L)
    for r, ins_list in enumerate(lists):
        if evaluation:
            bad = [i for i in ins_list if isinstance(i, (Backward, RecvGrad, SendGrad, OptimizerStep))
                   or (isinstance(i, Forward) and i.keep_cache)]
            if bad:
                raise ScheduleError(f"rank {r}: {bad[0]} in a forward-only schedule")
        seen: dict[type, set] = {}
        for pos, ins in enumerate(ins_list):
            key = (ins.mb, ins.chunk)
            done = seen.setdefault(type(ins), set())
            if key in done:
                raise ScheduleError(f"rank {r}: {ins} appears twice")
            done.add(key)
            f_done = key in seen.get(Forward, set())
            b_done = key in seen.get(Backward, set())
            if isinstance(ins, OptimizerStep) and pos != len(ins_list) - 1:
                raise ScheduleError(f"rank {r}: OptimizerStep is not the last instruction")
            if isinstance(ins, (SendActivation, Backward)) and not f_done:
                raise ScheduleError(f"rank {r}: {ins} before Forward(mb={ins.mb}, chunk={ins.chunk})")
            if isinstance(ins, SendGrad) and not b_done:
                raise ScheduleError(f"rank {r}: {ins} before its Backward")
            if isinstance(ins, Forward) and b_done:
                raise ScheduleError(f"rank {r}: {ins} after its Backward")
            vs = ins.chunk * P + r
            if isinstance(ins, Forward) and vs > 0 and key not in seen.get(RecvActivation, set()):
                raise ScheduleError(f"rank {r}: {ins} before its RecvActivation")
            if (isinstance(ins, Backward) and vs < P * v - 1
                    and key not in seen.get(RecvGrad, set())):
                raise ScheduleError(f"rank {r}: {ins} before its RecvGrad")
            if isinstance(ins, (RecvActivation, RecvGrad)):
                later = Forward if isinstance(ins, RecvActivation) else Backward
                if key in seen.get(later, set()):
                    raise ScheduleError(f"rank {r}: {ins} after the {later.__name__} that needs it")
            if isinstance(ins, SENDS + RECVS):
                dest, _ = peer(ins, r, P)
                if dest == r:
                    raise ScheduleError(f"rank {r}: {ins} would talk to itself")
        for kind in (Forward,) if evaluation else (Forward, Backward):
            if seen.get(kind, set()) != want:
                missing = sorted(want - seen.get(kind, set()))
                raise ScheduleError(f"rank {r}: {kind.__name__} (mb, chunk) missing {missing[:5]} "
                                    f"or unexpected units")
        if not evaluation and (not ins_list or not isinstance(ins_list[-1], OptimizerStep)):
            raise ScheduleError(f"rank {r}: does not end with OptimizerStep")
    # every send has exactly one receive, at the rank it is addressed to
    sends, recvs = {}, {}
    for r, ins_list in enumerate(lists):
        for ins in ins_list:
            if isinstance(ins, SENDS):
                dest, _ = peer(ins, r, P)
                sends[message_key(ins, r, P)] = (r, dest, ins)
            elif isinstance(ins, RECVS):
                src, _ = peer(ins, r, P)
                recvs[message_key(ins, r, P)] = (src, r, ins)
    for key in sends.keys() | recvs.keys():
        if key not in recvs:
            raise ScheduleError(f"{sends[key][2]} on rank {sends[key][0]} has no matching receive "
                                f"on rank {sends[key][1]}")
        if key not in sends:
            raise ScheduleError(f"{recvs[key][2]} on rank {recvs[key][1]} has no matching send "
                                f"on rank {recvs[key][0]}")
    return M, v


def simulate(lists: Sequence[Sequence[Instruction]], f: float | Sequence[float] = 1.0,
             b: float | Sequence[float] = 2.0, comm: float = 0.0,
             stage_scale: Sequence[float] | None = None) -> SimResult:
    """Run every rank's list with blocking receives and non-blocking sends on virtual clocks.

    A Forward takes ``f`` and a Backward ``b`` (either one number, or one per rank), times
    ``stage_scale[r]`` on rank r; a message arrives ``comm`` after its send starts. Raises
    ScheduleError on a deadlock (ranks waiting for messages nobody will send). Ranks start at
    0; the step ends when the last rank does.
    """
    P = len(lists)
    scale = list(stage_scale) if stage_scale is not None else [1.0] * P
    fs = [float(f)] * P if isinstance(f, (int, float)) else [float(x) for x in f]
    bs = [float(b)] * P if isinstance(b, (int, float)) else [float(x) for x in b]
    pos = [0] * P
    clock = [0.0] * P
    busy = [0.0] * P
    live = [0] * P
    peak = [0] * P
    arrivals: dict[tuple, float] = {}
    progressed = True
    while progressed:
        progressed = False
        for r in range(P):
            while pos[r] < len(lists[r]):
                ins = lists[r][pos[r]]
                if isinstance(ins, RECVS):
                    key = message_key(ins, r, P)
                    if key not in arrivals:
                        break                                   # blocked: try other ranks
                    clock[r] = max(clock[r], arrivals.pop(key))
                elif isinstance(ins, SENDS):
                    arrivals[message_key(ins, r, P)] = clock[r] + comm
                elif isinstance(ins, Forward):
                    clock[r] += fs[r] * scale[r]
                    busy[r] += fs[r] * scale[r]
                    live[r] += ins.keep_cache
                    peak[r] = max(peak[r], live[r])
                elif isinstance(ins, Backward):
                    clock[r] += bs[r] * scale[r]
                    busy[r] += bs[r] * scale[r]
                    live[r] -= 1
                pos[r] += 1
                progressed = True
    stuck = [r for r in range(P) if pos[r] < len(lists[r])]
    if stuck:
        detail = ", ".join(f"rank {r} at {lists[r][pos[r]]}" for r in stuck)
        raise ScheduleError(f"deadlock: {detail} wait for messages never sent")
    step = max(clock) if P else 0.0
    return SimResult(step, busy, clock, peak)


def check_schedule(lists: Sequence[Sequence[Instruction]]) -> SimResult:
    """Raise ScheduleError unless the per-rank lists can run together: each unit forward and
    backward exactly once (forward only, keeping no cache, in an evaluation schedule), forward before backward, sends after the compute that makes them,
    receives before the compute that needs them, every send matched by one receive on the
    rank it names, no rank talking to itself, and no deadlock with blocking receives."""
    _static_checks(lists)
    return simulate(lists)
