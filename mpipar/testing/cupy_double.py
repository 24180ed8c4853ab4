"""A strict stand-in for CuPy, for testing the GPU path on a machine without a GPU.

The arrays hold a NumPy array privately and behave as CuPy's do where mpipar can go wrong:

* **no implicit host conversion**: ``numpy.asarray(x)``, ``__array__``, the buffer protocol
  (``memoryview``, ``numpy.frombuffer``) and ``__array_interface__`` fail as CuPy's do
  (TypeError with CuPy's wording; no ``__array_interface__`` attribute). ``float(x)``,
  ``int(x)``, ``bool(x)``, ``x.item()`` and ``x.tolist()`` are allowed, as in CuPy, but each
  is a synchronising device -> host copy and is counted as one, by call site; with
  ``refuse_scalars=True`` they raise instead, which finds every one of them.
* **explicit copies are counted**: ``x.get()``, ``cupy.asnumpy(x)`` (device -> host) and
  ``cupy.asarray(host)``, ``cupy.array(host)``, ``x.set(host)`` (host -> device), each under
  the file:line of the code that asked (frames of this module and of ``mpipar/backend.py``,
  the funnel every caller goes through, are skipped).
* **reductions stay on the device**: ``x.sum()`` is a 0-d device array, as in CuPy.
* **only CuPy's names**: the namespace (``StrictCupy.xp``) has the names of CuPy's documented
  API that mpipar may use (``CUPY_NAMES``); any other raises AttributeError.
* **devices per thread**: ``cuda.Device(i).use()`` sets this thread's device; an array
  remembers its device; a kernel given an array of another device raises ValueError, as
  CuPy does.
* **streams and events**: every kernel is queued on this thread's current stream (by
  default each thread has its own default stream, CuPy's ``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM``
  mode, so that nothing relies on the legacy stream ordering two threads). A buffer remembers
  the stream and position of its last write and where it was made. Reading it on another
  stream before the writer's work is known complete (``Stream.synchronize``,
  ``Event.synchronize``, ``Stream.wait_event``, ``runtime.deviceSynchronize``) raises
  ``HazardError`` naming both call sites; so does a host copy on another stream, and a
  library reading the device pointer (``__cuda_array_interface__``: CUDA-aware MPI) before
  the writes are complete.
* **atomic scatter-adds in random order**: ``add.at`` and ``cupyx.scatter_add`` apply their
  updates in a fresh random order each call, so float sums round differently run to run, as
  atomics on a GPU do.
* **counters**: host synchronisations, transfers and kernels by call site, over the whole
  life of the double or over a region (``with double.counting() as c: ...``). An operation
  whose output size the data decides (a boolean-mask index, ``nonzero``, ``unique`` ...)
  is a synchronisation, as on CuPy.
* **user kernels run**: ``ElementwiseKernel`` and ``RawKernel`` compile their CUDA C++ for the
  CPU and run it over the arrays, stricter than CuPy about argument types (``cuda_cpu.py``).

It is installed into mpipar only through ``backend.use_gpu_module`` (the ``strict_cupy``
fixture of ``tests/conftest.py`` does that and removes it), so nothing outside a test can
pick it up.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import ctypes
import functools
import itertools
import os
import sys
import threading
import types
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from mpipar.comm import mpi_env
from mpipar.testing import cuda_cpu

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")

# CuPy's documented names that mpipar uses or may reasonably use (docs.cupy.dev, API
# reference: array creation, manipulation, mathematical functions, ufuncs, sorting, random,
# cuda, kernels). A name outside this list is an AttributeError, as a name CuPy lacks is.
UFUNC_NAMES = (
    "add", "subtract", "multiply", "divide", "true_divide", "floor_divide", "power", "negative",
    "remainder", "mod", "abs", "absolute", "exp", "expm1", "log", "log1p", "log2", "log10",
    "sqrt", "square", "reciprocal", "tanh", "sinh", "cosh", "sin", "cos", "tan", "arctan",
    "sign", "maximum", "minimum", "fmax", "fmin", "isfinite", "isnan", "isinf", "equal",
    "not_equal", "less", "less_equal", "greater", "greater_equal", "logical_and",
    "logical_or", "logical_not", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor",
    "invert", "left_shift", "right_shift", "floor", "ceil", "rint", "trunc", "copysign",
    "signbit", "matmul",
)
FUNCTION_NAMES = (
    "where", "dot", "vdot", "inner", "outer", "einsum", "tensordot", "sum", "prod", "mean",
    "max", "amax", "min", "amin", "argmax", "argmin", "std", "var", "cumsum", "cumprod",
    "clip", "all", "any", "count_nonzero", "concatenate", "stack", "vstack", "hstack",
    "split", "array_split", "reshape", "transpose", "swapaxes", "moveaxis", "squeeze",
    "expand_dims", "broadcast_to", "ravel", "take", "take_along_axis", "put",
    "nonzero", "flatnonzero", "argwhere", "tril", "triu", "sort", "argsort", "unique", "bincount",
    "searchsorted", "allclose", "isclose", "array_equal", "tile", "repeat", "pad", "flip",
    "roll", "copy", "diff", "trace", "diag", "cumsum", "round", "around", "nan_to_num",
    "shares_memory", "may_share_memory", "result_type", "can_cast", "promote_types",
    "copyto", "linalg",
)
CREATION_NAMES = ("arange", "zeros", "ones", "empty", "full", "zeros_like", "ones_like",
                  "empty_like", "full_like", "eye", "identity", "linspace", "tri")
HOST_NAMES = ("asarray", "array", "ascontiguousarray", "asnumpy", "get_array_module",
              "fuse", "ElementwiseKernel", "RawKernel", "ReductionKernel", "RawModule",
              "ndarray", "ufunc", "random", "cuda", "dtype", "finfo", "iinfo", "newaxis",
              "pi", "e", "inf", "nan", "float16", "float32", "float64", "int8", "int16",
              "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool_", "intp",
              "complex64", "complex128", "isscalar", "ndim", "shape", "size")
CUPY_NAMES = frozenset(UFUNC_NAMES + FUNCTION_NAMES + CREATION_NAMES + HOST_NAMES)
# functions whose output size the data decides: each is a host synchronisation on CuPy
DATA_DEPENDENT_NAMES = ("nonzero", "flatnonzero", "argwhere", "unique")
CUDA_NAMES = frozenset(("Device", "Stream", "ExternalStream", "Event", "get_current_stream",
                        "runtime", "alloc_pinned_memory", "PinnedMemoryPointer",
                        "PinnedMemoryPool", "set_pinned_memory_allocator", "is_available",
                        "get_elapsed_time", "MemoryPointer", "Memory", "nccl"))
RUNTIME_NAMES = frozenset(("getDeviceCount", "getDevice", "setDevice", "deviceSynchronize",
                           "streamSynchronize", "CUDARuntimeError", "runtimeGetVersion",
                           "driverGetVersion", "memGetInfo"))
RANDOM_NAMES = frozenset(("default_rng", "Generator", "seed", "random", "standard_normal",
                          "randn", "rand", "randint", "normal", "uniform", "permutation",
                          "shuffle", "choice"))
GENERATOR_METHODS = ("random", "integers", "standard_normal", "normal", "uniform",
                     "permutation", "shuffle", "choice", "standard_exponential",
                     "exponential")
NDARRAY_METHODS = ("reshape", "view", "astype", "copy", "transpose", "ravel", "flatten",
                   "sum", "prod", "mean", "max", "min", "argmax", "argmin", "std", "var",
                   "cumsum", "squeeze", "swapaxes", "any", "all", "dot", "clip", "take",
                   "repeat", "nonzero", "sort", "argsort", "conj", "round", "diagonal",
                   "trace", "fill", "put")

_SKIP_FILES = (os.path.abspath(__file__), os.path.join("mpipar", "backend.py"),
               os.path.abspath(cuda_cpu.__file__))


class HazardError(RuntimeError):
    """A read the GPU would not order after the write it needs: stale data on a real GPU."""


@functools.lru_cache(maxsize=None)
def _shown(filename: str) -> str | None:
    """How a call site in ``filename`` is named, or None for frames that are skipped (this
    module, NumPy, mpipar/backend.py: the funnel every caller's copies go through)."""
    if (filename.endswith(_SKIP_FILES[1]) or os.path.abspath(filename) in _SKIP_FILES[::2]
            or os.sep + "numpy" + os.sep in filename):
        return None
    return os.path.relpath(filename)


def _site() -> str:
    """file:line of the first caller outside this module, NumPy and mpipar/backend.py."""
    f = sys._getframe(1)
    while f is not None:
        shown = _shown(f.f_code.co_filename)
        if shown is not None:
            return f"{shown}:{f.f_lineno}"
        f = f.f_back
    return "?"


class Counters:
    """Events by call site: ``syncs`` (the host waits for the device), ``d2h``, ``h2d``
    (copies), ``d2h_pinned`` (those of ``d2h`` written straight into page-locked memory from
    ``cuda.alloc_pinned_memory``: the fast staging path), ``kernels`` (operations queued),
    ``external`` (device pointers read by a library through ``__cuda_array_interface__``:
    what reached CUDA-aware MPI). Each is a ``collections.Counter``."""

    def __init__(self) -> None:
        self.syncs: collections.Counter[str] = collections.Counter()
        self.d2h: collections.Counter[str] = collections.Counter()
        self.d2h_pinned: collections.Counter[str] = collections.Counter()
        self.h2d: collections.Counter[str] = collections.Counter()
        self.kernels: collections.Counter[str] = collections.Counter()
        self.external: collections.Counter[str] = collections.Counter()

    def total(self, kind: str) -> int:
        return sum(getattr(self, kind).values())

    def __repr__(self) -> str:
        return (f"Counters(syncs={dict(self.syncs)}, d2h={dict(self.d2h)}, "
                f"d2h_pinned={dict(self.d2h_pinned)}, "
                f"h2d={dict(self.h2d)}, kernels={self.total('kernels')}, "
                f"external={dict(self.external)})")


class _Buffer:
    """Device memory shared by an array and its views: its device and its last write."""

    __slots__ = ("device", "stream", "seq", "site")

    def __init__(self, device: int) -> None:
        self.device = device
        self.stream: Stream | None = None
        self.seq = 0
        self.site = ""


class StrictCupy:
    """One strict CuPy: the namespace ``xp`` (install it with ``backend.use_gpu_module``),
    ``cupyx`` (``scatter_add``), its counters, and its options.

    ``devices``: what ``cuda.runtime.getDeviceCount()`` reports. ``per_thread_default_stream``
    (default True): every thread's default stream is its own; False is CuPy's legacy null
    stream, shared by all threads. ``refuse_scalars``: make ``float``/``int``/``bool``/
    ``item``/``tolist`` raise instead of counting them. ``seed``: for the scatter-add order
    (None: a different order every run, as on a GPU)."""

    def __init__(self, devices: int = 2, per_thread_default_stream: bool = True,
                 refuse_scalars: bool = False, seed: int | None = None) -> None:
        self.devices = devices
        self.per_thread_default_stream = per_thread_default_stream
        self.refuse_scalars = refuse_scalars
        self.rng = np.random.default_rng(seed)
        self.counters = Counters()
        # hazards raised where the caller may swallow the error (a library probing
        # __cuda_array_interface__); the strict_cupy fixture fails a test that left any
        self.hazards: list[str] = []
        self._regions: list[Counters] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all_streams: list[Stream] = []
        self._pinned: list[tuple[int, int]] = []   # address ranges of pinned allocations
        self._pinned_keep: list[PinnedMemoryPointer] = []
        self._pointers: dict[int, Any] = {}         # device address -> weakref to its array
        self._null = [Stream(self, d, null=True) for d in range(devices)]
        self.xp = _make_cupy(self)
        self.cupyx = _Namespace("cupyx", {"scatter_add": self._scatter_add})

    # -- counters ------------------------------------------------------------------------
    def count(self, kind: str, site: str, n: int = 1) -> None:
        with self._lock:
            for c in [self.counters, *self._regions]:
                getattr(c, kind)[site] += n

    @contextlib.contextmanager
    def counting(self) -> Iterator[Counters]:
        """Counters of what happens inside the ``with`` block (any thread)."""
        c = Counters()
        self._regions.append(c)
        try:
            yield c
        finally:
            self._regions.remove(c)

    # -- per-thread device and stream ----------------------------------------------------
    def device(self) -> int:
        return getattr(self._local, "device", 0)

    def set_device(self, i: int) -> None:
        if not 0 <= int(i) < self.devices:
            raise self.xp.cuda.runtime.CUDARuntimeError(
                f"cudaErrorInvalidDevice: invalid device ordinal {i} ({self.devices} devices)")
        self._local.device = int(i)

    def stream(self) -> Stream:
        streams = self._local.__dict__.setdefault("streams", {})
        d = self.device()
        if d not in streams:
            streams[d] = (Stream(self, d, name=f"per-thread default stream of "
                                 f"{threading.current_thread().name}")
                          if self.per_thread_default_stream else self._null[d])
        return streams[d]

    def set_stream(self, s: Stream) -> None:
        self._local.__dict__.setdefault("streams", {})[s.device_id] = s

    # -- the hazard model ----------------------------------------------------------------
    def check_read(self, buf: _Buffer, site: str, what: str = "read") -> None:
        s = buf.stream
        if s is None or buf.seq <= s.completed:
            return
        reader = self.stream()
        # a kernel, or a copy to the host (queued on the reader's stream, then waited for),
        # is ordered after the write when it runs on the writer's stream or on a stream that
        # waited for an event recorded after the write
        if reader is s or reader.waited.get(s, 0) >= buf.seq:
            return
        raise HazardError(
            f"{what} at {site} on {reader} of an array written at {buf.site} on {s}, "
            f"with no event wait or synchronize between them: on a GPU it may read stale data")

    def check_external(self, buf: _Buffer, site: str) -> None:
        """A library outside CUDA's ordering (MPI) reads the device pointer now."""
        self.count("external", site)
        s = buf.stream
        if s is not None and buf.seq > s.completed:
            msg = (f"device memory handed to a library at {site} while its write at {buf.site} "
                   f"on {s} has not been synchronised: MPI may read it before the kernel ran")
            self.hazards.append(msg)   # mpi4py turns an error here into "expecting buffer"
            raise HazardError(msg)

    def write(self, buf: _Buffer, site: str) -> None:
        s = self.stream()
        s.queued += 1
        buf.stream, buf.seq, buf.site = s, s.queued, site

    def host_sync(self, site: str, stream: Stream | None = None) -> None:
        """The host waits for ``stream`` (the current one): counted, its work complete."""
        s = stream or self.stream()
        s.completed = s.queued
        for other, seq in s.waited.items():
            other.completed = max(other.completed, seq)
        self.count("syncs", site)

    def check_device(self, arrays: list[ndarray]) -> None:
        d = self.device()
        for a in arrays:
            if a._buf.device != d:
                raise ValueError(f"Array device must be same as the current device: "
                                 f"array device = {a._buf.device} while current = {d}")

    # -- kernels -------------------------------------------------------------------------
    def unwrap(self, obj: Any, arrays: list[ndarray], site: str) -> Any:
        if isinstance(obj, ndarray):
            arrays.append(obj)
            return obj._a
        if isinstance(obj, np.ndarray):
            raise TypeError(f"Unsupported type {type(obj)}")
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.unwrap(o, arrays, site) for o in obj)
        return obj

    def wrap(self, out: Any, inputs: list[ndarray], site: str) -> Any:
        if isinstance(out, tuple):
            return tuple(self.wrap(o, inputs, site) for o in out)
        if isinstance(out, list):
            return [self.wrap(o, inputs, site) for o in out]
        if isinstance(out, (np.ndarray, np.generic)):
            out = np.asarray(out)
            for a in inputs:   # a view shares its base's buffer (and its write history)
                if out.base is not None and np.may_share_memory(out, a._a):
                    return ndarray._of(self, out, a._buf)
            buf = _Buffer(self.device())
            self.write(buf, site)
            return ndarray._of(self, out, buf)
        return out

    def kernel(self, fn: Any, args: tuple, kwargs: dict, site: str, writes: tuple = ()) -> Any:
        arrays: list[ndarray] = []
        a = self.unwrap(args, arrays, site)
        kw = {k: self.unwrap(v, arrays, site) for k, v in kwargs.items()}
        self.check_device(arrays)
        for x in arrays:
            self.check_read(x._buf, site)
        self.count("kernels", site)
        out = fn(*a, **kw)
        targets = list(writes) + ([kwargs["out"]] if isinstance(kwargs.get("out"), ndarray) else [])
        for t in targets:
            self.write(t._buf, site)
        if "out" in kw and out is kw["out"]:
            return kwargs["out"]
        if writes and out is None:
            return None
        return self.wrap(out, arrays, site)

    def index(self, key: Any, site: str) -> Any:
        """An index as CuPy takes it: host integer arrays and lists are copied to the device
        (counted), device arrays used as they are; a boolean device mask is a host
        synchronisation (``data_dependent``)."""
        if isinstance(key, tuple):
            return tuple(self.index(k, site) for k in key)
        if isinstance(key, (np.ndarray, list)):
            key = self.to_device(key, None, site)
        if isinstance(key, ndarray) and key.dtype == np.bool_:
            self.data_dependent(site)
        return key

    # -- outputs whose size the data decides (issue 15 item 3) ----------------------------
    def data_dependent(self, site: str) -> None:
        """An operation whose output size depends on the data (a boolean-mask gather or
        assignment, ``nonzero``, ``flatnonzero``, ``argwhere``, ``unique``): CuPy reads the
        count to the host before it can allocate the result, so the host waits for the
        stream, as for ``float(x)``. Counted as a sync at ``site``."""
        self.host_sync(site)

    def to_device(self, host: Any, dtype: Any = None, site: str = "") -> ndarray:
        if isinstance(host, ndarray):
            return host if dtype is None or host.dtype == dtype else host.astype(dtype)
        arr = np.array(host, dtype=dtype)
        if isinstance(host, (np.ndarray, list, tuple)) or arr.ndim:
            self.count("h2d", site)
        buf = _Buffer(self.device())
        self.write(buf, site)
        return ndarray._of(self, arr, buf)

    def to_host(self, x: ndarray, site: str, out: np.ndarray | None = None,
                stream: Stream | None = None) -> np.ndarray:
        self.check_device([x])
        if stream is not None:
            with stream:
                self.check_read(x._buf, site, "host read")
        else:
            self.check_read(x._buf, site, "host read")
        self.count("d2h", site)
        self.host_sync(site, stream)
        if out is not None:
            if self.is_pinned(out):
                self.count("d2h_pinned", site)
            out[...] = x._a
            return out
        return x._a.copy()

    def pointer(self, x: ndarray) -> MemoryPointer:
        """``x.data``: its address, remembered with ``x`` for the libraries that take one."""
        ptr = int(x._a.__array_interface__["data"][0])
        with self._lock:
            self._pointers[ptr] = weakref.ref(x)
        return MemoryPointer(ptr, x._buf.device)

    def array_at(self, ptr: int) -> ndarray | None:
        """The array whose ``.data.ptr`` was last taken at ``ptr`` (None: none alive)."""
        with self._lock:
            ref = self._pointers.get(int(ptr))
        return ref() if ref is not None else None

    def stream_at(self, ptr: int) -> Stream | None:
        """The stream of this thread's current device whose handle is ``ptr`` (0: the
        legacy null stream), as a library given ``stream.ptr`` finds it."""
        if int(ptr) == 0:
            return self._null[self.device()]
        with self._lock:
            return next((s for s in self._all_streams if s.ptr == int(ptr)), None)

    def is_pinned(self, host: np.ndarray) -> bool:
        """Whether ``host`` lies in memory from this double's ``alloc_pinned_memory``."""
        lo = host.__array_interface__["data"][0]
        with self._lock:
            return any(a <= lo and lo + host.nbytes <= b for a, b in self._pinned)

    def scalar(self, x: ndarray, conv: Any) -> Any:
        site = _site()
        if self.refuse_scalars:
            raise TypeError(f"{conv.__name__}() of a device array at {site}: a synchronising "
                            f"device -> host copy (refused by this strict double)")
        return conv(self.to_host(x, site))

    def _scatter_add(self, a: ndarray, indices: Any, b: Any) -> None:
        _scatter_add(self, a, indices, b, _site())


