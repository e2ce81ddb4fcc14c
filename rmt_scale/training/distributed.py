"""What a rank knows about itself and its peers, without DeepSpeed: the accelerator choice (which must run
before ``import deepspeed``), the rank's place, whether an MPI launcher started it, and object exchange. The
process group itself is joined by :func:`rmt_scale.training.engine.init_distributed`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


# Set for every process by MPI launchers, which set none of torch.distributed's variables: PMI_RANK by MPICH's
# mpirun and by ``srun --mpi=pmi2``, OMPI_COMM_WORLD_RANK by Open MPI's mpirun, PMIX_RANK by PMIx launchers.
MPI_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def all_gather_objects(value) -> list:
    """``value`` of every rank, in rank order, on every rank (just ``[value]`` without a process group)."""
    if not torch.distributed.is_initialized():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]




def launched_by_mpi() -> bool:
    """Whether an MPI launcher started this process without torch.distributed's variables, so that the ranks
    must be found through MPI (DeepSpeed's MPI discovery, with mpi4py)."""
    return "RANK" not in os.environ and any(name in os.environ for name in MPI_RANK_VARIABLES)


def mpi_master_port() -> int:
    """The rendezvous port of an MPI-launched job: MASTER_PORT if set (slurm/common.sh sets one per job), else a
    port that is free on rank 0's host, which rank 0 sends to the others through MPI. DeepSpeed's MPI discovery
    would otherwise use 29500 for every job, and a second job on the same node would fail to bind it."""
    if "MASTER_PORT" in os.environ:
        return int(os.environ["MASTER_PORT"])
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    return world.bcast(free_port() if world.Get_rank() == 0 else None, root=0)
