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

On a GPU (issue 15 item 2) the worker runs on the submitting thread's device and on a
stream of its own (one per device, made by the worker), never on a default stream: with
per-thread default streams nothing would order the two threads' work, and on the legacy one
the comm thread's copies would serialise with the backward kernels they should overlap.
``submit`` records an event on the submitter's current stream after the kernels that made
the input (its work copy included); the comm stream waits on it before the collective
reads the input. The collective's result is followed by an event on the comm stream, and
``Handle.wait`` makes the waiting thread's current stream wait on it before the caller
uses the result. Both waits are on the device: the host waits only where MPI must read
memory (the transport's and ``native``'s synchronisations). Without a GPU the events are
None and none of this costs anything.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from mpipar import backend
from mpipar.comm import mpi_env


class Handle:
    """The pending result of a background collective."""

    __slots__ = ("_done", "_result", "_error", "_event")

    def __init__(self) -> None:
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        self._event: Any = None   # recorded on the comm stream after the call (GPU only)

    def wait(self) -> Any:
        """Block until the collective has run; return its result or raise its exception.
        On a GPU the caller's current stream is then made to wait for the comm stream's
        work on the result (a device-side wait: kernels the caller queues next read it
        after it is written)."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        backend.wait_event(self._event)
        return self._result

    def test(self) -> bool:
        return self._done.is_set()


class BackgroundWorker:
    """A daemon thread that runs submitted calls one after another."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # the worker's own stream per device, with the GPU module it belongs to (a test
        # installs a new CuPy double per test: its streams are not the last one's)
        self._streams: dict[int, tuple[Any, Any]] = {}

    def _stream(self, device: int | None) -> Any:
        """The worker's stream on ``device`` (made on first use, by the worker thread)."""
        if device is None:
            return None
        module = backend.cupy_module()
        held = self._streams.get(device)
        if held is None or held[0] is not module:
            held = self._streams[device] = (module, backend.new_stream())
        return held[1]

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
            fn, args, kwargs, handle, device, ready = item
            try:
                backend.use_device(device)            # the submitter's GPU
                with backend.use_stream(self._stream(device)):
                    backend.wait_event(ready)         # after the kernels that made the input
                    handle._result = fn(*args, **kwargs)
                    handle._event = backend.record_event()
            except BaseException as exc:  # handed to the waiting thread, which re-raises
                handle._error = exc
            finally:
                handle._done.set()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Handle:
        """Queue ``fn(*args, **kwargs)``; on a GPU it runs on the caller's device, on the
        worker's stream, after the work the caller's current stream has queued so far."""
        if self._thread is None:
            self._start()
        handle = Handle()
        self._queue.put((fn, args, kwargs, handle, backend.current_device(), backend.record_event()))
        return handle


_worker: BackgroundWorker | None = None


def worker() -> BackgroundWorker:
    """The process's one background worker (created on first use)."""
    global _worker
    if _worker is None:
        _worker = BackgroundWorker()
    return _worker
