"""Fused GPU kernels for the memory-bound layers and the optimiser update, chosen per array module.

NumPy runs one pass over memory per operation; so does CuPy, one kernel launch each: GELU
forward was 8 launches, its backward 11, layer norm forward 9, the attention softmax 5, AdamW
about 11 per tensor. Here each is one kernel (layer norm backward two: one per row for dx,
one per column for dw and db), written in CUDA C++ for CuPy's ``ElementwiseKernel`` and
``RawKernel`` (as Megatron-LM fuses bias-GELU, the scaled masked softmax, layer norm and Adam):

=====================  ==================  ==================================================
function               kernel              what one launch does
=====================  ==================  ==================================================
``gelu.forward``       elementwise         out and t = tanh(u) (the cache) from x
``gelu.backward``      elementwise         dx from dout, x and t
causal softmax         raw, thread/row     row max, exp, sum, scale; zeros above the diagonal
                                           (no mask array: the row's query position is its
                                           index modulo T)
softmax backward       raw, thread/row     att * (datt - rowsum(datt * att)), in place
``layernorm.forward``  raw, thread/row     mean, rstd and the normalised, scaled, shifted row
``layernorm.backward`` raw, thread/row     dx; then raw, thread/column: dw += and db +=
``AdamW`` update       elementwise         m, v and the parameter in place, per tensor
=====================  ==================  ==================================================

Each kernel does the NumPy body's operations in its order, in the array's dtype (float32 or
float64), so it differs from NumPy only where the order of a sum does (NumPy sums pairwise, a
thread sums in sequence) and where a GPU contracts a multiply and an add into one rounding.
The raw kernels are one thread per row (or column), with no shared memory: the simplest form,
which the strict CuPy double can run on the CPU (``mpipar/testing/cuda_cpu.py``); a block per
row with a warp reduction is the form to measure on a GPU.

The layers call one function; ``twin`` makes the choice by array module, once per module:
NumPy, and any module without CuPy's kernel API (the simulator's shape-only namespace), runs
the NumPy body; a module with ``ElementwiseKernel`` and ``RawKernel`` (CuPy, the strict double)
runs the fused twin, which takes the same arguments and returns what the NumPy body returns.
Kernel objects are made once per module and shared by threads and devices (CuPy compiles and
caches a kernel per device).
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from mpipar.backend import array_module, is_half

F = TypeVar("F", bound=Callable[..., Any])

ROW_THREADS = 128      # threads per block of the one-thread-per-row kernels

# GELU, tanh form (nn/gelu.py): k = sqrt(2/pi), a = 0.044715, the constants as NumPy casts them
_K = math.sqrt(2.0 / math.pi)
_A = 0.044715

GELU_FORWARD = (
    "T x", "T out, T t",
    f"""
    T u = x * x;
    u = u * (T){_K * _A!r};
    u = u + (T){_K!r};
    u = u * x;
    T th = tanh(u);
    t = th;
    out = (th + (T)1) * x * (T)0.5;
    """, "mpipar_gelu_forward")

GELU_BACKWARD = (
    "T dout, T x, T t", "T dx",
    f"""
    T w = x * x;
    w = w * (T){1.5 * _K * _A!r};
    w = w + (T){0.5 * _K!r};
    w = w * x;
    T s = (T)1 - t * t;
    s = s * w;
    s = s + (t * (T)0.5 + (T)0.5);
    dx = s * dout;
    """, "mpipar_gelu_backward")

# p, m, v in place; the scalars are cast to the parameters' dtype, as NumPy casts them
ADAMW = (
    "T g, T b1, T omb1, T b2, T omb2, T keep, T inv_sqrt_bc2, T eps, T neg_step",
    "T p, T m, T v",
    """
    m = m * b1;
    m = m + g * omb1;
    v = v * b2;
    v = v + (g * g) * omb2;
    p = p * keep;
    T den = sqrt(v) * inv_sqrt_bc2;
    den = den + eps;
    p = p + (m / den) * neg_step;
    """, "mpipar_adamw")

# raw kernels, one source per dtype: {T} is float or double, {t} its name in the kernel's name
ROW_KERNELS = r"""
extern "C" __global__ void mpipar_causal_softmax_{t}({T}* att, long long rows, int n) {
  long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  int q = (int)(r % n);                  // the query position: keys 0..q are visible
  {T}* a = att + r * n;
  {T} m = a[0];
  for (int j = 1; j <= q; j++) m = max(m, a[j]);
  {T} s = 0;
  for (int j = 0; j <= q; j++) { {T} e = exp(a[j] - m); a[j] = e; s += e; }
  {T} inv = ({T})1 / s;
  for (int j = 0; j <= q; j++) a[j] = a[j] * inv;
  for (int j = q + 1; j < n; j++) a[j] = 0;
}