def _scatter_add(double: StrictCupy, a: ndarray, indices: Any, b: Any, site: str) -> None:
    """``a[indices] += b`` with repeated indices summed, in a random order of the updates
    (a GPU's atomics): the float result differs from run to run."""
    arrays: list[ndarray] = []
    target = double.unwrap(a, arrays, site)
    idx = double.unwrap(indices, arrays, site)
    vals = double.unwrap(b, arrays, site)
    double.check_device(arrays)
    for x in arrays:
        double.check_read(x._buf, site)
    double.count("kernels", site)
    idx_t = idx if isinstance(idx, tuple) else (idx,)
    idx_b = np.broadcast_arrays(*[np.asarray(i) for i in idx_t])
    n = idx_b[0].size
    sub = target.shape[len(idx_b):]      # index arrays select along the leading axes
    vals_b = np.broadcast_to(np.asarray(vals, dtype=target.dtype), idx_b[0].shape + sub)
    vals_b = vals_b.reshape((n,) + sub)
    perm = double.rng.permutation(n)
    flat = tuple(i.reshape(-1)[perm] for i in idx_b)
    np.add.at(target, flat if len(flat) > 1 else flat[0], vals_b[perm])
    double.write(a._buf, site)


class _Namespace(types.ModuleType):
    """A module object with exactly the given names; any other is an AttributeError."""

    def __init__(self, name: str, names: dict[str, Any]) -> None:
        super().__init__(name)
        self.__dict__.update(names)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")


