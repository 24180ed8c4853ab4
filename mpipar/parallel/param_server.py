"""Parameter-server training: K server ranks own the parameters and the optimiser, W workers
compute gradients, push them and pull fresh parameters (synchronous, asynchronous, or stale
synchronous parallel).

    trainer = ParamServerTrainer(world, config, Layout(), OptimizerSpec("adamw", lr=1e-3),
                                 servers=1, mode=parse_mode("ssp:2"))
    for step in range(steps):
        x, y = sampler.batch(step, trainer.mesh.dp_rank, trainer.mesh.dp)   # a worker's rows
        result = trainer.step(x, y, lr=cosine_lr(step, ...))   # servers: serve the step
    sd = trainer.full_state_dict()            # the whole model, every rank (collective)

Roles (``ps_roles``): the LAST K world ranks are servers, ranks 0 .. W-1 (W = world - K)
workers, so world rank 0, which prints the log, is always worker 0. Worker w is data-parallel
rank w of W: it takes rows [w B/W, (w+1) B/W) of every global batch, as the all-reduce
trainer's dp rank w does, and runs the one-process ``ParallelTrainer`` (its own grad-accum
and micro-batches) on them, with a ``GradSync`` (``PushGradients``) that reduces nothing:
the gradient goes to the servers instead.

Sharding (balanced by bytes): the flat parameter vector of N elements (the single process's
layout, nanoGPT order) is cut into K contiguous ranges [k N / K, (k+1) N / K); server k
owns range k of the parameters, and the optimiser's state over it as 1-D pieces
``name[a:b]`` (as ZeRO's: each piece decays as its whole tensor would). Every element has one
owner, and a tensor may straddle two servers.

One step of worker w, step index c (its clock: steps it has pushed)::

    grads = backward(rows of batch c)                       # the inner trainer
    to every server k:  isend [c, lr, loss, norm], isend grads[range k]
    from every server:  irecv [version, norm, loss, slowest clock], irecv params[range k]

A server holds, per worker, one header and one gradient receive posted ahead, and polls
them with ``Request.test``; between fruitless polls it sleeps (50 us, doubling to 1 ms): MPI's
blocking waits spin a core inside the library (MPICH polls its progress engine), and a
server that spun would take a worker's core on a machine with as many ranks as cores. The
transport has no probe, and needs none: every message's size and source are known. Pushes
are taken in arrival order; a pull is answered as soon as the mode allows, while further
pushes keep arriving (nothing blocks on one worker).

Modes (``Mode``, chosen once by ``parse_mode``):

* ``sync``: the server waits for all W gradients of step c, averages them in worker order
  (g = sum_w g_w / W, the single process's mean over the global batch), clips by the global
  norm of that average (sum of squares added over the servers: one all-reduce of one number
  over the server group) and applies one update; then it answers every pull. Equal to the
  single process up to summation order.
* ``async``: each push is clipped by its own norm (on the worker, which holds the whole
  gradient) and applied on arrival with the lr it carries; its pull is answered at once with
  the newest parameters. No barrier between workers.
* ``ssp:S`` (stale synchronous parallel, Ho et al. 2013, "More Effective Distributed ML via a
  Stale Synchronous Parallel Parameter Server"): as async, but a worker that has pushed c
  steps may start step c (its pull is answered) only once the slowest worker has pushed at
  least c - S: enforced by the server on the pull.

Staleness, recorded by every server for every gradient it applies (``Staleness``):

* ``lag`` (clocks): the gradient's step c minus the slowest worker's clock when the
  parameters it was computed on were sent. SSP's guarantee is lag <= S; sync's is 0; async has
  no bound.
* ``updates``: the server's version (updates applied) at the apply minus its version when
  those parameters were sent: how many other updates the gradient missed (sync: 0).

Synchronisation points (``synchronize``, done before evaluation and every gather): every
server sends its range to every worker after it has applied every push of the steps taken,
so the workers hold the servers' parameters, identical on all of them. Between them nothing is
collective over the world: a worker talks only to the servers.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np

from mpipar import backend
from mpipar.nn.flat import FlatLayout
from mpipar.nn.gpt import init_host, param_shapes
from mpipar.optim import NoLossScaling, OptimizerSpec, decays_by_default
from mpipar.optim.clip import norm_of, scale_to, squares
from mpipar.parallel.data_parallel import CommStats
from mpipar.parallel.layout import Layout
from mpipar.parallel.mesh import Mesh
from mpipar.parallel.numerics import NonFinite
from mpipar.parallel.trainer import ParallelTrainer, TrainStepResult

# message tags (the world's user transport; no collective ever matches them)
TAG_PUSH, TAG_GRAD, TAG_REPLY, TAG_PARAMS, TAG_SYNC = 7101, 7102, 7103, 7104, 7105
PUSH = ("step", "lr", "loss", "norm")                 # a push's header, float64
REPLY = ("version", "norm", "loss", "slowest")        # a pull reply's header, float64

POLL_MIN_S, POLL_MAX_S = 5e-5, 1e-3      # a server's sleep between fruitless polls


class PSConfigError(ValueError):
    """A parameter-server configuration that does not compose; ``field`` names the quantity
    (``servers``, ``mode``, ``tp``, ``pp``, ``zero``, ``compress``, ``slow_rank``,
    ``slow_factor``, ``batch_size``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


# ---- modes --------------------------------------------------------------------------------
class Mode:
    """How servers apply pushes and when they answer pulls."""

    name: str = ""
    bound: int | None = None      # the largest clock lag allowed (None: no bound)
    averages: bool = False        # True: one update of the W gradients of a step

    def ready(self, clock: int, slowest: int) -> bool:
        """Whether a worker that has pushed ``clock`` steps may start its next one, the
        slowest worker having pushed ``slowest``."""
        raise NotImplementedError

    def worker_clip(self, grads: Mapping[str, Any], norm: float, max_norm: float) -> None:
        """Clip on the worker, before the push (async, SSP: each push is an update of its
        own, so its own norm is the norm of the update)."""
        scale_to(grads, norm, max_norm)

    def __str__(self) -> str:
        return self.name


class SyncMode(Mode):
    name, bound, averages = "sync", 0, True

    def ready(self, clock: int, slowest: int) -> bool:
        return slowest >= clock

    def worker_clip(self, grads: Mapping[str, Any], norm: float, max_norm: float) -> None:
        """Nothing: the server clips the average by its own global norm."""


class AsyncMode(Mode):
    name = "async"

    def ready(self, clock: int, slowest: int) -> bool:
        return True


@dataclass(frozen=True)
class SSPMode(Mode):
    staleness: int = 0

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"ssp:{self.staleness}"

    @property
    def bound(self) -> int:  # type: ignore[override]
        return self.staleness

    def ready(self, clock: int, slowest: int) -> bool:
        return slowest >= clock - self.staleness

    def __str__(self) -> str:
        return self.name


MODES = ("sync", "async", "ssp:S")


def parse_mode(text: str) -> Mode:
    """``sync``, ``async`` or ``ssp:S`` (S an integer >= 0) as its Mode; ValueError naming
    the text otherwise."""
    t = text.strip()
    if t == "sync":
        return SyncMode()
    if t == "async":
        return AsyncMode()
    if t.startswith("ssp:"):
        try:
            s = int(t[4:])
        except ValueError:
            s = -1
        if s >= 0:
            return SSPMode(s)
    raise ValueError(f"parameter-server mode {text!r} is not one of sync, async, ssp:S "
                     f"(S: the staleness bound, an integer >= 0)")


# ---- roles, shards, checks ----------------------------------------------------------------
def ps_roles(world_size: int, servers: int) -> tuple[list[int], list[int]]:
    """(worker ranks, server ranks): the last ``servers`` ranks serve."""
    workers = world_size - servers
    return list(range(workers)), list(range(workers, world_size))


def server_ranges(numel: int, servers: int) -> list[tuple[int, int]]:
    """Server k's range [k N / K, (k+1) N / K) of the flat parameters: equal bytes."""
    return [(k * numel // servers, (k + 1) * numel // servers) for k in range(servers)]


def check_ps(world_size: int, servers: int, mode: str, layout: Layout,
             batch_size: int | None = None, slow_rank: int | None = None,
             slow_factor: float = 1.0, precision: str = "fp32") -> Mode:
    """The one fit check of a parameter-server run: raise PSConfigError naming the quantity
    unless ``servers`` servers and the workers the world leaves can train ``layout``
    (workers run tp = pp = 1, no ZeRO, no compression, precision fp32; the global batch
    splits into W workers x grad-accum x micro-batches), and the slowed rank is a worker;
    returns the Mode. Local and deterministic: no communication."""
    try:
        m = parse_mode(mode)
    except ValueError as e:
        raise PSConfigError(str(e), "mode") from None
    if not 0 < servers < world_size:
        raise PSConfigError(f"{servers} parameter servers in a world of {world_size} ranks: "
                            f"needs 1 <= servers <= {world_size - 1} (at least one worker)",
                            "servers")
    for what, v in (("tp", layout.tp), ("pp", layout.pp)):
        if v != 1:
            raise PSConfigError(f"{what} degree {v} with parameter servers: workers are "
                                f"data-parallel only (tp = pp = 1)", what)
    if layout.zero:
        raise PSConfigError(f"ZeRO stage {layout.zero} with parameter servers: the servers "
                            f"already shard the optimiser state", "zero")
    try:
        compressed = layout.compressed
    except ValueError as e:
        raise PSConfigError(str(e), "compress") from None
    if compressed:
        raise PSConfigError(f"gradient compression {layout.compress!r} with parameter "
                            f"servers: pushes are not compressed", "compress")
    if precision != "fp32":
        raise PSConfigError(f"precision {precision} with parameter servers: pushes, pulls and "
                            f"the servers' update are fp32 (mixed precision is for all-reduce "
                            f"training)", "precision")
    workers = world_size - servers
    if batch_size is not None:
        parts = workers * layout.grad_accum * layout.micro_batches
        if batch_size % parts:
            raise PSConfigError(f"global batch {batch_size} does not split into {workers} "
                                f"workers x grad-accum {layout.grad_accum} x "
                                f"{layout.micro_batches} micro-batches", "batch_size")
    if not (math.isfinite(slow_factor) and slow_factor >= 1):
        raise PSConfigError(f"slow factor {slow_factor} must be a finite number >= 1",
                            "slow_factor")
    if slow_rank is not None and not 0 <= slow_rank < workers:
        raise PSConfigError(f"rank {slow_rank} is not a worker: the workers are ranks 0.."
                            f"{workers - 1} (the last {servers} of {world_size} serve)",
                            "slow_rank")
    return m


# ---- staleness ----------------------------------------------------------------------------
@dataclass
class Staleness:
    """Counts of the staleness of applied gradients: ``lag`` in clocks, ``updates`` in
    server versions (module docstring)."""

    lag: Counter
    updates: Counter

    @classmethod
    def empty(cls) -> "Staleness":
        return cls(Counter(), Counter())

    def add(self, lag: int, updates: int) -> None:
        self.lag[lag] += 1
        self.updates[updates] += 1

    def merge(self, other: "Staleness") -> "Staleness":
        return Staleness(self.lag + other.lag, self.updates + other.updates)

    @staticmethod
    def _stats(c: Counter) -> dict[str, Any]:
        n = sum(c.values())
        return {"applied": n, "max": max(c) if c else 0,
                "mean": sum(k * v for k, v in c.items()) / n if n else 0.0,
                "counts": {int(k): int(v) for k, v in sorted(c.items())}}

    def summary(self) -> dict[str, Any]:
        return {"lag": self._stats(self.lag), "updates": self._stats(self.updates)}

    def __str__(self) -> str:
        s = self.summary()
        lag, upd = s["lag"], s["updates"]
        counts = ", ".join(f"{k}:{v}" for k, v in lag["counts"].items())
        return (f"{lag['applied']} gradients applied; staleness in clocks max {lag['max']}, "
                f"mean {lag['mean']:.2f} (counts {counts}); in updates max {upd['max']}, "
                f"mean {upd['mean']:.2f}")


# ---- the worker's GradSync ------------------------------------------------------------------
class PushGradients:
    """A worker's ``GradSync``: reduces nothing and updates nothing (the servers do); the
    inner one-process trainer computes, reads and (per the mode) clips the gradient, and
    ``ParamServerTrainer`` pushes it."""

    every_micro_batch = False
    state_names: tuple[str, ...] = ()
    state_replicated = True

    def __init__(self, grads: Any, mode: Mode) -> None:
        self.grads, self.mode = grads, mode
        self.clock = 0

    @property
    def step_count(self) -> int:
        return self.clock

    def begin_step(self) -> None:
        """Nothing: the model zeroes its own gradients."""

    def mark_ready(self, names: Iterable[str]) -> None:
        """Nothing: the whole gradient is pushed after backward."""

    def finish(self) -> CommStats:
        return CommStats()

    def squares(self) -> list[Any]:
        return squares(self.grads)

    def clip(self, sums: Sequence[float], max_norm: float) -> float:
        norm = norm_of(sums)
        self.mode.worker_clip(self.grads, norm, max_norm)
        return norm

    def clip_grad_norm(self, max_norm: float) -> float:
        return self.clip(backend.host_scalars(self.squares()), max_norm)

    def step(self, lr: float | None = None) -> CommStats:
        """Nothing here: the push and pull follow the inner step (``ParamServerTrainer``)."""
        return CommStats()

    def state_tensors(self) -> dict[str, Mapping[str, Any]]:
        return {}

    def state_pieces(self) -> dict[str, list[tuple[str, tuple[int, int] | None, Any]]]:
        return {}

    def load_state_tensors(self, tensors: Mapping[str, Mapping[str, Any]], step: int) -> None:
        self.clock = int(step)

    def memory_report(self) -> dict[str, int]:
        grads = int(self.grads.buffer.nbytes)
        return {"params": grads, "grads": grads, "grads_kept": grads, "grads_unsharded": grads,
                "optimizer_state": 0, "optimizer_state_unsharded": 0}


class Slowdown:
    """``--slow-factor F`` on one worker: after computing, sleep (F - 1) times the compute
    time, so the step takes F times as long (sleeping uses no core)."""

    def __init__(self, factor: float = 1.0) -> None:
        self.factor = float(factor)

    def after(self, compute_s: float) -> None:
        if self.factor > 1:
            time.sleep((self.factor - 1) * compute_s)


# ---- the server -------------------------------------------------------------------------------
class ParamServer:
    """Server k: its range [lo, hi) of the flat parameters, the optimiser over it, the
    workers' clocks, and the staleness of what it applied. ``world``: the world Communicator;
    ``group``: the server group (the sync mode's norm is added over it)."""

    def __init__(self, world: Any, group: Any, workers: list[int], lo: int, hi: int,
                 flat: FlatLayout, init: Any, optimizer: OptimizerSpec, mode: Mode,
                 grad_clip: float, xp: ModuleType, start: int = 0) -> None:
        self.world, self.group, self.workers, self.mode = world, group, workers, mode
        self.lo, self.hi, self.flat, self.xp = lo, hi, flat, xp
        self.grad_clip = grad_clip
        self.params = xp.array(init[lo:hi])            # this server's range, its own copy
        # the optimiser over 1-D pieces "name[a:b]" of the range (views of self.params)
        self.pieces: list[tuple[str, str, int, int]] = []       # key, name, x0, x1 (flat)
        for name, (s, e) in flat.offsets.items():
            x0, x1 = max(lo, s), min(hi, e)
            if x0 < x1:
                self.pieces.append((f"{name}[{x0 - s}:{x1 - s}]", name, x0, x1))
        views = {key: self.params[x0 - lo:x1 - lo] for key, _, x0, x1 in self.pieces}
        name_of = {key: name for key, name, _, _ in self.pieces}
        whole = flat.views(init)
        # a piece decays as its whole tensor does (ZeRO's rule); a server owning nothing
        # (fewer elements than servers) has no optimiser
        self.optimizer = (optimizer.build(views, decay=lambda key, p: decays_by_default(
            name_of[key], whole[name_of[key]])) if views else None)
        n, W, dtype = hi - lo, len(workers), self.params.dtype
        self.hdr = [np.zeros(len(PUSH)) for _ in workers]
        self.grad = [xp.zeros(n, dtype=dtype) for _ in workers]
        self.out = [xp.zeros(n, dtype=dtype) for _ in workers]         # reply buffers
        self.out_hdr = [np.zeros(len(REPLY)) for _ in workers]
        self.sending: list[list[Any]] = [[] for _ in workers]          # replies in flight
        self.recv: list[tuple[Any, Any] | None] = [None] * W
        self.clock = [start] * W            # steps each worker has pushed
        self.arrived: list[bool] = [False] * W       # sync: this step's gradient is in
        self.pending: list[int] = []        # workers whose pull awaits an answer
        self.version = 0                    # updates applied
        self.sent_version = [0] * W         # version / slowest clock of the last parameters
        self.sent_slowest = [start] * W     # each worker got
        self.last = (math.nan, math.nan)    # sync: the step's (norm, mean loss)
        self.loss_of = [math.nan] * W
        self.staleness = Staleness.empty()
        self.lr_of: list[float | None] = [None] * W
        self.bytes_in = 0
        for w in range(W):
            self._post(w)

    def _post(self, w: int) -> None:
        src = self.workers[w]
        self.recv[w] = (self.world.irecv(self.hdr[w], src, TAG_PUSH),
                        self.world.irecv(self.grad[w], src, TAG_GRAD))

    # -- serving ----------------------------------------------------------------------------
    def serve_until(self, clock: int) -> None:
        """Take pushes and answer pulls until every worker has pushed ``clock`` steps and
        every pull is answered."""
        sleep = POLL_MIN_S
        while min(self.clock) < clock or self.pending:
            if self._poll():
                sleep = POLL_MIN_S
            else:
                time.sleep(sleep)                  # no spinning: see the module docstring
                sleep = min(2 * sleep, POLL_MAX_S)
        for w in range(len(self.workers)):
            self._drain(w)

    def _poll(self) -> bool:
        progressed = False
        for w, reqs in enumerate(self.recv):
            if reqs is not None and reqs[0].test() and reqs[1].test():
                self.recv[w] = None
                self._take(w)
                progressed = True
        if self.pending:
            slowest = min(self.clock)
            ready = [w for w in self.pending if self.mode.ready(self.clock[w], slowest)]
            for w in ready:
                self.pending.remove(w)
                self._answer(w)
                progressed = True
        return progressed

    def _take(self, w: int) -> None:
        step, rate, loss, _ = (float(v) for v in self.hdr[w])
        lr = None if math.isnan(rate) else rate
        if int(step) != self.clock[w]:
            raise RuntimeError(f"server rank {self.world.rank}: worker {w} pushed step "
                               f"{int(step)}, expected {self.clock[w]}")
        self.bytes_in += int(self.grad[w].nbytes)
        self.clock[w] += 1
        self.lr_of[w], self.loss_of[w] = lr, loss
        self.pending.append(w)
        if self.mode.averages:
            self.arrived[w] = True
            if all(self.arrived):
                self._apply_average()
        else:
            self._record(w, int(step))
            self._update({key: self.grad[w][x0 - self.lo:x1 - self.lo]
                          for key, _, x0, x1 in self.pieces}, lr)
            self._post(w)

    def _record(self, w: int, step: int) -> None:
        self.staleness.add(step - self.sent_slowest[w], self.version - self.sent_version[w])

    def _apply_average(self) -> None:
        """sync: g = sum_w g_w / W (worker order), clipped by the global norm of g (its
        squares added over the servers), one update."""
        W = len(self.workers)
        g = self.grad[0].copy()
        for w in range(1, W):
            g += self.grad[w]
        g /= W
        for w in range(W):
            self._record(w, self.clock[w] - 1)
        pieces = {key: g[x0 - self.lo:x1 - self.lo] for key, _, x0, x1 in self.pieces}
        norm = norm_of(backend.host_scalars(squares(pieces)), (self.group,))
        scale_to(pieces, norm, self.grad_clip)
        self._update(pieces, self.lr_of[0])
        self.last = (norm, sum(self.loss_of) / W)
        self.arrived = [False] * W
        for w in range(W):
            self._post(w)

    def _update(self, grads: dict[str, Any], lr: float | None) -> None:
        if self.optimizer is not None:
            self.optimizer.step(grads, lr=lr)
        self.version += 1

    def _answer(self, w: int) -> None:
        self._drain(w)
        norm, loss = self.last if self.mode.averages else (math.nan, self.loss_of[w])
        self.out_hdr[w][:] = (self.version, norm, loss, min(self.clock))
        self.out[w][...] = self.params
        self.sent_version[w], self.sent_slowest[w] = self.version, min(self.clock)
        dst = self.workers[w]
        self.sending[w] = [self.world.isend(self.out_hdr[w], dst, TAG_REPLY),
                           self.world.isend(self.out[w], dst, TAG_PARAMS)]

    def _drain(self, w: int) -> None:
        for r in self.sending[w]:
            r.wait()
        self.sending[w] = []

    def finish(self) -> None:
        """Wait for every worker's end message (``ParamServerTrainer.close``) and every reply
        in flight: no request is left open."""
        for w, reqs in enumerate(self.recv):
            if reqs is not None:
                for r in reqs:
                    r.wait()
                if int(self.hdr[w][0]) != -1:
                    raise RuntimeError(f"worker {w} pushed step {int(self.hdr[w][0])} after "
                                       f"the last step served")
            self._drain(w)

    def send_params(self) -> None:
        """A synchronisation point: this range, as it is, to every worker."""
        reqs = [self.world.isend(self.params, dst, TAG_SYNC) for dst in self.workers]
        for r in reqs:
            r.wait()
        # the workers' next gradients are computed on these parameters
        self.sent_version = [self.version] * len(self.workers)
        self.sent_slowest = [min(self.clock)] * len(self.workers)


# ---- the trainer --------------------------------------------------------------------------
class ParamServerTrainer:
    """This rank's share of parameter-server training on ``world`` (module docstring):
    a worker's one-process ``ParallelTrainer`` and its pushes and pulls, or a server. The
    interface of ``ParallelTrainer`` for what a training loop uses: ``step`` (a server
    serves the step instead: every worker's push of it taken, every pull answered),
    ``evaluate``, ``full_state_dict``, ``full_optimizer_state``,
    ``load_full``, ``nonfinite_state``, ``mesh`` (dp = W, the worker's dp rank),
    ``memory_report``. Collective over ``world`` at construction and at every gather."""

    def __init__(self, world: Any, config: Any, layout: Layout = Layout(),
                 optimizer: OptimizerSpec = OptimizerSpec(), *, servers: int = 1,
                 mode: Mode | str = "sync", seed: int = 0, dtype: str = "float32",
                 xp: ModuleType = np, grad_clip: float = 0.0, hooks: bool = True,
                 slow_rank: int | None = None, slow_factor: float = 1.0) -> None:
        self.mode = check_ps(world.size, servers, str(mode), layout, None, slow_rank, slow_factor)
        self.world, self.config, self.xp = world, config, xp
        self.workers, self.servers = ps_roles(world.size, servers)
        W = len(self.workers)
        self.layout = layout.replace(dp=W)
        self.is_server = world.rank in self.servers
        self.flat = FlatLayout(param_shapes(config).items())
        self.ranges = server_ranges(self.flat.numel, servers)
        self.dtype = backend.resolve_dtype(dtype)
        self.state_names = optimizer.state_names
        self.clock = 0
        self._synced = True
        # collective over the world, in the same order on every rank; the pushes and pulls go
        # over a communicator of their own, so no message of another trainer on the same
        # world (a test's previous run, a benchmark's other mode) can match a receive here
        self.p2p = world.split(color=0, key=world.rank)
        group = world.split(color=1 if self.is_server else 0, key=world.rank)
        solo = world.split(color=world.rank, key=0)
        if self.is_server:
            k = self.servers.index(world.rank)
            lo, hi = self.ranges[k]
            init = init_host(config, self.flat, seed).astype(self.dtype)
            self.server: ParamServer | None = ParamServer(
                self.p2p, group, self.workers, lo, hi, self.flat, init, optimizer, self.mode,
                float(grad_clip), xp)
            self.inner: ParallelTrainer | None = None
            self.mesh = Mesh(W, 1, 1, world.rank, 0, 0, 0, world, None, None, None)
        else:
            self.server = None
            self.inner = ParallelTrainer(
                solo, config, layout.replace(dp=1), optimizer, seed=seed, dtype=dtype, xp=xp,
                grad_clip=grad_clip, hooks=hooks,
                grad_sync=lambda local, mesh, lay, opt, **_: PushGradients(local.grads, self.mode))
            self.local = self.inner.local
            w = self.workers.index(world.rank)
            self.mesh = Mesh(W, 1, 1, world.rank, w, 0, 0, world, None, None, None)
            self.slow = Slowdown(slow_factor if world.rank == slow_rank else 1.0)
            self._reply = [np.zeros(len(REPLY)) for _ in self.servers]
        self.group, self.solo = group, solo

    # -- one step ---------------------------------------------------------------------------
    def step(self, idx: Any, targets: Any, lr: float | None = None) -> TrainStepResult:
        """A worker: backward on its rows ``idx``, ``targets`` (B/W, T), push, pull. A
        server: serve this step (the rows are not used). The loss is the global batch's mean
        under sync (the servers average the workers'), this worker's rows' otherwise; the
        norm is the update's (sync: of the average) before clipping."""
        self.clock += 1
        self._synced = False
        if self.server is not None:
            self.server.serve_until(self.clock)
            return TrainStepResult(math.nan, math.nan)
        assert self.inner is not None
        t0 = time.perf_counter()
        result = self.inner.step(idx, targets, lr=lr)
        self.slow.after(time.perf_counter() - t0)
        # no lr (None): the optimiser's own, sent as NaN
        reply = self._push_pull(result.loss, result.grad_norm, self.inner.sync.grads.buffer,
                                math.nan if lr is None else float(lr))
        sync_norm, loss = reply[0][REPLY.index("norm")], reply[0][REPLY.index("loss")]
        result.loss = float(loss)
        if self.mode.averages:
            result.grad_norm = float(sync_norm)
        self.inner.sync.clock = self.clock
        return result

    def _push_pull(self, loss: float, norm: float, grad: Any, lr: float) -> list[np.ndarray]:
        w, params = self.p2p, self.inner.local.param_buffer   # type: ignore[union-attr]
        recvs = []
        for k, srv in enumerate(self.servers):
            lo, hi = self.ranges[k]
            recvs += [w.irecv(self._reply[k], srv, TAG_REPLY),
                      w.irecv(params[lo:hi], srv, TAG_PARAMS)]
        hdr = np.array([self.clock - 1, lr, loss, norm], dtype=np.float64)
        sends = []
        for k, srv in enumerate(self.servers):
            lo, hi = self.ranges[k]
            sends += [w.isend(hdr, srv, TAG_PUSH), w.isend(grad[lo:hi], srv, TAG_GRAD)]
        for r in sends + recvs:
            r.wait()
        return self._reply

    # -- synchronisation points ---------------------------------------------------------------
    def synchronize(self) -> None:
        """Every worker takes every server's range as it is after every push of the steps
        taken (the servers have applied them all once ``step`` returned there). Collective
        over the world; nothing is sent twice for the same step."""
        if self._synced:
            return
        self._synced = True
        if self.server is not None:
            self.server.send_params()
            return
        params = self.inner.local.param_buffer      # type: ignore[union-attr]
        reqs = [self.p2p.irecv(params[lo:hi], srv, TAG_SYNC)
                for srv, (lo, hi) in zip(self.servers, self.ranges)]
        for r in reqs:
            r.wait()

    def evaluate(self, idx: Any, targets: Any) -> float:
        """Mean loss of the global validation batch whose rows [w B/W, (w+1) B/W) worker w
        holds (``idx``, ``targets``; a server's are not used), on the servers' parameters:
        the same number on every rank. Collective over the world."""
        self.synchronize()
        mine = 0.0 if self.inner is None else self.inner.evaluate(idx, targets)
        total = self.world.allreduce(np.array([mine], dtype=np.float64), op="sum")
        return float(total[0]) / len(self.workers)

    # -- the full model and the optimiser state --------------------------------------------------
    def _gather(self, arrays_of: Callable[[ParamServer], Any]) -> np.ndarray:
        """The full flat vector on every rank: each server writes its range of
        ``arrays_of(server)`` into zeros and the world sums (x + 0 is exact)."""
        self.synchronize()
        buf = np.zeros(self.flat.numel, dtype=self.dtype)
        if self.server is not None:
            buf[self.server.lo:self.server.hi] = backend.to_host(arrays_of(self.server))
        return self.world.allreduce(buf, op="sum") if self.world.size > 1 else buf

    def full_state_dict(self) -> dict[str, np.ndarray]:
        """The whole model's nanoGPT state dict, from the servers, on every rank."""
        return self.flat.views(self._gather(lambda s: s.params))

    def full_optimizer_state(self) -> dict[str, Any]:
        """The servers' optimiser state as one process holds it (``{"step": the updates
        applied, "<state>.<name>": full array}``), on every rank: what a one-process or any
        other run resumes from. Collective over the world."""
        out: dict[str, Any] = {"step": int(self.world.allreduce(np.array(
            [self.server.version if self.server else 0]), op="max")[0])}
        for s in self.state_names:
            def state(server: ParamServer, s: str = s) -> Any:
                flat = self.xp.zeros(server.hi - server.lo, dtype=self.dtype)
                if server.optimizer is not None:
                    for key, _, x0, x1 in server.pieces:
                        flat[x0 - server.lo:x1 - server.lo] = server.optimizer.state[s][key]
                return flat
            for name, full in self.flat.views(self._gather(state)).items():
                out[f"{s}.{name}"] = full
        return out

    def load_full(self, model: Mapping[str, Any], optim: Mapping[str, Any], step: int) -> None:
        """Resume at ``step`` from full tensors (``model``: nanoGPT names; ``optim``: as
        ``full_optimizer_state`` or any trainer's): the servers take their ranges and their
        optimiser pieces, version = the optimiser's step; every clock = ``step``; the
        workers the parameters. Local, no collective."""
        flat = np.zeros(self.flat.numel, dtype=self.dtype)
        for name, view in self.flat.views(flat).items():
            view[...] = backend.to_host(model[name])
        self.clock = int(step)
        if self.server is not None:
            srv = self.server
            srv.params[...] = backend.to_device(flat[srv.lo:srv.hi], self.xp)
            opt_step = int(np.asarray(optim["step"]))
            if srv.optimizer is not None:
                sd: dict[str, Any] = {"step": opt_step}
                for s in srv.optimizer.state:
                    for key, name, x0, x1 in srv.pieces:
                        start = self.flat.offsets[name][0]
                        sd[f"{s}.{key}"] = backend.to_host(optim[f"{s}.{name}"]).reshape(-1)[
                            x0 - start:x1 - start]
                srv.optimizer.load_state_dict(sd)
            srv.version = opt_step
            srv.clock = [int(step)] * len(self.workers)
            srv.sent_version = [opt_step] * len(self.workers)
            srv.sent_slowest = [int(step)] * len(self.workers)
        else:
            self.inner.local.param_buffer[...] = backend.to_device(flat, self.xp)  # type: ignore[union-attr]
            self.inner.sync.clock = int(step)            # type: ignore[union-attr]

    def nonfinite_state(self, step: int) -> NonFinite | None:
        """The first parameter or optimiser state tensor (nanoGPT order) holding a NaN or an
        infinity, on every rank (gathered: what a checkpoint must not be written with)."""
        return self.gathered().nonfinite_state(step)

    def gathered(self) -> "Gathered":
        """The servers' state as one process would hold it, on every rank; what
        ``parallel.checkpoint.save_sharded`` writes (``Gathered``). Collective."""
        return Gathered(self.world, self.flat, self.full_state_dict(), self.full_optimizer_state(),
                        self.state_names)

    @property
    def at_sync_point(self) -> bool:
        """Whether every rank has met since the last step (an evaluation, a gather)."""
        return self._synced

    # -- reports --------------------------------------------------------------------------------
    def staleness_summary(self) -> Staleness:
        """Every server's recorded staleness, merged: each push reaches every server, so
        each gradient is counted once per server (``applied`` = K x W x steps), each with
        the staleness of that server's range. Collective over the world."""
        rows = self.world.allgather_json(self.server.staleness.summary() if self.server else None)
        out = Staleness.empty()
        for r in rows:
            if r is not None:
                out.lag.update({int(k): int(v) for k, v in r["lag"]["counts"].items()})
                out.updates.update({int(k): int(v) for k, v in r["updates"]["counts"].items()})
        return out

    def memory_report(self) -> dict[str, int]:
        """Bytes on this rank: a worker holds parameters and gradients, no optimiser state; a
        server its range of the parameters, W gradient and W reply buffers of it, and the
        optimiser state of its range."""
        if self.inner is not None:
            return self.inner.memory_report()
        srv = self.server
        assert srv is not None
        state = 0 if srv.optimizer is None else sum(
            int(a.nbytes) for bufs in srv.optimizer.state.values() for a in bufs.values())
        item = int(srv.params.itemsize)
        return {"params": int(srv.params.nbytes),
                "grads": sum(int(g.nbytes) for g in srv.grad) + sum(int(o.nbytes) for o in srv.out),
                "grads_kept": sum(int(g.nbytes) for g in srv.grad),
                "grads_unsharded": self.flat.numel * item,
                "optimizer_state": state,
                "optimizer_state_unsharded": len(srv.optimizer.state if srv.optimizer else ())
                * self.flat.numel * item}

    def describe(self) -> str:
        W, K = len(self.workers), len(self.servers)
        sizes = ", ".join(f"{hi - lo:,}" for lo, hi in self.ranges)
        return (f"parameter servers: {K} ({_ranks(self.servers)}), "
                f"workers: {W} ({_ranks(self.workers)}, data-parallel), mode {self.mode}; server "
                f"ranges of {sizes} elements")

    def close(self) -> None:
        """Collective over the world: end the servers' receives (each worker sends every
        server a header of step -1 and no gradient, which completes the receives posted for
        its next push) and free the communicators split off the world. The inner trainer's
        own groups are its own to free (``ParallelTrainer.close``)."""
        if self.server is not None:
            self.server.finish()
        else:
            end = np.array([-1.0, 0.0, 0.0, 0.0])
            empty = self.xp.zeros(0, dtype=self.dtype)
            reqs = []
            for srv in self.servers:
                reqs += [self.p2p.isend(end, srv, TAG_PUSH), self.p2p.isend(empty, srv, TAG_GRAD)]
            for r in reqs:
                r.wait()
        for c in (self.p2p, self.solo, self.group):
            c.free()


class Gathered:
    """A parameter-server run's state as a one-process trainer's, for ``save_sharded``
    (which asks ``mesh.world``, ``local`` and ``sync``): world rank 0 holds every tensor
    whole and writes it (the checkpoint is one file, which any layout resumes from), the
    other ranks hold nothing."""

    def __init__(self, world: Any, flat: FlatLayout, model: dict[str, np.ndarray],
                 optim: dict[str, Any], state_names: tuple[str, ...]) -> None:
        owner = world.rank == 0
        self.model, self.optim = model, optim
        self.mesh = SimpleNamespace(world=world)
        # what save_sharded also asks: servers train in fp32 without compression (check_ps)
        self.layout, self.scaler = Layout(), NoLossScaling(None)
        # model.owns: no mesh owns everything; dp rank 1 owns nothing
        self.local = SimpleNamespace(
            shard_spec={n: None for n in model}, params=model, full_layout=flat,
            dtype=next(iter(model.values())).dtype,
            mesh=None if owner else SimpleNamespace(dp_rank=1, tp_rank=0))
        pieces = {s: [(n, None, optim[f"{s}.{n}"]) for n in model] for s in state_names}
        self.sync = SimpleNamespace(state_names=state_names, state_replicated=True,
                                    step_count=int(optim["step"]),
                                    state_pieces=lambda: pieces if owner else {},
                                    compression_state=lambda: {})   # pushes are not compressed

    def nonfinite_state(self, step: int) -> NonFinite | None:
        """The first tensor (parameters, then each optimiser state) holding a NaN or an
        infinity; local (every rank holds the same gathered tensors)."""
        for what, tensors in (("parameter", self.model),
                              ("optimiser state", {k: v for k, v in self.optim.items() if k != "step"})):
            for name, a in tensors.items():
                if not np.all(np.isfinite(a)):
                    return NonFinite(step, what, name, None, math.nan, math.nan)
        return None


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}..{ranks[-1]}"
