"""The pipeline executor: runs one rank's instruction list (``schedules.py``) on its stages.

    from mpipar.parallel.schedules import make_schedule
    from mpipar.parallel.pipeline import PipelineExecutor

    pipe = PipelineExecutor(local, mesh.pp_group)      # collective over the pp group (once)
    ins = make_schedule("1f1b", mesh.pp, mesh.pp_rank, M)
    loss = pipe.step(ins, micro_batches, dloss_scale=1.0)   # zeroes, runs, reduces tied grads
    # ... data-parallel gradient sync, clipping, optimiser step on local.param_buffer
    pipe.last.bubble                                    # 1 - compute / step time, this rank

``micro_batches``: M pairs ``(idx, targets)`` of this rank's data-parallel shard, each
(B/M, T). Only stage 0 reads ``idx`` and only the last stage ``targets``; the middle stages
read either one's shape (or pass ``act_shape=(B/M, T, C)`` and ``None`` entries).

What one ``step`` does:

* ``local.zero_grad()`` (unless ``zero_grad=False``, for accumulating several steps);
* every instruction in order. Receives are posted as ``irecv`` into pooled buffers up to
  ``lookahead`` receives ahead of the one awaited, so a message can land while this rank
  computes; ``RecvActivation``/``RecvGrad`` only wait. Sends are ``isend``s whose buffers are
  kept until MPI is done with them. Tags: ``schedules.message_tag`` (micro-batch, direction,
  receiving chunk), so messages in flight between two ranks never match the wrong receive;
* each micro-batch's backward starts the head with ``dloss = dloss_scale / M``, so the
  gradients are those of the mean loss over the whole batch (times ``dloss_scale``) and
  accumulate (``+=``) in ``local.grad_buffer``;
* at ``OptimizerStep`` (the end of gradient work; the optimiser itself is the caller's, after
  the data-parallel reduction): wait for the sends, sum the tied embedding's gradient
  (``local.tied_names``) between the first and last stage over a 2-rank group of the pp group
  made once here (Megatron's "embedding group"), so both copies stay equal after any
  optimiser; then broadcast the mean loss from the last stage to the whole pp group.

Hooks for overlapping the data-parallel reduction: ``pipe.on_stage_backward_done`` is a list
of callables ``fn(stage_index, names)``; ``stage_index`` indexes ``pipe.stages``
(``local.stages`` when not interleaved) and ``names`` are parameter names of this rank whose
gradients are now final for the step. Each name of ``local.grads`` is reported exactly once
per step: a stage's own names right after the last micro-batch's backward through it; the
tied ``wte`` (pp > 1: held by the embedding stage on the first rank and by the head on the
last, which does not list it) only after the tied all-reduce at the end. With the
data-parallel colleague's buckets::

    pipe.on_stage_backward_done.append(lambda i, names: buckets.mark_ready(names))

Timing (``pipe.last``, a ``StepTimes``; ``pipe.history`` keeps every step): wall time of the
step on this rank, time in forward and backward compute, waiting on receives, on sends, in
the tied all-reduce and the loss broadcast, and the rest ("other": bookkeeping). The measured
bubble is ``1 - compute / step``; compare with ``bubble_fraction_theory(P, M)``. With a GPU
the compute is synchronised before each clock read so the numbers are real.

Interleaved 1F1B runs when ``chunks`` gives this rank's model chunks (a list of stage lists,
chunk c being virtual stage ``c * P + pp_rank``); ``build_local_model`` builds contiguous
stages only, so interleaving needs a model built per chunk (see tests/parallel/test_pipeline.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from mpipar import backend
from mpipar.parallel.schedules import (Backward, Forward, Instruction, OptimizerStep, RecvActivation,
                                       RecvGrad, SendActivation, SendGrad, message_tag, peer)


@dataclass
class StepTimes:
    """Seconds one rank spent in one pipeline step."""

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


class PipelineExecutor:
    """Runs schedules on this rank's stages; holds receive buffers and the tied group."""

    def __init__(self, local: Any, pp_group: Any, *, chunks: Sequence[Sequence[Any]] | None = None,
                 lookahead: int = 2, act_shape: Sequence[int] | None = None,
                 record_events: bool = True) -> None:
        self.local, self.pp = local, pp_group
        self.P, self.rank = pp_group.size, pp_group.rank
        self.chunks = [list(c) for c in chunks] if chunks is not None else [list(local.stages)]
        self.V = len(self.chunks)
        self.stages = [st for c in self.chunks for st in c]
        self._offset = np.cumsum([0] + [len(c) for c in self.chunks]).tolist()
        self.lookahead = max(int(lookahead), 0)
        self.act_shape = tuple(act_shape) if act_shape is not None else None
        self.record_events = record_events
        self.on_stage_backward_done: list[Callable[[int, list[str]], None]] = []
        self.history: list[StepTimes] = []
        self.last = StepTimes()
        self.xp = backend.array_module(local.param_buffer)
        self.dtype = local.param_buffer.dtype
        self._gpu = self.xp is not np
        self._pool: dict[tuple, list] = {}
        self.tied_names = list(getattr(local, "tied_names", []))
        # Megatron's embedding group: first and last pipeline rank. Made once, collectively.
        self.tied_group = None
        if self.P > 1:
            member = self.rank in (0, self.P - 1)
            self.tied_group = pp_group.split(color=0 if member else None, key=self.rank)
        # what each stage reports when its last backward is done, and what waits for the end
        tied = set(self.tied_names) if self.tied_group is not None else set()
        self._ready = [[n for n in getattr(st, "names", ()) if n in local.grads and n not in tied]
                       for st in self.stages]
        self._ready_at_end: list[tuple[int, list[str]]] = []
        holder = 0 if self.rank == 0 else len(self.stages) - 1 if self.rank == self.P - 1 else None
        if tied and holder is not None:
            self._ready_at_end.append((holder, [n for n in self.tied_names if n in local.grads]))

    # ---- helpers --------------------------------------------------------------------------
    def _vs(self, chunk: int) -> int:
        return chunk * self.P + self.rank

    def _is_first(self, chunk: int) -> bool:
        return self._vs(chunk) == 0

    def _is_last(self, chunk: int) -> bool:
        return self._vs(chunk) == self.P * self.V - 1

    def _shape(self, mb: int) -> tuple[int, int, int]:
        if self.act_shape is not None:
            return self.act_shape                                   # type: ignore[return-value]
        for a in self._micro[mb]:
            if a is not None:
                B, T = a.shape[:2]
                return int(B), int(T), int(self.local.config.n_embd)
        raise ValueError(f"micro-batch {mb}: neither idx nor targets given; pass act_shape")

    def _take(self, shape: tuple) -> Any:
        free = self._pool.get(shape)
        return free.pop() if free else self.xp.empty(shape, dtype=self.dtype)

    def _give(self, buf: Any) -> None:
        self._pool.setdefault(tuple(buf.shape), []).append(buf)

    def _sync(self) -> None:
        if self._gpu:
            backend.synchronize(self.xp)

    def _event(self, kind: str, ins: Instruction, t0: float, t1: float) -> None:
        if self.record_events:
            self.last.events.append((kind, ins.mb, ins.chunk, t0 - self._t0, t1 - self._t0))

    def _post(self, ins: Instruction) -> None:
        buf = self._take(self._shape(ins.mb))                        # (B, T, C)
        src, _ = peer(ins, self.rank, self.P)
        tag = message_tag(ins, self.rank, self.P, self.V)
        self._posted[(type(ins), ins.mb, ins.chunk)] = (self.pp.irecv(buf, src, tag), buf)

    def _post_ahead(self, upto: int) -> None:
        """Post receives up to index ``upto`` of the receive list (exclusive)."""
        while self._next_post < min(upto, len(self._recvs)):
            self._post(self._recvs[self._next_post])
            self._next_post += 1

    def _fire(self, index: int, names: list[str]) -> None:
        for fn in self.on_stage_backward_done:
            fn(index, names)

    # ---- one step -----------------------------------------------------------------------------
    def step(self, instructions: Sequence[Instruction], micro_batches: Sequence[tuple[Any, Any]],
             dloss_scale: float = 1.0, zero_grad: bool = True, reduce_tied: bool = True) -> float:
        """Run one step; returns the mean loss over the micro-batches on every pp rank.

        ``reduce_tied=False`` skips summing the tied embedding gradient between first and
        last stage: with gradient accumulation over several calls it must be summed once,
        on the last call, or the earlier calls' share would be counted twice."""
        self._reduce_tied = reduce_tied
        ins_list = list(instructions)
        M = len(micro_batches)
        if M < 1:
            raise ValueError("need at least one micro-batch")
        self._micro = [tuple(mb) for mb in micro_batches]
        self.last = times = StepTimes()
        self._sync()
        self._t0 = t_start = time.perf_counter()
        if zero_grad:
            self.local.zero_grad()
        dloss = dloss_scale / M
        last_bwd = {}
        for ins in ins_list:
            if isinstance(ins, Backward):
                last_bwd[ins.chunk] = ins.mb
        self._recvs = [i for i in ins_list if isinstance(i, (RecvActivation, RecvGrad))]
        self._next_post = 0
        self._posted: dict[tuple, tuple] = {}
        inputs: dict[tuple, Any] = {}     # received activations (pooled), by (chunk, mb)
        dins: dict[tuple, Any] = {}       # received output gradients (pooled)
        caches: dict[tuple, list] = {}
        outs: dict[tuple, Any] = {}       # activations / input gradients waiting to be sent
        losses: dict[int, Any] = {}
        sends: list = []
        finished = False
        self._post_ahead(self.lookahead)
        n_recv = 0

        for ins in ins_list:
            key = (ins.chunk, ins.mb)
            if isinstance(ins, (RecvActivation, RecvGrad)):
                n_recv += 1
                self._post_ahead(n_recv + self.lookahead)
                req, buf = self._posted.pop((type(ins), ins.mb, ins.chunk))
                t0 = time.perf_counter()
                req.wait()
                t1 = time.perf_counter()
                times.recv_wait += t1 - t0
                self._event("recv_wait", ins, t0, t1)
                (inputs if isinstance(ins, RecvActivation) else dins)[key] = buf
            elif isinstance(ins, Forward):
                t0 = time.perf_counter()
                x = self._micro[ins.mb][0] if self._is_first(ins.chunk) else inputs[key]
                stages = self.chunks[ins.chunk]
                cs = []
                for k, st in enumerate(stages):
                    if k == len(stages) - 1 and self._is_last(ins.chunk):
                        _, loss, c = st.forward(x, self._micro[ins.mb][1])
                        losses[ins.mb] = loss
                        x = None
                    else:
                        x, c = st.forward(x)
                    cs.append(c)
                caches[key] = cs
                if x is not None:
                    outs[key] = x
                self._sync()
                t1 = time.perf_counter()
                times.forward += t1 - t0
                self._event("forward", ins, t0, t1)
            elif isinstance(ins, Backward):
                t0 = time.perf_counter()
                stages, cs = self.chunks[ins.chunk], caches.pop(key)
                dx = None if self._is_last(ins.chunk) else dins.pop(key)
                dout_buf = dx
                done = last_bwd.get(ins.chunk) == ins.mb
                for k in range(len(stages) - 1, -1, -1):
                    if k == len(stages) - 1 and self._is_last(ins.chunk):
                        dx = stages[k].backward(cs[k], dloss)
                    else:
                        dx = stages[k].backward(dx, cs[k])
                    cs[k] = None                             # free as we go
                    index = self._offset[ins.chunk] + k
                    if done and self.on_stage_backward_done:
                        self._sync()
                        self._fire(index, self._ready[index])
                if dout_buf is not None and dx is not dout_buf:
                    self._give(dout_buf)
                xin = inputs.pop(key, None)
                if xin is not None and outs.get(key) is not xin:
                    self._give(xin)                          # its cache is gone: reuse
                if not self._is_first(ins.chunk):
                    outs[key] = dx
                self._sync()
                t1 = time.perf_counter()
                times.backward += t1 - t0
                self._event("backward", ins, t0, t1)
            elif isinstance(ins, (SendActivation, SendGrad)):
                x = outs.pop(key)
                dest, _ = peer(ins, self.rank, self.P)
                tag = message_tag(ins, self.rank, self.P, self.V)
                sends = [s for s in sends if not s[0].test()]       # drop finished sends
                sends.append((self.pp.isend(x, dest, tag), x))      # x must outlive the send
            elif isinstance(ins, OptimizerStep):
                self._finish(sends, times)
                sends, finished = [], True
            else:
                raise TypeError(f"unknown pipeline instruction {ins!r}")
        if not finished:
            self._finish(sends, times)
        if self._posted or inputs or dins or caches:
            raise RuntimeError(f"pipeline rank {self.rank}: schedule left work behind "
                               f"(receives {list(self._posted)}, caches {list(caches)})")

        # the mean loss, from the last stage to every pp rank
        t0 = time.perf_counter()
        buf = np.zeros(1, dtype=np.float64)
        if self.rank == self.P - 1:
            buf[0] = sum(float(losses[mb]) for mb in range(M)) / M
        if self.P > 1:
            buf = self.pp.broadcast(buf, root=self.P - 1)
        t1 = time.perf_counter()
        times.loss_bcast = t1 - t0
        times.step = t1 - t_start
        self.history.append(times)
        return float(buf[0])

    def _finish(self, sends: list, times: StepTimes) -> None:
        t0 = time.perf_counter()
        for req, _ in sends:
            req.wait()
        t1 = time.perf_counter()
        times.send_wait += t1 - t0
        if self.tied_group is not None and self._reduce_tied:
            self._sync()
            for name in self.tied_names:
                g = self.local.grads[name]
                g[...] = self.tied_group.allreduce(g)
        t2 = time.perf_counter()
        times.tied_reduce = t2 - t1
        for index, names in self._ready_at_end:
            self._fire(index, names)


