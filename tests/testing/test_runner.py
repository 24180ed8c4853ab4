"""``python -m mpipar.testing``, the suite's runner: its summary names what failed, and a
serial test that hangs fails alone (the signal timeout) instead of ending the serial part."""

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import time
    import pytest

    def test_fails():
        assert 1 == 2

    @pytest.mark.timeout(2)
    def test_hangs():
        time.sleep(600)

    def test_after_the_hang():
        pass
""")


def test_a_hanging_serial_test_fails_alone_and_the_summary_names_each_failure(tmp_path):
    (tmp_path / "test_child.py").write_text(CHILD)
    res = subprocess.run([sys.executable, "-m", "mpipar.testing", "--serial-only", "-pno:cacheprovider",
                          "test_child.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    summary = res.stdout.split("== summary", 1)[1]
    assert res.returncode == 1, res.stdout
    assert "serial: FAILED (exit 1)    1 passed, 2 failed" in summary, summary
    assert "-- serial: FAILED test_child.py::test_fails" in summary, summary
    assert "-- serial: FAILED test_child.py::test_hangs - Failed: Timeout" in summary, summary


def test_a_part_that_ends_before_pytest_counts_shows_its_last_lines(tmp_path):
    (tmp_path / "test_child.py").write_text("import os\n\ndef test_dies():\n    print('last words', flush=True)\n"
                                            "    os._exit(7)\n")
    res = subprocess.run([sys.executable, "-m", "mpipar.testing", "--serial-only", "-pno:cacheprovider",
                          "-s", "test_child.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    summary = res.stdout.split("== summary", 1)[1]
    assert res.returncode == 1, res.stdout
    assert "serial: FAILED (exit 7)    0 passed, 1 failed" in summary, summary
    assert "-- serial ended before pytest counted (exit 7); its last lines:" in summary, summary
    assert "last words" in summary.split("its last lines:", 1)[1], summary
