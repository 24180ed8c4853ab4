# Sourced by slurm/train.sbatch and slurm/train-gpu.sbatch: run one training step so that a
# preemption or the time limit costs at most the steps since the last step boundary.
#
#   run_preemptible srun ... python -m mpipar.train ... --preempt-status "$PREEMPTED" ...
#
# Slurm sends USR1 (sbatch --signal=B:USR1@120) to this batch shell only, and TERM to the
# shell and every task at the time limit or on scancel. The step runs in the background so the
# shell can take the signal while it waits: the trap forwards it to srun, which forwards it to
# every task; mpipar.train then saves a checkpoint at its next step boundary and exits with
# status $PREEMPTED. That status, and only that one, means "stopped with a checkpoint, not
# finished": the job requeues itself, and the next run resumes (--resume auto). 0 is a finished
# run; anything else is a failure, passed on as the job's exit status.

PREEMPTED=75                     # EX_TEMPFAIL: try again later

run_preemptible() {
    "$@" &
    local step=$!
    trap 'echo "mpipar: $(date -u +%FT%TZ) USR1: asking the training step to checkpoint and stop"; kill -USR1 "$step" 2>/dev/null || true' USR1
    trap 'echo "mpipar: $(date -u +%FT%TZ) TERM: asking the training step to checkpoint and stop"; kill -TERM "$step" 2>/dev/null || true' TERM
    local status=0
    while true; do
        wait "$step" && status=0 || status=$?
        kill -0 "$step" 2>/dev/null || break      # a trap interrupted the wait: wait again
    done
    trap - USR1 TERM
    if [ "$status" -eq "$PREEMPTED" ]; then
        echo "mpipar: checkpoint saved; requeueing job ${SLURM_JOB_ID} to resume from it"
        scontrol requeue "${SLURM_JOB_ID}"
        return 0
    fi
    return "$status"
}
