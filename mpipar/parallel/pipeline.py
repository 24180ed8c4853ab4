"""The pipeline executor: runs one rank's instruction list (``schedules.py``) on its stages.

    from mpipar.parallel.schedules import forward_only, make_schedule
    from mpipar.parallel.pipeline import PipelineExecutor

    pipe = PipelineExecutor(local, mesh.pp_group)      # collective over the pp group (once)
    ins = make_schedule("1f1b", mesh.pp, mesh.pp_rank, M)
    loss = pipe.step(ins, micro_batches)                # zeroes, runs, reduces tied grads
    # ... data-parallel gradient sync, clipping, optimiser step on local.param_buffer
    pipe.last.bubble                                    # 1 - compute / step time, this rank
    loss = pipe.step(list(forward_only(mesh.pp, mesh.pp_rank, M)), micro_batches,
                     zero_grad=False)                   # evaluation

``micro_batches``: M pairs ``(idx, targets)`` of this rank's data-parallel shard, each
(B/M, T). Only stage 0 reads ``idx`` and only the last stage ``targets``; the middle stages
read either one's shape (or pass ``act_shape=(B/M, T, C)`` and ``None`` entries).

The executor is a dispatch table (ShallowSpeed's ``Worker._INSTRUCTION_MAP``): each
instruction type has one short handler, and the state of one step (received buffers,
caches, sends in flight, losses, timings) lives in one ``_Step`` object made per ``step``
and dropped at its end. What one ``step`` does:

* ``local.zero_grad()`` unless ``zero_grad=False`` (accumulating several steps, evaluating);
* every instruction, by its handler. Receives are posted as ``irecv`` into pooled buffers up
  to ``lookahead`` receives ahead of the one awaited, so a message can land while this rank
  computes; ``RecvActivation``/``RecvGrad`` only wait. Sends are ``isend``s whose buffers are
  kept until MPI is done with them. Tags: ``schedules.message_tag`` (micro-batch, direction,
  receiving chunk), so messages in flight between two ranks never match the wrong receive;
* each micro-batch's backward starts the head with ``dout = dloss_scale / M``, so the
  gradients are those of the mean loss over the whole batch (times ``dloss_scale``) and
  accumulate (``+=``) in ``local.grads``;
* a ``Backward`` with ``sync=True`` (the chunk's last backward of a synchronised step)
  reports each of its stages' gradients as final as soon as that stage is done;
* ``OptimizerStep`` (the end of gradient work; the optimiser itself is the caller's, after
  the data-parallel reduction) waits for the sends and, with ``sync=True``, sums the tied
  embedding's gradient (``local.tied_names``) between the first and last stage over
  Megatron's "embedding group" (``model.tied_embedding_group``) so both copies stay equal;
* at the end the mean loss is broadcast from the last stage to the whole pp group
  (``run`` is ``step`` without that: it returns the last stage's micro-batch losses as
  device values, which the trainer reads with the gradient norm in one copy, then
  ``share_loss``).

Nothing in the executor waits for the GPU: kernels of consecutive instructions queue on the
stream, and only a hand-off outside the stream synchronises it, inside the Communicator (a
send or receive staged through host memory, a collective); a receive buffer is written by
MPI or a staging copy before any kernel reads it.

Hooks for overlapping the data-parallel reduction: ``pipe.on_stage_backward_done`` is a list
of callables ``fn(stage_index, names)``; ``stage_index`` indexes ``pipe.stages``
(``local.stages`` when not interleaved) and ``names`` are parameter names of this rank whose
gradients are now final for the step. Each name of ``local.grads`` is reported exactly once
per synchronised step: a stage's own names right after the last micro-batch's backward
through it; the tied ``wte`` (pp > 1: held by the embedding stage on the first rank and by
the head on the last, which does not list it) only after the tied all-reduce at the end::

    pipe.on_stage_backward_done.append(lambda i, names: grad_sync.mark_ready(names))

Timing (``pipe.last``, a ``StepTimes`` of the latest step only: nothing accumulates from step
to step): wall time of the step on this rank, time in forward and backward compute, waiting
on receives, on sends, in the tied all-reduce and the loss broadcast, and the rest
("other": bookkeeping). The measured bubble is ``1 - compute / step``; compare with
``bubble_fraction_theory(P, M)``. On a GPU the clocks are the host's and nothing is
synchronised for them: forward and backward are the time to queue their kernels, and the
device time they take shows up in the next wait (a send, a receive, the loss read), so the
per-instruction split (and the bubble) is a CPU measurement; ``step`` is real either way.
Each forward, backward, send (the ``isend``) and receive wait is also reported to the trace
(``mpipar.trace.recorder()``: nothing is kept unless ``--trace`` is recording), named with
its micro-batch and virtual stage, a message with its peer and bytes.

Interleaved 1F1B runs when ``chunks`` gives this rank's model chunks (a list of stage lists,
chunk c being virtual stage ``c * P + pp_rank``): ``build_local_model(...,
layout=Layout(virtual_stages=v)).chunks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from mpipar import backend, trace
from mpipar.parallel.model import allreduce_tied_grads, tied_embedding_group
from mpipar.parallel.schedules import (Backward, Forward, Instruction, OptimizerStep, RecvActivation,
                                       RecvGrad, SendActivation, SendGrad, message_tag, peer)

# the trace's name of each message instruction (its span: the isend, or the wait for the irecv)
_MESSAGE = {SendActivation: "send act", SendGrad: "send grad", RecvActivation: "recv act",
            RecvGrad: "recv grad"}


@dataclass
class StepTimes:
    """Seconds one rank spent in one pipeline step (or, added up, in several)."""

    step: float = 0.0
    forward: float = 0.0
    backward: float = 0.0
    recv_wait: float = 0.0
    send_wait: float = 0.0
    tied_reduce: float = 0.0
    loss_bcast: float = 0.0
    events: list = field(default_factory=list)   # (kind, mb, chunk, t0, t1) from the step start

    @property
    def compute(self) -> float:
        return self.forward + self.backward

    @property
    def wait(self) -> float:
        return self.recv_wait + self.send_wait + self.tied_reduce + self.loss_bcast

    @property
    def other(self) -> float:
        return max(self.step - self.compute - self.wait, 0.0)

    @property
    def bubble(self) -> float:
        """Measured idle fraction of this rank's step: 1 - compute / step."""
        return 1.0 - self.compute / self.step if self.step > 0 else 0.0

    def __iadd__(self, other: "StepTimes") -> "StepTimes":
        for name in ("step", "forward", "backward", "recv_wait", "send_wait", "tied_reduce",
                     "loss_bcast"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.events += other.events
        return self


@dataclass
class _Step:
    """What one ``step`` call holds; gone when it returns."""

    micro: list                       # (idx, targets) per micro-batch
    dloss: float                      # d(total)/d(loss) of one micro-batch
    times: StepTimes
    t0: float
    recvs: list                       # the receive instructions, in order
    next_post: int = 0                # index in recvs of the next irecv to post
    n_recv: int = 0                   # receive instructions reached
    posted: dict = field(default_factory=dict)    # (type, mb, chunk) -> (request, buffer)
    inputs: dict = field(default_factory=dict)    # (chunk, mb) -> received activation
    dins: dict = field(default_factory=dict)      # (chunk, mb) -> received output gradient
    caches: dict = field(default_factory=dict)    # (chunk, mb) -> stage caches
    outs: dict = field(default_factory=dict)      # (chunk, mb) -> array waiting to be sent
    losses: dict = field(default_factory=dict)    # mb -> loss (last stage)
    sends: list = field(default_factory=list)     # (request, buffer) of sends in flight


class PipelineExecutor:
    """Runs schedules on this rank's stages; holds receive buffers and the tied group."""

    def __init__(self, local: Any, pp_group: Any, *, chunks: Sequence[Sequence[Any]] | None = None,
                 lookahead: int = 2, act_shape: Sequence[int] | None = None,
                 record_events: bool = True) -> None:
        self.local, self.pp = local, pp_group
        self.P, self.rank = pp_group.size, pp_group.rank
        # wall time under MPI, the rank's virtual clock in the simulator
        self.clock: Callable[[], float] = pp_group.clock
        self.chunks = [list(c) for c in chunks] if chunks is not None else [list(local.stages)]
        self.V = len(self.chunks)
        self.stages = [st for c in self.chunks for st in c]
        self._offset = np.cumsum([0] + [len(c) for c in self.chunks]).tolist()
        self.lookahead = max(int(lookahead), 0)
        self.act_shape = tuple(act_shape) if act_shape is not None else None
        self.record_events = record_events
        self.on_stage_backward_done: list[Callable[[int, list[str]], None]] = []
        self.last = StepTimes()
        self.xp = backend.array_module(local.param_buffer)
        self.dtype = local.param_buffer.dtype
        self._pool: dict[tuple, list] = {}
        self.tied_group = tied_embedding_group(pp_group)      # collective over the pp group
        # what each stage reports when its last backward is done, and what waits for the end
        tied = set(local.tied_names) if self.tied_group is not None else set()
        self._ready = [[n for n in getattr(st, "names", ()) if n in local.grads and n not in tied]
                       for st in self.stages]
        self._ready_at_end: list[tuple[int, list[str]]] = []
        holder = 0 if self.rank == 0 else len(self.stages) - 1 if self.rank == self.P - 1 else None
        if tied and holder is not None:
            self._ready_at_end.append((holder, [n for n in local.tied_names if n in local.grads]))

    # ---- one step -----------------------------------------------------------------------------
    def step(self, instructions: Sequence[Instruction], micro_batches: Sequence[tuple[Any, Any]],
             dloss_scale: float = 1.0, zero_grad: bool = True) -> float:
        """Run one instruction list; returns the mean loss over the micro-batches on every pp
        rank. ``zero_grad``: zero the gradients first (False when accumulating, and for an
        evaluation schedule, which makes none)."""
        losses = backend.host_scalars(self.run(instructions, micro_batches, dloss_scale,
                                               zero_grad))
        t0 = self.clock()
        loss = self.share_loss(mean_loss(losses))
        self.last.loss_bcast = self.clock() - t0
        self.last.step += self.last.loss_bcast
        return loss

    def run(self, instructions: Sequence[Instruction], micro_batches: Sequence[tuple[Any, Any]],
            dloss_scale: float = 1.0, zero_grad: bool = True) -> list[Any]:
        """``step`` without reading the loss: this rank's micro-batch losses as 0-d arrays
        of the model's module, in micro-batch order, on the last stage (empty elsewhere). On
        a GPU nothing waits for the device here: the caller reads the losses when it reads
        other values too (the trainer: with the gradient norm, one copy per step) and gives
        ``mean_loss`` of them to ``share_loss``."""
        M = len(micro_batches)
        if M < 1:
            raise ValueError("need at least one micro-batch")
        instructions = list(instructions)
        t0 = self.clock()
        s = _Step(micro=[tuple(mb) for mb in micro_batches], dloss=dloss_scale / M,
                  times=StepTimes(), t0=t0,
                  recvs=[i for i in instructions if isinstance(i, (RecvActivation, RecvGrad))])
        if zero_grad:
            self.local.zero_grad()
        self._post_ahead(s, self.lookahead)
        for ins in instructions:
            handler = self._HANDLERS.get(type(ins))
            if handler is None:
                raise TypeError(f"unknown pipeline instruction {ins!r}")
            handler(self, ins, s)
        self._wait_sends(s)                       # an evaluation schedule has no OptimizerStep
        if s.posted or s.inputs or s.dins or s.caches:
            raise RuntimeError(f"pipeline rank {self.rank}: schedule left work behind "
                               f"(receives {list(s.posted)}, caches {list(s.caches)})")
        s.times.step = self.clock() - t0
        self.last = s.times
        return [s.losses[mb] for mb in range(M)] if s.losses else []

    def share_loss(self, loss: float) -> float:
        """The last stage's ``loss`` (a host number) on every pp rank: a broadcast over the
        pp group (the other ranks' argument is ignored)."""
        if self.P == 1:
            return loss
        buf = np.array([loss if self.rank == self.P - 1 else 0.0], dtype=np.float64)
        return float(self.pp.broadcast(buf, root=self.P - 1)[0])

    # ---- the handlers, one per instruction type --------------------------------------------
    def _recv(self, ins: Instruction, s: _Step) -> None:
        s.n_recv += 1
        self._post_ahead(s, s.n_recv + self.lookahead)
        req, buf = s.posted.pop((type(ins), ins.mb, ins.chunk))
        t0 = self.clock()
        req.wait()
        self._record(s, "recv_wait", ins, t0, buf)
        (s.inputs if isinstance(ins, RecvActivation) else s.dins)[(ins.chunk, ins.mb)] = buf

    def _forward(self, ins: Forward, s: _Step) -> None:
        t0 = self.clock()
        key = (ins.chunk, ins.mb)
        idx, targets = s.micro[ins.mb]
        x = idx if self._is_first(ins.chunk) else s.inputs[key]
        stages = self.chunks[ins.chunk]
        head = stages[-1] if self._is_last(ins.chunk) else None
        caches = []
        for st in stages:
            if st is head:
                _, s.losses[ins.mb], c = st.forward(x, targets)
                x = None
            else:
                x, c = st.forward(x)
            caches.append(c)
        if ins.keep_cache:
            s.caches[key] = caches
        elif key in s.inputs:
            self._give(s.inputs.pop(key))                   # nothing refers to it any more
        if x is not None:
            s.outs[key] = x
        self._record(s, "forward", ins, t0)

    def _backward(self, ins: Backward, s: _Step) -> None:
        t0 = self.clock()
        key = (ins.chunk, ins.mb)
        stages, caches = self.chunks[ins.chunk], s.caches.pop(key)
        received = None if self._is_last(ins.chunk) else s.dins.pop(key)
        dx = s.dloss if received is None else received      # the head's dout is d(total)/d(loss)
        for k in range(len(stages) - 1, -1, -1):
            dx = stages[k].backward(dx, caches[k])
            caches[k] = None                                 # free as we go
            if ins.sync and self.on_stage_backward_done:
                index = self._offset[ins.chunk] + k
                self._report(index, self._ready[index])
        if received is not None and dx is not received:
            self._give(received)
        xin = s.inputs.pop(key, None)
        if xin is not None and s.outs.get(key) is not xin:
            self._give(xin)                                  # its cache is gone: reuse
        if not self._is_first(ins.chunk):
            s.outs[key] = dx
        self._record(s, "backward", ins, t0)

    def _send(self, ins: Instruction, s: _Step) -> None:
        x = s.outs.pop((ins.chunk, ins.mb))
        dest, _ = peer(ins, self.rank, self.P)
        tag = message_tag(ins, self.rank, self.P, self.V)
        s.sends = [snd for snd in s.sends if not snd[0].test()]   # drop finished sends
        rec = trace.recorder()
        t0 = rec.now()
        s.sends.append((self.pp.isend(x, dest, tag), x))         # x must outlive the send
        rec.add(_MESSAGE[type(ins)], t0, rec.now(), "p2p", mb=ins.mb, stage=self._vs(ins.chunk),
                peer=dest, bytes=x.nbytes)

    def _end_of_gradients(self, ins: OptimizerStep, s: _Step) -> None:
        self._wait_sends(s)
        if not ins.sync:
            return
        t0 = self.clock()
        if self.tied_group is not None:
            allreduce_tied_grads(self.local, self.tied_group)
        s.times.tied_reduce += self.clock() - t0
        for index, names in self._ready_at_end:
            self._report(index, names)

    _HANDLERS: dict[type, Callable[..., None]] = {
        RecvActivation: _recv, RecvGrad: _recv, Forward: _forward, Backward: _backward,
        SendActivation: _send, SendGrad: _send, OptimizerStep: _end_of_gradients,
    }

    # ---- helpers --------------------------------------------------------------------------
    def _vs(self, chunk: int) -> int:
        return chunk * self.P + self.rank

    def _is_first(self, chunk: int) -> bool:
        return self._vs(chunk) == 0

    def _is_last(self, chunk: int) -> bool:
        return self._vs(chunk) == self.P * self.V - 1

    def _shape(self, s: _Step, mb: int) -> tuple[int, int, int]:
        if self.act_shape is not None:
            return self.act_shape                                   # type: ignore[return-value]
        for a in s.micro[mb]:
            if a is not None:
                B, T = a.shape[:2]
                return int(B), int(T), int(self.local.config.n_embd)
        raise ValueError(f"micro-batch {mb}: neither idx nor targets given; pass act_shape")

    def _take(self, shape: tuple) -> Any:
        free = self._pool.get(shape)
        return free.pop() if free else self.xp.empty(shape, dtype=self.dtype)

    def _give(self, buf: Any) -> None:
        self._pool.setdefault(tuple(buf.shape), []).append(buf)

    def _record(self, s: _Step, kind: str, ins: Instruction, t0: float, buf: Any = None) -> None:
        """Charge the time since ``t0`` to the ``kind`` field of the step's StepTimes
        (recv_wait, forward, backward), log it as an event, and report it to the trace
        (a receive's wait with its peer and bytes: ``buf``, what it received)."""
        t1 = self.clock()
        setattr(s.times, kind, getattr(s.times, kind) + t1 - t0)
        if self.record_events:
            s.times.events.append((kind, ins.mb, ins.chunk, t0 - s.t0, t1 - s.t0))
        if buf is None:
            trace.recorder().add(kind, t0, t1, "compute", mb=ins.mb, stage=self._vs(ins.chunk))
        else:
            trace.recorder().add(_MESSAGE[type(ins)], t0, t1, "p2p", mb=ins.mb,
                                 stage=self._vs(ins.chunk), peer=peer(ins, self.rank, self.P)[0],
                                 bytes=buf.nbytes)

    def _post_ahead(self, s: _Step, upto: int) -> None:
        """Post receives up to index ``upto`` of the receive list (exclusive)."""
        while s.next_post < min(upto, len(s.recvs)):
            ins = s.recvs[s.next_post]
            buf = self._take(self._shape(s, ins.mb))             # (B, T, C)
            src, _ = peer(ins, self.rank, self.P)
            tag = message_tag(ins, self.rank, self.P, self.V)
            s.posted[(type(ins), ins.mb, ins.chunk)] = (self.pp.irecv(buf, src, tag), buf)
            s.next_post += 1

    def _report(self, index: int, names: list[str]) -> None:
        for fn in self.on_stage_backward_done:
            fn(index, names)

    def _wait_sends(self, s: _Step) -> None:
        t0 = self.clock()
        for req, _ in s.sends:
            req.wait()
        t1 = self.clock()
        s.times.send_wait += t1 - t0
        if s.sends:
            trace.recorder().add("wait sends", t0, t1, "wait", sends=len(s.sends))
        s.sends = []


def mean_loss(losses: Sequence[float]) -> float:
    """The mean of one step's micro-batch losses (host numbers, ``run``'s read), added in
    micro-batch order in float64; 0.0 for none (a stage other than the last)."""
    return sum(losses) / len(losses) if losses else 0.0


def split_micro_batches(idx: Any, targets: Any, M: int) -> list[tuple[Any, Any]]:
    """Split a (B, T) batch into M micro-batches of B/M rows (B must be divisible by M)."""
    ref = idx if idx is not None else targets
    B = ref.shape[0]
    if B % M:
        raise ValueError(f"a batch of {B} rows does not split into {M} micro-batches")
    n = B // M
    return [(None if idx is None else idx[i * n:(i + 1) * n],
             None if targets is None else targets[i * n:(i + 1) * n]) for i in range(M)]