class ndarray:  # noqa: N801  (CuPy's name)
    """A device array: a private NumPy array, its buffer's device and write history."""

    __slots__ = ("_a", "_buf", "_d", "__weakref__")
    __array_priority__ = 100

    @classmethod
    def _of(cls, double: StrictCupy, a: np.ndarray, buf: _Buffer) -> ndarray:
        x = object.__new__(cls)
        x._a, x._buf, x._d = a, buf, double
        return x

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("make device arrays with the double's xp (zeros, asarray, ...)")

    # -- what CuPy refuses ---------------------------------------------------------------
    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        mine = self._d.xp.__dict__.get(ufunc.__name__)
        if mine is None:
            return NotImplemented
        return getattr(mine, method)(*inputs, **kwargs) if method != "__call__" else mine(*inputs, **kwargs)

    def __array_function__(self, func: Any, types_: Any, args: Any, kwargs: Any) -> Any:
        mine = self._d.xp.__dict__.get(func.__name__)
        if mine is None or func.__name__ in ("asarray", "array"):
            return NotImplemented
        return mine(*args, **kwargs)

    def __iter__(self) -> Iterator[ndarray]:
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self)))

    def __float__(self) -> float:
        return self._d.scalar(self, float)

    def __int__(self) -> int:
        return self._d.scalar(self, int)

    def __index__(self) -> int:
        raise TypeError("only integer scalar arrays can be converted to a scalar index")

    def __bool__(self) -> bool:
        return self._d.scalar(self, bool)

    def __complex__(self) -> complex:
        return self._d.scalar(self, complex)

    def item(self) -> Any:
        return self._d.scalar(self, np.ndarray.item)

    def tolist(self) -> Any:
        return self._d.scalar(self, np.ndarray.tolist)

    def get(self, stream: Stream | None = None, order: str = "C", out: np.ndarray | None = None,
            blocking: bool = True) -> np.ndarray:
        return self._d.to_host(self, _site(), out=out, stream=stream)

    def set(self, arr: np.ndarray, stream: Stream | None = None) -> None:
        site = _site()
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        self._d.check_read(self._buf, site)
        self._a[...] = arr
        self._d.count("h2d", site)
        self._d.write(self._buf, site)

    @property
    def data(self) -> MemoryPointer:
        """The device address of the first element (``x.data.ptr``), as libraries such as
        NCCL take buffers; the double remembers which array it belongs to (``cuda.nccl``)."""
        return self._d.pointer(self)

    @property
    def __cuda_array_interface__(self) -> dict:
        self._d.check_external(self._buf, _site())
        return {"shape": self._a.shape, "typestr": self._a.dtype.str, "version": 3,
                "data": (self._a.__array_interface__["data"][0], False),
                "strides": None if self._a.flags.c_contiguous else self._a.strides}

    # -- metadata ------------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    device = property(lambda self: Device(self._d, self._buf.device))
    T = property(lambda self: self.transpose())

    def __len__(self) -> int:
        return len(self._a)

    def __repr__(self) -> str:
        return f"array({self._a!r}, device={self._buf.device})"   # no sync modelled for repr

    def __getitem__(self, key: Any) -> ndarray:
        site = _site()
        return self._d.kernel(np.ndarray.__getitem__, (self, self._d.index(key, site)), {}, site)

    def __setitem__(self, key: Any, value: Any) -> None:
        site = _site()
        self._d.kernel(np.ndarray.__setitem__, (self, self._d.index(key, site), value), {}, site,
                       writes=(self,))

    def __hash__(self) -> int:  # CuPy arrays are unhashable, as NumPy's
        raise TypeError("unhashable type: 'cupy.ndarray'")


