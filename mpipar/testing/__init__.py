"""Test infrastructure: launching MPI jobs with timeouts, and the whole-suite runner.

``python -m mpipar.testing`` runs the serial tests, then the MPI tests (marked
``@pytest.mark.mpi``) under ``mpiexec -n N`` for N in 1, 2, 3, 4, 8.
"""
