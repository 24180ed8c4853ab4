"""Child job for tests/comm/test_watchdog.py: a hang the watchdog must end, named by
``argv[1]``, with the collective timeout ``argv[2]`` seconds (no MPIPAR_DEBUG).

* ``mismatch``: rank 0 all-reduces while the others broadcast (collective #2 of the world);
* ``recv``: rank 0 waits for a message (tag 7) that rank 1 never sends; rank 1 sleeps.
"""

import sys
import time

import numpy as np

from mpipar.comm import make_communicator, set_collective_timeout

mode, limit = sys.argv[1], float(sys.argv[2])
comm = make_communicator()
comm.allreduce(np.ones(4))            # collective #1 completes on every rank
set_collective_timeout(limit)
if mode == "mismatch":
    if comm.rank == 0:
        comm.allreduce(np.ones(16, dtype=np.float32))
    else:
        comm.broadcast(np.ones(16, dtype=np.float32))
elif mode == "recv":
    if comm.rank == 0:
        comm.recv(1, tag=7, shape=(8,), dtype="float64")
    else:
        time.sleep(limit + 60)        # ended by rank 0's abort
comm.barrier()
