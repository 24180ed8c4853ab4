"""Array backend: the one module that decides between NumPy (CPU) and CuPy (GPU).

Every numeric function in mpipar takes and returns arrays of one array module ``xp``.
``xp`` is chosen once, from ``--device cpu|gpu|auto``::

    from mpipar import backend
    xp = backend.get_xp("auto")          # cupy where a GPU is usable, else numpy
    x = xp.zeros((4, 4), dtype=backend.resolve_dtype("float32"))
    backend.synchronize(xp)               # wait for queued GPU work (no-op on numpy)
    host = backend.to_host(x)             # numpy.ndarray, copied off the GPU if needed

No other module imports cupy: they ask this one (``array_module``, ``is_device_array``,
``pinned_empty``), so a machine without CuPy never pays for it and the GPU path is a
different ``xp``, not a different copy of the code.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import importlib
import os
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import ml_dtypes
import numpy as np

DEVICES = ("cpu", "gpu", "auto")

# dtypes that collectives and layers accept; names are numpy's.
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64", "int32", "int64")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
# the 16-bit floats of mixed precision; bfloat16 is ml_dtypes' (NumPy has none, CuPy neither)
HALF_DTYPES = ("float16", "bfloat16")
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


@functools.lru_cache(maxsize=1)
def _cupy() -> ModuleType | None:
    """CuPy if it imports and sees at least one GPU, else None (checked once)."""
    if os.environ.get("MPIPAR_DISABLE_CUPY"):
        return None
    try:
        import cupy  # noqa: PLC0415  (the only cupy import in mpipar)

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # ImportError, or CUDA driver/runtime missing
        return None


# A GPU array module installed in CuPy's place by a test (the strict CuPy double of
# mpipar.testing.cupy_double, through the strict_cupy fixture); None: CuPy itself.
_gpu_module: ModuleType | None = None


def _gpu() -> ModuleType | None:
    """The GPU array module: the one a test installed, else CuPy where usable, else None."""
    return _gpu_module if _gpu_module is not None else _cupy()


@contextlib.contextmanager
def use_gpu_module(module: ModuleType) -> Any:
    """Within the block, ``module`` is the GPU array module in CuPy's place (``get_xp("gpu")``,
    ``is_device_array``, ``synchronize``, ``pinned_empty`` ...). The one way a test double
    reaches the backend: nothing outside the block, and nothing outside tests, sees it."""
    global _gpu_module
    previous, _gpu_module = _gpu_module, module
    try:
        yield module
    finally:
        _gpu_module = previous


def cupy_available() -> bool:
    """True when CuPy imports and a GPU is visible (or a test installed a GPU module)."""
    return _gpu() is not None


def cupy_module() -> ModuleType:
    """The cupy module; raises a clear error where there is none."""
    cp = _gpu()
    if cp is None:
        raise RuntimeError("GPU requested but CuPy with a visible GPU is not available "
                           "(pip install 'mpipar[gpu]' on a machine with CUDA)")
    return cp


def get_xp(device: str = "cpu") -> ModuleType:
    """The array module for ``device`` in ``cpu|gpu|auto``."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return np
    if device == "gpu":
        return cupy_module()
    return _gpu() or np


def device_name(xp: ModuleType) -> str:
    return "gpu" if xp is not np else "cpu"


def is_device_array(x: Any) -> bool:
    """True for a CuPy array (memory on the GPU)."""
    cp = _gpu()
    return cp is not None and isinstance(x, cp.ndarray)


def array_module(x: Any) -> Any:
    """The array module ``x`` belongs to: numpy, cupy, or the namespace an array of another
    kind declares (``x.__array_namespace__()``, the array API's rule), which is how the
    simulator's shape-only arrays (``mpipar.sim.symbolic``) run the same layers as NumPy."""
    if type(x) is np.ndarray or isinstance(x, np.generic):
        return np
    if is_device_array(x):
        return cupy_module()
    declared = getattr(type(x), "__array_namespace__", None)
    if declared is not None and not isinstance(x, np.ndarray):
        return declared(x)
    return np


def resolve_dtype(dtype: Any) -> np.dtype:
    """np.dtype from a name or dtype; rejects what mpipar does not support."""
    dt = np.dtype(dtype)
    if dt.name not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {dt.name}; supported: {', '.join(SUPPORTED_DTYPES)}")
    return dt


