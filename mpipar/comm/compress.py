"""Gradient compression for a data-parallel group: one bucket's mean, sent small.

    comp = make_compressor("topk:0.01")    # none | fp16 | bf16 | int8 | topk:RATIO | powersgd:RANK
    mean = comp.allreduce_mean(dp, "bucket3", g, shapes=[(64, 256), (256,)])
                                           # g: one flat gradient bucket (numpy/cupy), the
                                           # tensors of ``shapes`` laid end to end (C order)
    comp.last_call, comp.bytes_sent               # {"index": ..., "value": ...}, cumulative
    ckpt["residuals"] = comp.state_dict()         # {key: array}; load_state_dict to resume

Every rank of the group calls ``allreduce_mean`` with the same ``key`` and a 1-D float array
``x`` of the same size and dtype (and the same ``shapes``, the tensors ``x`` holds end to end;
None: ``x`` is one vector; only PowerSGD looks at them); every rank gets the same estimate of
``(1/p) sum_ranks x`` (p the group size), in ``x``'s array module and dtype. The call is
blocking; to overlap it with backward, queue it whole on the group's communication thread,
``comm.background().submit(comp.allreduce_mean, comm, key, x)`` (its collectives then run on
that thread, in call order), as ``GradBuckets`` queues ``iallreduce``.

Error feedback (Seide et al., "1-bit SGD", Interspeech 2014; Karimireddy et al., "Error
feedback fixes SignSGD", ICML 2019). Each lossy scheme keeps, per rank and per key, a residual
``r`` (zeros at the key's first call) and on each call

    v = x + r,    c = C(v),    send c,    r <- v - D(c)

with C the compressor and D its decompression; the mean returned is ``(1/p) sum_ranks D(c)``.
Summed over calls t = 1..T on one rank, ``sum_t D(c_t) + r_T = sum_t x_t``: nothing a rank
was given is lost, only delayed, which is what makes the biased compressors below converge.
The identity holds to the rounding of ``v`` and ``r`` in ``x``'s dtype; what the group
applies (p times the returned means) is ``sum_ranks D(c)`` exactly where the scheme sums
decompressed payloads itself (int8, topk), and up to the float16 reduction's rounding for fp16
(at most (p - 1) float16 roundings of the partial sums, 2^-11 relative each).

The schemes (one class each, chosen once by ``make_compressor``):

* ``none`` (``Uncompressed``): ``comm.allreduce(x, op="avg")``, no residual. Any algorithm.
* ``fp16`` (``Float16``): ``c = float16(v / p)``, ``D(c) = p * c``; the float16 payloads are
  summed by ``comm.allreduce(c, op="sum")`` in float16 (``native`` sums them in float32 and
  rounds once), so the mean is the sum itself. Dividing by p before the cast keeps the sum
  within float16's range wherever every ``|v|`` is (the rule of PyTorch's fp16 hook). Half
  the bytes of float32; any all-reduce algorithm.
* ``bf16`` (``BFloat16``): ``c = bfloat16(float32(v / p))`` (round to nearest even, through
  float32 where ``v`` is float64), ``D(c) = p * c``. The Communicator has no bfloat16 type
  (MPI has none), so the 16-bit patterns are all-gathered, packed two to an int32 word (n
  padded to even), and each rank sums the p decompressed payloads in ``v``'s dtype, in rank
  order: that sum is the mean (of v / p), the same on every rank, and where ``v`` is float64 the
  sum of p values of 8 significant bits is exact, so the group applies ``sum_ranks D(c)``
  exactly as for int8 (up to the rounding of p times the mean). On the wire: 2n bytes handed to the all-gather (half of float32's, as
  fp16), which a ring all-gather turns into (p - 1) 2n bytes leaving each rank against
  2 (p - 1) / p 4n for a float32 ring all-reduce: p / 4 of its bytes. bfloat16 keeps
  float32's exponent range, so no division is needed for range; ``v / p`` is kept so both
  16-bit schemes send the same quantity. On NumPy the cast is ml_dtypes' ``bfloat16``; CuPy
  has no bfloat16 dtype, so there the same rounding is done on the float32 bit patterns
  (``u + 0x7FFF + ((u >> 16) & 1)``, the top 16 bits kept; NaN kept a quiet NaN): bitwise
  ml_dtypes' result (tested on the strict CuPy double). Error of one call: 2^-8 relative
  per element (bfloat16's 8 significant bits), 16 times fp16's 2^-11, with no underflow
  below float16's 6e-8. Needs ``allgather`` (native, ring, rhd).
* ``int8`` (``Int8``): a scale agreed by the group, ``s = max_ranks max|v| / 127`` (one
  all-reduce ``max`` of one element), ``q = rint(v / s)`` in [-127, 127], ``D(q) = s * q``.
  The int8 payloads are all-gathered (packed four to an int32 word, the Communicator having
  no int8 type: n padded up to a multiple of 4) and each rank sums the p of them in int32,
  in rank order: ``|sum| <= 127 p``, so no overflow below p = 2^24. The mean is
  ``s * sum / p``. Error of one call (r = 0): each rank rounds to within ``s / 2``, so
  ``|mean - true mean| <= s / 2 = max|x| / 254`` elementwise (plus float rounding). On the
  wire: n (+ padding) bytes handed to the all-gather, which an all-gather turns into
  (p - 1) n bytes leaving each rank (ring), against 2 (p - 1) / p * 4n for a float32 ring
  all-reduce: p / 8 of its bytes, nothing saved at p = 8. (A sum in int32 would be overflow-free too,
  but 4 bytes an element: no compression of float32 at all.)
* ``topk:RATIO`` (``TopK``): ``k = ceil(RATIO * n)`` entries of largest ``|v|``, ties at the
  k-th magnitude broken by the lower index (deterministic on every module), sent as
  (index, value) pairs: indices int32 (int64 when n >= 2^31), values in x's dtype, two
  all-gathers of k elements each. Every rank scatters the p ranks' pairs into a dense zero
  vector in rank order (indices of one rank are distinct, so each rank's scatter is a plain
  indexed add, not an atomic one), then divides by p. ``topk:1.0`` is the uncompressed mean.
* ``powersgd:RANK`` (``PowerSGD``; Vogels, Karimireddy and Jaggi, "PowerSGD: Practical
  Low-Rank Gradient Compression for Distributed Optimization", NeurIPS 2019, Algorithm 1
  with error feedback). Per tensor of ``shapes`` with two or more dimensions, M = v's slice
  as an n x m matrix (the first dimension by the rest; transposed where it has more rows
  than columns, so n <= m), of rank r = min(RANK, n); M, P and Q
  are float32 for a 16-bit bucket (sums of m loss-scaled fp16 products overflow where the
  gradient does not; and float16 has no LAPACK), the bucket's dtype otherwise:

      P = M Q                  (n x r; Q: m x r, this key's Q of the previous call)
      P <- mean_ranks P        (one all-reduce: every matrix's P concatenated)
      P^ = orth(P)             (Householder QR, the reduced Q factor)
      Q = M^T P^               (m x r)
      Q <- mean_ranks Q        (one all-reduce: every matrix's Q concatenated)
      D = P^ Q^T = P^ P^T mean_ranks M

  and D is the matrix's mean (the same on every rank: it is made of all-reduced factors
  only); the residual is ``v - D`` (e = M - P^ Q^T with the all-reduced Q, as PyTorch's
  PowerSGD hook and Vogels' code keep it), so the identity above holds per rank with D(c) =
  the returned mean; at full rank the residuals are each rank's deviation from the mean and
  cancel over the ranks, so they change no later mean. Q starts, at a key's first call, from a normal draw of
  ``numpy.random.default_rng([seed, crc32(key), j])`` for the key's j-th matrix, on the host
  and then moved to the device: the same on every rank, module and run; later calls start from the
  previous call's all-reduced Q (the warm start that makes one power iteration a step
  enough). Tensors of one dimension (biases, layer-norm gains) are averaged uncompressed in
  one more all-reduce (``op="avg"``; no residual). QR, not Gram-Schmidt: P may be rank
  deficient (a gradient of b tokens has rank <= b), where Gram-Schmidt divides by ~0 and
  Householder still gives orthonormal columns. At r = n (``RANK >= min(n, m)``, the cap) P^
  is square orthogonal, P^ P^T = I, and D is the mean up to rounding (float64: ~1e-15
  relative, as tested in training against ``none`` within 1e-10), whatever M's rank: the
  reason for the orientation. On the wire: (n + m) r elements of v's dtype per matrix,
  against n m; every all-reduce algorithm (only ``allreduce`` is used). Full rank sends more
  than ``none`` ((n + m) n >= n m): it is for testing.

Bytes on the wire are COUNTED from the payloads this rank hands to the Communicator's
collectives: the sum of ``nbytes`` of every array given to ``allreduce`` / ``allgather`` for
the call (what ``CommStats.bytes`` counts for an uncompressed bucket), by part
(``last_call``, e.g. ``{"scale": 4, "payload": n}`` for int8), and 0 in a group of one,
where the Communicator sends nothing. Neither the Communicator nor its transports keep
counters of the traffic an algorithm generates from a payload (and MPI's own collectives,
``native``, are invisible to them), so that traffic is not counted: it is the algorithm's
function of the payload (collectives.md, "Gradient compression (library)").

Which all-reduce algorithms: fp16, powersgd and none use ``allreduce`` (every algorithm that has one); bf16, int8 and topk need ``allgather`` (native, ring, rhd; a communicator whose
default lacks it runs native, an explicit ``algorithm=`` that lacks it is an error) plus,
for int8, an all-reduce of one element (any algorithm). A parameter server (``ps``) has no
all-gather: compressed pushes to servers are not this module's.

Not in this module: the trainer's ``--compress`` wiring (``parallel/data_parallel.py``, whose
buckets know their tensors' shapes) and the residuals' files (``state_dict`` gives them as
plain 1-D arrays for that: ``parallel/checkpoint.py`` writes them per rank).
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from mpipar import backend
from mpipar.comm.communicator import Communicator

__all__ = ["GradientCompressor", "make_compressor", "Uncompressed", "Float16", "BFloat16", "Int8",
           "TopK", "PowerSGD", "COMPRESSION_SCHEMES"]

COMPRESSION_SCHEMES = ("none", "fp16", "bf16", "int8", "topk:RATIO", "powersgd:RANK")

Shapes = Sequence[Sequence[int]]

INT8_MAX = 127


@runtime_checkable
class GradientCompressor(Protocol):
    """The mean of one gradient bucket over a group, compressed; counters of what was sent."""

    spec: str
    collectives: tuple[str, ...]  # the Communicator collectives a call uses (an algorithm's)
    bytes_sent: int           # cumulative bytes this rank handed to collectives
    calls: int
    last_call: dict[str, int]  # bytes by part of the latest call

    def allreduce_mean(self, comm: Communicator, key: str, x: Any,
                       algorithm: str | None = None, shapes: Shapes | None = None) -> Any:
        """The group's (compressed) mean of ``x`` (the tensors of ``shapes`` end to end;
        None: one vector); the same on every rank."""

    @property
    def last_bytes(self) -> int:
        """Bytes this rank handed to collectives in the latest call."""

    def state_dict(self) -> dict[str, Any]:
        """The error-feedback residuals by key (and PowerSGD's Q factors, as ``KEY.Q``):
        copies, 1-D, in the buckets' array module and dtype (``backend.to_host`` them for a
        file); empty for ``none``."""

    def load_state_dict(self, state: Mapping[str, Any], dtype: Any = None) -> None:
        """Replace the residuals by ``state`` (as ``state_dict`` gave them); ``dtype``: the
        buckets' dtype, to which residuals held wider (a checkpoint stores 16-bit values as
        float32) are rounded back, exactly or a ValueError."""


def make_compressor(spec: str) -> GradientCompressor:
    """The compressor ``spec`` names: ``none``, ``fp16``, ``bf16``, ``int8``, ``topk:RATIO``
    with RATIO a float in (0, 1], or ``powersgd:RANK`` with RANK an integer >= 1. Anything
    else is a ValueError that names what is wrong."""
    if not isinstance(spec, str):
        raise ValueError(f"compression spec must be a string, got {type(spec).__name__}")
    name, sep, arg = spec.strip().partition(":")
    if name == "powersgd":
        rank = _parameter(spec, sep, arg, int, "powersgd", "rank")
        if rank < 1:
            raise ValueError(f"powersgd rank {rank} is not >= 1")
        return PowerSGD(rank)
    if name == "topk":
        ratio = _parameter(spec, sep, arg, float, "topk", "ratio")
        if not (0.0 < ratio <= 1.0):  # NaN fails too
            raise ValueError(f"topk ratio {arg.strip()} is not in (0, 1]")
        return TopK(ratio)
    fixed = {"none": Uncompressed, "fp16": Float16, "bf16": BFloat16, "int8": Int8}
    if name in fixed:
        if sep:
            raise ValueError(f"compression {spec!r}: {name} takes no argument")
        return fixed[name]()
    raise ValueError(f"unknown compression {spec!r}; choose from {', '.join(COMPRESSION_SCHEMES)}")


def _parameter(spec: str, sep: str, arg: str, kind: type, name: str, quantity: str) -> Any:
    """The number after the colon of ``spec`` (``sep``, ``arg``: its partition) as ``kind``
    (int or float): scheme ``name``'s ``quantity``; a ValueError saying so otherwise."""
    if not sep or not arg.strip():
        example = "4" if kind is int else "0.01"
        raise ValueError(f"compression {spec!r}: {name} needs a {quantity}, as {name}:{example}")
    try:
        return kind(arg)
    except ValueError:
        raise ValueError(f"compression {spec!r}: {name} {quantity} {arg.strip()!r} is not "
                         f"{'an integer' if kind is int else 'a number'}") from None