extern "C" __global__ void mpipar_softmax_backward_{t}({T}* d, const {T}* att, long long rows, int n) {
  long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  {T}* dr = d + r * n;
  const {T}* ar = att + r * n;
  {T} s = 0;
  for (int j = 0; j < n; j++) s += dr[j] * ar[j];
  for (int j = 0; j < n; j++) dr[j] = (dr[j] - s) * ar[j];
}

extern "C" __global__ void mpipar_layernorm_forward_{t}(const {T}* x, const {T}* w, const {T}* b,
    {T}* out, {T}* mean, {T}* rstd, long long rows, int C, {T} eps, int has_bias) {
  long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const {T}* xr = x + r * C;
  {T}* o = out + r * C;
  {T} s = 0;
  for (int j = 0; j < C; j++) s += xr[j];
  {T} mu = s / ({T})C;
  {T} v = 0;
  for (int j = 0; j < C; j++) { {T} c = xr[j] - mu; v += c * c; }
  v = v / ({T})C;
  {T} rs = ({T})1 / sqrt(v + eps);
  for (int j = 0; j < C; j++) {
    {T} nj = (xr[j] - mu) * rs;
    nj = nj * w[j];
    if (has_bias) nj = nj + b[j];
    o[j] = nj;
  }
  mean[r] = mu;
  rstd[r] = rs;
}

extern "C" __global__ void mpipar_layernorm_backward_dx_{t}(const {T}* dout, const {T}* x,
    const {T}* mean, const {T}* rstd, const {T}* w, {T}* dx, long long rows, int C) {
  long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const {T}* g = dout + r * C;
  const {T}* xr = x + r * C;
  {T}* o = dx + r * C;
  {T} mu = mean[r], rs = rstd[r];
  {T} s1 = 0, s2 = 0;
  for (int j = 0; j < C; j++) {
    {T} nj = (xr[j] - mu) * rs;
    {T} dn = g[j] * w[j];
    s1 += dn;
    s2 += dn * nj;
  }
  {T} m1 = s1 / ({T})C, m2 = s2 / ({T})C;
  for (int j = 0; j < C; j++) {
    {T} nj = (xr[j] - mu) * rs;
    {T} dn = g[j] * w[j];
    o[j] = ((dn - m1) - nj * m2) * rs;
  }
}