def _method(name: str) -> Any:
    np_method = getattr(np.ndarray, name)
    writes = name in ("fill", "put", "sort")

    def method(self: ndarray, *args: Any, **kwargs: Any) -> Any:
        site = _site()
        if name in DATA_DEPENDENT_NAMES:
            self._d.data_dependent(site)
        return self._d.kernel(np_method, (self, *args), kwargs, site,
                              writes=(self,) if writes else ())
    method.__name__ = name
    return method


for _name in NDARRAY_METHODS:
    setattr(ndarray, _name, _method(_name))

_BINARY = {"add": "add", "sub": "subtract", "mul": "multiply", "truediv": "true_divide",
           "floordiv": "floor_divide", "mod": "remainder", "pow": "power", "matmul": "matmul",
           "and": "bitwise_and", "or": "bitwise_or", "xor": "bitwise_xor",
           "lshift": "left_shift", "rshift": "right_shift"}
_COMPARE = {"eq": "equal", "ne": "not_equal", "lt": "less", "le": "less_equal",
            "gt": "greater", "ge": "greater_equal"}


def _operator(ufunc: str, reflected: bool = False, inplace: bool = False) -> Any:
    f = getattr(np, ufunc)

    def op(self: ndarray, other: Any) -> Any:
        if isinstance(other, np.ndarray):
            raise TypeError(f"Unsupported type {type(other)}")
        site = _site()
        if inplace:
            return self._d.kernel(f, (self, other), {"out": self}, site)
        return self._d.kernel(f, (other, self) if reflected else (self, other), {}, site)
    return op


