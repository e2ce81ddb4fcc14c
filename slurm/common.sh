# shellcheck shell=bash
# Sourced by the slurm/*.sbatch scripts: where the checkout and Python are, the rendezvous address,
# and an srun that forwards the batch shell's signals to every task. Nothing cluster-specific lives
# here; everything below is set from SLURM's variables or overridden by the environment:
#
#   RMT_REPO        checkout to run from (default: the directory sbatch was called in)
#   RMT_PYTHON      Python interpreter (default: $RMT_VENV/bin/python, else $RMT_REPO/.venv/bin/python,
#                   else python3 on PATH)
#   RMT_VENV        virtual environment whose bin/ is put first on PATH
#   MASTER_PORT     rendezvous port (default: 20000 + job id mod 20000, so jobs sharing a node differ)
#   OMP_NUM_THREADS threads per task (default: the CPUs SLURM gives each task)
#   RMT_TASK_WAIT_S once a task has ended, seconds the others get to end before srun ends them (default 60)
#   RMT_LAUNCH      how the tasks learn their ranks: "srun" (default) exports RANK, WORLD_SIZE and LOCAL_RANK
#                   from SLURM's variables (slurm/task_env.sh); "mpi" runs srun --mpi=pmi2 and the ranks are
#                   found through MPI (mpi4py over SLURM's PMI2), as under mpirun
#   RMT_SWEEP       for job arrays: space-separated values; array task i replaces every "{}" in the
#                   script's arguments with the i-th value (sbatch --array=0-<count-1>)

# Exit status of launchers/train.py after a stop signal once the checkpoint is written ("requeue me").
# shellcheck disable=SC2034  # read by the scripts that source this file
RMT_EXIT_PREEMPTED=75

rmt_setup() {
    RMT_REPO=${RMT_REPO:-${SLURM_SUBMIT_DIR:?run this script through sbatch, or set RMT_REPO}}
    cd "$RMT_REPO" || exit 1
    if [[ -n ${RMT_VENV:-} ]]; then
        export PATH=$RMT_VENV/bin:$PATH
    fi
    if [[ -z ${RMT_PYTHON:-} ]]; then
        if [[ -n ${RMT_VENV:-} ]]; then
            RMT_PYTHON=$RMT_VENV/bin/python
        elif [[ -x $RMT_REPO/.venv/bin/python ]]; then
            RMT_PYTHON=$RMT_REPO/.venv/bin/python
        else
            RMT_PYTHON=python3
        fi
    fi
    export RMT_REPO RMT_PYTHON
    export PYTHONPATH=$RMT_REPO${PYTHONPATH:+:$PYTHONPATH}
    # The batch shell runs on the first node of the allocation; rank 0 listens there.
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    # Oversubscribed OpenMP threads slow CPU runs down a hundredfold; one team per task's CPUs.
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export MASTER_ADDR MASTER_PORT OMP_NUM_THREADS
    RMT_LAUNCH=${RMT_LAUNCH:-srun}
    case $RMT_LAUNCH in
        srun) RMT_SRUN_LAUNCH=("$RMT_REPO/slurm/task_env.sh") ;;
        # MASTER_PORT still applies; MPI discovery takes rank 0's host as the master address.
        mpi) RMT_SRUN_LAUNCH=(--mpi=pmi2) ;;
        *)
            echo "rmt: RMT_LAUNCH=$RMT_LAUNCH is not a launch mode: use srun (the default) or mpi" >&2
            exit 2
            ;;
    esac
    echo "rmt: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}:" \
        "${SLURM_NTASKS:-1} tasks, master ${MASTER_ADDR}:${MASTER_PORT}, launch ${RMT_LAUNCH}, python ${RMT_PYTHON}"
}

# Sets RMT_ARGS to the arguments, with "{}" replaced by this array task's value of RMT_SWEEP.
rmt_sweep_args() {
    RMT_ARGS=("$@")
    [[ -n ${RMT_SWEEP:-} ]] || return 0
    local values
    read -r -a values <<<"$RMT_SWEEP"
    local index=${SLURM_ARRAY_TASK_ID:?RMT_SWEEP is set but this is not an array job: submit with --array=0-$((${#values[@]} - 1))}
    if ((index >= ${#values[@]})); then
        echo "rmt: array task $index has no value: RMT_SWEEP holds ${#values[@]} (use --array=0-$((${#values[@]} - 1)))" >&2
        exit 2
    fi
    RMT_ARGS=("${RMT_ARGS[@]//\{\}/${values[index]}}")
    echo "rmt: array task $index of sweep: ${values[index]}"
}

# Whether the flag (e.g. --out_dir) is among the remaining arguments, as "--flag value" or "--flag=value".
rmt_has_flag() {
    local flag=$1 arg
    shift
    for arg in "$@"; do
        [[ $arg == "$flag" || $arg == "$flag="* ]] && return 0
    done
    return 1
}

RMT_STOP_SIGNAL=""

# Runs the command once per task under srun, with torch.distributed's variables taken from SLURM's
# per-task ones, or (RMT_LAUNCH=mpi) with SLURM's PMI2 server, through which MPI finds the ranks.
# srun runs in the background so that the batch shell stays free to take signals (bash runs a trap
# only between commands) and to pass them on; srun relays them to every task.
# --wait: once a task has ended, srun ends the others RMT_TASK_WAIT_S seconds later. A rank blocked in a
# collective (its peer died, or timed out on a hung peer: --collective_timeout_s) only records SIGTERM,
# so without this the job would wait for it until its time limit. Not --kill-on-bad-exit: the ranks'
# status 75 after a checkpointed stop counts as a bad exit, and it would cut the others' exit short.
# Sets RMT_SRUN_STATUS to srun's exit status and RMT_STOP_SIGNAL to the signal that arrived, if any.
rmt_srun() {
    srun --wait="${RMT_TASK_WAIT_S:-60}" "${RMT_SRUN_LAUNCH[@]}" "$@" &
    local srun_pid=$!
    # shellcheck disable=SC2064  # the pid is fixed now, on purpose
    trap "rmt_forward USR1 $srun_pid" USR1
    # shellcheck disable=SC2064
    trap "rmt_forward TERM $srun_pid" TERM
    # `wait` returns early (status > 128) when a trapped signal arrives; wait again for srun's own status.
    while true; do
        RMT_WAIT_INTERRUPTED=0
        wait "$srun_pid" && RMT_SRUN_STATUS=0 || RMT_SRUN_STATUS=$?
        ((RMT_WAIT_INTERRUPTED && RMT_SRUN_STATUS > 128)) || break
    done
    trap - USR1 TERM
}

rmt_forward() {
    # shellcheck disable=SC2034  # read by the scripts that source this file
    RMT_STOP_SIGNAL=$1
    RMT_WAIT_INTERRUPTED=1
    echo "rmt: SIG$1 received at $(date -u +%FT%TZ); passing it to the tasks, which checkpoint and stop"
    kill -s "$1" "$2" 2>/dev/null || true
}
