"""The compute model (``mpipar.sim.compute``): a roofline whose curves pass through their
measured points, interpolate between them, and read the shipped GPU sections as labelled."""

import json
import math

import pytest

from mpipar.comm.network import load_profile
from mpipar.sim.compute import COMPUTE_PROFILES, ComputeModel, flops

LAUNCH = 2e-6


def section(**over):
    d = {"launch_s": LAUNCH, "memory_bytes_per_s": 10e9,
         "peak_flops": {"float32": 100e9, "float16": 100e9, "bfloat16": 200e9},
         "gemm": {"batched": "loop", "curves": {
             "float32": {"points": [{"m": 64, "n": 64, "k": 64, "tflops": 0.01},
                                    {"m": 512, "n": 512, "k": 512, "tflops": 0.06},
                                    {"m": 2048, "n": 2048, "k": 2048, "tflops": 0.08}]},
             "float16": {"same_as": "float32"},
             "bfloat16": {"same_as": "float32", "scale_to_max": 0.5}}},
         "memory": {"elementwise": {"points": [{"bytes": 4096, "gbps": 2.0},
                                               {"bytes": 1 << 20, "gbps": 8.0},
                                               {"bytes": 1 << 24, "gbps": 5.0}]},
                    "exp": {"points": [{"bytes": 1 << 20, "gbps": 1.0}]}}}
    d.update(over)
    return d


def test_flops_are_two_per_multiply_add():
    assert flops(3, 4, 5) == 120 and flops(3, 4, 5, batch=7) == 840
    assert ComputeModel.flops(2, 2, 2, 2) == 32


def test_the_gemm_curve_passes_through_its_measured_points():
    cm = ComputeModel.from_json(section())
    for p in section()["gemm"]["curves"]["float32"]["points"]:
        m, n, k = p["m"], p["n"], p["k"]
        assert cm.gemm_time(m, n, k) == pytest.approx(flops(m, n, k) / (p["tflops"] * 1e12), rel=1e-12)


def test_between_points_the_efficiency_lies_between_its_neighbours():
    cm = ComputeModel.from_json(section())
    e = [cm.gemm_efficiency(d, d, d) for d in (64, 128, 256, 512, 1024, 2048, 8192)]
    assert e[0] < e[1] < e[2] < e[3] < e[4] < e[5]
    assert e[6] == pytest.approx(e[5], rel=0.05)         # beyond the grid: near the last point


def test_a_skinny_gemm_is_priced_by_its_bytes():
    """m = 1 (a matrix-vector product): the memory side of the roofline decides."""
    cm = ComputeModel.from_json(section())
    m, n, k = 1, 4096, 4096
    assert cm.gemm_time(m, n, k) == pytest.approx(LAUNCH + 4 * (k + k * n + n) / 10e9, rel=1e-12)


def test_batched_gemms_loop_on_numpy_and_fill_the_tiles_on_cublas():
    loop = ComputeModel.from_json(section())
    one, eight = loop.gemm_time(512, 512, 512), loop.gemm_time(512, 512, 512, batch=8)
    assert eight - LAUNCH == pytest.approx(8 * (one - LAUNCH), rel=1e-12)
    fused = ComputeModel.from_json(section(gemm=dict(section()["gemm"], batched="fused")))
    # b matrices (m, n, k) fused are priced as one (m sqrt b, n sqrt b, k) product
    assert fused.gemm_time(256, 256, 512, batch=16) == pytest.approx(fused.gemm_time(1024, 1024, 512),
                                                                     rel=1e-12)
    with pytest.raises(ValueError, match="batched"):
        ComputeModel.from_json(section(gemm=dict(section()["gemm"], batched="sometimes")))


def test_same_as_reuses_a_curve_and_scale_to_max_sets_its_best_efficiency():
    cm = ComputeModel.from_json(section())
    assert cm.gemm_time(700, 300, 900, dtype="float16") == cm.gemm_time(700, 300, 900)
    best = max(cm.gemm_efficiency(d, d, d, dtype="bfloat16") for d in (64, 512, 2048))
    assert best == pytest.approx(0.5, rel=1e-12)
    ratio = [cm.gemm_efficiency(d, d, d, dtype="bfloat16") / cm.gemm_efficiency(d, d, d)
             for d in (64, 512, 2048)]
    assert max(ratio) == pytest.approx(min(ratio), rel=1e-12)   # the same shape dependence
    cyc = section()
    cyc["gemm"]["curves"]["float32"] = {"same_as": "bfloat16"}
    with pytest.raises(ValueError, match="cycle"):
        ComputeModel.from_json(cyc)


