"""Communication: the Communicator interface, collective algorithms, transports.

    from mpipar.comm import make_communicator
    comm = make_communicator(algorithm="native")
    total = comm.allreduce(x, op="sum")

See ``communicator.py`` for the contract, ``algorithms/`` for the from-scratch algorithms and
``transport/`` for the point-to-point layer beneath them. Importing this package does not
initialise MPI; ``make_communicator`` does.
"""

from mpipar.comm.algorithms import algorithm_names, get_algorithm, host_algorithm_names
from mpipar.comm.communicator import (CollectiveMismatchError, Communicator, make_communicator,
                                      split_counts)
from mpipar.comm.compress import GradientCompressor, make_compressor
from mpipar.comm.mpi_env import GPUSelectionError, select_gpu
from mpipar.comm.ops import OP_NAMES, OPS, ReduceOp, get_op
from mpipar.comm.watchdog import CollectiveTimeoutError
from mpipar.comm.watchdog import summary as watchdog_summary
from mpipar.comm.watchdog import set_timeout as set_collective_timeout

__all__ = ["Communicator", "make_communicator", "split_counts", "CollectiveMismatchError",
           "CollectiveTimeoutError", "set_collective_timeout", "watchdog_summary",
           "select_gpu", "GPUSelectionError", "algorithm_names", "host_algorithm_names",
           "get_algorithm", "OPS", "OP_NAMES", "ReduceOp", "get_op", "GradientCompressor",
           "make_compressor"]
