"""The simulated network: one-call runs of collective algorithms, and the command line.

The engine and the simulated transport live in ``mpipar.comm.transport.sim``, and the network
profiles they price messages with in ``mpipar.comm.network`` (``comm/profiles/*.json``): the
cost model and ``algorithm="auto"`` in ``comm`` need them too. This package holds what sits
above them: one-call runs of a collective (``run.py``), predicted beside measured
(``compare.py``), the nccl-tests tables (``report.py``) and ``python -m mpipar.sim``. The
profile names are re-exported here for convenience.
"""

from mpipar.comm.network import Link, Network, Profile, SizeClass, load_profile, profile_names
from mpipar.sim.run import simulate, simulate_collective

__all__ = ["Link", "Network", "Profile", "SizeClass", "load_profile", "profile_names",
           "simulate", "simulate_collective"]