def is_half(dtype: Any) -> bool:
    """True for the 16-bit floats (float16, bfloat16)."""
    return np.dtype(dtype).name in HALF_DTYPES


def compute_dtype(dtype: Any) -> np.dtype:
    """The dtype arithmetic on ``dtype`` values runs in: float32 for the 16-bit floats (what
    GPU tensor cores accumulate in, and what NumPy has BLAS and fast loops for), else itself."""
    dt = np.dtype(dtype)
    return np.dtype(np.float32) if dt.name in HALF_DTYPES else dt


def as_compute(x: Any) -> Any:
    """``x`` itself where its dtype is its compute dtype, else a float32 copy (16-bit ``x``):
    what a layer computes on before rounding its result back into ``x``'s dtype."""
    dt = compute_dtype(x.dtype)
    return x if x.dtype == dt else x.astype(dt)


def matmul(a: Any, b: Any, out: Any = None) -> Any:
    """``a @ b`` (into ``out`` when given). 16-bit inputs on NumPy are multiplied in float32
    and the product rounded once to their dtype: NumPy has no BLAS for float16 or bfloat16
    (a 256 x 256 float16 product took 119 ms here, its float32 product of the up-cast copies
    2 ms), and 16-bit inputs with float32 accumulation is what GPU tensor cores do. Any other
    array module (CuPy: cuBLAS's float16 GEMM) and every other dtype: ``a @ b`` itself."""
    xp = array_module(a)
    if xp is np and a.dtype.name in HALF_DTYPES:
        f32 = np.float32
        r = np.matmul(a.astype(f32), b.astype(f32))
        # a product beyond float16's range rounds to inf, as on a GPU: under fp16 the loss
        # scaler expects it (and skips the step), so no RuntimeWarning
        with np.errstate(over="ignore"):
            if out is None:
                return r.astype(a.dtype)
            out[...] = r
        return out
    if out is None:
        return a @ b
    return xp.matmul(a, b, out=out)


def to_host(x: Any, out: np.ndarray | None = None) -> np.ndarray:
    """A NumPy array with the contents of ``x`` (a copy when ``x`` is on the GPU).

    ``out``: a host array of ``x``'s shape and dtype to copy into, e.g. a view of a pooled
    page-locked buffer: one device -> host copy straight into it (CuPy's ``get(out=)``, on
    the current stream, synchronous), not a new pageable array copied again."""
    if out is None:
        return x.get() if is_device_array(x) else np.asarray(x)
    if is_device_array(x):
        return x.get(out=out)
    out[...] = x
    return out


def to_device(x: Any, xp: ModuleType) -> Any:
    """``x`` as an array of module ``xp`` (no copy when it already is one)."""
    if xp is np:
        return to_host(x)
    return xp.asarray(x)


def synchronize(x_or_xp: Any = None) -> None:
    """Block until all queued GPU work has finished; a no-op for NumPy.

    MPI reads device memory behind CUDA's back, so every transport calls this before
    handing a device buffer (or its staged host copy) to MPI.
    """
    cp = _gpu()
    if cp is None:
        return
    if x_or_xp is cp or is_device_array(x_or_xp) or x_or_xp is None:
        cp.cuda.get_current_stream().synchronize()


def host_scalars(values: Sequence[Any]) -> list[float]:
    """The Python floats of ``values`` (0-d arrays of one module, or numbers), in order. On
    the GPU they are stacked and read in one device -> host copy: one synchronisation for
    all of them, where ``float()`` of each would wait for the device once per value (what a
    step reads, its loss and gradient norm, is a few of these)."""
    values = list(values)
    if any(is_device_array(v) for v in values):
        return [float(v) for v in array_module(values[0]).stack(values).get()]
    return [float(v) for v in values]


def pinned_empty(count: int, dtype: Any) -> np.ndarray:
    """A 1-D host array in page-locked memory when CuPy is present (faster GPU copies),
    ordinary NumPy memory otherwise."""
    dt = np.dtype(dtype)
    cp = _gpu()
    if cp is None or count == 0:
        return np.empty(count, dtype=dt)
    mem = cp.cuda.alloc_pinned_memory(count * dt.itemsize)
    return np.frombuffer(mem, dtype=dt, count=count)


