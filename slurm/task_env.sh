#!/usr/bin/env bash
# Runs its arguments as one rank of a torch.distributed job: srun starts one copy per task, and this
# maps SLURM's per-task variables onto the ones torch/DeepSpeed read (the env:// rendezvous), so no
# MPI discovery is needed. MASTER_ADDR and MASTER_PORT come from the batch shell (slurm/common.sh).
set -euo pipefail
export RANK=$SLURM_PROCID
export WORLD_SIZE=$SLURM_NTASKS
export LOCAL_RANK=$SLURM_LOCALID
exec "$@"