for _op, _uf in _BINARY.items():
    setattr(ndarray, f"__{_op}__", _operator(_uf))
    setattr(ndarray, f"__r{_op}__", _operator(_uf, reflected=True))
    setattr(ndarray, f"__i{_op}__", _operator(_uf, inplace=True))
for _op, _uf in _COMPARE.items():
    setattr(ndarray, f"__{_op}__", _operator(_uf))
for _op, _uf in {"neg": "negative", "pos": "positive", "abs": "absolute", "invert": "invert"}.items():
    setattr(ndarray, f"__{_op}__",
            (lambda f: lambda self: self._d.kernel(f, (self,), {}, _site()))(getattr(np, _uf)))


class ufunc:  # noqa: N801  (CuPy's name)
    """A CuPy ufunc: call, ``at`` (atomic: random order), ``reduce``, ``accumulate``,
    ``reduceat``, ``outer`` (CuPy v13's ufunc methods)."""

    def __init__(self, double: StrictCupy, f: Any) -> None:
        self._d, self._f, self.__name__ = double, f, f.__name__
        self.nin, self.nout = f.nin, f.nout

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._d.kernel(self._f, args, kwargs, _site())

    def at(self, a: ndarray, indices: Any, b: Any = None) -> None:
        if self._f is np.add:
            return _scatter_add(self._d, a, indices, b, _site())
        self._d.kernel(self._f.at, (a, indices) + (() if b is None else (b,)), {}, _site(), writes=(a,))
        return None

    def reduce(self, *args: Any, **kwargs: Any) -> Any:
        return self._d.kernel(self._f.reduce, args, kwargs, _site())

    def outer(self, *args: Any, **kwargs: Any) -> Any:
        return self._d.kernel(self._f.outer, args, kwargs, _site())

    def accumulate(self, *args: Any, **kwargs: Any) -> Any:
        return self._d.kernel(self._f.accumulate, args, kwargs, _site())

    def reduceat(self, *args: Any, **kwargs: Any) -> Any:
        return self._d.kernel(self._f.reduceat, args, kwargs, _site())


def _function(double: StrictCupy, f: Any) -> Any:
    def fn(*args: Any, **kwargs: Any) -> Any:
        return double.kernel(f, args, kwargs, _site())
    fn.__name__ = getattr(f, "__name__", "function")
    return fn


class Stream:
    """A CUDA stream: the queue a thread's kernels go to (``with s:`` / ``s.use()``)."""

    _ids = itertools.count(1)

    def __init__(self, double: StrictCupy, device: int, null: bool = False, name: str = "") -> None:
        self._d, self.device_id, self.null = double, device, null
        self.queued = self.completed = 0
        self.waited: dict[Stream, int] = {}      # stream -> position this one waits for
        self.name = name or ("the legacy null stream" if null else f"stream {next(self._ids)}")
        self._prev: list[Stream] = []
        with double._lock:
            double._all_streams.append(self)

    def __repr__(self) -> str:
        return f"{self.name} (device {self.device_id})"

    def synchronize(self) -> None:
        self._d.host_sync(_site(), self)

    def use(self) -> Stream:
        self._d.set_stream(self)
        return self

    def __enter__(self) -> Stream:
        self._prev.append(self._d.stream())
        return self.use()

    def __exit__(self, *exc: Any) -> None:
        self._d.set_stream(self._prev.pop())

    def record(self, event: Event | None = None) -> Event:
        event = event or Event(self._d)
        event.record(self)
        return event

    def wait_event(self, event: Event) -> None:
        if event.stream is not None:
            self.waited[event.stream] = max(self.waited.get(event.stream, 0), event.seq)
            for s, seq in event.waited.items():
                self.waited[s] = max(self.waited.get(s, 0), seq)

    @property
    def ptr(self) -> int:
        return 0 if self.null else id(self)

    def done(self) -> bool:
        return self.completed >= self.queued


class Event:
    """A CUDA event: a position in a stream that another stream or the host can wait for."""

    def __init__(self, double: StrictCupy, block: bool = False, disable_timing: bool = False,
                 interprocess: bool = False) -> None:
        self._d = double
        self.stream: Stream | None = None
        self.seq = 0
        self.waited: dict[Stream, int] = {}

    def record(self, stream: Stream | None = None) -> None:
        s = stream or self._d.stream()
        self.stream, self.seq, self.waited = s, s.queued, dict(s.waited)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.completed = max(self.stream.completed, self.seq)
            for s, seq in self.waited.items():
                s.completed = max(s.completed, seq)
        self._d.count("syncs", _site())

    @property
    def done(self) -> bool:
        return self.stream is None or self.stream.completed >= self.seq


class Device:
    """A GPU: ``use()`` makes it this thread's current device; ``with Device(i):`` restores."""

    def __init__(self, double: StrictCupy, device: int | None = None) -> None:
        self._d = double
        self.id = double.device() if device is None else int(device)
        self._prev: list[int] = []

    def use(self) -> None:
        self._d.set_device(self.id)

    def __enter__(self) -> Device:
        self._prev.append(self._d.device())
        self.use()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._d.set_device(self._prev.pop())

    def synchronize(self) -> None:
        _device_sync(self._d, self.id, _site())

    @property
    def pci_bus_id(self) -> str:
        """One bus id per device ordinal: every process of the host sees the same GPUs."""
        return f"0000:{self.id + 1:02x}:00.0"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id}>"


def _device_sync(double: StrictCupy, device: int, site: str) -> None:
    """Every stream of ``device`` complete: the host waited for all of them."""
    with double._lock:
        streams = [s for s in double._all_streams if s.device_id == device]
    for s in streams:
        s.completed = s.queued
    double.count("syncs", site)


class PinnedMemoryPointer(bytearray):
    """Page-locked host memory (``cuda.alloc_pinned_memory``): a host buffer, so it supports
    the buffer protocol, as CuPy's does."""


class _Generator:
    """``cupy.random.Generator``: NumPy's draws, made on the device."""

    def __init__(self, double: StrictCupy, seed: Any) -> None:
        self._d, self._g = double, np.random.default_rng(seed)
        self.bit_generator = self._g.bit_generator   # CuPy's Generator has one (its state)

    def __deepcopy__(self, memo: dict) -> _Generator:
        g = object.__new__(_Generator)
        g._d, g._g = self._d, copy.deepcopy(self._g, memo)
        g.bit_generator = g._g.bit_generator
        return g

    def __getattr__(self, name: str) -> Any:
        if name not in GENERATOR_METHODS:
            raise AttributeError(f"'Generator' object has no attribute {name!r}")
        f = getattr(self._g, name)
        return lambda *a, **k: self._d.kernel(f, a, k, _site())


