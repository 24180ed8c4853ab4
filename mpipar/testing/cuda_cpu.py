"""CuPy's user kernels run on the CPU, for the strict CuPy double (``cupy_double.py``).

``ElementwiseKernel(in_params, out_params, operation, name, ...)`` and ``RawKernel(code, name,
...)`` take CuPy's arguments and are called as CuPy's are; the CUDA C++ they were given is
compiled with the machine's C++ compiler (``$CXX``, else ``g++``, ``c++`` or ``clang++``) into a
shared library behind a small shim, and run over the double's arrays through ctypes:

* elementwise: the operation runs in a loop over ``i`` (CuPy's index variable; ``_ind.size()``
  is the element count) with each parameter bound as CuPy binds it: an input is a ``const``
  value, an output a reference into its array, ``raw`` ones are indexable (``x[j]``,
  ``x.size()``), placeholder types (``T``) take the dtype of the array given for them, and
  array arguments broadcast against each other;
* raw: the ``extern "C" __global__`` function is called once per thread of the launch, blocks
  and threads in order, with ``blockIdx``, ``threadIdx``, ``blockDim`` and ``gridDim`` set, so a
  kernel that needs threads to run at once (``__shared__`` memory, ``__syncthreads``, atomics)
  is refused. Arguments are checked against the kernel's declared parameter types (a NumPy
  scalar of the exact type, an array of the pointer's element type), arrays must be C-contiguous
  (a raw kernel indexes memory itself), and the block must have at most 1024 threads, as CUDA's.

``__device__``, ``__forceinline__``, ``__restrict__`` and the CUDA maths functions mpipar's
kernels use (``exp``, ``tanh``, ``sqrt``, ``rsqrt``, ``max``, ``min`` and their ``f`` forms) are
mapped to C++; contraction into fused multiply-adds is off (``-ffp-contract=off``), so a kernel
does NumPy's roundings where it does NumPy's operations. Compiled libraries are kept under
``$MPIPAR_KERNEL_CACHE`` (default: ``mpipar-kernels-<uid>`` in the temporary directory) by a hash
of their source, compiled by one process while the others wait (a file lock), so concurrent
ranks share them. Without a compiler a call
raises ``CompilerMissing``, which the test suite reports as a skip.

Every launch goes through the double's kernel bookkeeping: device checks, the stream hazard
model (each array read; outputs and non-const pointers written) and the ``kernels`` counter,
one per launch.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from typing import Any

import numpy as np

C_TYPES = {"float32": "float", "float64": "double", "int8": "signed char", "int16": "short",
           "int32": "int", "int64": "long long", "uint8": "unsigned char",
           "uint16": "unsigned short", "uint32": "unsigned int", "uint64": "unsigned long long",
           "bool": "bool"}
# C parameter types of raw kernels -> the NumPy dtype an argument must have (LP64)
DTYPE_OF_C = {"float": "float32", "double": "float64", "int": "int32", "long long": "int64",
              "long": "int64", "ptrdiff_t": "int64", "unsigned int": "uint32",
              "unsigned": "uint32", "unsigned long long": "uint64", "unsigned long": "uint64",
              "size_t": "uint64", "short": "int16", "unsigned short": "uint16",
              "signed char": "int8", "char": "int8", "unsigned char": "uint8", "bool": "bool"}

SHIM = r"""
#include <math.h>
#include <stdint.h>
#include <stddef.h>
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __restrict__ __restrict
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __fdividef(float a, float b) { return a / b; }
template <class X> inline X max(X a, X b) { return a > b ? a : b; }
template <class X> inline X min(X a, X b) { return a < b ? a : b; }
struct dim3 { unsigned x, y, z; };
static thread_local dim3 blockIdx, threadIdx, blockDim, gridDim;
struct _Index { ptrdiff_t n; ptrdiff_t size() const { return n; } };
template <class X> struct _Raw {
  X* p; ptrdiff_t n;
  X& operator[](ptrdiff_t k) const { return p[k]; }
  ptrdiff_t size() const { return n; }
};
"""

_REFUSED = ("__shared__", "__syncthreads", "atomic", "__shfl", "cooperative_groups")


class CompilerMissing(RuntimeError):
    """No C++ compiler: the double cannot run kernel source on this machine."""


def compiler() -> str | None:
    """The C++ compiler the double uses, or None."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