_EXECUTORS: dict[tuple[int, int], PipelineExecutor] = {}
_MAX_CACHED = 4


def run_pipeline(local: Any, pp_group: Any, schedule_instructions: Sequence[Instruction],
                 micro_batches: Sequence[tuple[Any, Any]], dloss_scale: float = 1.0) -> float:
    """One pipeline step with a ``PipelineExecutor`` cached per (local, pp_group); returns
    the mean loss on every pp rank. The first call for a pair is collective over the pp group
    (it makes the tied-embedding group). Keep a ``PipelineExecutor`` yourself for hooks and
    timings (``executor_for`` returns the cached one)."""
    return executor_for(local, pp_group).step(schedule_instructions, micro_batches, dloss_scale)


def executor_for(local: Any, pp_group: Any) -> PipelineExecutor:
    key = (id(local), id(pp_group))
    ex = _EXECUTORS.get(key)
    if ex is None or ex.local is not local or ex.pp is not pp_group:
        while len(_EXECUTORS) >= _MAX_CACHED:        # same calls on every rank: same evictions
            del _EXECUTORS[next(iter(_EXECUTORS))]
        ex = _EXECUTORS[key] = PipelineExecutor(local, pp_group)
    return ex


def split_micro_batches(idx: Any, targets: Any, M: int) -> list[tuple[Any, Any]]:
    """Split a (B, T) batch into M micro-batches of B/M rows (B must be divisible by M)."""
    ref = idx if idx is not None else targets
    B = ref.shape[0]
    if B % M:
        raise ValueError(f"batch of {B} rows does not split into {M} micro-batches; "
                         f"choose --micro-batches dividing the per-rank batch")
    n = B // M
    return [(None if idx is None else idx[i * n:(i + 1) * n],
             None if targets is None else targets[i * n:(i + 1) * n]) for i in range(M)]