extern "C" __global__ void mpipar_layernorm_backward_dwdb_{t}(const {T}* dout, const {T}* x,
    const {T}* mean, const {T}* rstd, {T}* dw, {T}* db, long long rows, int C, int has_bias) {
  long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  {T} sw = 0, sb = 0;
  for (long long r = 0; r < rows; r++) {
    {T} g = dout[r * C + c];
    sw += g * ((x[r * C + c] - mean[r]) * rstd[r]);
    sb += g;
  }
  dw[c] += sw;
  if (has_bias) db[c] += sb;
}
"""
ROW_KERNEL_NAMES = ("causal_softmax", "softmax_backward", "layernorm_forward",
                    "layernorm_backward_dx", "layernorm_backward_dwdb")
C_TYPE = {"float32": "float", "float64": "double"}


class Kernels:
    """The fused kernels of one array module with CuPy's kernel API, made on first use."""

    def __init__(self, xp: Any) -> None:
        self.xp = xp
        self._lock = threading.Lock()
        self._made: dict[Any, Any] = {}

    def _kernel(self, key: Any, make: Callable[[], Any]) -> Any:
        k = self._made.get(key)
        if k is None:
            with self._lock:
                k = self._made.setdefault(key, make())
        return k

    def elementwise(self, spec: tuple[str, str, str, str]) -> Any:
        return self._kernel(spec[3], lambda: self.xp.ElementwiseKernel(*spec[:3], name=spec[3]))

    def raw(self, name: str, dtype: Any) -> Any:
        """The raw kernel ``mpipar_<name>_<dtype>`` (float32 or float64)."""
        dt = np.dtype(dtype).name
        if dt not in C_TYPE:
            raise TypeError(f"the fused kernels run in float32 or float64, not {dt}")
        src = ROW_KERNELS.replace("{T}", C_TYPE[dt]).replace("{t}", dt)
        return self._kernel((name, dt), lambda: self.xp.RawKernel(src, f"mpipar_{name}_{dt}"))

    def rows(self, name: str, dtype: Any, rows: int, *args: Any) -> None:
        """Launch a one-thread-per-row kernel over ``rows`` rows."""
        if rows:
            grid = (-(-rows // ROW_THREADS),)
            self.raw(name, dtype)(grid, (ROW_THREADS,), args)


_modules: weakref.WeakKeyDictionary[Any, Kernels | None] = weakref.WeakKeyDictionary()
_modules_lock = threading.Lock()


def of(xp: Any) -> Kernels | None:
    """The fused kernels of array module ``xp``; None for NumPy and any module without CuPy's
    ``ElementwiseKernel`` and ``RawKernel`` (those run the NumPy bodies). Decided once per
    module."""
    if xp is np:
        return None
    try:
        return _modules[xp]
    except KeyError:
        pass
    with _modules_lock:
        if xp not in _modules:
            has = hasattr(xp, "ElementwiseKernel") and hasattr(xp, "RawKernel")
            _modules[xp] = Kernels(xp) if has else None
        return _modules[xp]


def twin(fused: Callable[..., Any], arg: int = 0) -> Callable[[F], F]:
    """Decorator of a NumPy body: calls go to ``fused`` (same arguments, defaults filled in,
    same result) when the array module of positional argument ``arg`` has fused kernels
    (``of``) and the argument is not 16-bit, to the body otherwise. The two stay reachable as ``.numpy_body`` and ``.fused``
    (the tests compare them)."""
    def deco(body: F) -> F:
        sig = inspect.signature(body)

        @functools.wraps(body)
        def call(*args: Any, **kwargs: Any) -> Any:
            x = args[arg]
            # the kernels are float32/float64: a 16-bit array runs the body, which computes
            # in float32 (nn.blocking.for_each_block_of) and stores 16 bits
            if type(x) is np.ndarray or of(array_module(x)) is None or is_half(x.dtype):
                return body(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            return fused(*bound.args, **bound.kwargs)

        call.numpy_body, call.fused = body, fused  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]
    return deco


def _contiguous(xp: Any, a: Any) -> Any:
    return a if a.flags.c_contiguous else xp.ascontiguousarray(a)


# ---- the fused twins: each has the signature and result of the NumPy body it replaces ------

def gelu_forward(x: Any) -> tuple[Any, tuple]:
    """``nn.gelu.forward``: (out, (x as (N, F), t = tanh(u))) in one launch."""
    k = of(array_module(x))
    x2 = x.reshape(-1, x.shape[-1])              # (N, F)
    out, t = k.elementwise(GELU_FORWARD)(x2)
    return out.reshape(x.shape), (x2, t)


def gelu_backward(dout: Any, cache: tuple) -> Any:
    """``nn.gelu.backward``: dx in one launch."""
    x2, t = cache
    k = of(array_module(t))
    return k.elementwise(GELU_BACKWARD)(dout.reshape(x2.shape), x2, t).reshape(dout.shape)


def causal_softmax_(att: Any) -> None:
    """``nn.attention.causal_softmax_``: att (..., T, T) = softmax(att + causal mask) in place,
    one launch; no mask array."""
    xp = array_module(att)
    T = att.shape[-1]
    work = _contiguous(xp, att)
    rows = work.size // T if T else 0
    of(xp).rows("causal_softmax", att.dtype, rows, work, np.int64(rows), np.int32(T))
    if work is not att:
        att[...] = work


def softmax_backward_(datt: Any, att: Any, xp: Any) -> None:
    """``nn.attention._softmax_backward_``: datt = att * (datt - rowsum(datt * att)) in place,
    one launch."""
    T = att.shape[-1]
    work, a = _contiguous(xp, datt), _contiguous(xp, att)
    rows = work.size // T if T else 0
    of(xp).rows("softmax_backward", att.dtype, rows, work, a, np.int64(rows), np.int32(T))
    if work is not datt:
        datt[...] = work


def layernorm_forward(x: Any, w: Any, b: Any, eps: float) -> tuple[Any, tuple]:
    """``nn.layernorm.forward``: (out, (x, mean, rstd, w)), mean and rstd (..., 1), one launch."""
    xp = array_module(x)
    C = x.shape[-1]
    xc = _contiguous(xp, x)
    rows = x.size // C if C else 0
    out = xp.empty(x.shape, dtype=x.dtype)
    mean = xp.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    rstd = xp.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    wc = _contiguous(xp, w)
    bc = wc if b is None else _contiguous(xp, b)   # not read without a bias
    of(xp).rows("layernorm_forward", x.dtype, rows, xc, wc, bc, out, mean, rstd, np.int64(rows),
                np.int32(C), x.dtype.type(eps), np.int32(b is not None))
    return out, (x, mean, rstd, w)


def layernorm_backward(dout: Any, cache: tuple, dw: Any, db: Any) -> Any:
    """``nn.layernorm.backward``: dx returned, dw (and db) accumulated; two launches."""
    x, mean, rstd, w = cache
    xp = array_module(dout)
    C = x.shape[-1]
    rows = x.size // C if C else 0
    g, xc, wc = _contiguous(xp, dout), _contiguous(xp, x), _contiguous(xp, w)
    dx = xp.empty(x.shape, dtype=x.dtype)
    k = of(xp)
    k.rows("layernorm_backward_dx", x.dtype, rows, g, xc, mean, rstd, wc, dx, np.int64(rows),
           np.int32(C))
    dwc = _contiguous(xp, dw)
    dbc = dwc if db is None else _contiguous(xp, db)   # not written without a bias
    k.rows("layernorm_backward_dwdb", x.dtype, C, g, xc, mean, rstd, dwc, dbc, np.int64(rows),
           np.int32(C), np.int32(db is not None))
    if dwc is not dw:
        dw[...] = dwc
    if db is not None and dbc is not db:
        db[...] = dbc
    return dx


def adamw_update(opt: Any, p: Any, g: Any, state: dict[str, Any], lr: float, decay: bool,
                 buf: Any) -> None:
    """``optim.adamw.AdamW._update``: m, v and p of one tensor (or piece) in place, one launch
    (``buf``, the NumPy body's scratch, is not needed)."""
    m, v = state["exp_avg"], state["exp_avg_sq"]
    bc1, bc2 = opt.bias_corrections()
    keep = 1.0 - lr * opt.weight_decay if decay and opt.weight_decay else 1.0
    of(array_module(p)).elementwise(ADAMW)(
        g, opt.b1, 1.0 - opt.b1, opt.b2, 1.0 - opt.b2, keep, 1.0 / math.sqrt(bc2), opt.eps,
        -lr / bc1, p, m, v)