def _check_bucket(x: Any, shapes: Shapes | None = None) -> None:
    if getattr(x, "ndim", None) != 1:
        raise ValueError(f"a gradient bucket must be a 1-D array, got shape {getattr(x, 'shape', None)}")
    if np.dtype(x.dtype).name not in backend.FLOAT_DTYPES:
        raise TypeError(f"a gradient bucket must be float16/32/64, got {np.dtype(x.dtype).name}")
    if shapes is not None and sum(math.prod(s) for s in shapes) != x.size:
        raise ValueError(f"tensors of shapes {[tuple(s) for s in shapes]} hold "
                         f"{sum(math.prod(s) for s in shapes)} elements, the bucket {x.size}")


class _Counted:
    """Bookkeeping every scheme shares: bytes handed to collectives, by call and in all."""

    spec = ""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.calls = 0
        self.last_call: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, bytes_sent={self.bytes_sent})"

    def _begin(self) -> None:
        self.calls += 1
        self.last_call = {}

    def _handed(self, comm: Communicator, part: str, payload: Any) -> None:
        """Count ``payload`` (an array given to one collective) as this call's ``part``."""
        n = int(payload.nbytes) if comm.size > 1 else 0
        self.last_call[part] = self.last_call.get(part, 0) + n
        self.bytes_sent += n

    @property
    def last_bytes(self) -> int:
        """Bytes this rank handed to collectives in the latest call."""
        return sum(self.last_call.values())


