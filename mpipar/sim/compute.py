"""The compute model: the time of one kernel of a training step on a given machine.

A roofline per kernel, from its FLOPs and the bytes it moves, with measured efficiencies
rather than one "achieved TFLOP/s" knob:

    gemm_time(m, n, k, batch, dtype) = launch + max(flops / (peak[dtype] eff(m, n, k)),
                                                    bytes / memory_bandwidth)
    memory_time(nbytes, op)          = launch + nbytes / bandwidth[op](nbytes)

``eff`` is the GEMM efficiency curve: measured points (m, n, k, batch, achieved TFLOP/s) per
dtype, each turned into the fraction of peak the kernel reached once its launch is taken
out, and interpolated by inverse-distance weighting of the nearest points in
(log2 m, log2 n, log2 k) -- a square-size sweep and a grid of layer shapes are read the same
way. A batched GEMM is either a loop of ``batch`` kernels (NumPy, ``"batched": "loop"``:
each matrix at its own shape's efficiency) or one kernel over all of them (cuBLAS,
``"fused"``: the batch multiplies the output tiles, so it is looked up as (m sqrt(batch),
n sqrt(batch), k)). Memory-bound kernels are priced per operation kind (``exp``, ``tanh``,
``reduction``, ``copy`` ...) by an achieved-bandwidth curve over the bytes moved, falling back
along ``FALLBACK`` to ``elementwise`` where a profile does not measure the kind (any kind it
does not name, ``add`` or ``where``, is ``elementwise``).

The profile section (the top-level ``"compute"`` key of a network profile JSON, or an entry
of ``compute_profiles.json`` here, keyed by profile name)::

    {"launch_s": 4e-6,                     per kernel
     "memory_bytes_per_s": 2.04e12,        peak (datasheet) or best measured
     "peak_flops": {"bfloat16": 312e12, "float32": 19.5e12, ...},
     "gemm": {"batched": "fused", "curves": {
         "bfloat16": {"points": [{"m": 4096, "n": 4096, "k": 4096, "batch": 1, "tflops": 270}, ...]},
         "float16": {"same_as": "bfloat16"},                      (the same kernels)
         "float32": {"same_as": "tf32", "scale_to_max": 0.72}}},   (tf32's shape, fp32's top)
     "memory": {"elementwise": {"points": [{"bytes": 1e8, "gbps": 1700}]}, "exp": {...}},
     "sources": {...}}                     where every number came from

Numbers are labelled with their sources in the JSON (``source`` keys); none is fitted to an
end-to-end training run.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

COMPUTE_PROFILES = Path(__file__).parent / "compute_profiles.json"

# where a memory-bound kind without a curve of its own is priced
FALLBACK = {"exp": "transcendental", "tanh": "transcendental", "log": "transcendental",
            "power": "transcendental", "transcendental": "elementwise",
            "sqrt": "elementwise", "divide": "elementwise", "square": "elementwise",
            "fill": "elementwise", "rng": "elementwise", "reduction": "elementwise",
            "gather": "copy", "scatter": "gather", "copy": "elementwise"}
BATCH_MODES = ("loop", "fused")
FUSION_MODES = ("none", "fused", "blocked")


def flops(m: int, n: int, k: int, batch: int = 1) -> int:
    """FLOPs of a (batched) matmul: 2 m n k per matrix (a multiply and an add)."""
    return 2 * m * n * k * batch


class _Curve:
    """Achieved bandwidth by bytes moved: log-log interpolation between measured points,
    constant beyond them. Each point's bandwidth is that of the kernel itself (its time
    less the launch)."""

    def __init__(self, points: list[dict[str, Any]], launch_s: float, peak: float) -> None:
        xs, ys = [], []
        for p in sorted(points, key=lambda p: float(p.get("bytes", 0))):
            if "fraction_of_peak" in p:
                bw = float(p["fraction_of_peak"]) * peak
                nbytes = float(p.get("bytes", 1 << 30))
            else:
                nbytes, bw = float(p["bytes"]), float(p["gbps"]) * 1e9
                t = nbytes / bw - launch_s
                bw = nbytes / t if t > 0 else bw * 4          # launch-dominated: a cap
            xs.append(math.log(nbytes))
            ys.append(math.log(bw))
        if not xs:
            raise ValueError("a bandwidth curve needs at least one point")
        self.xs, self.ys = np.array(xs), np.array(ys)

    def bandwidth(self, nbytes: float) -> float:
        if nbytes <= 0:
            return math.inf
        return float(math.exp(np.interp(math.log(nbytes), self.xs, self.ys)))


class _GemmCurve:
    """Efficiency (fraction of peak) of one dtype's GEMM by shape: inverse-distance weights
    (1/d^6) over the nearest measured points in log2 (m, n, k) (after the batch mapping)."""

    NEAREST = 4

    def __init__(self, curve: dict[str, Any], peak: float, launch_s: float, fused: bool,
                 scale_to_max: float | None = None) -> None:
        # "includes_launch": the points are wall times per call (take the launch out); false
        # for kernel durations from a profiler
        launch = launch_s if curve.get("includes_launch", True) else 0.0
        keys, effs = [], []
        for p in curve["points"]:
            m, n, k, b = int(p["m"]), int(p["n"]), int(p["k"]), int(p.get("batch", 1))
            f = flops(m, n, k, b)
            t = f / (float(p["tflops"]) * 1e12)
            t_kernel = max(t - launch, 0.25 * t)
            keys.append(_key(m, n, k, b, fused))
            effs.append(f / (peak * t_kernel))
        if not keys:
            raise ValueError("a GEMM curve needs at least one point")
        effs_a = np.array(effs)
        if scale_to_max is not None:          # another dtype's shape dependence, this one's top
            effs_a *= float(scale_to_max) / effs_a.max()
        self.keys, self.effs = np.array(keys), np.minimum(effs_a, 1.0)
        self.fused = fused

    @classmethod
    def of(cls, keys: np.ndarray, effs: np.ndarray, fused: bool) -> "_GemmCurve":
        c = cls.__new__(cls)
        c.keys, c.effs, c.fused = keys, effs, fused
        return c

    def efficiency(self, m: int, n: int, k: int, batch: int) -> float:
        q = np.array(_key(m, n, k, batch, self.fused))
        d2 = ((self.keys - q) ** 2).sum(axis=1)
        near = np.argsort(d2)[:self.NEAREST]
        if d2[near[0]] < 1e-12:
            return float(self.effs[near[0]])
        w = 1.0 / d2[near] ** 3        # steep: beyond the grid the nearest point decides
        return float((w * self.effs[near]).sum() / w.sum())


def _key(m: int, n: int, k: int, batch: int, fused: bool) -> tuple[float, float, float]:
    """Where a (batched) GEMM sits on the curve: its own shape (a loop of kernels) or, fused,
    the shape whose output tiles are as many as the batch's."""
    s = math.sqrt(batch) if fused else 1.0
    return (math.log2(max(m * s, 1)), math.log2(max(n * s, 1)), math.log2(max(k, 1)))


