"""``bench calibrate``'s pure helpers: size classes through measured points (interpolating or
one fitted line per class) and the profile built from the medians, post overhead included.
No MPI: the measured medians are made up here."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from mpipar.bench.calibrate import build_profile, fitted_classes, interpolating_classes
from mpipar.comm.network import Link, Profile, load_profile

# made-up medians (seconds): not linear, and given out of order on purpose
SAMPLES = {1024: 3e-6, 8: 1e-6, 64: 1.5e-6, 65536: 40e-6, 16384: 9e-6, 1 << 20: 500e-6}


def _link(samples):
    return Link(tuple(interpolating_classes(samples)))


def test_interpolating_classes_pass_through_every_point():
    """The link's time at each measured size is that size's median (1e-12 relative)."""
    link = _link(SAMPLES)
    for n, t in SAMPLES.items():
        assert link.time(n) == pytest.approx(t, rel=1e-12)


def test_interpolating_classes_shape():
    """Sorted bounds at the measured sizes (then one unbounded class); the first class is
    the smallest size's time with beta 0, the last alpha 0 and beta t_last / n_last."""
    classes = interpolating_classes(SAMPLES)
    sizes = sorted(SAMPLES)
    assert [c.max_bytes for c in classes] == sizes + [None]
    assert (classes[0].alpha, classes[0].beta) == (SAMPLES[8], 0.0)
    assert classes[-1].alpha == 0.0
    assert classes[-1].beta == pytest.approx(SAMPLES[1 << 20] / (1 << 20), rel=1e-15)