class Uncompressed(_Counted):
    """``none``: the plain all-reduce mean; nothing kept between calls."""

    spec = "none"
    collectives = ("allreduce",)

    def allreduce_mean(self, comm: Communicator, key: str, x: Any,
                       algorithm: str | None = None, shapes: Shapes | None = None) -> Any:
        _check_bucket(x, shapes)
        self._begin()
        self._handed(comm, "payload", x)
        return comm.allreduce(x, op="avg", algorithm=algorithm)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any], dtype: Any = None) -> None:
        if state:
            raise ValueError(f"compression 'none' keeps no residuals, got keys {sorted(state)}")


def _narrowed(key: str, r: Any, dtype: Any) -> Any:
    """A copy of residual ``r`` in ``dtype`` (None: its own), which must hold it exactly."""
    if dtype is None or r.dtype == dtype:
        return r.copy()
    out = r.astype(dtype)
    if not bool((out.astype(r.dtype) == r).all()):
        raise ValueError(f"residual {key!r} of dtype {r.dtype} does not round to "
                         f"{np.dtype(dtype).name} exactly: not a {np.dtype(dtype).name} "
                         f"bucket's residual")
    return out


class _ErrorFeedback(_Counted):
    """A lossy scheme with a residual per key: ``v = x + r``, ``r <- v - D(C(v))``.

    A subclass says how ``v`` travels: ``_exchange(comm, v, algorithm, key, shapes)`` returns
    (the group's mean, this rank's ``D(C(v))``), both arrays of ``v``'s module and dtype."""

    def __init__(self) -> None:
        super().__init__()
        self._residual: dict[str, Any] = {}

    def allreduce_mean(self, comm: Communicator, key: str, x: Any,
                       algorithm: str | None = None, shapes: Shapes | None = None) -> Any:
        _check_bucket(x, shapes)
        xp = backend.array_module(x)
        self._begin()
        r = self._residual.get(str(key))
        if r is not None and (r.shape != x.shape or r.dtype != x.dtype):
            raise ValueError(f"bucket {key!r}: residual of shape {r.shape} {r.dtype} does not fit "
                             f"a bucket of shape {x.shape} {x.dtype}")
        v = xp.array(x, copy=True) if r is None else x + backend.to_device(r, xp)
        mean, sent = self._exchange(comm, v, algorithm, str(key), shapes)
        self._residual[str(key)] = xp.subtract(v, sent, out=v)
        return mean

    def _exchange(self, comm: Communicator, v: Any, algorithm: str | None, key: str,
                  shapes: Shapes | None) -> tuple[Any, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {k: r.copy() for k, r in self._residual.items()}

    def load_state_dict(self, state: Mapping[str, Any], dtype: Any = None) -> None:
        for k, r in state.items():
            if getattr(r, "ndim", None) != 1:
                raise ValueError(f"residual {k!r} must be a 1-D array, got shape {getattr(r, 'shape', None)}")
        self._residual = {str(k): _narrowed(k, r, dtype) for k, r in state.items()}


class Float16(_ErrorFeedback):
    """``fp16``: ``c = float16(v / p)`` summed by the all-reduce in float16; ``D(c) = p c``."""

    spec = "fp16"
    collectives = ("allreduce",)

    def _exchange(self, comm: Communicator, v: Any, algorithm: str | None, key: str = "",
                  shapes: Shapes | None = None) -> tuple[Any, Any]:
        p = comm.size
        c = (v / v.dtype.type(p)).astype(np.float16)
        self._handed(comm, "payload", c)
        mean = comm.allreduce(c, op="sum", algorithm=algorithm).astype(v.dtype)
        return mean, c.astype(v.dtype) * v.dtype.type(p)


def _bf16_bits(xp: Any, a: Any) -> Any:
    """float32 ``a`` rounded to bfloat16 (to nearest, ties to even), as uint16 bit patterns:
    ml_dtypes' cast on NumPy; on CuPy, which has no bfloat16, the same rounding on the bits
    (add 0x7FFF plus the lowest kept bit, keep the top 16; a NaN stays a quiet NaN)."""
    if xp is np:
        import ml_dtypes  # noqa: PLC0415  (a dependency only bf16 needs)
        with np.errstate(invalid="ignore"):  # a NaN stays NaN: the numerics policy's to report
            return a.astype(ml_dtypes.bfloat16).view(np.uint16)
    u = a.view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet = (u >> np.uint32(16)) | np.uint32(0x0040)
    return xp.where(xp.isnan(a), quiet, rounded).astype(np.uint16)


def _bf16_value(xp: Any, bits: Any) -> Any:
    """uint16 bfloat16 patterns as float32 (exact: bfloat16 is float32's top half)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


class BFloat16(_ErrorFeedback):
    """``bf16``: ``c = bfloat16(v / p)``, the 16-bit patterns all-gathered and summed in v's
    dtype; ``D(c) = p c``."""

    spec = "bf16"
    collectives = ("allgather",)

    def _exchange(self, comm: Communicator, v: Any, algorithm: str | None, key: str = "",
                  shapes: Shapes | None = None) -> tuple[Any, Any]:
        xp = backend.array_module(v)
        p, n = comm.size, v.size
        c = _bf16_bits(xp, (v / v.dtype.type(p)).astype(np.float32))
        words = -(-n // 2)
        packed = xp.zeros(2 * words, dtype=np.uint16)
        packed[:n] = c
        packed = packed.view(np.int32)   # the Communicator has no 16-bit integer type
        self._handed(comm, "payload", packed)
        gathered = comm.allgather(packed, algorithm=algorithm)
        values = _bf16_value(xp, gathered.view(np.uint16).reshape(p, 2 * words)[:, :n])
        # the payloads are v / p: their sum is the mean
        mean = values.astype(v.dtype).sum(axis=0)
        return mean, _bf16_value(xp, c).astype(v.dtype) * v.dtype.type(p)


class Int8(_ErrorFeedback):
    """``int8``: one scale for the group (all-reduce max), int8 payloads all-gathered and
    summed in int32."""

    spec = "int8"
    collectives = ("allreduce", "allgather")

    def _exchange(self, comm: Communicator, v: Any, algorithm: str | None, key: str = "",
                  shapes: Shapes | None = None) -> tuple[Any, Any]:
        xp = backend.array_module(v)
        p, n = comm.size, v.size
        peak = xp.max(xp.abs(v)).reshape(1) if n else xp.zeros(1, dtype=v.dtype)
        self._handed(comm, "scale", peak)
        peak = comm.allreduce(peak, op="max", algorithm=algorithm)
        # s = peak / 127, or 1 where every |v| is 0 (then every q is 0 and no division by 0)
        scale = xp.where(peak > 0, peak / v.dtype.type(INT8_MAX), v.dtype.type(1))
        q = xp.clip(xp.rint(v / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
        words = -(-n // 4)
        packed = xp.zeros(4 * words, dtype=np.int8)
        packed[:n] = q
        packed = packed.view(np.int32)
        self._handed(comm, "payload", packed)
        gathered = comm.allgather(packed, algorithm=algorithm)
        total = gathered.view(np.int8).reshape(p, 4 * words)[:, :n].astype(np.int32).sum(axis=0)
        mean = (total.astype(v.dtype) * scale) / v.dtype.type(p)
        return mean, q.astype(v.dtype) * scale


class TopK(_ErrorFeedback):
    """``topk:RATIO``: each rank's ``ceil(RATIO n)`` largest ``|v|`` as (index, value) pairs."""

    collectives = ("allgather",)

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = float(ratio)
        self.spec = f"topk:{ratio:g}"

    def k(self, n: int) -> int:
        """Entries each rank sends of a bucket of n: ``ceil(ratio n)``, at most n."""
        return min(n, math.ceil(self.ratio * n))

    def select(self, v: Any) -> Any:
        """Indices (ascending) of the k largest ``|v|``; at the k-th magnitude the lower
        indices win, so every rank, module and run picks the same entries."""
        xp = backend.array_module(v)
        n = v.size
        k = self.k(n)
        if k == n:
            return xp.arange(n)
        a = xp.abs(v)
        kth = xp.sort(a)[n - k]
        above = xp.flatnonzero(a > kth)
        at = xp.flatnonzero(a == kth)[:k - int(above.size)]
        return xp.sort(xp.concatenate([above, at]))

    def _exchange(self, comm: Communicator, v: Any, algorithm: str | None, key: str = "",
                  shapes: Shapes | None = None) -> tuple[Any, Any]:
        xp = backend.array_module(v)
        p, n = comm.size, v.size
        sent = xp.zeros_like(v)
        if n == 0:
            return sent, sent
        idx = self.select(v)
        index = idx.astype(np.int32 if n < 2**31 else np.int64)
        value = v[idx]
        sent[idx] = value
        self._handed(comm, "index", index)
        self._handed(comm, "value", value)
        all_index = comm.allgather(index, algorithm=algorithm).reshape(p, -1)
        all_value = comm.allgather(value, algorithm=algorithm).reshape(p, -1)
        total = xp.zeros_like(v)
        for rank in range(p):  # rank order: the same sum on every rank
            total[all_index[rank]] += all_value[rank]
        return total / v.dtype.type(p), sent


class _Matrix:
    """One tensor of a bucket as PowerSGD's n x m matrix (n <= m), and its rank r."""

    def __init__(self, offset: int, rows: int, cols: int, rank: int) -> None:
        self.offset, self.rows, self.cols = offset, rows, cols
        self.transposed = rows > cols            # M = the tensor's transpose: n <= m
        self.n, self.m = min(rows, cols), max(rows, cols)
        self.r = min(rank, self.n)

    def of(self, v: Any) -> Any:
        """The n x m view of this tensor in the bucket ``v``."""
        a = v[self.offset:self.offset + self.rows * self.cols].reshape(self.rows, self.cols)
        return a.T if self.transposed else a

    def put(self, out: Any, d: Any) -> None:
        """Write the n x m ``d`` where this tensor sits in the bucket ``out``."""
        out[self.offset:self.offset + self.rows * self.cols] = (d.T if self.transposed else d).reshape(-1)


def _split(flat: Any, shapes: Sequence[tuple[int, int]]) -> list[Any]:
    """``flat`` cut into consecutive matrices of ``shapes``."""
    out, pos = [], 0
    for a, b in shapes:
        out.append(flat[pos:pos + a * b].reshape(a, b))
        pos += a * b
    return out


class PowerSGD(_ErrorFeedback):
    """``powersgd:RANK``: per weight matrix of the bucket, rank-r factors P and Q, each
    all-reduced once for the whole bucket; Q warm-started; vectors averaged uncompressed."""

    collectives = ("allreduce",)

    def __init__(self, rank: int, seed: int = 0) -> None:
        super().__init__()
        self.rank, self.seed = int(rank), int(seed)
        self.spec = f"powersgd:{self.rank}"
        self._q: dict[str, Any] = {}   # key -> the latest all-reduced Q's, concatenated

    def plan(self, shapes: Shapes) -> tuple[list[_Matrix], list[tuple[int, int]]]:
        """(the matrices, the [start, end) of the vectors) of a bucket of tensors ``shapes``;
        empty tensors are in neither (nothing to send)."""
        mats, vecs, off = [], [], 0
        for shape in shapes:
            size = math.prod(shape)
            if size and len(shape) >= 2:
                mats.append(_Matrix(off, int(shape[0]), size // int(shape[0]), self.rank))
            elif size:
                vecs.append((off, off + size))
            off += size
        return mats, vecs

    def _warm(self, key: str, mats: list[_Matrix], xp: Any, dtype: Any) -> Any:
        """The Q's to start from: the previous call's, else the seeded draw (module docstring)."""
        want = sum(mt.m * mt.r for mt in mats)
        q = self._q.get(key)
        if q is None:
            tag = zlib.crc32(key.encode())
            draws = [np.random.default_rng([self.seed, tag, j]).standard_normal(mt.m * mt.r)
                     for j, mt in enumerate(mats)]
            return backend.to_device(np.concatenate(draws).astype(dtype), xp)
        if q.size != want or q.dtype != dtype:
            raise ValueError(f"bucket {key!r}: PowerSGD Q of {q.size} {q.dtype} elements does "
                             f"not fit its matrices' {want} {np.dtype(dtype).name}")
        return backend.to_device(q, xp)

    def _exchange(self, comm: Communicator, v: Any, algorithm: str | None, key: str = "",
                  shapes: Shapes | None = None) -> tuple[Any, Any]:
        xp = backend.array_module(v)
        mats, vecs = self.plan(shapes if shapes is not None else [(v.size,)])
        mean = xp.zeros_like(v)
        sent = v.copy()                  # vectors go whole: nothing of them is kept back
        if mats:
            # the factors are float32 for a 16-bit bucket: a sum of m products of
            # loss-scaled fp16 gradients overflows where the gradient itself does not, and
            # float16 has no LAPACK; they are a small part of the bytes
            work = np.float32 if v.dtype.itemsize < 4 else v.dtype
            ms = [mt.of(v).astype(work, copy=False) for mt in mats]
            qs = _split(self._warm(key, mats, xp, work), [(mt.m, mt.r) for mt in mats])
            p = xp.concatenate([(m @ q).reshape(-1) for m, q in zip(ms, qs)])
            self._handed(comm, "P", p)
            p = comm.allreduce(p, op="avg", algorithm=algorithm)
            # orthonormal columns (QR: P may be rank deficient)
            ph = [xp.linalg.qr(a)[0] for a in _split(p, [(mt.n, mt.r) for mt in mats])]
            q = xp.concatenate([(m.T @ a).reshape(-1) for m, a in zip(ms, ph)])
            self._handed(comm, "Q", q)
            q = comm.allreduce(q, op="avg", algorithm=algorithm)
            self._q[key] = q
            for mt, a, b in zip(mats, ph, _split(q, [(mt.m, mt.r) for mt in mats])):
                d = a @ b.T                    # rounded to the bucket's dtype by put
                mt.put(mean, d)
                mt.put(sent, d)
        if vecs:
            flat = xp.concatenate([v[a:b] for a, b in vecs])
            self._handed(comm, "vectors", flat)
            flat = comm.allreduce(flat, op="avg", algorithm=algorithm)
            pos = 0
            for a, b in vecs:
                mean[a:b] = flat[pos:pos + b - a]
                pos += b - a
        return mean, sent

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {f"{k}.Q": q.copy() for k, q in self._q.items()}

    def load_state_dict(self, state: Mapping[str, Any], dtype: Any = None) -> None:
        qs = {k[:-2]: r for k, r in state.items() if k.endswith(".Q")}   # in their work dtype
        super().load_state_dict({k: r for k, r in state.items() if not k.endswith(".Q")}, dtype)
        self._q = {k: q.copy() for k, q in qs.items()}