class _Kernel:
    """``ReductionKernel`` / ``RawModule``: made as CuPy makes them; the double does not run
    them, so calling one says so (``ElementwiseKernel`` and ``RawKernel`` run on the CPU:
    ``cuda_cpu.py``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs
        self.name = kwargs.get("name") or (args[-1] if args and isinstance(args[-1], str) else "kernel")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"the strict CuPy double cannot run the CUDA source of {self.name!r}")


def _make_cupy(d: StrictCupy) -> _Namespace:
    names: dict[str, Any] = {}
    for n in UFUNC_NAMES:
        names[n] = ufunc(d, getattr(np, n))
    for n in FUNCTION_NAMES + CREATION_NAMES:
        if hasattr(np, n) and n != "linalg":
            names[n] = _function(d, getattr(np, n))
    def unwritten(f: Any) -> Any:
        def fn(*args: Any, **kwargs: Any) -> ndarray:
            x = d.kernel(f, args, kwargs, _site())
            x._buf.stream = None     # an allocation queues no kernel: nothing to wait for
            return x
        fn.__name__ = f.__name__
        return fn

    names["empty"], names["empty_like"] = unwritten(np.empty), unwritten(np.empty_like)

    def sized_by_data(f: Any) -> Any:
        def fn(*args: Any, **kwargs: Any) -> Any:
            site = _site()
            d.data_dependent(site)
            return d.kernel(f, args, kwargs, site)
        fn.__name__ = f.__name__
        return fn

    for n in DATA_DEPENDENT_NAMES:
        names[n] = sized_by_data(getattr(np, n))
    names["linalg"] = _Namespace("cupy.linalg", {"norm": _function(d, np.linalg.norm),
                                                  "qr": _function(d, np.linalg.qr)})
    names["copyto"] = lambda dst, src, **kw: d.kernel(np.copyto, (dst, src), kw, _site(), writes=(dst,))
    for n in ("shares_memory", "may_share_memory"):
        names[n] = (lambda f: lambda a, b, **kw: f(a._a, b._a, **kw))(getattr(np, n))
    for n in ("result_type", "can_cast", "promote_types", "dtype", "finfo", "iinfo", "newaxis",
              "pi", "e", "inf", "nan", "float16", "float32", "float64", "int8", "int16",
              "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool_", "intp",
              "complex64", "complex128", "isscalar", "ndim", "shape", "size"):
        names[n] = getattr(np, n)
    names["ndim"] = lambda a: a.ndim
    names["shape"] = lambda a: a.shape
    names["size"] = lambda a: a.size
    names["ndarray"] = ndarray
    names["ufunc"] = ufunc

    def asarray(a: Any, dtype: Any = None, order: Any = None, *, blocking: bool = False) -> ndarray:
        return d.to_device(a, dtype, _site())

    def array(obj: Any, dtype: Any = None, copy: bool = True, **kw: Any) -> ndarray:
        if isinstance(obj, ndarray):
            return d.kernel(np.array, (obj,), {"dtype": dtype, "copy": True}, _site())
        return d.to_device(obj, dtype, _site())

    def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
        if not isinstance(a, ndarray):
            return d.to_device(np.ascontiguousarray(a, dtype), None, _site())
        return d.kernel(np.ascontiguousarray, (a,), {"dtype": dtype}, _site())

    def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True) -> np.ndarray:
        if isinstance(a, ndarray):
            return d.to_host(a, _site(), out=out, stream=stream)
        return np.asarray(a, order=order)

    def get_array_module(*args: Any) -> Any:
        return d.xp if any(isinstance(a, ndarray) for a in args) else np

    def fuse(*args: Any, **kwargs: Any) -> Any:
        def deco(f: Any) -> Any:
            return f     # the double runs the Python body kernel by kernel
        return deco(args[0]) if args and callable(args[0]) else deco

    names.update(asarray=asarray, array=array, ascontiguousarray=ascontiguousarray,
                 asnumpy=asnumpy, get_array_module=get_array_module, fuse=fuse,
                 ReductionKernel=_Kernel, RawModule=_Kernel)
    # user kernels: their CUDA C++ compiled for the CPU and run over the arrays (cuda_cpu.py)
    names["ElementwiseKernel"] = functools.partial(cuda_cpu.ElementwiseKernel, d, _site)
    names["RawKernel"] = functools.partial(cuda_cpu.RawKernel, d, _site)
    names["random"] = _Namespace("cupy.random", {
        "default_rng": lambda seed=None: _Generator(d, seed),
        "Generator": _Generator})

    class CUDARuntimeError(RuntimeError):
        pass

    def device_synchronize() -> None:
        _device_sync(d, d.device(), _site())

    runtime = _Namespace("cupy.cuda.runtime", {
        "getDeviceCount": lambda: d.devices, "getDevice": d.device,
        "setDevice": d.set_device, "deviceSynchronize": device_synchronize,
        "CUDARuntimeError": CUDARuntimeError,
        "runtimeGetVersion": lambda: 12040, "driverGetVersion": lambda: 12040})

    def make_stream(null: bool = False, non_blocking: bool = False, ptds: bool = False) -> Stream:
        return d._null[d.device()] if null else Stream(d, d.device())

    def alloc_pinned_memory(size: int) -> PinnedMemoryPointer:
        mem = PinnedMemoryPointer(int(size))
        if size:
            lo = np.frombuffer(mem, np.uint8).__array_interface__["data"][0]
            with d._lock:   # kept alive: an address range must not be reused by other memory
                d._pinned.append((lo, lo + int(size)))
                d._pinned_keep.append(mem)
        return mem

    class _StreamFactory:
        null = property(lambda self: d._null[d.device()])

        def __call__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False) -> Stream:
            return make_stream(null, non_blocking, ptds)

    names["cuda"] = _Namespace("cupy.cuda", {
        "Device": lambda device=None: Device(d, device),
        "Stream": _StreamFactory(),
        "Event": lambda block=False, disable_timing=False, interprocess=False: Event(d, block, disable_timing, interprocess),
        "get_current_stream": lambda device_id=None: d.stream(),
        "runtime": runtime, "alloc_pinned_memory": alloc_pinned_memory,
        "PinnedMemoryPointer": PinnedMemoryPointer, "is_available": lambda: True,
        "get_elapsed_time": lambda a, b: 0.0, "nccl": _make_nccl(d),
        "MemoryPointer": MemoryPointer})
    missing = set(names) - CUPY_NAMES
    assert not missing, f"names not in CUPY_NAMES: {missing}"
    return _Namespace("cupy", {n: v for n, v in names.items() if n in CUPY_NAMES})


# ---- cuda.nccl: NCCL over MPI host copies among the test's ranks ------------------------------
class MemoryPointer:
    """``cupy.cuda.MemoryPointer``: a device address (``ptr``) on a device (``device_id``)."""

    def __init__(self, ptr: int, device_id: int) -> None:
        self.ptr, self.device_id = int(ptr), int(device_id)

    def __int__(self) -> int:
        return self.ptr


NCCL_CONSTANTS = {
    "NCCL_SUM": 0, "NCCL_PROD": 1, "NCCL_MAX": 2, "NCCL_MIN": 3, "NCCL_AVG": 4,
    "NCCL_INT8": 0, "NCCL_CHAR": 0, "NCCL_UINT8": 1, "NCCL_INT32": 2, "NCCL_INT": 2,
    "NCCL_UINT32": 3, "NCCL_INT64": 4, "NCCL_UINT64": 5, "NCCL_FLOAT16": 6, "NCCL_HALF": 6,
    "NCCL_FLOAT32": 7, "NCCL_FLOAT": 7, "NCCL_FLOAT64": 8, "NCCL_DOUBLE": 8, "NCCL_BFLOAT16": 9}
# cupy_backends/cuda/libs/nccl.pyx: the module's names (send/recv, initAll and the async-error
# query are left out: mpipar uses none of them, and a missing name fails loudly)
NCCL_NAMES = frozenset(("available", "NcclError", "NcclCommunicator", "get_unique_id",
                        "get_version", "get_build_version", "groupStart", "groupEnd")
                       + tuple(NCCL_CONSTANTS))
# NCCL datatype -> the NumPy dtype its bytes hold (bfloat16: its 16 bits, as uint16)
_NCCL_DTYPES = {0: np.int8, 1: np.uint8, 2: np.int32, 3: np.uint32, 4: np.int64, 5: np.uint64,
                6: np.float16, 7: np.float32, 8: np.float64, 9: np.uint16}
_NCCL_STATUS = {2: ("NCCL_ERROR_SYSTEM_ERROR", "unhandled system error"),
                4: ("NCCL_ERROR_INVALID_ARGUMENT", "invalid argument"),
                5: ("NCCL_ERROR_INVALID_USAGE", "invalid usage")}
_NCCL_MAGIC = b"mpipar-double-nccl\0"
_NCCL_TAG = 29000      # COMM_WORLD tags [29000, 32000): the double's NCCL messages
_NCCL_TAGS = 3000


class NcclError(RuntimeError):
    """``cupy.cuda.nccl.NcclError``: the status's name and NCCL's string for it."""

    def __init__(self, status: int) -> None:
        self.status = status
        name, text = _NCCL_STATUS[status]
        super().__init__(f"{name}: {text}")


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as a GPU's conversion does (NaN aside)."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _nccl_reduce(parts: list[np.ndarray], op: int, datatype: int) -> np.ndarray:
    """The reduction of ``parts`` in rank order, in their own dtype (each step rounded, as
    NCCL's kernels round); bfloat16 in float32, rounded once."""
    bf16 = datatype == 9
    vals = [_bf16_to_f32(p) if bf16 else p for p in parts]
    ufunc = {0: np.add, 1: np.multiply, 2: np.maximum, 3: np.minimum, 4: np.add}[op]
    acc = vals[0].copy()
    for v in vals[1:]:
        ufunc(acc, v, out=acc)
    if op == 4:                 # ncclAvg: the sum divided by the ranks (integers truncate)
        n = len(parts)
        acc = acc // n if np.issubdtype(acc.dtype, np.integer) else acc / acc.dtype.type(n)
    return _f32_to_bf16(acc) if bf16 else acc


def _make_nccl(d: StrictCupy) -> _Namespace:
    """The double's ``cuda.nccl``. A communicator's ranks are processes of the test's MPI
    world: ``get_unique_id`` names the calling process (its world rank and a count), and the
    ``NcclCommunicator`` of every member sends its (node, device) to that process, which
    refuses two members on one GPU as NCCL does (``NCCL_ERROR_INVALID_USAGE`` on every
    member), and then hosts each collective: the members' send buffers are read as host
    copies, combined in rank order and written back. A call reads its send buffer on the
    stream it is given: a buffer last written on another stream with no event wait is a
    ``HazardError``, as it would be stale data on a GPU; the receive buffer is written on
    that stream. Calls between ``groupStart`` and ``groupEnd`` run at ``groupEnd``."""
    counter = itertools.count()
    group: list[list[Any]] = []          # the pending calls of an open group, per depth

    def world() -> Any:
        return mpi_env.import_mpi().COMM_WORLD

    def exchange(sends: list[tuple[np.ndarray, int]], recvs: list[tuple[np.ndarray, int]],
                 tag: int) -> None:
        MPI, comm = mpi_env.import_mpi(), world()
        with mpi_env.MPI_LOCK:
            reqs = ([comm.Irecv([b, MPI.BYTE], src, tag) for b, src in recvs]
                    + [comm.Isend([b, MPI.BYTE], dst, tag) for b, dst in sends])
        mpi_env.wait_all(reqs, "the strict double's NCCL")

    def get_unique_id() -> tuple:
        raw = _NCCL_MAGIC + np.array([world().Get_rank(), next(counter)], np.int64).tobytes()
        return tuple(int(v) for v in np.frombuffer(raw.ljust(128, b"\0"), np.int8))

    class NcclCommunicator:
        def __init__(self, ndev: int, commId: tuple, rank: int) -> None:  # noqa: N803 (CuPy's)
            assert len(commId) == 128
            raw = np.array(commId, dtype=np.int64).astype(np.int8).tobytes()
            if not raw.startswith(_NCCL_MAGIC) or not 0 <= rank < ndev:
                raise NcclError(4)
            self._hub, n = (int(v) for v in np.frombuffer(raw[len(_NCCL_MAGIC):][:16], np.int64))
            self._tag = _NCCL_TAG + n % _NCCL_TAGS
            self._ndev, self._rank, self._device = int(ndev), int(rank), d.device()
            me = world().Get_rank()
            node = int.from_bytes(mpi_env.import_mpi().Get_processor_name().encode()[:8], "little")
            mine = np.array([me, rank, self._device, node], dtype=np.int64)
            reply = np.empty(ndev + 1, dtype=np.int64)     # status, then members by rank
            if me == self._hub:
                rows = [np.empty(4, np.int64) for _ in range(ndev - 1)]
                exchange([], [(r, _any_source()) for r in rows], self._tag)
                table = np.stack([mine] + rows)
                status = 0
                if sorted(table[:, 1].tolist()) != list(range(ndev)):
                    status = 4
                elif len({(int(r[3]), int(r[2])) for r in table}) < ndev:
                    status = 5       # "Duplicate GPU detected": two ranks on one device
                reply[0] = status
                reply[1:] = table[np.argsort(table[:, 1]), 0]
                exchange([(reply, int(w)) for w in table[1:, 0]], [], self._tag)
            else:
                exchange([(mine, self._hub)], [(reply, self._hub)], self._tag)
            if reply[0]:
                raise NcclError(int(reply[0]))
            self._members = [int(w) for w in reply[1:]]
            self._alive = True

        # -- CuPy's queries and teardown ---------------------------------------------------
        def device_id(self) -> int:
            return self._device

        def rank_id(self) -> int:
            return self._rank

        def size(self) -> int:
            return self._ndev

        def destroy(self) -> None:
            self._alive = False

        def abort(self) -> None:
            self._alive = False

        # -- collectives -------------------------------------------------------------------
        def allReduce(self, sendbuf: int, recvbuf: int, count: int, datatype: int, op: int,  # noqa: N802
                      stream: int) -> None:
            self._call("allReduce", sendbuf, count, recvbuf, count, datatype, stream,
                       lambda parts: [_nccl_reduce(parts, op, datatype)] * self._ndev)

        def reduce(self, sendbuf: int, recvbuf: int, count: int, datatype: int, op: int,
                   root: int, stream: int) -> None:
            self._check_root(root)
            self._call("reduce", sendbuf, count, recvbuf, count if self._rank == root else 0,
                       datatype, stream, lambda parts: [
                           _nccl_reduce(parts, op, datatype) if r == root else parts[r][:0]
                           for r in range(self._ndev)])

        def broadcast(self, sendbuff: int, recvbuff: int, count: int, datatype: int, root: int,
                      stream: int) -> None:
            self._check_root(root)
            self._call("broadcast", sendbuff, count, recvbuff, count, datatype, stream,
                       lambda parts: [parts[root]] * self._ndev)

        def bcast(self, buff: int, count: int, datatype: int, root: int, stream: int) -> None:
            self.broadcast(buff, buff, count, datatype, root, stream)

        def reduceScatter(self, sendbuf: int, recvbuf: int, recvcount: int, datatype: int,  # noqa: N802
                          op: int, stream: int) -> None:
            def blocks(parts: list[np.ndarray]) -> list[np.ndarray]:
                total = _nccl_reduce(parts, op, datatype)
                return [total[r * recvcount:(r + 1) * recvcount] for r in range(self._ndev)]
            self._call("reduceScatter", sendbuf, recvcount * self._ndev, recvbuf, recvcount,
                       datatype, stream, blocks)

        def allGather(self, sendbuf: int, recvbuf: int, count: int, datatype: int,  # noqa: N802
                      stream: int) -> None:
            self._call("allGather", sendbuf, count, recvbuf, count * self._ndev, datatype, stream,
                       lambda parts: [np.concatenate(parts)] * self._ndev)

        # -- the model ---------------------------------------------------------------------
        def _check_root(self, root: int) -> None:
            if not 0 <= root < self._ndev:
                raise NcclError(4)

        def _view(self, ptr: int, count: int, datatype: int, site: str, stream: Stream,
                  what: str) -> tuple[np.ndarray, ndarray | None]:
            """The host view of ``count`` elements at ``ptr``, and the array they are in."""
            dtype = np.dtype(_NCCL_DTYPES.get(int(datatype), np.void))
            if dtype == np.void:
                raise NcclError(4)
            if count == 0:
                return np.empty(0, dtype), None
            arr = d.array_at(ptr)
            if arr is None or arr._a.nbytes < count * dtype.itemsize:
                raise ValueError(f"{what} at {site}: {count} elements of {dtype} at {ptr:#x} "
                                 f"are not inside one device array (give x.data.ptr of an array "
                                 f"of at least that size)")
            if arr._buf.device != self._device or stream.device_id != self._device:
                raise ValueError(f"{what} at {site}: a buffer on device {arr._buf.device} or a "
                                 f"stream of device {stream.device_id} for an NCCL communicator "
                                 f"of device {self._device}")
            mem = (ctypes.c_byte * (count * dtype.itemsize)).from_address(int(ptr))
            return np.frombuffer(mem, dtype=dtype), arr

        def _call(self, name: str, send: int, n_in: int, recv: int, n_out: int, datatype: int,
                  stream: int, combine: Any) -> None:
            site = _site()
            if not self._alive:
                raise NcclError(4)
            s = d.stream_at(stream)
            if s is None:
                raise ValueError(f"{name} at {site}: {stream:#x} is not a stream of this process")
            src, src_arr = self._view(send, n_in, datatype, site, s, f"{name}'s send buffer")
            if src_arr is not None:
                with s:    # NCCL reads the buffer on the stream it is given
                    d.check_read(src_arr._buf, site)
            data = src.copy()
            dst, dst_arr = self._view(recv, n_out, datatype, site, s, f"{name}'s receive buffer")
            d.count("kernels", site)

            def run() -> None:
                out = self._host(data, combine)
                dst[...] = out[:dst.size]
                if dst_arr is not None:
                    with s:
                        d.write(dst_arr._buf, site)
            if group:
                group[-1].append(run)
            else:
                run()

        def _host(self, data: np.ndarray, combine: Any) -> np.ndarray:
            """Every member's ``data`` to the hub, ``combine``d there, each member's part back."""
            me = world().Get_rank()
            out_len = np.zeros(1, np.int64)
            if me != self._hub:
                size = np.array([data.size], np.int64)
                exchange([(size, self._hub), (data, self._hub)], [(out_len, self._hub)], self._tag)
                out = np.empty(int(out_len[0]), data.dtype)
                exchange([], [(out, self._hub)], self._tag)
                return out
            ranks = {w: r for r, w in enumerate(self._members)}
            got: dict[int, np.ndarray] = {me: data}
            for w in self._members:
                if w == me:
                    continue
                size = np.zeros(1, np.int64)
                exchange([], [(size, w)], self._tag)
                got[w] = np.empty(int(size[0]), data.dtype)
                exchange([], [(got[w], w)], self._tag)
            parts = [got[w] for w in self._members]
            outs = combine(parts)
            for w in self._members:
                if w != me:
                    o = np.ascontiguousarray(outs[ranks[w]])
                    exchange([(np.array([o.size], np.int64), w), (o, w)], [], self._tag)
            return np.ascontiguousarray(outs[ranks[me]])

    def groupStart() -> None:  # noqa: N802  (CuPy's name)
        group.append([])

    def groupEnd() -> None:  # noqa: N802
        calls = group.pop()
        if not group:
            for run in calls:
                run()
        else:
            group[-1].extend(calls)

    names: dict[str, Any] = dict(NCCL_CONSTANTS)
    names.update(available=True, NcclError=NcclError, NcclCommunicator=NcclCommunicator,
                 get_unique_id=get_unique_id, get_version=lambda: 22304,
                 get_build_version=lambda: 22304, groupStart=groupStart, groupEnd=groupEnd)
    assert set(names) == NCCL_NAMES
    return _Namespace("cupy.cuda.nccl", names)


def _any_source() -> int:
    return int(mpi_env.import_mpi().ANY_SOURCE)