# ---- devices, streams and events (issue 15 item 2) -----------------------------------------
# Which GPU a rank uses is decided where MPI is known (``comm/mpi_env.select_gpu``, from the
# node-local rank); these are the CUDA calls it and the communication thread need. Each is
# a no-op (or None) without a GPU module, so the CPU path pays nothing.

def device_count() -> int:
    """GPUs visible to this process (CUDA_VISIBLE_DEVICES applied by CUDA); 0 without CuPy."""
    cp = _gpu()
    return 0 if cp is None else int(cp.cuda.runtime.getDeviceCount())


def current_device() -> int | None:
    """This thread's current GPU (CUDA's device is per thread), None without CuPy."""
    cp = _gpu()
    return None if cp is None else int(cp.cuda.runtime.getDevice())


def use_device(device: int | None) -> None:
    """Make ``device`` this thread's current GPU (None: nothing to do)."""
    cp = _gpu()
    if cp is not None and device is not None:
        cp.cuda.Device(device).use()


def new_stream() -> Any:
    """A new non-blocking CUDA stream on this thread's device (None without CuPy): work on it
    is ordered against other streams by events only, never by the legacy default stream."""
    cp = _gpu()
    return None if cp is None else cp.cuda.Stream(non_blocking=True)


def use_stream(stream: Any) -> Any:
    """A context making ``stream`` this thread's current stream (None: no change)."""
    return contextlib.nullcontext() if stream is None else stream


def record_event() -> Any:
    """An event recorded on this thread's current stream (None without CuPy): a later
    ``wait_event`` on another stream orders that stream's work after everything queued here
    so far."""
    cp = _gpu()
    if cp is None:
        return None
    event = cp.cuda.Event(disable_timing=True)
    event.record(cp.cuda.get_current_stream())
    return event


def wait_event(event: Any) -> None:
    """Make this thread's current stream wait, on the device, for ``event`` (no host wait;
    None: nothing to wait for)."""
    if event is not None:
        cp = _gpu()
        if cp is not None:
            cp.cuda.get_current_stream().wait_event(event)


# ---- CPU threads: NumPy's BLAS and mpipar's blocked elementwise chains ----------------------
# One thread per rank by default: mpipar uses more cores through more ranks, and OpenBLAS
# threads spin while they wait, so with more ranks than cores a second thread per rank made a
# small-model step 2.5x slower (measured on 2 busy cores: 265 ms with 1 thread, 715 ms with 2).
_cpu_threads = 1

_BLAS_SET = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
             "openblas_set_num_threads")
_BLAS_GET = ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
             "openblas_get_num_threads")


@functools.lru_cache(maxsize=1)
def _openblas() -> Any:
    """NumPy's bundled OpenBLAS as a ctypes library, or None (then threads are not managed)."""
    libdir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libdir, "*openblas*.so*"))):
        with contextlib.suppress(OSError):
            return ctypes.CDLL(path)
    return None


def blas_threads() -> int | None:
    """Threads NumPy's BLAS uses now (None where that cannot be asked)."""
    lib = _openblas()
    for name in _BLAS_GET if lib is not None else ():
        if hasattr(lib, name):
            return int(getattr(lib, name)())
    return None


def cpu_threads() -> int:
    """Threads per rank for mpipar's own CPU work (blocked elementwise chains)."""
    return _cpu_threads


# glibc's malloc returns freed memory at the top of its heap to the kernel once more than
# M_TRIM_THRESHOLD is free there, and serves blocks above M_MMAP_THRESHOLD with fresh mmaps; a
# training step frees and reallocates its activations every step, so each step page-faulted
# its memory back in: 58,000 minor faults and 0.28 s of kernel time in a 3.0 s shakespeare
# step (B=8, T=256, one thread), none with these settings. Freed memory stays in the process
# up to its peak, as PyTorch's caching allocators keep theirs.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_HOST_HEAP_SETTINGS = ((_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20),
                       (_M_MMAP_THRESHOLD, 32 << 20))   # 32 MiB: glibc's largest on 64 bits


@functools.lru_cache(maxsize=1)
def retain_host_memory() -> bool:
    """Keep memory the process frees for its next allocations instead of returning it to the
    kernel (glibc's ``mallopt``, once per process; ``set_cpu_threads`` calls it). False where
    the C library is not glibc (nothing changed)."""
    with contextlib.suppress(OSError, AttributeError):
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        return all(mallopt(option, value) == 1 for option, value in _HOST_HEAP_SETTINGS)
    return False


