"""Child pytest file for tests/test_harness.py (not collected by the suite: no test_ prefix).

Rank 3 fails an assertion; the other ranks then wait in an all-reduce. The conftest hook
must abort the job, naming rank 3 and this test."""

import numpy as np
import pytest


@pytest.mark.mpi(min_size=4)
def test_rank3_fails(comm):
    assert comm.rank != 3, "rank 3 disagrees"
    comm.allreduce(np.ones(3))
    comm.barrier()
