"""Non-blocking collectives: any algorithm run on one background thread, in call order.

Data parallelism overlaps gradient all-reduces with the rest of backward: a bucket's
all-reduce starts as soon as backward has produced it, and the main thread goes on computing
(NumPy and CuPy release the GIL in their kernels, so the two threads really run at once).
The from-scratch algorithms are blocking Python functions, so "non-blocking" here means "run
by a worker thread": ``comm.iallreduce(x)`` queues the call and returns a handle whose
``wait()`` returns the result.

Why this is safe at MPI_THREAD_SERIALIZED: while a worker exists, every MPI call of the
transport and of ``native`` takes ``mpi_env.MPI_LOCK``, and waits poll (``Test``) with the
lock released between polls, so no thread ever blocks inside MPI while holding the lock. That
matters: a thread blocked in MPI_Wait holding the lock would stop the other thread of the
same rank from making the progress its peer is waiting for (a deadlock across ranks).

Ordering: one worker per process runs queued collectives strictly in submission order, so
ranks that submit the same sequence run the same sequence, as MPI requires.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from mpipar.comm import mpi_env


class Handle:
    """The pending result of a background collective."""

    __slots__ = ("_done", "_result", "_error")

    def __init__(self) -> None:
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None

    def wait(self) -> Any:
        """Block until the collective has run; return its result or raise its exception."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result

    def test(self) -> bool:
        return self._done.is_set()


class BackgroundWorker:
    """A daemon thread that runs submitted calls one after another."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                mpi_env.enter_concurrent_mode()  # from now on MPI calls take MPI_LOCK
                self._thread = threading.Thread(target=self._run, name="mpipar-comm", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args, kwargs, handle = item
            try:
                handle._result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the waiting thread, which re-raises
                handle._error = exc
            finally:
                handle._done.set()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Handle:
        if self._thread is None:
            self._start()
        handle = Handle()
        self._queue.put((fn, args, kwargs, handle))
        return handle


_worker: BackgroundWorker | None = None


def worker() -> BackgroundWorker:
    """The process's one background worker (created on first use)."""
    global _worker
    if _worker is None:
        _worker = BackgroundWorker()
    return _worker
