"""Point-to-point transports: the only thing a collective algorithm talks to.

``base.Transport`` is the interface (isend / irecv / wait / local reduce);
``mpi.MPITransport`` moves real bytes with MPI (host buffers directly, GPU buffers directly
when the MPI library is CUDA-aware, otherwise staged through pinned host memory);
the simulated transport advances virtual clocks under a network model.
"""

from mpipar.comm.transport.base import Request, Transport, CompletedRequest

__all__ = ["Request", "Transport", "CompletedRequest"]
