#!/usr/bin/env bash
# Splits one long training run (e.g. a whole segment curriculum, 1 -> 2 -> 4 -> ... -> 32 segments) over
# a chain of jobs, each starting when the previous one succeeded (--dependency=afterok), for clusters whose
# time limit is shorter than the run or that do not allow requeueing:
#
#   slurm/chain.sh 4 --nodes=2 --ntasks-per-node=8 --time=24:00:00 -- --out_dir runs/babilong --curriculum 1,2,4,8,16,32
#
# Arguments: the number of jobs, then sbatch options, then "--", then launchers/train.py flags (the same for
# every job; --out_dir is required, since it is what carries the run from job to job). Each job trains
# until SIGUSR1 arrives before its time limit, checkpoints (the curriculum stage is part of the checkpoint)
# and exits successfully (RMT_REQUEUE=0), which starts the next one; it resumes with --resume auto.
# Jobs that start after the run has reached --max_steps find it finished and end at once.
# Prints the job ids, one per line. Extra environment: RMT_AFTER=<job id> makes the first job wait for
# that one as well (e.g. a data preparation job).
set -euo pipefail

usage() {
    echo "usage: $0 JOBS [sbatch options...] -- --out_dir DIR [launcher flags...]" >&2
    exit 2
}

if (($# < 2)) || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
    usage
fi
jobs=$1
shift
sbatch_options=()
while (($#)) && [[ $1 != -- ]]; do
    sbatch_options+=("$1")
    shift
done
(($#)) || usage
shift
train_flags=("$@")

repo=${RMT_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=slurm/common.sh
source "$repo/slurm/common.sh"
if ! rmt_has_flag --out_dir "${train_flags[@]}"; then
    echo "error: pass --out_dir after '--': every job of the chain must resume the same run" >&2
    exit 2
fi

previous=${RMT_AFTER:-}
for ((i = 0; i < jobs; i++)); do
    dependency=()
    [[ -n $previous ]] && dependency=(--dependency="afterok:$previous" --kill-on-invalid-dep=yes)
    previous=$(RMT_REQUEUE=0 RMT_REPO=$repo sbatch --parsable "${dependency[@]}" "${sbatch_options[@]}" \
        "$repo/slurm/train.sbatch" "${train_flags[@]}")
    previous=${previous%%;*}  # --parsable prints "id;cluster" on multi-cluster setups
    echo "$previous"
done
