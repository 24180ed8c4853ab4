"""The Communicator: the one interface every layer above ``comm`` uses to talk to other ranks.

    comm = make_communicator()                   # COMM_WORLD, MPI's native collectives
    y = comm.allreduce(x, op="avg")              # x: numpy or cupy array of any shape
    y = comm.allreduce(x, algorithm="ring")      # one call with another algorithm
    tp = comm.split(color=rank // 2, key=rank)   # a sub-group, same algorithm choice

Contract of every collective:
* inputs are numpy or cupy arrays of any shape, dtype float16/32/64 or int32/64;
* outputs come back in the input's array module and dtype, as new arrays: the caller's input
  is never modified (the algorithm works on a contiguous flat copy);
* every rank gets bit-identical results (``avg`` divides the identical sums at the end);
* with ``MPIPAR_DEBUG=1`` each collective first checks that all ranks called the same
  operation with the same count, dtype, root and sequence number, and raises a clear error
  naming the ranks that differ instead of hanging or mixing up data.

Collectives on axis 0: ``reduce_scatter`` splits rows into ``size`` blocks as
``numpy.array_split`` does (rank r gets block r; the first ``n % size`` blocks have one more
row), and ``allgather`` concatenates rows, the inverse when given those ``counts``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from mpipar import backend, trace
from mpipar.comm import auto, mpi_env, watchdog
from mpipar.comm.algorithms import Algorithm, get_algorithm
from mpipar.comm.algorithms._util import accepted, split_counts
from mpipar.comm.ops import AVG, OPS, ReduceOp, finalize_avg, get_op
from mpipar.comm.transport.base import Request
from mpipar.comm.transport.mpi import MPITransport
from mpipar.runtime import install_abort_handler

__all__ = ["Communicator", "make_communicator", "split_counts", "CollectiveMismatchError"]


_DTYPE_CODES = {name: i for i, name in enumerate(backend.SUPPORTED_DTYPES)}
_OP_CODES = watchdog.OP_CODES


_OP_INDEX = {name: i for i, name in enumerate(OPS)}  # stable across processes, unlike hash()


class CollectiveMismatchError(RuntimeError):
    """Ranks called different collectives, or the same one with different arguments."""


class Communicator:
    """Collectives and point-to-point messages among the ranks of one group.

    ``transport`` carries algorithm traffic (a private duplicate of the group, so that user
    messages and collective messages never match each other); ``p2p`` carries user
    ``send``/``recv``. ``algorithm`` is the default for every collective that it implements;
    the others use ``native``. ``name`` says what the group is for (``dp``, ``tp``, ``pp``:
    ``make_mesh`` names its groups), in the trace's names of its collectives.
    """

    def __init__(self, p2p: Any, transport: Any, algorithm: str = "native",
                 options: dict[str, Any] | None = None, debug: bool | None = None,
                 auto_table: Any = None, name: str = "") -> None:
        self.name = name
        self.p2p = p2p
        self.transport = transport
        self.rank: int = transport.rank
        self.size: int = transport.size
        self.algorithm = algorithm
        self.options = dict(options or {})
        self.debug = os.environ.get("MPIPAR_DEBUG", "0") not in ("", "0") if debug is None else debug
        self.auto_table = auto_table
        self._seq = 0
        # the hang watchdog's record of this group (comm/watchdog.py); none in the simulator
        self._watch = getattr(p2p, "watch", None) or watchdog.UNWATCHED
        self._auto_cache: dict[tuple[str, int], Algorithm] = {}
        if algorithm != "auto":
            get_algorithm(algorithm)  # unknown name -> clear error now, not at first use

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, size={self.size}, algorithm={self.algorithm!r})"

    # -- algorithm choice ------------------------------------------------------------------
    def _resolve(self, collective: str, algorithm: str | None, nbytes: int,
                 device: bool = True) -> Algorithm:
        name = algorithm or self.algorithm
        if name == "auto":
            # auto sits on every call's path and its answer depends only on (collective,
            # bytes) for this group: resolved once (3.7 us a call otherwise, measured)
            key = (collective, nbytes)
            alg = self._auto_cache.get(key)
            if alg is None:  # the cost model or a tuned table
                alg = self._auto_cache[key] = self._resolve(
                    collective, auto.choose(collective, nbytes, self.size, table=self.auto_table), nbytes)
            return alg
        alg = get_algorithm(name)
        if alg.device_only and not device and algorithm is None:
            return get_algorithm("native")  # a default of nccl: host numbers go through MPI
        if not alg.supports(collective):
            if algorithm is not None:  # asked for explicitly: say it cannot
                raise ValueError(f"algorithm {name!r} has no {collective}; it implements "
                                 f"{', '.join(alg.collectives())}")
            alg = get_algorithm("native")
        return alg

    @staticmethod
    def _check_algorithm(algorithm: str | None) -> None:
        """Unknown names fail on every group size, even where no message would be sent."""
        if algorithm is not None and algorithm != "auto":
            get_algorithm(algorithm)

    def _run(self, collective: str, algorithm: str | None, nbytes: int, *args: Any,
             **call_options: Any) -> Any:
        alg = self._resolve(collective, algorithm, nbytes, backend.is_device_array(args[0]))
        fn = getattr(alg, collective)
        if self.transport.begin_collective is not None:
            self.transport.begin_collective(alg.name)
        options = {**self.options, **call_options} if call_options else self.options
        # communicator-wide options (servers=, ranks_per_node=) reach only the algorithms
        # that declare them; the call is one span of the trace, on the thread that runs it,
        # and the watchdog's board and context say which collective runs
        rec = trace.recorder()
        watch = self._watch
        watch.enter(self._seq, collective, nbytes, args[0].dtype, alg.name)
        t0 = rec.now()
        try:
            out = fn(self.transport, *args, **accepted(fn, options))
        except BaseException:
            watch.abandon()
            raise
        watch.leave()
        rec.add(collective, t0, rec.now(), "collective", group=self.name, bytes=int(nbytes),
                algorithm=alg.name, size=self.size, seq=self._seq)
        return out

    # -- argument checks -------------------------------------------------------------------
    @staticmethod
    def _check_array(x: Any, what: str = "input") -> None:
        if not hasattr(x, "dtype") or not hasattr(x, "shape"):
            raise TypeError(f"{what} must be a numpy or cupy array, got {type(x).__name__}")
        backend.resolve_dtype(x.dtype)

    def _check_root(self, root: int) -> None:
        if not 0 <= root < self.size:
            raise ValueError(f"root {root} is not a rank of this group of size {self.size}")

    def _agree(self, collective: str, count: int, dtype: Any, root: int = -1, extra: int = -1) -> None:
        """MPIPAR_DEBUG: all ranks compare (sequence, op, count, dtype, root) before the call."""
        self._seq += 1
        if not self.debug or self.size == 1:
            return
        mine = np.array([self._seq, _OP_CODES[collective], count,
                         _DTYPE_CODES.get(np.dtype(dtype).name, -1) if dtype is not None else -1,
                         root, extra], dtype=np.int64)
        table = np.empty((self.size, mine.size), dtype=np.int64)
        mpi_env.collective(self.transport.comm, "Allgather", mine, table)
        bad = [r for r in range(self.size) if not np.array_equal(table[r], table[0])]
        if bad:
            def describe(row: np.ndarray) -> str:
                op = {v: k for k, v in _OP_CODES.items()}.get(int(row[1]), "?")
                dt = backend.SUPPORTED_DTYPES[row[3]] if 0 <= row[3] < len(backend.SUPPORTED_DTYPES) else "-"
                return f"call #{row[0]} {op}(count={row[2]}, dtype={dt}, root={row[4]}, extra={row[5]})"

            lines = [f"  rank 0: {describe(table[0])}"] + [f"  rank {r}: {describe(table[r])}" for r in bad]
            raise CollectiveMismatchError(
                f"collective mismatch detected on rank {self.rank}: ranks {bad} differ from rank 0\n"
                + "\n".join(lines))

    # -- collectives -----------------------------------------------------------------------
    @staticmethod
    def _work_copy(x: Any) -> Any:
        """A contiguous flat copy of x that algorithms may overwrite."""
        xp = backend.array_module(x)
        return xp.array(x, copy=True).reshape(-1)

    def allreduce(self, x: Any, op: str | ReduceOp = "sum", algorithm: str | None = None,
                  **options: Any) -> Any:
        """Elementwise reduction of ``x`` over all ranks; every rank gets the result."""
        self._check_array(x)
        self._check_algorithm(algorithm)
        return self._allreduce_owned(self._work_copy(x), x.shape, get_op(op), algorithm, options)

    def _allreduce_owned(self, buf: Any, shape: tuple, rop: ReduceOp, algorithm: str | None,
                         options: dict[str, Any]) -> Any:
        self._agree("allreduce", buf.size, buf.dtype, extra=_OP_INDEX[rop.name])
        if self.size > 1 and buf.size > 0:
            buf = self._run("allreduce", algorithm, buf.nbytes, buf, rop, **options)
        if rop is AVG:
            finalize_avg(buf, self.size)
        return buf.reshape(shape)

    def reduce(self, x: Any, root: int = 0, op: str | ReduceOp = "sum", algorithm: str | None = None,
               **options: Any) -> Any | None:
        """Elementwise reduction onto ``root``; other ranks get None."""
        self._check_array(x)
        self._check_root(root)
        self._check_algorithm(algorithm)
        rop = get_op(op)
        self._agree("reduce", x.size, x.dtype, root, extra=_OP_INDEX[rop.name])
        buf = self._work_copy(x)
        if self.size > 1 and buf.size > 0:
            buf = self._run("reduce", algorithm, buf.nbytes, buf, rop, root, **options)
        if self.rank != root:
            return None
        if rop is AVG:
            finalize_avg(buf, self.size)
        return buf.reshape(x.shape)

    def broadcast(self, x: Any, root: int = 0, algorithm: str | None = None, **options: Any) -> Any:
        """Root's ``x`` on every rank. Non-root ranks pass an array of the same shape and dtype
        (its values are ignored), as with MPI_Bcast."""
        self._check_array(x)
        self._check_root(root)
        self._check_algorithm(algorithm)
        self._agree("broadcast", x.size, x.dtype, root)
        buf = self._work_copy(x)
        if self.size > 1 and buf.size > 0:
            buf = self._run("broadcast", algorithm, buf.nbytes, buf, root, **options)
        return buf.reshape(x.shape)

    def reduce_scatter(self, x: Any, op: str | ReduceOp = "sum", algorithm: str | None = None,
                       **options: Any) -> Any:
        """Reduce ``x`` over ranks and give rank r block r of its rows (axis 0), blocks as
        ``split_counts(x.shape[0], size)``."""
        self._check_array(x)
        return self._reduce_scatter_owned(self._work_copy(x).reshape(x.shape), op, algorithm, options)

    def _reduce_scatter_owned(self, x: Any, op: str | ReduceOp, algorithm: str | None,
                              options: dict[str, Any]) -> Any:
        """``reduce_scatter`` of a contiguous ``x`` that the algorithm may overwrite."""
        if x.ndim == 0:
            raise ValueError("reduce_scatter needs at least one axis to split")
        self._check_algorithm(algorithm)
        rop = get_op(op)
        self._agree("reduce_scatter", x.size, x.dtype, extra=_OP_INDEX[rop.name])
        rows = split_counts(x.shape[0], self.size)
        row = int(np.prod(x.shape[1:], dtype=np.int64))
        counts = [r * row for r in rows]
        buf = x.reshape(-1)
        if self.size == 1 or buf.size == 0:
            out = buf
        else:
            out = self._run("reduce_scatter", algorithm, buf.nbytes, buf, rop, counts, **options)
        if rop is AVG:
            finalize_avg(out, self.size)
        return out.reshape((rows[self.rank],) + tuple(x.shape[1:]))

    def allgather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON-able ``obj``, in rank order, on every rank: the JSON text padded to
        whole int64 words and all-gathered (plain bytes, never pickle)."""
        if self.size == 1:
            return [obj]
        text = json.dumps(obj).encode()
        words = np.frombuffer(text.ljust(-(-len(text) // 8) * 8 or 8), dtype=np.int64).copy()
        sizes = self.allgather(np.array([len(text), words.size], dtype=np.int64)).reshape(-1, 2)
        flat = self.allgather(words, counts=[int(w) for _, w in sizes])
        out, at = [], 0
        for n, w in sizes:
            out.append(json.loads(flat[at:at + int(w)].tobytes()[:int(n)]))
            at += int(w)
        return out

    def allgather(self, x: Any, counts: Sequence[int] | None = None, algorithm: str | None = None,
                  **options: Any) -> Any:
        """Concatenate every rank's ``x`` along axis 0, in rank order.

        All ranks pass the same shape, unless ``counts`` (rows per rank, the same list on
        every rank) says otherwise; ``allgather(block, counts=split_counts(n, size))`` undoes
        ``reduce_scatter``."""
        self._check_array(x)
        if x.ndim == 0:
            x = x.reshape(1)
        self._check_algorithm(algorithm)
        rows = [x.shape[0]] * self.size if counts is None else [int(c) for c in counts]
        if len(rows) != self.size or rows[self.rank] != x.shape[0]:
            raise ValueError(f"allgather counts {rows} do not fit a group of {self.size} "
                             f"where rank {self.rank} has {x.shape[0]} rows")
        row = int(np.prod(x.shape[1:], dtype=np.int64))
        elem_counts = [r * row for r in rows]
        self._agree("allgather", sum(elem_counts), x.dtype, extra=row)
        buf = self._work_copy(x)
        if self.size == 1:
            out = buf
        elif sum(elem_counts) == 0:
            out = buf[:0]
        else:
            out = self._run("allgather", algorithm, sum(elem_counts) * x.itemsize, buf, elem_counts,
                            **options)
        return out.reshape((sum(rows),) + tuple(x.shape[1:]))

    def alltoall(self, x: Any, algorithm: str | None = None, **options: Any) -> Any:
        """Split rows of ``x`` into ``size`` equal blocks; block j goes to rank j. The result
        holds the blocks received, in rank order (same shape as ``x``)."""
        self._check_array(x)
        if x.ndim == 0 or x.shape[0] % self.size:
            raise ValueError(f"alltoall needs axis 0 divisible by the group size {self.size}, "
                             f"got shape {tuple(x.shape)}")
        self._check_algorithm(algorithm)
        self._agree("alltoall", x.size, x.dtype)
        buf = self._work_copy(x)
        if self.size > 1 and buf.size > 0:
            buf = self._run("alltoall", algorithm, buf.nbytes, buf, **options)
        return buf.reshape(x.shape)

    # -- non-blocking collectives (a background thread; see background.py) -------------------
    def iallreduce(self, x: Any, op: str | ReduceOp = "sum", algorithm: str | None = None,
                   **options: Any) -> Any:
        """Start ``allreduce``; returns a handle whose ``wait()`` gives the result.

        ``x`` is copied now, so the caller may overwrite it at once. Background collectives
        run one at a time in call order; do not call blocking collectives on this same
        communicator until they are waited for."""
        self._check_array(x)
        self._check_algorithm(algorithm)
        return self.transport.background().submit(self._allreduce_owned, self._work_copy(x), x.shape, get_op(op),
                               algorithm, options)

    def ireduce_scatter(self, x: Any, op: str | ReduceOp = "sum", algorithm: str | None = None,
                        donate: bool = False, **options: Any) -> Any:
        """Start ``reduce_scatter`` on a copy of ``x``; ``wait()`` gives this rank's block.

        ``donate=True`` hands ``x`` itself over (no copy; it must be contiguous): the caller
        must neither read nor write it again, since the algorithm works in it."""
        self._check_array(x)
        if donate and not x.flags.c_contiguous:
            raise ValueError("ireduce_scatter(donate=True) needs a contiguous array")
        buf = x if donate else self._work_copy(x).reshape(x.shape)
        return self.transport.background().submit(self._reduce_scatter_owned, buf, op, algorithm, options)

    def iallgather(self, x: Any, counts: Sequence[int] | None = None, algorithm: str | None = None,
                   **options: Any) -> Any:
        """Start ``allgather`` on a copy of ``x``; ``wait()`` gives the concatenation."""
        self._check_array(x)
        return self.transport.background().submit(self.allgather, self._work_copy(x).reshape(x.shape), counts, algorithm,
                               **options)

    def barrier(self) -> None:
        self._agree("barrier", 0, None)
        if self.size > 1:
            self._watch.enter(self._seq, "barrier", 0, None, "native")
            try:
                self.transport.barrier()
            except BaseException:
                self._watch.abandon()
                raise
            self._watch.leave()

    # -- point to point --------------------------------------------------------------------
    def clock(self) -> float:
        """Seconds on this rank's clock (``Transport.clock``: wall time under MPI, virtual
        time in the simulator)."""
        return self.transport.clock()

    def background(self) -> Any:
        """This rank's queue of non-blocking collectives (``Transport.background``)."""
        return self.transport.background()

    def _check_peer(self, peer: int) -> None:
        if not 0 <= peer < self.size:
            raise ValueError(f"rank {peer} is not in this group of size {self.size}")

    def isend(self, x: Any, dest: int, tag: int = 0) -> Request:
        """Start sending ``x`` (any shape) to ``dest``; keep ``x`` unchanged until wait()."""
        self._check_array(x)
        self._check_peer(dest)
        xp = backend.array_module(x)
        return self.p2p.isend(xp.ascontiguousarray(x).reshape(-1), dest, tag)

    def irecv(self, out: Any, source: int, tag: int = 0) -> Request:
        """Start receiving into ``out`` (contiguous, the sender's size and dtype); wait()
        returns ``out``."""
        self._check_array(out, "out")
        self._check_peer(source)
        if not out.flags.c_contiguous:
            raise ValueError("irecv needs a contiguous output array")
        req = self.p2p.irecv(out.reshape(-1), source, tag)
        return _ResultRequest(req, out)

    def send(self, x: Any, dest: int, tag: int = 0) -> None:
        self.isend(x, dest, tag).wait()

    def recv(self, source: int, tag: int = 0, *, out: Any = None, shape: Any = None,
             dtype: Any = None, xp: Any = None) -> Any:
        """Receive from ``source`` into ``out``, or into a new array of ``shape``/``dtype``
        (numpy unless ``xp`` says otherwise)."""
        if out is None:
            if shape is None or dtype is None:
                raise ValueError("recv needs out=, or shape= and dtype=")
            out = (xp or np).empty(shape, dtype=backend.resolve_dtype(dtype))
        return self.irecv(out, source, tag).wait()

    def free(self) -> None:
        """Collective over the group: release its MPI communicators (those made by split or
        dup; never COMM_WORLD). The Communicator is unusable afterwards."""
        if self.transport is not self.p2p:
            self.transport.free()
        self.p2p.free()

    def split(self, color: int | None, key: int = 0) -> "Communicator | None":
        """A Communicator over the ranks that passed the same ``color``, ordered by ``key``
        (``color=None``: this rank joins none, and gets None). Keeps the algorithm choice."""
        p2p = self.p2p.split(color, key)
        if p2p is None:
            return None
        return Communicator(p2p, p2p.dup(), algorithm=self.algorithm, options=self.options,
                            debug=self.debug, auto_table=self.auto_table)


class _ResultRequest:
    __slots__ = ("_req", "_out")

    def __init__(self, req: Request, out: Any) -> None:
        self._req, self._out = req, out

    def wait(self) -> Any:
        self._req.wait()
        return self._out

    def test(self) -> bool:
        return self._req.test()


def make_communicator(mpi_comm: Any = None, algorithm: str = "native", *,
                      options: dict[str, Any] | None = None, debug: bool | None = None,
                      abort_on_exception: bool = True, **algorithm_options: Any) -> Communicator:
    """A Communicator over ``mpi_comm`` (default COMM_WORLD) using ``algorithm`` by default.

    Extra keyword arguments are options of the algorithms (``servers=2`` for ``ps``,
    ``ranks_per_node=4`` for ``hier`` ...). Unless ``abort_on_exception=False``, an uncaught
    exception on any rank then aborts the whole job, naming the rank.
    """
    MPI = mpi_env.import_mpi()
    comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
    if comm == MPI.COMM_WORLD:   # the hang watchdog's progress board (collective, once)
        watchdog.open_board(MPI, comm, mpi_env.MPI_LOCK)
    p2p = MPITransport(comm)
    if abort_on_exception:
        install_abort_handler()
    return Communicator(p2p, p2p.dup(), algorithm=algorithm,
                        options={**(options or {}), **algorithm_options}, debug=debug,
                        name="world")
