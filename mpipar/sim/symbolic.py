"""Shape-only arrays: an array module like NumPy whose arrays hold no data and whose every
kernel charges a compute model.

The simulator runs the trainer's real code (``nn/``, ``optim/``, ``parallel/``) on thousands
of virtual ranks; only the arithmetic is replaced. ``SymbolicNamespace`` is the ``xp`` it is
given::

    ns = SymbolicNamespace(ComputeModel.from_json(section), charge=lambda kind, s: ...)
    model = GPT(config, dtype="float32", xp=ns)        # parameters: shapes, no numbers
    loss, grads = model.loss_and_grads(idx, targets)   # idx: ns.zeros((B, T), ns.int64)
    ns.seconds["gemm"], ns.gemm_flops, ns.peak_bytes   # what that cost, and its memory

A ``SymbolicArray`` is a shape, a dtype, whether it is C-contiguous and, for a view, the
array that owns its storage (``base``, as NumPy's). Its operations follow NumPy's rules for
shapes (broadcasting, matmul's core dimensions, basic and advanced indexing, reductions;
a mismatch raises NumPy's error) and dtypes (NumPy 2's promotion: a Python scalar takes the
array's dtype), so the code cannot tell, except by looking at numbers: ``float(a)`` and
``a.item()`` of a size-1 array are ``PLACEHOLDER`` (1.0: finite and positive, so a loss can
be logged and a gradient norm computed and compared with the clipping threshold -- with
norms of 1 per tensor the norm exceeds 1 and clipping runs, as it does early in real
training -- while nothing the simulator reports depends on the value). A boolean mask
selects every element (the number of true entries is unknown; the upper bound is charged).

Costs. Each operation that would run a kernel calls ``charge(kind, seconds)`` once, with
the compute model's time for it, ``kind`` one of ``KINDS``: ``gemm`` (a (batched) matmul:
``ComputeModel.gemm_time(m, n, k, batch, dtype)``, FLOPs 2 m n k per matrix), and the
memory-bound ones priced by ``ComputeModel.memory_time(bytes, op)`` with the bytes the
kernel reads plus writes: ``elementwise`` (each array operand's own bytes, broadcast or
not, and the output's), ``transcendental`` (the same, for exp, log, tanh, powers),
``reduction`` (input and output), ``copy`` (astype, copy, assignment, concatenation,
contiguous copies), ``gather`` (advanced indexing: the index and twice the result),
``scatter`` (``add.at`` and assignment through an index: the index, the values and a
read-modify-write of the rows they hit) and ``rng`` (the drawn numbers). Views, reshapes
of contiguous arrays, transposes and shape queries cost nothing. Costs are cached per
(operation, size), since a training step repeats a handful of shapes millions of times.

Memory. Arrays that own storage add their bytes to ``live_bytes`` when made and subtract
them when garbage-collected (CPython frees at the last reference, as NumPy's arrays are);
``peak_bytes`` is the most held at once since the last ``reset_peak()``. Views hold their
``base``, so storage lives as long as any view of it, as in NumPy.

``nn/blocking.py`` cuts elementwise chains into cache-sized blocks only for NumPy (``xp is
np``); this namespace is not NumPy, so each chain runs as whole-array kernels, one per pass,
as on CuPy.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np

from mpipar.sim.compute import ComputeModel

PLACEHOLDER = 1.0          # float() / item() of any size-1 symbolic array (see the module doc)

KINDS = ("gemm", "elementwise", "transcendental", "reduction", "copy", "gather", "scatter", "rng")


# ---- dtypes ------------------------------------------------------------------------------------

class ShapeOnlyDType:
    """A dtype NumPy lacks, for arrays that hold no data: a name and an item size.

    ``numpy.dtype()`` of it is ``like`` (its ``dtype`` attribute), a NumPy dtype of the same
    size and kind, so code below the namespace that asks NumPy about it (the Communicator's
    dtype check, the simulated transport's placeholder buffers) sees a float of the right
    width, which is all it needs of it."""

    kind = "f"
    type = float              # ``dtype.type(x)``: a Python float, a weak scalar

    def __init__(self, name: str, itemsize: int, like: Any) -> None:
        self.name, self.itemsize, self.dtype = name, int(itemsize), np.dtype(like)

    def __eq__(self, other: object) -> bool:
        return other is self or other == self.name or (
            isinstance(other, ShapeOnlyDType) and other.name == self.name)

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"dtype({self.name!r})"

    def __str__(self) -> str:
        return self.name


try:                                   # a real NumPy dtype where ml_dtypes is installed
    import ml_dtypes                   # noqa: PLC0415  (optional dependency)

    BFLOAT16: Any = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    BFLOAT16 = ShapeOnlyDType("bfloat16", 2, np.float16)

_DTYPES: dict[Any, Any] = {}


def as_dtype(d: Any) -> Any:
    """The dtype object for ``d`` (a NumPy dtype, type or name; ``bfloat16``; None: float64)."""
    try:
        return _DTYPES[d]
    except (KeyError, TypeError):
        pass
    if d is None:
        dt = np.dtype(np.float64)
    elif d is BFLOAT16 or (isinstance(d, str) and d == "bfloat16") or (
            isinstance(d, ShapeOnlyDType) and d.name == "bfloat16"):
        dt = BFLOAT16
    elif isinstance(d, ShapeOnlyDType):
        dt = d
    else:
        dt = np.dtype(d)
    try:
        _DTYPES[d] = dt
    except TypeError:
        pass
    return dt


_PROMOTE: dict[tuple[Any, Any], Any] = {}


def _promote_new(a: Any, b: Any) -> Any:
    if isinstance(b, type) and not isinstance(a, type):      # b a Python scalar: weak
        a, b = b, a
    if isinstance(a, type):                                  # a weak, b a dtype (or weak)
        if isinstance(b, type):
            return np.result_type(a(0), b(0))
        if isinstance(b, ShapeOnlyDType):
            if a is complex:
                raise TypeError(f"no complex {b.name}")
            return b
        return np.result_type(b, a(0))
    if isinstance(a, ShapeOnlyDType) or isinstance(b, ShapeOnlyDType):
        if a == b:
            return a
        s, o = (a, b) if isinstance(a, ShapeOnlyDType) else (b, a)
        if o.kind in "biu":
            return s
        if o.kind == "f" and o.itemsize <= s.itemsize:       # float16 with bfloat16
            return np.dtype(np.float32)
        return np.result_type(np.float32, o)
    return np.result_type(a, b)


def result_dtype(a: Any, b: Any) -> Any:
    """NumPy 2's promotion of two dtypes, or a dtype and a Python scalar type (weak)."""
    key = (a, b)
    r = _PROMOTE.get(key)
    if r is None:
        r = _PROMOTE[key] = _promote_new(a, b)
    return r


# ---- shapes ------------------------------------------------------------------------------------

def _fmt(shape: tuple) -> str:
    """A shape as NumPy prints it in errors: ``(2,3)``, ``(4,)``."""
    return "(" + ",".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


_BCAST: dict[tuple, tuple] = {}


def broadcast_shapes(a: tuple, b: tuple) -> tuple:
    """NumPy's broadcast of two shapes; ValueError with NumPy's message on a mismatch."""
    if a == b:
        return a
    key = (a, b)
    r = _BCAST.get(key)
    if r is not None:
        return r
    n = max(len(a), len(b))
    pa, pb = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(pa, pb):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise ValueError(f"operands could not be broadcast together with shapes "
                             f"{_fmt(a)} {_fmt(b)} ")
    r = _BCAST[key] = tuple(out)
    return r


def _fits(value: tuple, target: tuple) -> bool:
    """Whether an array of shape ``value`` broadcasts to ``target`` (assignment's rule)."""
    try:
        return broadcast_shapes(value, target) == target
    except ValueError:
        return False


def _norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise np.exceptions.AxisError(axis, ndim)
    return axis % ndim


def _contiguous_after_transpose(shape: tuple, axes: tuple) -> bool:
    """Whether a C-contiguous array stays C-contiguous under ``transpose(axes)``: the
    axes longer than one keep their order."""
    big = [a for a in axes if shape[a] != 1]
    return big == sorted(big)


class _Flags:
    __slots__ = ("c_contiguous",)

    def __init__(self, c: bool) -> None:
        self.c_contiguous = c

    @property
    def contiguous(self) -> bool:
        return self.c_contiguous


# ---- the array ---------------------------------------------------------------------------------

class SymbolicArray:
    """A shape, a dtype and whose storage: NumPy's array interface without the numbers.

    Made by a ``SymbolicNamespace`` (``ns.empty``, ``ns.asarray`` ...), never directly."""

    __slots__ = ("shape", "dtype", "size", "nbytes", "base", "_ns", "_contig")
    __array_ufunc__ = None         # NumPy operands defer to our reflected operators
    __hash__ = None                # type: ignore[assignment]  (elementwise ==, as NumPy)

    def __init__(self, ns: "SymbolicNamespace", shape: tuple, dtype: Any,
                 base: "SymbolicArray | None" = None, contig: bool = True) -> None:
        self.shape, self.dtype, self._ns, self._contig = shape, dtype, ns, contig
        self.size = size = math.prod(shape)
        self.nbytes = nbytes = size * dtype.itemsize
        self.base = base
        if base is None:
            live = ns.live_bytes = ns.live_bytes + nbytes
            if live > ns.peak_bytes:
                ns.peak_bytes = live

    def __del__(self) -> None:
        if self.base is None:
            self._ns.live_bytes -= self.nbytes

    # -- what it is -------------------------------------------------------------------------
    def __array_namespace__(self, api_version: str | None = None) -> "SymbolicNamespace":
        return self._ns

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def flags(self) -> _Flags:
        return _Flags(self._contig)

    @property
    def T(self) -> "SymbolicArray":
        return self.transpose()

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __repr__(self) -> str:
        view = "" if self.base is None else ", view"
        return f"SymbolicArray(shape={self.shape}, dtype={self.dtype}{view})"

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"a SymbolicArray {self.shape} holds no data: it cannot become a "
                        f"NumPy array (to_host, np.asarray) in a simulated run")

    # -- numbers: the placeholder -------------------------------------------------------------
    def _scalar(self) -> float:
        if self.size != 1:
            raise TypeError(f"only size-1 arrays can be converted to Python scalars, "
                            f"this one has shape {self.shape}")
        return PLACEHOLDER

    def __float__(self) -> float:
        return self._scalar()

    def __int__(self) -> int:
        return int(self._scalar())

    def item(self) -> float:
        return self._scalar()

    def __bool__(self) -> bool:
        if self.size != 1:
            raise ValueError("The truth value of an array with more than one element is "
                             "ambiguous. Use a.any() or a.all()")
        return bool(PLACEHOLDER)

    # -- views and copies -----------------------------------------------------------------
    def _owner(self) -> "SymbolicArray":
        return self if self.base is None else self.base

    def reshape(self, *shape: Any, order: str = "C") -> "SymbolicArray":
        if len(shape) == 1 and not isinstance(shape[0], int):
            shape = tuple(shape[0])
        shape = tuple(int(s) for s in shape)
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            if shape.count(-1) > 1 or known == 0 or self.size % known:
                raise ValueError(f"cannot reshape array of size {self.size} into shape "
                                 f"{_fmt(shape)}")
            shape = tuple(self.size // known if s == -1 else s for s in shape)
        elif math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape array of size {self.size} into shape {_fmt(shape)}")
        if shape == self.shape:
            return SymbolicArray(self._ns, shape, self.dtype, self._owner(), self._contig)
        if self._contig:
            return SymbolicArray(self._ns, shape, self.dtype, self._owner(), True)
        out = self._ns._copy_of(self)          # NumPy copies what it cannot view
        return SymbolicArray(self._ns, shape, self.dtype, out, True)

    def ravel(self) -> "SymbolicArray":
        return self.reshape(-1)

    def transpose(self, *axes: Any) -> "SymbolicArray":
        nd = len(self.shape)
        if not axes or axes == (None,):
            axes = tuple(range(nd - 1, -1, -1))
        elif len(axes) == 1 and not isinstance(axes[0], int):
            axes = tuple(axes[0])
        if len(axes) != nd:
            raise ValueError("axes don't match array")
        axes = tuple(_norm_axis(a, nd) for a in axes)
        if sorted(axes) != list(range(nd)):
            raise ValueError("repeated axis in transpose")
        shape = tuple(self.shape[a] for a in axes)
        contig = self._contig and _contiguous_after_transpose(self.shape, axes)
        return SymbolicArray(self._ns, shape, self.dtype, self._owner(), contig)

    def view(self, dtype: Any = None) -> "SymbolicArray":
        if dtype is None:
            return SymbolicArray(self._ns, self.shape, self.dtype, self._owner(), self._contig)
        dt = as_dtype(dtype)
        shape = self.shape
        if dt.itemsize != self.dtype.itemsize:
            if not shape or not self._contig or (shape[-1] * self.dtype.itemsize) % dt.itemsize:
                raise ValueError(f"cannot view {self.dtype} array of shape {self.shape} as {dt}")
            shape = shape[:-1] + (shape[-1] * self.dtype.itemsize // dt.itemsize,)
        return SymbolicArray(self._ns, shape, dt, self._owner(), self._contig)

    def copy(self, order: str = "C") -> "SymbolicArray":
        return self._ns._copy_of(self)

    def astype(self, dtype: Any, copy: bool = True, **kwargs: Any) -> "SymbolicArray":
        dt = as_dtype(dtype)
        if dt == self.dtype and not copy:
            return self
        return self._ns._copy_of(self, dt)

    def fill(self, value: Any) -> None:
        self._ns._kernel("elementwise", "fill", self.nbytes)

    # -- indexing -----------------------------------------------------------------------------
    def __getitem__(self, key: Any) -> "SymbolicArray":
        shape, contig, advanced, index_bytes = _index(self, key)
        if advanced:
            out = SymbolicArray(self._ns, shape, self.dtype)
            self._ns._kernel("gather", "gather", index_bytes + 2 * out.nbytes)
            return out
        return SymbolicArray(self._ns, shape, self.dtype, self._owner(), contig)

    def __setitem__(self, key: Any, value: Any) -> None:
        shape, _, advanced, index_bytes = _index(self, key)
        vshape, _, vbytes = _operand(value)
        if vshape != shape and not _fits(vshape, shape):
            raise ValueError(f"could not broadcast input array from shape {_fmt(vshape)} "
                             f"into shape {_fmt(shape)}")
        nbytes = math.prod(shape) * self.dtype.itemsize
        if advanced:
            self._ns._kernel("scatter", "scatter", index_bytes + vbytes + 2 * nbytes)
        elif vbytes:
            self._ns._kernel("copy", "copy", vbytes + nbytes)
        else:
            self._ns._kernel("elementwise", "fill", nbytes)

    # -- reductions ---------------------------------------------------------------------------
    def sum(self, axis: Any = None, dtype: Any = None, out: Any = None,
            keepdims: bool = False) -> "SymbolicArray":
        return self._ns._reduce(self, axis, dtype, out, keepdims, "sum")

    def mean(self, axis: Any = None, dtype: Any = None, out: Any = None,
             keepdims: bool = False) -> "SymbolicArray":
        return self._ns._reduce(self, axis, dtype, out, keepdims, "mean")

    def max(self, axis: Any = None, out: Any = None, keepdims: bool = False) -> "SymbolicArray":
        return self._ns._reduce(self, axis, None, out, keepdims, "max")

    def min(self, axis: Any = None, out: Any = None, keepdims: bool = False) -> "SymbolicArray":
        return self._ns._reduce(self, axis, None, out, keepdims, "min")

    def argmax(self, axis: Any = None, out: Any = None, keepdims: bool = False) -> "SymbolicArray":
        return self._ns._reduce(self, axis, np.int64, out, keepdims, "argmax")

    def nonzero(self) -> tuple["SymbolicArray", ...]:
        return self._ns.nonzero(self)

    # -- operators ----------------------------------------------------------------------------
    def __add__(self, o: Any) -> Any:
        return self._ns._binary("add", self, o, None)

    def __radd__(self, o: Any) -> Any:
        return self._ns._binary("add", o, self, None)

    def __iadd__(self, o: Any) -> Any:
        return self._ns._binary("add", self, o, self)

    def __sub__(self, o: Any) -> Any:
        return self._ns._binary("subtract", self, o, None)

    def __rsub__(self, o: Any) -> Any:
        return self._ns._binary("subtract", o, self, None)

    def __isub__(self, o: Any) -> Any:
        return self._ns._binary("subtract", self, o, self)

    def __mul__(self, o: Any) -> Any:
        return self._ns._binary("multiply", self, o, None)

    def __rmul__(self, o: Any) -> Any:
        return self._ns._binary("multiply", o, self, None)

    def __imul__(self, o: Any) -> Any:
        return self._ns._binary("multiply", self, o, self)

    def __truediv__(self, o: Any) -> Any:
        return self._ns._binary("divide", self, o, None)

    def __rtruediv__(self, o: Any) -> Any:
        return self._ns._binary("divide", o, self, None)

    def __itruediv__(self, o: Any) -> Any:
        return self._ns._binary("divide", self, o, self)

    def __floordiv__(self, o: Any) -> Any:
        return self._ns._binary("floor_divide", self, o, None)

    def __ifloordiv__(self, o: Any) -> Any:
        return self._ns._binary("floor_divide", self, o, self)

    def __pow__(self, o: Any) -> Any:
        return self._ns.power(self, o)

    def __rpow__(self, o: Any) -> Any:
        return self._ns.power(o, self)

    def __neg__(self) -> Any:
        return self._ns._unary("negative", self, None)

    def __pos__(self) -> Any:
        return self

    def __abs__(self) -> Any:
        return self._ns._unary("absolute", self, None)

    def __invert__(self) -> Any:
        return self._ns._unary("invert", self, None)

    def __and__(self, o: Any) -> Any:
        return self._ns._binary("logical_and", self, o, None)

    def __rand__(self, o: Any) -> Any:
        return self._ns._binary("logical_and", o, self, None)

    def __or__(self, o: Any) -> Any:
        return self._ns._binary("logical_or", self, o, None)

    def __ror__(self, o: Any) -> Any:
        return self._ns._binary("logical_or", o, self, None)

    def __lt__(self, o: Any) -> Any:
        return self._ns._binary("less", self, o, None)

    def __le__(self, o: Any) -> Any:
        return self._ns._binary("less_equal", self, o, None)

    def __gt__(self, o: Any) -> Any:
        return self._ns._binary("greater", self, o, None)

    def __ge__(self, o: Any) -> Any:
        return self._ns._binary("greater_equal", self, o, None)

    def __eq__(self, o: Any) -> Any:  # type: ignore[override]
        return self._ns._binary("equal", self, o, None)

    def __ne__(self, o: Any) -> Any:  # type: ignore[override]
        return self._ns._binary("not_equal", self, o, None)

    def __matmul__(self, o: Any) -> Any:
        return self._ns.matmul(self, o)

    def __rmatmul__(self, o: Any) -> Any:
        return self._ns.matmul(o, self)


def _basic_index(k: Any, n: int, dim: int) -> tuple[int, int] | None:
    """A slice or integer index of axis ``dim`` (length ``n``): (length kept, step) for a
    slice, None for an integer (the axis goes); NumPy's IndexError for anything else or an
    integer out of bounds."""
    if isinstance(k, slice):
        start, stop, step = k.indices(n)
        return len(range(start, stop, step)), step
    if isinstance(k, (int, np.integer)):
        if not -n <= int(k) < n:
            raise IndexError(f"index {int(k)} is out of bounds for axis {dim} with size {n}")
        return None
    raise IndexError("only integers, slices (`:`), ellipsis (`...`), numpy.newaxis "
                     "(`None`) and integer or boolean arrays are valid indices")


def _result_of(op: str, dt: Any) -> Any:
    """The dtype of ``op``'s result from its operands' dtype ``dt`` (a Python scalar type
    takes NumPy's default for it; float-valued operations on integers give float64)."""
    if isinstance(dt, type):
        dt = np.result_type(dt(0))
    if op in _FLOAT_RESULT and dt.kind in "biu":
        dt = np.dtype(np.float64)
    return dt


def _check_out(shape: tuple, out: Any) -> None:
    """NumPy's error for an ``out=`` array the result of ``shape`` does not broadcast to."""
    if out.shape != shape and broadcast_shapes(shape, out.shape) != out.shape:
        raise ValueError(f"non-broadcastable output operand with shape {_fmt(out.shape)} "
                         f"doesn't match the broadcast shape {_fmt(broadcast_shapes(shape, out.shape))}")


def _operand(x: Any) -> tuple[tuple, Any, int]:
    """(shape, dtype or Python scalar type, bytes a kernel reads) of an operand."""
    if type(x) is SymbolicArray:
        return x.shape, x.dtype, x.nbytes
    if isinstance(x, bool):
        return (), bool, 0
    if isinstance(x, int):
        return (), int, 0
    if isinstance(x, float):
        return (), float, 0
    if isinstance(x, np.generic):
        return (), x.dtype, 0
    if isinstance(x, np.ndarray):
        return x.shape, x.dtype, x.nbytes
    if isinstance(x, SymbolicArray):
        return x.shape, x.dtype, x.nbytes
    raise TypeError(f"unsupported operand {type(x).__name__} for a symbolic array")


def _is_index_array(k: Any) -> bool:
    return isinstance(k, (SymbolicArray, np.ndarray, list))


def _index(a: SymbolicArray, key: Any) -> tuple[tuple, bool, bool, int]:
    """NumPy's result of ``a[key]``: (shape, C-contiguous, advanced (a copy), index bytes)."""
    if not isinstance(key, tuple):
        key = (key,)
    try:                               # basic indexes repeat: cached by shape and key
        hkey = (a.shape, a._contig) + tuple(
            (k.start, k.stop, k.step) if type(k) is slice else k for k in key)
        hit = _BASIC.get(hkey)
    except TypeError:                  # an index array (unhashable)
        hkey = hit = None
    if hit is not None:
        return hit
    if any(_is_index_array(k) for k in key):
        return _advanced(a, key)
    r = _basic(a, key)
    if hkey is not None:
        _BASIC[hkey] = r
    return r


_BASIC: dict[tuple, tuple] = {}


def _basic(a: SymbolicArray, key: tuple) -> tuple[tuple, bool, bool, int]:
    shape = a.shape
    n_real = sum(1 for k in key if k is not None and k is not Ellipsis)
    if n_real > len(shape):
        raise IndexError(f"too many indices for array: array is {len(shape)}-dimensional, "
                         f"but {n_real} were indexed")
    i = next((j for j, k in enumerate(key) if k is Ellipsis), None)
    if i is not None:
        key = key[:i] + (slice(None),) * (len(shape) - n_real) + key[i + 1:]
    else:
        key = key + (slice(None),) * (len(shape) - n_real)
    out: list[int] = []
    strides: list[int] = []        # in elements, of the C-contiguous source (contiguity test)
    src = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        src[i] = src[i + 1] * shape[i + 1]
    dim = 0
    for k in key:
        if k is None:
            out.append(1)
            strides.append(0)
            continue
        kept = _basic_index(k, shape[dim], dim)
        if kept is not None:
            out.append(kept[0])
            strides.append(src[dim] * kept[1])
        dim += 1
    contig = a._contig
    if contig:                     # C order: each kept dimension (> 1 long) strides by the
        want = 1                   # product of the lengths after it
        for n, st in zip(reversed(out), reversed(strides)):
            if n > 1:
                if st != want:
                    contig = False
                    break
                want *= n
    elif math.prod(out) <= 1:
        contig = True
    return tuple(out), contig, False, 0


def _advanced(a: SymbolicArray, key: tuple) -> tuple[tuple, bool, bool, int]:
    """Advanced indexing (integer or boolean arrays among the indices), NumPy's rules: the
    index arrays broadcast together; their shape replaces the indexed dimensions where
    they are adjacent, else it goes first. A boolean array of d dimensions indexes d
    dimensions with one index of its size (every element assumed selected)."""
    shape = a.shape
    index_bytes = 0
    dim = 0
    expanded: list[Any] = []
    n_real = 0
    for k in key:
        if k is None or k is Ellipsis:
            continue
        if isinstance(k, (SymbolicArray, np.ndarray)) and k.dtype == np.bool_:
            n_real += k.ndim
        elif isinstance(k, list):
            n_real += np.asarray(k).ndim if np.asarray(k).dtype == np.bool_ else 1
        else:
            n_real += 1
    if n_real > len(shape):
        raise IndexError(f"too many indices for array: array is {len(shape)}-dimensional, "
                         f"but {n_real} were indexed")
    for k in key:
        if k is Ellipsis:
            expanded += [slice(None)] * (len(shape) - n_real)
        else:
            expanded.append(k)
    if not any(k is Ellipsis for k in key):
        expanded += [slice(None)] * (len(shape) - n_real)
    adv_shape: tuple = ()
    adv_pos: list[int] = []
    out_basic: list[tuple[int, int]] = []      # (position in expanded, length)
    for pos, k in enumerate(expanded):
        if k is None:
            out_basic.append((pos, 1))
            continue
        if isinstance(k, list):
            k = np.asarray(k)
        if isinstance(k, (SymbolicArray, np.ndarray)):
            if k.dtype == np.bool_:
                if tuple(k.shape) != tuple(shape[dim:dim + k.ndim]):
                    raise IndexError(f"boolean index did not match indexed array along axis "
                                     f"{dim}; size of axis is {shape[dim]} but size of "
                                     f"corresponding boolean axis is {k.shape[0]}")
                ishape: tuple = (k.size,)
                dim += k.ndim
            else:
                if k.dtype.kind not in "iu":
                    raise IndexError("arrays used as indices must be of integer (or boolean) type")
                ishape = tuple(k.shape)
                dim += 1
            index_bytes += int(k.nbytes)
            try:
                adv_shape = broadcast_shapes(adv_shape, ishape)
            except ValueError:
                raise IndexError(f"shape mismatch: indexing arrays could not be broadcast "
                                 f"together with shapes {_fmt(adv_shape)} {_fmt(ishape)} ") from None
            adv_pos.append(pos)
            continue
        kept = _basic_index(k, shape[dim], dim)
        if kept is not None:
            out_basic.append((pos, kept[0]))
        dim += 1
    # integers count as advanced indices when arrays are present (NumPy): their positions
    # join the advanced group for the adjacency rule
    int_pos = [p for p, k in enumerate(expanded) if isinstance(k, (int, np.integer))
               and not isinstance(k, bool)]
    group = sorted(adv_pos + int_pos)
    adjacent = group == list(range(group[0], group[-1] + 1))
    out: list[int] = []
    if adjacent:
        placed = False
        for pos, n in out_basic:
            if pos > group[0] and not placed:
                out += list(adv_shape)
                placed = True
            out.append(n)
        if not placed:
            out += list(adv_shape)
    else:
        out = list(adv_shape) + [n for _, n in out_basic]
    return tuple(out), True, True, index_bytes


# ---- the namespace -------------------------------------------------------------------------------

_ELEMENTWISE = {                     # op -> the kind it is charged as (priced as the op)
    "add": "elementwise", "subtract": "elementwise", "multiply": "elementwise",
    "divide": "elementwise", "floor_divide": "elementwise", "maximum": "elementwise",
    "minimum": "elementwise", "negative": "elementwise", "absolute": "elementwise",
    "sqrt": "elementwise", "square": "elementwise", "invert": "elementwise",
    "less": "elementwise", "less_equal": "elementwise", "greater": "elementwise",
    "greater_equal": "elementwise", "equal": "elementwise", "not_equal": "elementwise",
    "logical_and": "elementwise", "logical_or": "elementwise", "where": "elementwise",
    "exp": "transcendental", "log": "transcendental", "tanh": "transcendental",
    "power": "transcendental",
}
_BOOL_RESULT = frozenset(("less", "less_equal", "greater", "greater_equal", "equal",
                          "not_equal", "logical_and", "logical_or"))
_FLOAT_RESULT = frozenset(("divide", "exp", "log", "tanh", "sqrt"))   # ints become float64


class _UFunc:
    """``ns.add(a, b, out=...)`` and ``ns.add.at(a, index, b)``, as NumPy's ufuncs."""

    __slots__ = ("ns", "name", "nin")

    def __init__(self, ns: "SymbolicNamespace", name: str, nin: int) -> None:
        self.ns, self.name, self.nin = ns, name, nin

    def __call__(self, *args: Any, out: Any = None, dtype: Any = None, **kwargs: Any) -> Any:
        if len(args) == self.nin + 1 and out is None:
            args, out = args[:-1], args[-1]
        if len(args) != self.nin:
            raise TypeError(f"{self.name} takes {self.nin} operands, got {len(args)}")
        if isinstance(out, tuple):
            (out,) = out
        if self.nin == 1:
            return self.ns._unary(self.name, args[0], out)
        return self.ns._binary(self.name, args[0], args[1], out)

    def at(self, a: SymbolicArray, indices: Any, b: Any = None) -> None:
        """Unbuffered in-place ``a[indices] op= b`` (repeated indices accumulate)."""
        shape, _, _, index_bytes = _index(a, indices if isinstance(indices, tuple) else (indices,))
        if self.nin == 2:
            vshape, _, vbytes = _operand(b)
            if vshape != shape and not _fits(vshape, shape):
                raise ValueError("array is not broadcastable to correct shape")
        else:
            vbytes = 0
        nbytes = math.prod(shape) * a.dtype.itemsize
        self.ns._kernel("scatter", "scatter", index_bytes + vbytes + 2 * nbytes)

    def __repr__(self) -> str:
        return f"<symbolic ufunc {self.name!r}>"


class _Generator:
    """``ns.random.default_rng(seed)``: draws cost their bytes; there are no numbers."""

    def __init__(self, ns: "SymbolicNamespace") -> None:
        self.ns = ns

    def _draw(self, size: Any, dtype: Any) -> SymbolicArray:
        shape = () if size is None else (int(size),) if isinstance(size, (int, np.integer)) \
            else tuple(int(s) for s in size)
        out = SymbolicArray(self.ns, shape, as_dtype(dtype))
        self.ns._kernel("rng", "rng", out.nbytes)
        return out

    def random(self, size: Any = None, dtype: Any = np.float64, out: Any = None) -> SymbolicArray:
        return self._draw(size, dtype)

    def standard_normal(self, size: Any = None, dtype: Any = np.float64,
                        out: Any = None) -> SymbolicArray:
        return self._draw(size, dtype)

    def integers(self, low: int, high: int | None = None, size: Any = None,
                 dtype: Any = np.int64, endpoint: bool = False) -> SymbolicArray:
        return self._draw(size, dtype)


class _Region:
    """The kernels of one fusion region (``SymbolicNamespace.region``), priced on exit."""

    __slots__ = ("ns", "rows", "block_rows", "mode", "touched", "passes", "outer")

    def __init__(self, ns: "SymbolicNamespace", rows: int | None, block_rows: int | None) -> None:
        self.ns, self.rows, self.block_rows = ns, rows, block_rows
        self.mode = getattr(ns.cost, "fusion", "none")   # a cost model may not say: unfused
        self.touched: dict[int, tuple[Any, int]] = {}   # storage id -> (array, bytes)
        self.passes: list[tuple[str, str, int]] = []
        self.outer: _Region | None = None

    def take(self, kind: str, op: str, nbytes: int, operands: tuple) -> bool:
        """Keep a kernel for pricing at the region's end (False: price it now)."""
        if self.mode == "none" or (self.mode == "blocked" and not self.block_rows):
            return False
        if self.mode == "blocked":
            self.passes.append((kind, op, nbytes))
            return True
        for a in operands:
            if type(a) is SymbolicArray:
                owner = a.base if a.base is not None else a
                prev = self.touched.get(id(owner))
                if prev is None or prev[1] < a.nbytes:
                    self.touched[id(owner)] = (owner, a.nbytes)
        return True

    def __enter__(self) -> "_Region":
        self.outer, self.ns._region = self.ns._region, self if self.ns._region is None else self.ns._region
        return self

    def __exit__(self, *exc: Any) -> None:
        ns = self.ns
        ns._region = self.outer
        if self.outer is not None or exc[0] is not None:
            return                                    # nested: the outer region prices it all
        if self.touched:
            ns._kernel("elementwise", "elementwise", sum(b for _, b in self.touched.values()))
        if self.passes:
            # the first pass streams the arrays from memory (priced at their whole size); the
            # later ones find each block in cache (priced at the block's size)
            blocks = -(-self.rows // self.block_rows) if self.rows else 1
            kind, op, nbytes = self.passes[0]
            ns._kernel(kind, op, nbytes)
            for kind, op, nbytes in self.passes[1:]:
                block = max(nbytes // blocks, 1)
                key = (op, block)
                t = ns._mem_cache.get(key)
                if t is None:
                    t = ns._mem_cache[key] = ns.cost.memory_time(block, op)
                ns.kernels[kind] += blocks
                ns.seconds[kind] += t * blocks
                ns.bytes_moved += nbytes
                ns.charge(kind, t * blocks)


class SymbolicNamespace:
    """An array module (``xp``) of shape-only arrays whose kernels charge ``cost``.

    ``charge(kind, seconds)`` is called once per kernel (``KINDS``); the namespace also
    counts per kind ``kernels`` and ``seconds``, the GEMM FLOPs (``gemm_flops``), the bytes
    memory-bound kernels moved (``bytes_moved``), and the storage held (``live_bytes``,
    ``peak_bytes``, ``reset_peak()``)."""

    ndarray = SymbolicArray
    newaxis = None
    inf, pi, e, nan = math.inf, math.pi, math.e, math.nan
    bool_ = np.bool_
    int8, int32, int64, uint8 = np.int8, np.int32, np.int64, np.uint8
    float16, float32, float64 = np.float16, np.float32, np.float64
    bfloat16 = BFLOAT16
    integer, floating = np.integer, np.floating

    def __init__(self, cost: ComputeModel, charge: Callable[[str, float], None] | None = None) -> None:
        self.cost = cost
        self.charge = charge if charge is not None else (lambda kind, seconds: None)
        self.live_bytes = 0
        self.peak_bytes = 0
        self.kernels = dict.fromkeys(KINDS, 0)
        self.seconds = dict.fromkeys(KINDS, 0.0)
        self.gemm_flops = 0
        self.bytes_moved = 0
        self._gemm_cache: dict[tuple, float] = {}
        self._mem_cache: dict[tuple, float] = {}
        self._region: _Region | None = None
        self.random = SimpleNamespace(default_rng=lambda seed=None: _Generator(self))
        for name, nin in (("add", 2), ("subtract", 2), ("multiply", 2), ("divide", 2),
                          ("floor_divide", 2), ("maximum", 2), ("minimum", 2),
                          ("less", 2), ("less_equal", 2), ("greater", 2), ("greater_equal", 2),
                          ("equal", 2), ("not_equal", 2), ("logical_and", 2), ("logical_or", 2),
                          ("exp", 1), ("log", 1), ("tanh", 1), ("sqrt", 1), ("square", 1),
                          ("negative", 1), ("absolute", 1)):
            setattr(self, name, _UFunc(self, name, nin))
        self.true_divide = self.divide
        self.abs = self.absolute

    def __repr__(self) -> str:
        return f"SymbolicNamespace({self.cost!r})"

    # -- accounting ---------------------------------------------------------------------------
    def reset_peak(self) -> None:
        """Start a new peak from what is held now."""
        self.peak_bytes = self.live_bytes

    def reset_counts(self) -> None:
        """Zero the per-kind kernel counts and seconds, the FLOPs and the bytes moved."""
        self.kernels = dict.fromkeys(KINDS, 0)
        self.seconds = dict.fromkeys(KINDS, 0.0)
        self.gemm_flops = self.bytes_moved = 0

    def region(self, rows: int | None = None, block_rows: int | None = None) -> "_Region":
        """A fusion region (``nn/blocking.py``: ``fused`` and ``for_each_block``): the
        memory-bound kernels inside it are priced as the compute model's ``fusion`` says:
        ``"fused"`` (a GPU, as mpipar's GPU path and Megatron run such chains): one kernel
        that reads and writes each array it touches once; ``"blocked"`` (NumPy on a CPU):
        every pass still runs, but over blocks of ``block_rows`` of the ``rows`` rows at a
        time, each block priced at its own (cache-resident) size; ``"none"``: every pass
        over the whole array, as outside a region."""
        return _Region(self, rows, block_rows)

    def _kernel(self, kind: str, op: str, nbytes: int, operands: tuple = ()) -> None:
        """Charge one memory-bound kernel moving ``nbytes``, priced as ``op``; inside a
        region (``region``), ``operands`` are the arrays it reads and writes."""
        reg = self._region
        if reg is not None and operands and reg.take(kind, op, nbytes, operands):
            return
        key = (op, nbytes)
        t = self._mem_cache.get(key)
        if t is None:
            t = self._mem_cache[key] = self.cost.memory_time(nbytes, op)
        self.kernels[kind] += 1
        self.seconds[kind] += t
        self.bytes_moved += nbytes
        self.charge(kind, t)

    def _gemm(self, m: int, n: int, k: int, batch: int, dtype: Any) -> None:
        key = (m, n, k, batch, dtype)
        t = self._gemm_cache.get(key)
        if t is None:
            t = self._gemm_cache[key] = self.cost.gemm_time(m, n, k, batch, str(dtype))
        self.kernels["gemm"] += 1
        self.seconds["gemm"] += t
        self.gemm_flops += 2 * m * n * k * batch
        self.charge("gemm", t)

    # -- kernels --------------------------------------------------------------------------------
    def _binary(self, op: str, a: Any, b: Any, out: Any) -> SymbolicArray:
        sa, da, na = _operand(a)
        sb, db, nb = _operand(b)
        shape = sa if sa == sb else broadcast_shapes(sa, sb)
        if out is None:
            if op in _BOOL_RESULT:
                dt = np.dtype(np.bool_)
            else:
                dt = _result_of(op, da if da is db else result_dtype(da, db))
            out = SymbolicArray(self, shape, dt)
        else:
            _check_out(shape, out)
        self._kernel(_ELEMENTWISE[op], op, na + nb + out.nbytes, (a, b, out))
        return out

    def _unary(self, op: str, a: Any, out: Any) -> SymbolicArray:
        sa, da, na = _operand(a)
        if out is None:
            out = SymbolicArray(self, sa, _result_of(op, da))
        else:
            _check_out(sa, out)
        self._kernel(_ELEMENTWISE[op], op, na + out.nbytes, (a, out))
        return out

    def power(self, a: Any, b: Any, out: Any = None) -> SymbolicArray:
        """``a ** b``; a square or square root is priced as the kernel NumPy runs for it."""
        if isinstance(b, (int, float)) and not isinstance(b, bool) and b in (0.5, 2):
            if out is None and type(a) is SymbolicArray:
                return self._unary("sqrt" if b == 0.5 else "square", a, None)
        return self._binary("power", a, b, out)

    def where(self, cond: Any, a: Any, b: Any) -> SymbolicArray:
        sc, _, nc = _operand(cond)
        sa, da, na = _operand(a)
        sb, db, nb = _operand(b)
        shape = broadcast_shapes(broadcast_shapes(sc, sa), sb)
        dt = result_dtype(da, db)
        if isinstance(dt, type):
            dt = np.result_type(dt(0))
        out = SymbolicArray(self, shape, dt)
        self._kernel("elementwise", "where", nc + na + nb + out.nbytes, (cond, a, b, out))
        return out

    def matmul(self, a: Any, b: Any, out: Any = None) -> SymbolicArray:
        """NumPy's matmul: (..., m, k) @ (..., k, n) -> (..., m, n), batch dimensions
        broadcast, a 1-D operand a vector; one kernel of 2 m n k FLOPs per matrix."""
        sa, da, _ = _operand(a)
        sb, db, _ = _operand(b)
        if not sa or not sb:
            raise ValueError("matmul: Input operand does not have enough dimensions "
                             "(has 0, gufunc core with signature (n?,k),(k,m?)->(n?,m?) requires 1)")
        va, vb = len(sa) == 1, len(sb) == 1
        a2 = (1,) + sa if va else sa
        b2 = sb + (1,) if vb else sb
        m, k = a2[-2], a2[-1]
        k2, n = b2[-2], b2[-1]
        if k != k2:
            raise ValueError(f"matmul: Input operand 1 has a mismatch in its core dimension 0, "
                             f"with gufunc signature (n?,k),(k,m?)->(n?,m?) (size {k2} is "
                             f"different from {k})")
        batch_shape = a2[:-2] if a2[:-2] == b2[:-2] else broadcast_shapes(a2[:-2], b2[:-2])
        shape = batch_shape + ((m,) if not va else ()) + ((n,) if not vb else ())
        dt = da if da is db else result_dtype(da, db)
        if out is None:
            out = SymbolicArray(self, shape, dt)
        elif out.shape != shape:
            raise ValueError(f"matmul: Output operand 0 has a mismatch in its core dimension, "
                             f"shape {_fmt(out.shape)} is not {_fmt(shape)}")
        if va and vb:                          # a dot product: a memory-bound reduction
            self._kernel("reduction", "reduction", a.nbytes + b.nbytes + out.nbytes, (a, b, out))
        else:
            self._gemm(m, n, k, math.prod(batch_shape), dt)
        return out

    def dot(self, a: Any, b: Any) -> SymbolicArray:
        return self.matmul(a, b)

    def _reduce(self, a: SymbolicArray, axis: Any, dtype: Any, out: Any, keepdims: bool,
                op: str) -> SymbolicArray:
        nd = len(a.shape)
        if axis is None:
            axes = tuple(range(nd))
        elif isinstance(axis, (tuple, list)):
            axes = tuple(_norm_axis(x, nd) for x in axis)
        else:
            axes = (_norm_axis(axis, nd),)
        if keepdims:
            shape = tuple(1 if i in axes else s for i, s in enumerate(a.shape))
        else:
            shape = tuple(s for i, s in enumerate(a.shape) if i not in axes)
        if dtype is not None:
            dt = as_dtype(dtype)
        elif op == "mean" and a.dtype.kind in "biu":
            dt = np.dtype(np.float64)
        elif op == "sum" and a.dtype.kind in "bi" and a.dtype.itemsize < 8:
            dt = np.dtype(np.int64)
        else:
            dt = a.dtype
        if out is None:
            out = SymbolicArray(self, shape, dt)
        elif out.shape != shape:
            raise ValueError(f"output parameter for reduction operation {op} has the wrong "
                             f"number of dimensions or shape {_fmt(out.shape)}, expected {_fmt(shape)}")
        self._kernel("reduction", "reduction", a.nbytes + out.nbytes, (a, out))
        if op == "mean":                      # NumPy divides the sums in a second pass
            self._kernel("elementwise", "divide", 2 * out.nbytes, (out,))
        return out

    def sum(self, a: SymbolicArray, axis: Any = None, dtype: Any = None, out: Any = None,
            keepdims: bool = False) -> SymbolicArray:
        return self._reduce(a, axis, dtype, out, keepdims, "sum")

    def mean(self, a: SymbolicArray, axis: Any = None, dtype: Any = None, out: Any = None,
             keepdims: bool = False) -> SymbolicArray:
        return self._reduce(a, axis, dtype, out, keepdims, "mean")

    def max(self, a: SymbolicArray, axis: Any = None, out: Any = None,
            keepdims: bool = False) -> SymbolicArray:
        return self._reduce(a, axis, None, out, keepdims, "max")

    def nonzero(self, a: SymbolicArray) -> tuple[SymbolicArray, ...]:
        """Index arrays of the true entries: unknown in number, so every entry (an upper
        bound) is taken to be true."""
        outs = tuple(SymbolicArray(self, (a.size,), np.dtype(np.int64)) for _ in range(max(a.ndim, 1)))
        self._kernel("reduction", "reduction", a.nbytes + sum(o.nbytes for o in outs))
        return outs

    # -- making arrays ----------------------------------------------------------------------------
    @staticmethod
    def _shape(shape: Any) -> tuple:
        if isinstance(shape, (int, np.integer)):
            return (int(shape),)
        return tuple(int(s) for s in shape)

    def empty(self, shape: Any, dtype: Any = np.float64, order: str = "C") -> SymbolicArray:
        return SymbolicArray(self, self._shape(shape), as_dtype(dtype))

    def zeros(self, shape: Any, dtype: Any = np.float64, order: str = "C") -> SymbolicArray:
        out = SymbolicArray(self, self._shape(shape), as_dtype(dtype))
        self._kernel("elementwise", "fill", out.nbytes)
        return out

    def ones(self, shape: Any, dtype: Any = np.float64, order: str = "C") -> SymbolicArray:
        return self.zeros(shape, dtype)

    def full(self, shape: Any, fill_value: Any, dtype: Any = None) -> SymbolicArray:
        dt = as_dtype(dtype) if dtype is not None else np.result_type(fill_value)
        return self.zeros(shape, dt)

    def empty_like(self, a: Any, dtype: Any = None) -> SymbolicArray:
        return self.empty(a.shape, a.dtype if dtype is None else dtype)

    def zeros_like(self, a: Any, dtype: Any = None) -> SymbolicArray:
        return self.zeros(a.shape, a.dtype if dtype is None else dtype)

    def ones_like(self, a: Any, dtype: Any = None) -> SymbolicArray:
        return self.zeros(a.shape, a.dtype if dtype is None else dtype)

    def full_like(self, a: Any, fill_value: Any, dtype: Any = None) -> SymbolicArray:
        return self.zeros(a.shape, a.dtype if dtype is None else dtype)

    def arange(self, start: Any, stop: Any = None, step: Any = 1, dtype: Any = None) -> SymbolicArray:
        if stop is None:
            start, stop = 0, start
        n = max(0, math.ceil((stop - start) / step))
        dt = as_dtype(dtype) if dtype is not None else np.result_type(start, stop, step)
        out = SymbolicArray(self, (n,), dt)
        self._kernel("elementwise", "fill", out.nbytes)
        return out

    def _copy_of(self, a: SymbolicArray, dtype: Any = None) -> SymbolicArray:
        out = SymbolicArray(self, a.shape, a.dtype if dtype is None else dtype)
        self._kernel("copy", "copy", a.nbytes + out.nbytes)
        return out

    def asarray(self, x: Any, dtype: Any = None) -> SymbolicArray:
        """``x`` as a symbolic array: itself (cast if ``dtype`` differs) or, for host data
        (NumPy arrays, lists, scalars), a new array of its shape whose copy to the device is
        charged as a ``copy`` of its bytes."""
        if isinstance(x, SymbolicArray):
            if dtype is None or as_dtype(dtype) == x.dtype:
                return x
            return self._copy_of(x, as_dtype(dtype))
        host = np.asarray(x)
        out = SymbolicArray(self, tuple(host.shape), host.dtype if dtype is None else as_dtype(dtype))
        self._kernel("copy", "copy", 2 * out.nbytes)
        return out

    def array(self, x: Any, dtype: Any = None, copy: bool = True) -> SymbolicArray:
        if isinstance(x, SymbolicArray):
            dt = x.dtype if dtype is None else as_dtype(dtype)
            return self._copy_of(x, dt) if copy or dt != x.dtype else x
        return self.asarray(x, dtype)

    def ascontiguousarray(self, x: Any, dtype: Any = None) -> SymbolicArray:
        a = self.asarray(x, dtype)
        return a if a._contig else self._copy_of(a)

    def concatenate(self, arrays: Sequence[Any], axis: int = 0) -> SymbolicArray:
        arrs = [self.asarray(a) for a in arrays]
        if not arrs:
            raise ValueError("need at least one array to concatenate")
        first = arrs[0]
        nd = first.ndim
        ax = _norm_axis(axis, nd)
        for a in arrs[1:]:
            if a.ndim != nd or any(s != t for i, (s, t) in enumerate(zip(a.shape, first.shape)) if i != ax):
                raise ValueError(f"all the input array dimensions except for the concatenation "
                                 f"axis must match exactly, but along dimension "
                                 f"{next((i for i, (s, t) in enumerate(zip(a.shape, first.shape)) if i != ax and s != t), 0)}, "
                                 f"the array at index 0 has size {first.shape} and another {a.shape}")
        shape = first.shape[:ax] + (sum(a.shape[ax] for a in arrs),) + first.shape[ax + 1:]
        dt = first.dtype
        for a in arrs[1:]:
            dt = result_dtype(dt, a.dtype)
        out = SymbolicArray(self, shape, dt)
        self._kernel("copy", "copy", sum(a.nbytes for a in arrs) + out.nbytes)
        return out

    def reshape(self, a: SymbolicArray, shape: Any) -> SymbolicArray:
        return a.reshape(shape)

    def transpose(self, a: SymbolicArray, axes: Any = None) -> SymbolicArray:
        return a.transpose(axes) if axes is not None else a.transpose()

    def dtype(self, d: Any) -> Any:
        return as_dtype(d)

    @staticmethod
    def issubdtype(a: Any, b: Any) -> bool:
        return np.issubdtype(a, b)