FLAGS = ("-O2", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off", "-w")
_libs: dict[str, ctypes.CDLL] = {}
_libs_lock = threading.Lock()


def _cache_dir() -> str:
    return os.environ.get("MPIPAR_KERNEL_CACHE") or os.path.join(
        tempfile.gettempdir(), f"mpipar-kernels-{os.getuid()}")


def build(source: str, what: str) -> ctypes.CDLL:
    """The shared library of ``source`` (compiled once per source, kept on disk)."""
    cxx = compiler()
    if cxx is None:
        raise CompilerMissing(f"the strict CuPy double runs kernel {what!r} on the CPU with a C++ "
                              f"compiler, and none was found ($CXX unset; no g++, c++ or clang++ "
                              f"on PATH)")
    key = hashlib.sha256((cxx + " ".join(FLAGS) + source).encode()).hexdigest()[:24]
    with _libs_lock:
        if key in _libs:
            return _libs[key]
        d = _cache_dir()
        os.makedirs(d, exist_ok=True)
        so = os.path.join(d, f"{key}.so")
        with open(so + ".lock", "w") as lock:     # one process compiles; the others wait
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.exists(so):
                _compile(cxx, source, so, what)
        lib = ctypes.CDLL(so)
        _libs[key] = lib
        return lib


def _compile(cxx: str, source: str, so: str, what: str) -> None:
    """Compile ``source`` into ``so``, atomically (a reader never loads half a file)."""
    fd, tmp_src = tempfile.mkstemp(suffix=".cpp", dir=os.path.dirname(so))
    with os.fdopen(fd, "w") as f:
        f.write(source)
    tmp_so = tmp_src[:-4] + ".so"
    try:
        r = subprocess.run([cxx, *FLAGS, "-o", tmp_so, tmp_src], capture_output=True, text=True,
                           timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"kernel {what!r} does not compile ({cxx}):\n{r.stderr[-4000:]}")
        os.replace(tmp_so, so)
    finally:
        for p in (tmp_src, tmp_so):
            if os.path.exists(p):
                os.unlink(p)


def _parse_params(spec: str) -> list[tuple[bool, str, str]]:
    """CuPy's parameter list (``"T x, raw float32 y"``) -> [(raw, type, name)]."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        words = part.split()
        raw = words[0] == "raw"
        words = words[1:] if raw else words
        if len(words) != 2:
            raise ValueError(f"syntax error in kernel parameter {part!r}")
        out.append((raw, words[0], words[1]))
    return out


def _is_dtype(name: str) -> bool:
    return name in C_TYPES


class ElementwiseKernel:
    """``cupy.ElementwiseKernel`` of the double (see the module docstring)."""

    def __init__(self, double: Any, site: Any, in_params: str, out_params: str, operation: str,
                 name: str = "kernel", reduce_dims: bool = True, preamble: str = "",
                 no_return: bool = False, return_tuple: bool = False, **kwargs: Any) -> None:
        self._d, self._site = double, site
        self.in_params, self.out_params = _parse_params(in_params), _parse_params(out_params)
        self.operation, self.name, self.preamble = operation, name, preamble
        self.no_return, self.return_tuple = no_return, return_tuple
        self.loop_prep, self.after_loop = kwargs.get("loop_prep", ""), kwargs.get("after_loop", "")
        self.nin, self.nout = len(self.in_params), len(self.out_params)
        self.nargs = self.nin + self.nout
        self._built: dict[tuple, Any] = {}

    def __call__(self, *args: Any, size: int | None = None, block_size: int | None = None) -> Any:
        d, site, ndarray = self._d, self._site(), self._d.xp.ndarray
        if len(args) not in (self.nin, self.nargs):
            raise TypeError(f"Wrong number of arguments for {self.name!r}")
        params = self.in_params + self.out_params
        for a in args:
            if isinstance(a, np.ndarray):
                raise TypeError(f"Unsupported type {type(a)}")
        arrays = [a for a in args if isinstance(a, ndarray)]
        d.check_device(arrays)
        # placeholder types from the arrays given for them
        types: dict[str, np.dtype] = {}
        for (raw, t, n), a in zip(params, args):
            if not _is_dtype(t) and isinstance(a, ndarray):
                if types.setdefault(t, a.dtype) != a.dtype:
                    raise TypeError(f"kernel {self.name!r}: type {t} is both {types[t]} and {a.dtype}")
        for raw, t, n in params:
            if not _is_dtype(t) and t not in types:
                raise TypeError(f"kernel {self.name!r}: cannot determine type {t} (no array given for it)")

        for t, dt in types.items():
            if dt.name not in C_TYPES:
                raise TypeError(f"kernel {self.name!r}: the double has no C type for {dt} ({t})")

        def dtype(t: str) -> np.dtype:
            return np.dtype(t) if _is_dtype(t) else types[t]

        for (raw, t, n), a in zip(params, args):
            if isinstance(a, ndarray) and a.dtype != dtype(t):
                raise TypeError(f"kernel {self.name!r}: {n} is {a.dtype}, declared {dtype(t)}")
        # inputs broadcast; given outputs must have that shape (decide it without inputs)
        shaped = [a._a for (raw, t, n), a in zip(self.in_params, args) if isinstance(a, ndarray) and not raw]
        shaped = shaped or [a._a for (raw, t, n), a in zip(self.out_params, args[self.nin:]) if not raw]
        shape = np.broadcast_shapes(*[s.shape for s in shaped]) if shaped else None
        if shape is None:
            if size is None:
                raise ValueError(f"kernel {self.name!r}: loop size is undecided (no array and no size=)")
            shape = (int(size),)
        outs = list(args[self.nin:])
        for raw, t, n in self.out_params[len(outs):]:   # allocated: no launch, no write yet
            outs.append(d.wrap(np.empty(shape, dtype=dtype(t)), [], site))
        for (raw, t, n), o in zip(self.out_params, outs):
            if not raw and o.shape != shape:
                raise ValueError(f"kernel {self.name!r}: output {n} has shape {o.shape}, the "
                                 f"broadcast shape is {shape}")
        values = list(args[:self.nin]) + outs
        for x in values:
            if isinstance(x, ndarray):
                d.check_read(x._buf, site)
        d.count("kernels", site)
        self._run(params, values, shape, dtype)
        for (raw, t, n), o in zip(self.out_params, outs):
            d.write(o._buf, site)
        if self.no_return:
            return None
        if len(outs) == 1 and not self.return_tuple:
            return outs[0]
        return tuple(outs)

    def _run(self, params: list, values: list, shape: tuple, dtype: Any) -> None:
        ndarray = self._d.xp.ndarray
        n = int(np.prod(shape))
        if n == 0:
            return
        ptrs, keep, strides, rawsize = [], [], [], []
        views = []
        for (raw, t, name), v in zip(params, values):
            if isinstance(v, ndarray):
                a = v._a
                if raw:
                    if not a.flags.c_contiguous:
                        raise ValueError(f"kernel {self.name!r}: raw {name} must be C-contiguous")
                    rawsize.append(a.size)
                else:
                    a = np.broadcast_to(a, shape) if a.shape != shape else a
                    views.append(a)
                    rawsize.append(0)
                ptrs.append(a.ctypes.data)
            else:
                c = np.array(v, dtype=dtype(t))           # a scalar, cast to its declared type
                keep.append(c)
                ptrs.append(c.ctypes.data)
                rawsize.append(0)
        if all(a.flags.c_contiguous for a in views):  # one flat loop (CuPy reduces dims too)
            dims = (n,)
            strides = [a.itemsize for a in views]
        else:
            dims = shape
            strides = [s for a in views for s in a.strides]
        is_array = tuple(isinstance(v, ndarray) for v in values)
        key = (tuple(dtype(t).name for raw, t, name in params), is_array)
        fn = self._built.get(key)
        if fn is None:   # one library per argument types and kinds, as CuPy compiles per types
            fn = self._built[key] = build(self._source(params, list(is_array), dtype), self.name)._run
        P = ctypes.c_void_p * len(ptrs)
        L = ctypes.c_longlong
        fn(P(*ptrs), (L * max(1, len(strides)))(*strides), (L * len(dims))(*dims),
           ctypes.c_int(len(dims)), L(n), (L * len(rawsize))(*rawsize))

    def _source(self, params: list, is_array: list[bool], dtype: Any) -> str:
        lines = [SHIM]
        for t in sorted({t for raw, t, n in params if not _is_dtype(t)}):
            lines.append(f"typedef {C_TYPES[dtype(t).name]} {t};")
        lines.append(self.preamble)
        lines.append('extern "C" void _run(void** _ptr, const long long* _strides, '
                     "const long long* _shape, int _ndim, long long _n, const long long* _rawsize) {")
        lines.append("  _Index _ind = {(ptrdiff_t)_n};")
        body, k = [], 0
        for j, (raw, t, name) in enumerate(params):
            ct = C_TYPES[dtype(t).name]
            is_out = j >= self.nin
            if raw:
                lines.append(f"  _Raw<{ct}> {name} = {{({ct}*)_ptr[{j}], (ptrdiff_t)_rawsize[{j}]}};")
            elif is_out or is_array[j]:
                body.append((k, j, ct, name, is_out))
                k += 1
            else:   # a scalar
                lines.append(f"  const {ct} {name} = *(const {ct}*)_ptr[{j}];")
        lines.append(self.loop_prep)
        lines.append("  for (ptrdiff_t i = 0; i < (ptrdiff_t)_n; i++) {")
        lines.append(f"    long long _o[{max(1, k)}] = {{0}};")
        lines.append("    long long _r = i;")
        lines.append("    for (int _d = _ndim - 1; _d >= 0; _d--) {")
        lines.append("      long long _k = _r % _shape[_d]; _r /= _shape[_d];")
        lines.append(f"      for (int _a = 0; _a < {k}; _a++) _o[_a] += _k * _strides[_a * _ndim + _d];")
        lines.append("    }")
        for a, j, ct, name, is_out in body:
            ref = f"*({ct}*)((char*)_ptr[{j}] + _o[{a}])"
            lines.append(f"    {ct}& {name} = {ref};" if is_out else f"    const {ct} {name} = {ref};")
        lines.append("    " + self.operation + ";")
        lines.append("  }")
        lines.append(self.after_loop)
        lines.append("}")
        return "\n".join(lines)


class RawKernel:
    """``cupy.RawKernel`` of the double (see the module docstring)."""

    def __init__(self, double: Any, site: Any, code: str, name: str, options: tuple = (),
                 backend: str = "nvrtc", translate_cucomplex: bool = False, *,
                 enable_cooperative_groups: bool = False, jitify: bool = False) -> None:
        self._site, self._lib = site, None
        self._d, self.code, self.name, self.options = double, code, name, tuple(options)
        self.backend = backend
        kernels = _signatures(code)
        if name not in kernels:
            raise ValueError(f"no __global__ void {name}(...) in the kernel source")
        self.params = kernels[name]

    def __call__(self, grid: tuple, block: tuple, args: tuple, *, shared_mem: int = 0) -> None:
        d, site, ndarray = self._d, self._site(), self._d.xp.ndarray
        for word in _REFUSED if self._lib is None else ():
            if word in self.code:
                raise NotImplementedError(
                    f"raw kernel {self.name!r} uses {word}: the strict CuPy double runs each "
                    f"thread to completion in turn, so threads cannot cooperate")
        g, b = _dims(grid, "grid"), _dims(block, "block")
        if b[0] * b[1] * b[2] > 1024:
            raise ValueError(f"raw kernel {self.name!r}: a block of {b} has more than 1024 threads "
                             f"(CUDA_ERROR_INVALID_VALUE on a GPU)")
        if not isinstance(args, tuple) or len(args) != len(self.params):
            raise TypeError(f"raw kernel {self.name!r} takes {len(self.params)} arguments in a "
                            f"tuple, got {args!r:.80}")
        arrays = [a for a in args if isinstance(a, ndarray)]
        d.check_device(arrays)
        slots, keep = [], []
        for i, ((ctype, ptr, base, const), a) in enumerate(zip(self.params, args)):
            want = DTYPE_OF_C.get(base)
            if want is None:
                raise TypeError(f"raw kernel {self.name!r}: the double has no dtype for "
                                f"parameter type {ctype!r}")
            if ptr:
                if not isinstance(a, ndarray):
                    raise TypeError(f"raw kernel {self.name!r}: argument {i} ({ctype}) must be a "
                                    f"device array, got {type(a).__name__}")
                if a.dtype != np.dtype(want):
                    raise TypeError(f"raw kernel {self.name!r}: argument {i} is {a.dtype}, the "
                                    f"kernel reads it as {ctype}")
                if not a._a.flags.c_contiguous:
                    raise ValueError(f"raw kernel {self.name!r}: argument {i} is not C-contiguous "
                                     f"(the kernel indexes it as dense memory)")
                d.check_read(a._buf, site)
                v = ctypes.c_void_p(a._a.ctypes.data)
            else:
                if not isinstance(a, np.generic) or a.dtype != np.dtype(want):
                    raise TypeError(f"raw kernel {self.name!r}: argument {i} ({ctype}) must be "
                                    f"numpy.{want}, got {type(a).__name__} (a Python number "
                                    f"would not be passed as {ctype})")
                v = np.array(a)
            keep.append(v)
            slots.append(ctypes.addressof(v) if ptr else v.ctypes.data)
        d.count("kernels", site)
        if self._lib is None:
            self._lib = build(self._source(), self.name)
        lib = self._lib
        P = ctypes.c_void_p * max(1, len(slots))
        u = ctypes.c_uint
        getattr(lib, f"_launch_{self.name}")(P(*slots), *(u(x) for x in g), *(u(x) for x in b))
        for (ctype, ptr, base, const), a in zip(self.params, args):
            if ptr and not const:
                d.write(a._buf, site)

    def _source(self) -> str:
        """The code and a launcher ``_launch_<name>`` for each of its kernels: one library per
        source, shared by the RawKernels made from it."""
        parts = [SHIM, self.code]
        for name, params in _signatures(self.code).items():
            call = ", ".join(f"*({ctype}*)_a[{i}]" for i, (ctype, _, _, _) in enumerate(params))
            parts += [
                f'extern "C" void _launch_{name}(void** _a, unsigned gx, unsigned gy, '
                "unsigned gz, unsigned bx, unsigned by, unsigned bz) {",
                "  gridDim = {gx, gy, gz}; blockDim = {bx, by, bz};",
                "  for (unsigned z = 0; z < gz; z++) for (unsigned y = 0; y < gy; y++) "
                "for (unsigned x = 0; x < gx; x++) {",
                "    blockIdx = {x, y, z};",
                "    for (unsigned tz = 0; tz < bz; tz++) for (unsigned ty = 0; ty < by; ty++) "
                "for (unsigned tx = 0; tx < bx; tx++) {",
                "      threadIdx = {tx, ty, tz};",
                f"      {name}({call});",
                "    }",
                "  }",
                "}"]
        return "\n".join(parts)


def _signatures(code: str) -> dict[str, list[tuple[str, bool, str, bool]]]:
    """Each ``__global__ void name(...)`` of ``code``: its parameters as (C type without
    ``__restrict__``, pointer?, base type, const?)."""
    out = {}
    for m in re.finditer(r"__global__\s+void\s+([A-Za-z_]\w*)\s*\(([^)]*)\)", code):
        params = []
        for p in (s.strip() for s in m.group(2).split(",") if s.strip()):
            decl = re.sub(r"\b__restrict__\b", "", p).strip()
            tm = re.match(r"(.*?)([A-Za-z_]\w*)$", decl)
            ctype = tm.group(1).strip() if tm else decl
            base = " ".join(w for w in ctype.replace("*", " ").split() if w != "const")
            params.append((ctype, "*" in ctype, base, ctype.startswith("const")))
        out[m.group(1)] = params
    return out


def _dims(t: Any, what: str) -> tuple[int, int, int]:
    if not isinstance(t, tuple) or not 1 <= len(t) <= 3 or not all(
            isinstance(v, (int, np.integer)) and v >= 1 for v in t):
        raise ValueError(f"{what} must be a tuple of 1 to 3 positive integers, got {t!r}")
    return tuple(int(v) for v in t) + (1,) * (3 - len(t))  # type: ignore[return-value]
