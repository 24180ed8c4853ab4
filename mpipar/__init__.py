"""mpipar: train and simulate large-language-model parallelism on MPI.

Layers (bottom to top): ``backend`` (numpy | cupy), ``comm`` (Communicator, collective
algorithms over a point-to-point transport), ``nn`` / ``optim`` / ``data`` (a GPT with
hand-written backward), ``parallel`` (data, tensor, pipeline), and the command lines
``python -m mpipar.train | bench | sim``. See docs/architecture.md.

Importing mpipar does not initialise MPI; ``mpipar.comm.make_communicator`` does.
"""

__version__ = "0.1.0"
