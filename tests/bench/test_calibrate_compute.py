"""``bench calibrate --compute``: what it times is what the symbolic namespace charges, the
section it writes loads as a compute model that passes through the measurements, and
writing it keeps the rest of the profile. One process, no MPI; no timed assertions."""

import json

import numpy as np
import pytest

from mpipar.bench import calibrate_compute as cc
from mpipar.sim.compute import ComputeModel
from mpipar.sim.symbolic import SymbolicNamespace


class Bytes:
    """A compute model recording the bytes of each memory-bound kernel."""

    def __init__(self):
        self.seen = []

    def memory_time(self, nbytes, kind="elementwise"):
        self.seen.append(nbytes)
        return 0.0

    def gemm_time(self, *a, **k):
        return 0.0


def _symbolic_equivalents(ns, nbytes):
    """The namespace's version of each kernel ``_memory_kernels`` times, on the same shapes."""
    n = nbytes // 4
    a, b, c = (ns.empty(n, ns.float32) for _ in range(3))
    rows = n // 256
    a2, r2 = a[:rows * 256].reshape(rows, 256), ns.empty((rows, 1), ns.float32)
    w = ns.zeros((1024, 64), ns.float32)
    idx = ns.empty(n // 64, ns.int64)
    g = ns.empty((n // 64, 64), ns.float32)
    gen = ns.random.default_rng(1)

    def assign():
        c[...] = a

    return {"add": lambda: ns.add(a, b, out=c), "multiply": lambda: ns.multiply(a, b, out=c),
            "exp": lambda: ns.exp(a, out=c), "tanh": lambda: ns.tanh(a, out=c),
            "sum": lambda: a2.sum(axis=-1, keepdims=True, out=r2),
            "max": lambda: a2.max(axis=-1, keepdims=True, out=r2),
            "copy": assign, "fill": lambda: c.fill(0.0), "gather": lambda: w[idx],
            "scatter": lambda: ns.add.at(w, idx, g), "rng": lambda: gen.random(n, dtype=ns.float32)}


@pytest.mark.parametrize("nbytes", [1 << 14, 1 << 20])
def test_each_kernel_is_timed_with_the_bytes_the_namespace_charges(nbytes):
    real = cc._memory_kernels(nbytes)
    assert real.keys() == cc.KIND_OF.keys()
    for name, (fn, charged) in real.items():
        fn()                                        # the real call runs
        rec = Bytes()
        sym = _symbolic_equivalents(SymbolicNamespace(rec), nbytes)   # (prices are cached)
        rec.seen.clear()
        sym[name]()
        assert rec.seen == [charged], name


def test_the_grid_stays_under_its_size_limit_and_has_attentions_products():
    shapes = cc.gemm_shapes()
    assert all(m * n * k <= cc.MAX_MACS for m, n, k, b in shapes if b == 1)
    assert (64, 64, 64, 1) in shapes and (4096, 128, 64, 1) in shapes
    for T, hs, b in cc.ATTENTION:
        assert (T, T, hs, b) in shapes and (T, hs, T, b) in shapes


def test_a_small_calibration_loads_and_passes_through_what_it_measured(monkeypatch, tmp_path):
    monkeypatch.setattr(cc, "DIMS", (64, 128))
    monkeypatch.setattr(cc, "ATTENTION", ((32, 16, 4),))
    monkeypatch.setattr(cc, "MEM_BYTES", (4096, 65536))
    monkeypatch.setattr(cc, "SAMPLE_S", 1e-4)
    section = cc.build_section(threads=1, repeats=1)
    cm = ComputeModel.from_json(section, "local")
    assert section["threads"] == 1 and section["gemm"]["batched"] == "loop"
    for dtype in ("float32", "float64"):
        pts = section["gemm"]["curves"][dtype]["points"]
        assert len(pts) == len(cc.gemm_shapes())
        assert cm.peak_flops(dtype) == max(p["tflops"] for p in pts) * 1e12
        for p in pts:
            if p["batch"] == 1:                     # an exact point (batched ones share keys)
                f = 2 * p["m"] * p["n"] * p["k"]
                want = f / (p["tflops"] * 1e12)
                got = cm.gemm_time(p["m"], p["n"], p["k"], 1, dtype)
                # compute-bound points come back as measured (the memory roof may be higher)
                assert got == pytest.approx(want, rel=1e-9) or got > want
    for kind, c in section["memory"].items():
        for p in c["points"]:
            # the points time single kernels; the host's dispatch per kernel of the layers'
            # code (measured apart, on a tiny GPT) comes on top of them
            assert cm.memory_time(p["bytes"], kind) - cm.dispatch_s == pytest.approx(
                p["bytes"] / (p["gbps"] * 1e9), rel=1e-3)
    out = tmp_path / "profile.json"
    out.write_text(json.dumps({"name": "local", "classes": [1, 2, 3]}))
    cc.write_section(out, section)
    d = json.loads(out.read_text())
    assert d["classes"] == [1, 2, 3] and d["compute"]["launch_s"] == section["launch_s"]
    assert "summary" not in d and cc.summary(section).count("\n") > 5


def test_calibrate_dispatches_compute_without_mpi(monkeypatch, tmp_path):
    from mpipar.bench import calibrate

    called = {}
    monkeypatch.setattr(cc, "main", lambda args: called.setdefault("args", args) and 0)
    import argparse

    p = argparse.ArgumentParser()
    calibrate.add_arguments(p)
    args = p.parse_args(["--compute", "--threads", "2", "--out", str(tmp_path / "x.json")])
    assert calibrate.main(args) == 0 or called
    assert called["args"].threads == 2 and called["args"].output == str(tmp_path / "x.json")
    assert np.isfinite(args.compute_repeats)


def test_the_check_predicts_the_step_it_times_from_the_same_code(monkeypatch):
    """The real step and the prediction run the same GPT code: the predicted parts add up
    to the step, every kind of kernel is priced, and the GEMM time is that of the step's
    FLOPs at the section's efficiencies (no timed assertion: measured figures are reported)."""
    monkeypatch.setattr(cc, "DIMS", (64, 128))
    monkeypatch.setattr(cc, "ATTENTION", ((64, 32, 32),))
    monkeypatch.setattr(cc, "MEM_BYTES", (4096, 65536))
    monkeypatch.setattr(cc, "SAMPLE_S", 1e-4)
    real = cc.RealStep(threads=1)
    section = cc.build_section(threads=1, repeats=2, beside=[real])
    assert len(real.runs) == 3 * 2                  # once per round of the three measurements
    check = cc.check_step(section, real)
    p = check["predicted"]
    assert p["step"] == pytest.approx(p["forward"] + p["backward"] + p["optimizer"], rel=1e-12)
    assert sum(check["predicted_kinds"].values()) == pytest.approx(p["step"], rel=1e-9)
    assert check["predicted_kinds"]["gemm"] > 0 and check["predicted_kinds"]["scatter"] > 0
    assert set(check["measured"]) == set(p) and all(v > 0 for v in check["measured"].values())
    assert "forward" in cc.format_check(check)