def set_cpu_threads(n: int) -> bool:
    """Use ``n`` threads per rank: NumPy's BLAS (set at run time; returns False where the BLAS
    is not OpenBLAS and so cannot be set) and mpipar's blocked elementwise chains (GELU,
    softmax: ``nn.blocking`` reads ``cpu_threads()``). Also keeps freed host memory in the
    process (``retain_host_memory``): every command line that computes calls this first."""
    global _cpu_threads
    if int(n) < 1:
        raise ValueError(f"threads per rank must be at least 1, got {n}")
    _cpu_threads = int(n)
    retain_host_memory()
    return _set_blas_threads(_cpu_threads)


def _set_blas_threads(n: int) -> bool:
    """NumPy's OpenBLAS on ``n`` threads; False where that cannot be set."""
    lib = _openblas()
    for name in _BLAS_SET if lib is not None else ():
        if hasattr(lib, name):
            getattr(lib, name)(int(n))
            return True
    return False


@contextlib.contextmanager
def one_thread_each() -> Iterator[int]:
    """While it lasts, BLAS and the blocked chains run on their calling thread only, for work
    the caller itself splits over threads (``nn.batch_threads``: concurrent calls into a
    multi-threaded OpenBLAS queue for its one thread pool). Yields the threads per rank
    that were set; restores them after."""
    global _cpu_threads
    n = _cpu_threads
    _cpu_threads = 1
    _set_blas_threads(1)
    try:
        yield n
    finally:
        _cpu_threads = n
        _set_blas_threads(n)


def fused(xp: Any, rows: int | None = None, block_rows: int | None = None) -> Any:
    """A context marking a chain of elementwise passes that a GPU runs as one fused kernel
    (as mpipar's GPU path is to, and as Megatron-LM does: fused layer norm, bias-GELU, scaled
    masked softmax, Adam). Nothing changes for NumPy or CuPy; an array module that prices
    kernels (the simulator's symbolic namespace, ``sim/symbolic.py``) prices the chain as
    one, or, for NumPy's run of it, block by block (``rows`` in ``block_rows`` at a time)."""
    region = getattr(xp, "region", None)
    return region(rows, block_rows) if region is not None else contextlib.nullcontext()


# ---- NCCL (comm/nccl.py): the library, the stream, device pointers and this rank's GPU -------
def nccl_module() -> ModuleType:
    """CuPy's NCCL binding (``cupy.cuda.nccl``); RuntimeError saying why where there is none
    (no GPU module, a CuPy built without NCCL, or NCCL's library missing at run time)."""
    cp = _gpu()
    if cp is None:
        raise RuntimeError("NCCL needs CuPy with a visible GPU, and none is available")
    mod = getattr(cp.cuda, "nccl", None)
    if mod is None and cp is _cupy():
        try:
            mod = importlib.import_module("cupy.cuda.nccl")
        except ImportError:
            mod = None
    if mod is None or not getattr(mod, "available", False):
        raise RuntimeError("NCCL is not available: this CuPy has no cupy.cuda.nccl (install "
                           "NCCL for its CUDA version, e.g. pip install nvidia-nccl-cu12)")
    return mod


def current_stream_ptr() -> int:
    """The handle of this thread's current stream (what NCCL queues its kernels on)."""
    return int(cupy_module().cuda.get_current_stream().ptr)


def device_pointer(x: Any) -> int:
    """The device address of a CuPy array's first element (``x.data.ptr``)."""
    return int(x.data.ptr)


def gpu_identity() -> tuple[int, str]:
    """This thread's current GPU: its device ordinal and its PCI bus id (the same physical
    GPU has one bus id whatever ``CUDA_VISIBLE_DEVICES`` numbers it)."""
    dev = cupy_module().cuda.Device()
    bus = getattr(dev, "pci_bus_id", None)     # CuPy's Device has it; a stand-in may not
    return int(dev.id), str(bus) if bus is not None else f"device {int(dev.id)}"


def gpu_name() -> str:
    """The current GPU's name ("NVIDIA H200"), or "" where the GPU module cannot say."""
    cp = cupy_module()
    props = getattr(cp.cuda.runtime, "getDeviceProperties", None)
    if props is None:
        return ""
    name = props(cp.cuda.Device().id).get("name", b"")
    return name.decode() if isinstance(name, bytes) else str(name)
