"""Child job for tests/test_harness.py: rank ``argv[1]`` raises, the others wait in a
collective that would never complete. The job must end at once, non-zero, naming the rank."""

import sys

import numpy as np

from mpipar.comm import make_communicator

comm = make_communicator()
bad = int(sys.argv[1])
if comm.rank == bad:
    raise RuntimeError(f"deliberate failure on rank {bad}")
comm.allreduce(np.ones(4))  # the others block here until the abort ends them
comm.barrier()
