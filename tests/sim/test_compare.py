"""sim compare: rows of a benchmark JSON are simulated on the same rank count and set beside
the measured times; native (MPI's own code) cannot be simulated and is left out."""

from mpipar.sim.compare import compare, format_comparison
from mpipar.sim.run import simulate_collective


def test_compare_reproduces_a_simulated_measurement():
    t = simulate_collective("allreduce", "ring", 4, 1 << 16, profile="dgx-h100", data=False).time
    bench = {"meta": {"ranks": 4}, "rows": [
        {"collective": "allreduce", "algorithm": "ring", "size": 1 << 18, "count": 1 << 16,
         "type": "float32", "op": "sum", "time_us": t * 1e6},
        {"collective": "allreduce", "algorithm": "native", "size": 1 << 18, "count": 1 << 16,
         "type": "float32", "op": "sum", "time_us": 1.0},
        {"collective": "allreduce", "algorithm": "ring", "size": 4096, "count": 1024,
         "type": "float32", "op": "sum", "time_us": 1.0}]}
    rows = compare(bench, "dgx-h100", min_bytes=65536)
    assert len(rows) == 1 and rows[0]["algorithm"] == "ring"
    assert abs(rows[0]["ratio"] - 1.0) < 1e-9
    assert "1 of 1 predictions within 25%" in format_comparison(rows)
