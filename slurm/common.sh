# Sourced by every slurm/*.sbatch: the environment of an mpipar job (see docs/slurm.md).
# MPIPAR_HOME: the checkout (default: where sbatch was run); MPIPAR_VENV: its virtual
# environment (default: $MPIPAR_HOME/.venv, what `make install` creates).
module load mpi 2>/dev/null || true           # site-specific: the MPI mpi4py was built against
source "${MPIPAR_VENV:-$MPIPAR_HOME/.venv}/bin/activate"
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
export MPI4PY_RC_THREAD_LEVEL=serialized      # mpipar calls MPI from one thread at a time