class ComputeModel:
    """Seconds per kernel on one machine: GEMMs by shape and dtype, memory-bound kernels by
    kind and size, a launch overhead each (see the module docstring)."""

    def __init__(self, section: dict[str, Any], name: str = "") -> None:
        self.name = name or str(section.get("name", ""))
        self.section = section
        self.launch_s = float(section.get("launch_s", 0.0))
        self.memory_bytes_per_s = float(section["memory_bytes_per_s"])
        self._peak = {str(k): float(v) for k, v in section["peak_flops"].items()}
        gemm = section.get("gemm", {})
        mode = gemm.get("batched", "fused")
        if mode not in BATCH_MODES:
            raise ValueError(f"gemm.batched must be one of {BATCH_MODES}, got {mode!r}")
        self.batched = mode
        curves = gemm.get("curves", {})
        self._gemm: dict[str, _GemmCurve] = {}
        for dt in curves:
            self._build_gemm(dt, curves, mode == "fused", ())
        self._memory = {kind: _Curve(c["points"], self.launch_s, self.memory_bytes_per_s)
                        for kind, c in section.get("memory", {}).items()}
        if "elementwise" not in self._memory:
            raise ValueError("the compute section needs a memory.elementwise curve")
        self._resolved: dict[str, _Curve] = {}
        # how a fusion region's kernels run (SymbolicNamespace.region): "fused" on a GPU (one
        # kernel per region), "blocked" for NumPy (every pass, block by block in cache)
        # the host's own time per kernel issued beyond the library's launch: the Python of the
        # code between two NumPy calls (measured by calibrate --compute on a GPT too small to
        # compute anything; 0 where kernels run asynchronously, as on a GPU)
        self.dispatch_s = float(section.get("dispatch_s", 0.0))
        # how much slower a rank computes while k ranks share its host (k -> factor; a GPU
        # profile has none: each rank has its own device)
        self.concurrency = {int(k): float(v) for k, v in section.get("concurrency", {}).items()}
        self.slowdown = 1.0
        # the GPU's memory (None: not given, as for this machine's own profile)
        cap = section.get("gpu_memory_bytes")
        self.memory_capacity_bytes: int | None = None if cap is None else int(cap)
        self.fusion = str(section.get("fusion", "none"))
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {self.fusion!r}")

    def _build_gemm(self, dt: str, curves: dict[str, Any], fused: bool,
                    seen: tuple[str, ...]) -> "_GemmCurve":
        """The curve of ``dt``: its own points, or ``"same_as"`` another dtype's curve (the
        same achieved FLOP/s, or with ``"scale_to_max"`` its shape dependence scaled so that
        this dtype's best efficiency is the given fraction of its own peak)."""
        if dt in self._gemm:
            return self._gemm[dt]
        if dt in seen:
            raise ValueError(f"GEMM curves refer to each other in a cycle: {' -> '.join(seen + (dt,))}")
        c = curves[dt]
        peak = self._peak.get(dt)
        if peak is None:
            raise ValueError(f"GEMM curve for {dt} but no peak_flops[{dt!r}]")
        if "same_as" in c:
            src = self._build_gemm(c["same_as"], curves, fused, seen + (dt,))
            effs = src.effs * self._peak[c["same_as"]] / peak
            if "scale_to_max" in c:
                effs = src.effs * float(c["scale_to_max"]) / src.effs.max()
            curve = _GemmCurve.of(src.keys, np.minimum(effs, 1.0), fused)
        else:
            curve = _GemmCurve(c, peak, self.launch_s, fused, c.get("scale_to_max"))
        self._gemm[dt] = curve
        return curve

    # -- construction -------------------------------------------------------------------------
    @staticmethod
    def from_json(d: dict[str, Any], name: str = "") -> "ComputeModel":
        """From a profile's ``"compute"`` section (a dict)."""
        return ComputeModel(d, name)

    @staticmethod
    def from_profile(profile: Any) -> "ComputeModel":
        """From a ``mpipar.comm.network.Profile``: its ``compute`` section, else the entry of
        ``compute_profiles.json`` named like it (the GPU profiles until the sections are
        merged into the network profiles)."""
        section = getattr(profile, "compute", None)
        name = getattr(profile, "name", "")
        if section:
            return ComputeModel(section, name)
        table = json.loads(COMPUTE_PROFILES.read_text())
        if name in table:
            return ComputeModel(table[name], name)
        raise KeyError(f"profile {name!r} has no compute section and compute_profiles.json "
                       f"has none of that name (it has {', '.join(sorted(table))})")

    @staticmethod
    def named(name: str) -> "ComputeModel":
        """A shipped compute section by profile name: ``compute_profiles.json``'s GPU ones, or
        the ``"compute"`` key of ``comm/profiles/<name>.json`` (``local``, after calibrate)."""
        table = json.loads(COMPUTE_PROFILES.read_text())
        if name in table:
            return ComputeModel(table[name], name)
        path = Path(__file__).parent.parent / "comm" / "profiles" / f"{name}.json"
        if path.exists():
            d = json.loads(path.read_text())
            if "compute" in d:
                return ComputeModel(d["compute"], name)
            raise KeyError(f"profile {name!r} has no compute section: run "
                           f"`python -m mpipar.bench calibrate --compute`")
        raise KeyError(f"no compute profile {name!r} (compute_profiles.json has "
                       f"{', '.join(sorted(table))})")

    # -- prices ---------------------------------------------------------------------------------
    @staticmethod
    def flops(m: int, n: int, k: int, batch: int = 1) -> int:
        return flops(m, n, k, batch)

    def peak_flops(self, dtype: str = "float32") -> float:
        """Dense peak FLOP/s of a dtype's matmuls (datasheet; for ``local``, the best
        measured): the denominator of MFU."""
        try:
            return self._peak[dtype]
        except KeyError:
            raise KeyError(f"compute profile {self.name!r} has no peak for {dtype} "
                           f"(it has {', '.join(self._peak)})") from None

    def gemm_efficiency(self, m: int, n: int, k: int, batch: int = 1,
                        dtype: str = "float32") -> float:
        """The fraction of ``peak_flops(dtype)`` the kernel reaches (launch excluded)."""
        curve = self._gemm.get(dtype)
        if curve is None:
            raise KeyError(f"compute profile {self.name!r} has no GEMM curve for {dtype} "
                           f"(it has {', '.join(self._gemm)})")
        return curve.efficiency(m, n, k, batch)

    def on_host_with(self, ranks: int) -> "ComputeModel":
        """This model for a rank sharing its host with ``ranks - 1`` others that compute at
        the same time: every kernel ``concurrency[ranks]`` times slower (the largest k <=
        ranks measured; 1 without measurements)."""
        known = [k for k in self.concurrency if k <= ranks]
        factor = self.concurrency[max(known)] if known else 1.0
        if factor == self.slowdown:
            return self
        other = copy.copy(self)
        other.slowdown = factor
        return other

    def gemm_time(self, m: int, n: int, k: int, batch: int = 1, dtype: str = "float32") -> float:
        """Seconds of one (batched) matmul kernel (m, k) @ (k, n), ``batch`` matrices."""
        f = flops(m, n, k, batch)
        calls = batch if self.batched == "loop" else 1
        if f == 0:
            return self.slowdown * (self.launch_s + calls * self.dispatch_s)
        peak = self.peak_flops(dtype)
        item = _ITEMSIZE.get(dtype, 4)
        nbytes = item * batch * (m * k + k * n + m * n)
        if self.batched == "loop" and batch > 1:
            eff = self.gemm_efficiency(m, n, k, 1, dtype)
        else:
            eff = self.gemm_efficiency(m, n, k, batch, dtype)
        return self.slowdown * (self.launch_s + calls * self.dispatch_s
                                + max(f / (peak * eff), nbytes / self.memory_bytes_per_s))

    def _curve(self, kind: str) -> _Curve:
        c = self._resolved.get(kind)
        if c is None:
            k = kind
            while k not in self._memory:
                k = FALLBACK.get(k, "elementwise")   # add, multiply, where ...
            c = self._resolved[kind] = self._memory[k]
        return c

    def memory_time(self, nbytes: int, kind: str = "elementwise") -> float:
        """Seconds of one memory-bound kernel of ``kind`` reading plus writing ``nbytes``."""
        return self.slowdown * (self.launch_s + self.dispatch_s
                                + nbytes / self._curve(kind).bandwidth(nbytes))

    def memory_bandwidth(self, nbytes: int, kind: str = "elementwise") -> float:
        """The achieved bandwidth (bytes/s, launch excluded) of that kernel."""
        return self._curve(kind).bandwidth(nbytes)

    def __repr__(self) -> str:
        return f"ComputeModel({self.name or 'unnamed'}, launch {self.launch_s * 1e6:.1f} us)"


_ITEMSIZE = {"float64": 8, "float32": 4, "tf32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