def test_memory_curves_pass_through_their_points_and_fall_back_by_kind():
    cm = ComputeModel.from_json(section())
    for p in section()["memory"]["elementwise"]["points"]:
        assert cm.memory_time(p["bytes"]) == pytest.approx(p["bytes"] / (p["gbps"] * 1e9), rel=1e-12)
    assert cm.memory_time(1 << 20, "exp") == pytest.approx((1 << 20) / 1e9, rel=1e-12)
    for kind in ("add", "where", "reduction", "copy", "scatter"):   # no curve of their own
        assert cm.memory_time(1 << 20, kind) == cm.memory_time(1 << 20, "elementwise")
    # tanh and log have none either: transcendental, then elementwise (exp is not their parent)
    assert cm.memory_time(1 << 20, "tanh") == cm.memory_time(1 << 20, "elementwise")
    times = [cm.memory_time(n) for n in (4096, 65536, 1 << 20, 1 << 22, 1 << 24)]
    assert times == sorted(times)                         # between the points: between them
    assert cm.memory_bandwidth(1 << 30) == cm.memory_bandwidth(1 << 24)   # constant beyond
    assert cm.memory_time(0) == LAUNCH


def test_missing_dtypes_and_peaks_are_named():
    cm = ComputeModel.from_json(section())
    with pytest.raises(KeyError, match="float64"):
        cm.gemm_time(64, 64, 64, dtype="float64")
    with pytest.raises(KeyError, match="tf32"):
        cm.peak_flops("tf32")
    bad = section()
    del bad["memory"]["elementwise"]
    with pytest.raises(ValueError, match="elementwise"):
        ComputeModel.from_json(bad)


# ---- the shipped GPU sections --------------------------------------------------------------

DATASHEET = {"dgx-a100": {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12},
             "dgx-h100": {"bfloat16": 989e12, "float16": 989e12, "tf32": 494e12, "float32": 67e12}}
HBM = {"dgx-a100": 2.039e12, "dgx-h100": 3.35e12}


@pytest.mark.parametrize("name", sorted(DATASHEET))
def test_gpu_sections_hold_the_datasheet_peaks_and_label_every_number(name):
    d = json.loads(COMPUTE_PROFILES.read_text())[name]
    cm = ComputeModel.named(name)
    for dt, peak in DATASHEET[name].items():
        assert cm.peak_flops(dt) == peak
    assert cm.memory_bytes_per_s == HBM[name]
    assert {"peak_flops", "memory_bytes_per_s", "launch_s"} <= d["sources"].keys()
    for dt, c in d["gemm"]["curves"].items():
        assert c.get("source"), f"{name} {dt} curve has no source"
    for kind, c in d["memory"].items():
        assert c.get("source"), f"{name} memory {kind} has no source"
    # large bf16 GEMMs land near the MAMF maxima (A100 SXM 267.9, H100 SXM 792.1 TFLOP/s)
    m = n = k = 8192
    achieved = flops(m, n, k) / cm.gemm_time(m, n, k, dtype="bfloat16")
    assert 0.7 * cm.peak_flops("bfloat16") < achieved < 0.9 * cm.peak_flops("bfloat16")
    # small ones far below; elementwise kernels at 85% of HBM
    assert flops(256, 256, 256) / cm.gemm_time(256, 256, 256, dtype="bfloat16") < 0.1 * achieved
    assert cm.memory_bandwidth(1 << 30) == pytest.approx(0.85 * HBM[name])


def test_h100_curve_is_xlas_table_at_its_points():
    """Kernel durations from a profiler: the launch is added, not taken out."""
    cm = ComputeModel.named("dgx-h100")
    f = flops(4096, 4096, 4096)
    assert cm.gemm_time(4096, 4096, 4096, dtype="bfloat16") == pytest.approx(
        cm.launch_s + f / 783.3e12, rel=1e-9)
    assert cm.gemm_time(4096, 4096, 4096, dtype="tf32") == pytest.approx(
        cm.launch_s + f / 401.6e12, rel=1e-9)