def test_interpolating_classes_are_linear_between_points():
    """At the midpoint (and a quarter) of two neighbouring sizes the time is the same
    fraction of the way between their times."""
    link = _link(SAMPLES)
    pts = sorted(SAMPLES.items())
    for (n0, t0), (n1, t1) in zip(pts, pts[1:]):
        assert link.time((n0 + n1) // 2) == pytest.approx((t0 + t1) / 2, rel=1e-12)
        q = n0 + (n1 - n0) // 4
        assert link.time(q) == pytest.approx(t0 + (t1 - t0) * (q - n0) / (n1 - n0), rel=1e-12)


def test_interpolating_classes_below_and_beyond():
    """Below the smallest size: that size's time, constant. Beyond the largest: proportional
    to size through the origin."""
    link = _link(SAMPLES)
    for n in (0, 1, 4, 7):
        assert link.time(n) == SAMPLES[8]
    big, t_big = 1 << 20, SAMPLES[1 << 20]
    for k in (1.5, 2, 16, 1000):
        n = int(k * big)
        assert link.time(n) == pytest.approx(t_big * n / big, rel=1e-12)


def test_interpolating_classes_one_sample():
    """One measured size: constant up to it, proportional beyond."""
    link = _link({4096: 2e-6})
    assert link.time(1) == 2e-6 and link.time(4096) == 2e-6
    assert link.time(8192) == pytest.approx(4e-6, rel=1e-12)


def test_interpolating_classes_follow_a_dip():
    """A time that goes down between two sizes (a protocol switch) is followed, not smoothed."""
    link = _link({1024: 5e-6, 2048: 3e-6, 4096: 4e-6})
    assert link.time(1024) == pytest.approx(5e-6, rel=1e-12)
    assert link.time(1536) == pytest.approx(4e-6, rel=1e-12)
    assert link.time(2048) == pytest.approx(3e-6, rel=1e-12)
    assert link.time(3072) == pytest.approx(3.5e-6, rel=1e-12)


# -- fitted classes ------------------------------------------------------------------------

LINES = [(1024, 1e-6, 1e-9), (65536, 5e-6, 5e-10), (None, 2e-5, 2e-10)]


def _linear(sizes):
    out = {}
    for n in sizes:
        for hi, a, b in LINES:
            if hi is None or n <= hi:
                out[n] = a + n * b
                break
    return out


def test_fitted_classes_recover_exact_lines():
    """On data exactly linear in each class, each class's fit is that class's alpha and beta."""
    sizes = [2 ** k for k in range(3, 23)]
    classes = fitted_classes(_linear(sizes), [1024, 65536])
    assert [c.max_bytes for c in classes] == [1024, 65536, None]
    for c, (_, a, b) in zip(classes, LINES):
        assert c.alpha == pytest.approx(a, rel=1e-6)
        assert c.beta == pytest.approx(b, rel=1e-6)
    link = Link(tuple(classes))
    for n, t in _linear(sizes).items():
        assert link.time(n) == pytest.approx(t, rel=1e-6)


def test_fitted_classes_drop_empty_classes():
    """A class with no sample is dropped; the last kept class is made unbounded; a class with
    one sample is that time with beta 0."""
    samples = _linear([8, 64, 512, 1024, 65536])
    classes = fitted_classes(samples, [1024, 4096, 65536, 1 << 20])
    assert [c.max_bytes for c in classes] == [1024, None]
    assert classes[0].alpha == pytest.approx(1e-6, rel=1e-6)
    assert classes[0].beta == pytest.approx(1e-9, rel=1e-6)
    assert (classes[1].alpha, classes[1].beta) == (samples[65536], 0.0)


# -- build_profile -------------------------------------------------------------------------

SIZES = [8, 1024, 65536, 1 << 20]


def _measured(post_halves):
    """Medians per operation; posted = message + 2 * post_halves[i] at SIZES[i]."""
    message = {8: 2e-6, 1024: 3e-6, 65536: 30e-6, 1 << 20: 400e-6}
    return {"message": message,
            "posted": {n: message[n] + 2 * h for n, h in zip(SIZES, post_halves)},
            "reduce": {8: 1e-7, 1024: 3e-7, 65536: 8e-6, 1 << 20: 2e-4},
            "copy": {8: 5e-8, 1024: 1e-7, 65536: 4e-6, 1 << 20: 1.5e-4}}


def test_build_profile_each_hits_the_samples(tmp_path):
    """split 'each': link.time, reduce_time and copy_time are the medians at every measured
    size; gamma and copy per byte are the largest size's; the rest is passed through, and the
    profile survives a save/load."""
    measured = _measured([1e-6, 2e-6, 5e-6, 1e-3])
    prof = build_profile("box", measured, "each", 65536, {"source": "test"})
    assert isinstance(prof, Profile)
    assert prof.name == "box" and prof.eager_limit == 65536
    for n in SIZES:
        assert prof.link.time(n) == pytest.approx(measured["message"][n], rel=1e-12)
        assert prof.reduce_time(n) == pytest.approx(measured["reduce"][n], rel=1e-12)
        assert prof.copy_time(n) == pytest.approx(measured["copy"][n], rel=1e-12)
    big = 1 << 20
    assert prof.gamma == measured["reduce"][big] / big
    assert prof.copy == measured["copy"][big] / big
    assert prof.metadata["source"] == "test"
    assert prof.metadata["samples"]["posted"][str(big)] == measured["posted"][big]
    path = tmp_path / "box.json"
    prof.save(path)
    back = load_profile(str(path))
    assert back == prof
    for n in SIZES:
        assert back.reduce_time(n) == prof.reduce_time(n)
        assert back.copy_time(n) == prof.copy_time(n)


def test_build_profile_post_overhead_is_the_median_up_to_64k():
    """o = median over sizes <= 64 KiB of (posted - message) / 2: the 1 MiB difference is
    left out."""
    prof = build_profile("box", _measured([1e-6, 2e-6, 5e-6, 1e-3]), "each", 65536, {})
    assert prof.post_overhead == pytest.approx(2e-6, rel=1e-9)
    # an even number of small sizes: the mean of the middle two
    measured = _measured([1e-6, 4e-6, 0.0, 0.0])
    del measured["posted"][65536]
    prof = build_profile("box", measured, "each", 65536, {})
    assert prof.post_overhead == pytest.approx(statistics.median([1e-6, 4e-6]), rel=1e-9)


def test_build_profile_post_overhead_clamps_at_zero():
    """Posting measured faster than sendrecv (noise) gives o = 0, not a negative time."""
    prof = build_profile("box", _measured([-1e-6, -2e-6, 3e-6, 1e-3]), "each", 65536, {})
    assert prof.post_overhead == 0.0


def test_build_profile_post_overhead_without_small_sizes():
    """No size up to 64 KiB: the smallest measured size alone gives o."""
    measured = _measured([1e-6, 2e-6, 5e-6, 7e-6])
    for op in measured.values():
        for n in (8, 1024, 65536):
            del op[n]
    prof = build_profile("box", measured, "each", 65536, {})
    assert prof.post_overhead == pytest.approx(7e-6, rel=1e-9)


def test_build_profile_oneway_link_is_the_samples_less_the_post_overhead():
    """The one-way samples become the profile's oneway link, less the sender's post
    overhead o (the simulator charges o on top), never below half the sample; the samples
    are kept in the metadata. Without one-way samples, or when the ordinary link is already
    one-way (--method pingpong), there is no oneway link."""
    measured = _measured([2e-6, 2e-6, 2e-6, 2e-6])  # o = 2 us
    oneway = {8: 3e-6, 1024: 4e-6, 65536: 20e-6, 1 << 20: 250e-6}
    prof = build_profile("box", dict(measured, oneway=oneway), "each", 65536, {"method": "exchange"})
    assert prof.post_overhead == pytest.approx(2e-6, rel=1e-9)
    assert prof.oneway_link is not None
    for n, v in oneway.items():
        assert prof.oneway_link.time(n) == pytest.approx(max(v - 2e-6, v / 2), rel=1e-9)
    assert prof.oneway_link.time(8) == pytest.approx(1.5e-6, rel=1e-9)  # clamped at half
    assert prof.metadata["samples"]["oneway"]["1024"] == oneway[1024]
    assert build_profile("box", measured, "each", 65536, {}).oneway_link is None
    assert build_profile("box", dict(measured, oneway=oneway), "each", 65536,
                         {"method": "pingpong"}).oneway_link is None


def test_build_profile_split_fits_one_line_per_class():
    """split '64K,256K': the message, reduce and copy links have classes bounded there, each
    the line of its class's samples."""
    lines = [(65536, 2e-6, 1e-9), (262144, 1e-5, 4e-10), (None, 5e-5, 2e-10)]
    sizes = [2 ** k for k in range(3, 23)]
    lin = {n: next(a + n * b for hi, a, b in lines if hi is None or n <= hi) for n in sizes}
    measured = {"message": lin, "posted": dict(lin), "reduce": dict(lin), "copy": dict(lin)}
    prof = build_profile("fit", measured, "64K,256K", 65536, {})
    for link in (prof.link, prof.reduce_link, prof.copy_link):
        assert [c.max_bytes for c in link.classes] == [65536, 262144, None]
        for c, (_, a, b) in zip(link.classes, lines):
            assert c.alpha == pytest.approx(a, rel=1e-6)
            assert c.beta == pytest.approx(b, rel=1e-6)
    assert prof.post_overhead == 0.0


def test_call_overheads_are_measured_minus_simulated():
    """call_overheads: per algorithm, the median over the overhead sizes of measured minus
    simulated time on the profile (never negative); other sizes are ignored."""
    from mpipar.bench.calibrate import OVERHEAD_SIZES, call_overheads
    from mpipar.comm.network import Profile
    from mpipar.sim import simulate_collective

    prof = Profile.simple(2e-6, 1e-9, 1e-10, eager_limit=65536)
    sim = {n: simulate_collective("allreduce", "ring", 2, n // 4, "float32", profile=prof, data=False).time
           for n in OVERHEAD_SIZES}
    extra = [7e-6, 9e-6, 8e-6, 30e-6]  # median of the four: 8.5 us
    measured = {"ring": {n: sim[n] + x for n, x in zip(OVERHEAD_SIZES, extra)} | {1 << 20: 1.0},
                "rhd": {n: 0.0 for n in OVERHEAD_SIZES}}  # faster than the model: clamped to 0
    got = call_overheads(measured, 2, prof)
    assert got["ring"] == pytest.approx(8.5e-6, rel=1e-9)
    assert got["rhd"] == 0.0


@pytest.mark.mpi(min_size=2)
def test_calibrate_runs_and_checks(comm, tmp_path, capsys):
    """The whole command on real ranks, small: it writes a profile that loads, with every
    measured part, and prints the predicted-vs-measured table it saves."""
    import argparse
    import json
    import math

    from mpipar.bench import calibrate
    from mpipar.comm.algorithms import host_algorithm_names

    p = argparse.ArgumentParser()
    calibrate.add_arguments(p)
    out, check, raw = tmp_path / "prof.json", tmp_path / "check.json", tmp_path / "raw.npz"  # rank 0 writes
    args = p.parse_args(["--sizes", "256:16K", "--repeats", "3", "--warmup", "1", "--check", "ring,rhd",
                         "--check-min", "4K", "--output", str(out), "--check-json", str(check),
                         "--raw", str(raw)])
    assert calibrate.main(args, comm=comm) == 0
    text = capsys.readouterr().out
    if comm.rank != 0:
        return
    prof = load_profile(str(out))
    assert prof.reduce_link is not None and prof.copy_link is not None and prof.post_overhead >= 0
    assert prof.oneway_link is not None and 0 < prof.oneway_link.time(4096) < 1
    assert prof.transfers_need_cpu  # the test's ranks share a node
    assert set(prof.call_overhead) == {a for a in host_algorithm_names() if a != "native"}
    for n in (256, 4096, 16384):
        assert 0 < prof.link.time(n) < 1 and 0 < prof.reduce_time(n) < 1 and 0 < prof.copy_time(n) < 1
    rows = json.loads(check.read_text())["rows"]
    assert {(r["algorithm"], r["size"]) for r in rows} == {(a, n) for a in ("ring", "rhd") for n in (4096, 8192, 16384)}
    assert all(r["measured_us"] > 0 and math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in rows)
    assert "predictions within 25%" in text and "call overhead" in text
    # --raw: every timed round of every operation and size, whose medians are the profile's
    with np.load(raw, allow_pickle=False) as rounds:
        sizes = [256 << k for k in range(7)]
        assert {f"{op}/{n}" for op in ("message", "posted", "oneway", "reduce", "copy") for n in sizes} <= set(rounds)
        assert {f"ring/{n}" for n in (4096, 8192, 16384)} <= set(rounds)
        assert all(rounds[k].shape == (3,) and (rounds[k] > 0).all() for k in rounds)
        samples = prof.metadata["samples"]
        for n in sizes:
            assert samples["message"][str(n)] == float(np.median(rounds[f"message/{n}"]))
        by_alg = {(r["algorithm"], r["size"]): r["measured_us"] for r in rows}
        assert by_alg[("ring", 8192)] == pytest.approx(float(np.median(rounds["ring/8192"])) * 1e6, rel=1e-12)
