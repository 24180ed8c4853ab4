"""All-reduce a vector with every available algorithm and check it against NumPy.

    mpiexec -n 8 python examples/allreduce.py
"""

import numpy as np

from mpipar.comm import algorithm_names, make_communicator
from mpipar.runtime import print0

comm = make_communicator()
x = np.arange(10, dtype=np.float64) * (comm.rank + 1)          # rank r holds (r+1) * [0..9]
expected = np.arange(10, dtype=np.float64) * comm.size * (comm.size + 1) / 2
for name in algorithm_names():
    y = comm.allreduce(x, op="sum", algorithm=name)
    assert np.array_equal(y, expected), (name, y)
    print0(f"{name:>8}: {y}")
mean = comm.allreduce(x, op="avg")
print0(f"     avg: {mean}   (on {comm.size} ranks, every rank holds the same bits)")