def test_from_profile_reads_the_profiles_section_or_the_shipped_table():
    prof = load_profile("dgx-h100")
    assert ComputeModel.from_profile(prof).peak_flops("bfloat16") == 989e12
    prof.compute = section()                                 # a Profile with its own section
    assert ComputeModel.from_profile(prof).peak_flops("bfloat16") == 200e9
    prof.compute = None
    prof.name = "no-such-cluster"
    with pytest.raises(KeyError, match="no-such-cluster"):
        ComputeModel.from_profile(prof)


def test_the_model_prices_a_symbolic_gpt_step():
    """The namespace and the model together: a GPT step costs its GEMMs' time and more."""
    from mpipar.nn.gpt import GPT, PRESETS
    from mpipar.sim.symbolic import SymbolicNamespace

    cm = ComputeModel.named("dgx-a100")
    ns = SymbolicNamespace(cm)
    model = GPT(PRESETS["small"], dtype="float32", xp=ns)
    ns.reset_counts()
    model.loss_and_grads(ns.zeros((8, 64), ns.int64), ns.zeros((8, 64), ns.int64))
    assert ns.seconds["gemm"] >= ns.gemm_flops / cm.peak_flops("float32")
    assert ns.seconds["elementwise"] >= ns.kernels["elementwise"] * cm.launch_s
    assert math.isfinite(sum(ns.seconds.values()))


# -- fusion regions, the host's dispatch cost, ranks sharing a host ---------------------------

def _gelu_forward_charges(fusion: str):
    """(kernels, seconds) a GELU forward over (rows, 512) float32 charges under ``fusion``."""
    from mpipar.nn import gelu
    from mpipar.sim.symbolic import SymbolicNamespace
    cm = ComputeModel.from_json(section(fusion=fusion))
    charged = []
    ns = SymbolicNamespace(cm, lambda kind, s: charged.append((kind, s)))
    x = ns.empty((256, 512), dtype=ns.float32)
    gelu.forward(x)
    return charged, cm, x.nbytes


def test_a_fused_region_is_one_kernel_reading_and_writing_each_array_once():
    unfused, cm, nbytes = _gelu_forward_charges("none")
    fused, _, _ = _gelu_forward_charges("fused")
    mem = [c for c in fused if c[0] != "gemm"]
    assert len(unfused) > 5 and len(mem) == 1
    # GELU's forward touches x, its cache t and its output: three arrays once each
    assert mem[0][1] == pytest.approx(cm.memory_time(3 * nbytes, "elementwise"))


def test_a_blocked_region_prices_every_pass_block_by_block():
    from mpipar.nn.blocking import BLOCK
    unfused, cm, nbytes = _gelu_forward_charges("none")
    blocked, _, _ = _gelu_forward_charges("blocked")
    assert len(blocked) == len(unfused)          # one charge per pass, as NumPy runs them
    rows_per_block = max(1, BLOCK // 512)
    blocks = -(-256 // rows_per_block)
    # the first pass at its whole size, the others as `blocks` cache-sized pieces
    assert blocks == 2 and blocked[0][1] == pytest.approx(unfused[0][1])
    # this curve is faster at half a pass's size than at its whole size: the blocked passes
    # cost less than the whole-array ones, each by its own price at the smaller size
    assert sum(s for _, s in blocked[1:]) < sum(s for _, s in unfused[1:])


def test_dispatch_is_paid_per_kernel_and_sharing_a_host_slows_every_kernel():
    base = ComputeModel.from_json(section())
    more = ComputeModel.from_json(section(dispatch_s=2e-6, concurrency={"1": 1.0, "2": 1.5}))
    assert more.memory_time(1 << 20) == pytest.approx(base.memory_time(1 << 20) + 2e-6)
    assert more.gemm_time(64, 64, 64) == pytest.approx(base.gemm_time(64, 64, 64) + 2e-6)
    two = more.on_host_with(2)
    assert two.memory_time(1 << 20) == pytest.approx(1.5 * more.memory_time(1 << 20))
    assert more.on_host_with(8).slowdown == 1.5          # the largest count measured
    assert more.on_host_with(1) is more and base.on_host_with(4) is base
