"""Test-wide fixtures and the rule that one failing rank ends the whole MPI job.

Under ``--with-mpi`` a test that fails on one rank would leave the other ranks waiting in
the next collective forever. So the moment any rank records a failure, it writes the test id,
its rank and the traceback to stderr and calls MPI_Abort, which ends every rank with a
non-zero exit. Hangs are further bounded by pytest-timeout (thread method: it can fire while
the main thread is stuck inside an MPI call) and by the launcher's own timeout.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from mpipar import backend
from mpipar.parallel.trainer import ParallelTrainer
from mpipar.runtime import wait_until_output_read


def _world():
    mod = sys.modules.get("mpi4py.MPI")
    if mod is not None and mod.Is_initialized() and not mod.Is_finalized():
        return mod.COMM_WORLD
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    world = _world()
    if report.failed and world is not None and world.Get_size() > 1 and item.get_closest_marker("mpi"):
        rank, size = world.Get_rank(), world.Get_size()
        sys.stderr.write(f"\n[mpipar] rank {rank}/{size}: test {item.nodeid} FAILED ({report.when}); "
                         f"aborting the MPI job\n{report.longreprtext}\n")
        wait_until_output_read()  # MPI_Abort would drop what the launcher has not read yet
        world.Abort(1)


XPS = [pytest.param(np, id="numpy")]
if backend.cupy_available():
    XPS.append(pytest.param(backend.cupy_module(), id="cupy"))
else:
    XPS.append(pytest.param(None, id="cupy", marks=pytest.mark.skip(reason="CuPy with a GPU not available")))


@pytest.fixture(params=XPS)
def xp(request):  # type: ignore[no-untyped-def]
    """The array module under test: numpy, and cupy where a GPU is present."""
    return request.param


@pytest.fixture
def strict_cupy():  # type: ignore[no-untyped-def]
    """Opt-in: the strict CuPy double (``mpipar.testing.cupy_double``) installed as the GPU
    array module for this test, removed after it. The test gets the ``StrictCupy`` (its
    ``xp``, ``cupyx`` and counters); ``backend.get_xp("gpu")`` returns its ``xp``."""
    from mpipar.testing.cupy_double import StrictCupy

    double = StrictCupy()
    with backend.use_gpu_module(double.xp):
        yield double


@pytest.fixture(scope="session")
def comm():  # type: ignore[no-untyped-def]
    """A Communicator over COMM_WORLD (MPI tests only)."""
    from mpipar.comm import make_communicator

    return make_communicator(abort_on_exception=False)


# child scripts launched by tests/test_harness.py: they fail on purpose and are never collected
collect_ignore = ["mpi_scripts"]


@pytest.fixture(autouse=True)
def _close_trainers(monkeypatch):  # type: ignore[no-untyped-def]
    """Every ParallelTrainer a test builds is closed after it (its MPI communicators freed),
    in the order built, which is the same on every rank: a whole-suite MPI process builds
    hundreds and would run out of MPI's communicators otherwise."""
    built: list = []
    init = ParallelTrainer.__init__

    def recording(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(ParallelTrainer, "__init__", recording)
    yield
    for tr in built:
        tr.close()
