"""The simulated network: profiles, the network model, and runs of collective algorithms.

The engine and the simulated transport live in ``mpipar.comm.transport.sim``; this package
holds what sits above them: network profiles (``network.py``, ``profiles/*.json``), one-call
runs of a collective (``run.py``) and the command line (``python -m mpipar.sim``).
"""

from mpipar.sim.network import Link, Network, Profile, SizeClass, load_profile, profile_names
from mpipar.sim.run import simulate, simulate_collective

__all__ = ["Link", "Network", "Profile", "SizeClass", "load_profile", "profile_names",
           "simulate", "simulate_collective"]
