"""Profiles (JSON round trip, shipped ones, shipped as package data), the report helpers shared
with the benchmark, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mpipar.sim
from mpipar.comm import network
from mpipar.comm.network import PROFILE_DIR, Link, Profile, SizeClass, load_profile, profile_names
from mpipar.sim import report
from mpipar.sim.__main__ import main as sim_main


def test_profile_round_trip(tmp_path):
    prof = Profile("x", Link((SizeClass(1024, 1e-6, 1e-9), SizeClass(None, 2e-6, 5e-10))), gamma=1e-10,
                   eager_limit=1024, ranks_per_node=4, intra=Link.simple(1e-7, 1e-11),
                   inter=Link.simple(3e-6, 2e-11), metadata={"source": "test"})
    path = tmp_path / "x.json"
    prof.save(path)
    back = load_profile(str(path))
    assert back == prof
    assert back.link.time(1024) == pytest.approx(1e-6 + 1024e-9)
    assert back.link.time(1025) == pytest.approx(2e-6 + 1025 * 5e-10)
    assert json.loads(path.read_text())["topology"]["ranks_per_node"] == 4


def test_shipped_profiles_load_by_name():
    names = profile_names()
    assert {"local", "dgx-h100", "dgx-a100"} <= set(names)
    dgx = load_profile("dgx-h100")
    assert dgx.ranks_per_node == 8 and "datasheet" in dgx.metadata["source"]
    # ring's ~370 GB/s on NVLink 4 (G3/G4), 48 GB/s per NDR NIC (G6), one NIC per GPU
    assert 1 / dgx.intra.params(1 << 20)[1] == pytest.approx(370e9)
    assert 1 / dgx.inter.params(1 << 20)[1] == pytest.approx(48e9)
    assert dgx.nics_per_node == 8 and dgx.native is not None
    a100 = load_profile("dgx-a100")
    assert 1 / a100.inter.params(1 << 20)[1] == pytest.approx(24e9)  # HDR 200 Gb/s, measured
    for prof in (dgx, a100):  # every number labelled: the metadata names its sources
        for key in ("intra_beta", "intra_latency", "inter_beta", "inter_latency", "gamma", "call_overhead"):
            assert prof.metadata.get(key), f"{prof.name} has no label for {key}"
    local = load_profile(None)
    assert local.name == "local" and "measured" in local.metadata["source"]
    with pytest.raises(FileNotFoundError, match="dgx-h100"):
        load_profile("no-such-profile")


def test_profiles_live_in_comm_and_sim_re_exports_them():
    """One definition: the network model is comm's (the cost model, auto and the simulated
    transport use it); mpipar.sim hands out the same objects."""
    assert PROFILE_DIR.parent == Path(network.__file__).parent
    assert PROFILE_DIR.parts[-2:] == ("comm", "profiles")
    for name in ("Link", "Network", "Profile", "SizeClass", "load_profile", "profile_names"):
        assert getattr(mpipar.sim, name) is getattr(network, name)


def test_shipped_profiles_are_package_data():
    """A wheel install has the profiles: pyproject.toml declares every shipped JSON file."""
    tomllib = pytest.importorskip("tomllib")
    root = PROFILE_DIR.parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("not a source checkout")
    data = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p.relative_to(PROFILE_DIR.parent).as_posix() for p in PROFILE_DIR.glob("*.json")}
    declared = {p.relative_to(PROFILE_DIR.parent).as_posix()
                for pattern in data.get("mpipar.comm", []) for p in PROFILE_DIR.parent.glob(pattern)}
    assert shipped and shipped <= declared


def test_size_classes_must_be_ordered():
    with pytest.raises(ValueError):
        Link((SizeClass(None, 1e-6, 1e-9), SizeClass(10, 1e-6, 1e-9)))


def test_report_helpers():
    assert report.parse_sizes("4K:64K") == [4096, 8192, 16384, 32768, 65536]
    assert report.parse_sizes("1000:5000") == [1000, 1024, 2048, 4096, 5000]
    assert report.parse_sizes("8,1M") == [8, 1 << 20]
    assert report.busbw_factor("allreduce", 4) == 1.5
    assert report.busbw_factor("allgather", 4) == 0.75
    assert report.busbw_factor("broadcast", 4) == 1.0
    r = report.row("allreduce", 4, 1 << 20, 1 << 18, "float32", 1e-3)
    assert r["algbw"] == pytest.approx((1 << 20) / 1e-3 / 1e9) and r["busbw"] == pytest.approx(1.5 * r["algbw"])
    table = report.format_table([r], title="ring")
    lines = table.splitlines()
    assert lines[0] == "# ring" and "busbw(GB/s)" in lines[1]
    assert lines[2].split() == ["1048576", "262144", "float32", "1000.00", "1.05", "1.57"]


def test_cli_prints_the_benchmark_table(capsys):
    assert sim_main(["collectives", "--ranks", "8", "--profile", "dgx-h100", "--sizes", "4K:16K",
                     "--algorithms", "rhd", "--model"]) == 0
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines() if ln and not ln.startswith("#")]
    assert [r[0] for r in rows] == ["4096", "8192", "16384"]
    assert all(r[2] == "float32" and float(r[3]) > 0 for r in rows)
    assert float(rows[0][3]) == pytest.approx(float(rows[0][6]), rel=1e-3)  # model == simulated
    assert sim_main(["profiles"]) == 0


def test_cli_header_names_the_local_profiles_pricing(capsys):
    """The shipped local profile was measured on one host: its header says that lone
    messages are priced apart and that transfers stall while the receiver reduces; the
    datasheet profile's says neither."""
    assert sim_main(["collectives", "--ranks", "4", "--profile", "local", "--sizes", "4K",
                     "--algorithms", "ring"]) == 0
    header = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("# flat network")]
    assert len(header) == 1 and "one-way" in header[0] and "transfers stall" in header[0]
    assert sim_main(["collectives", "--ranks", "4", "--profile", "dgx-h100", "--sizes", "4K",
                     "--algorithms", "ring"]) == 0
    out = capsys.readouterr().out
    assert "one-way" not in out and "transfers stall" not in out
