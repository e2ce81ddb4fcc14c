"""The process group: joined (under any launcher, or as one rank under plain ``python``), given its collective
timeouts, left; and what a rank knows about itself and its peers: its place, whether an MPI launcher started it,
object exchange. DeepSpeed is imported only to join, after the accelerator is chosen.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from ..runtime.device import select_accelerator

# Set for every process by MPI launchers, which set none of torch.distributed's variables: PMI_RANK by MPICH's
# mpirun and by ``srun --mpi=pmi2``, OMPI_COMM_WORLD_RANK by Open MPI's mpirun, PMIX_RANK by PMIx launchers.
MPI_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
OP_BUILT = re.compile(r"DeepSpeed \S+ built successfully")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(timeout_s: float = 600) -> DistInfo:
    """Joins the process group of ``deepspeed --num_gpus N``, ``torchrun`` or ``srun`` (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT set), of ``mpirun`` or ``srun --mpi=pmi2`` (ranks found through MPI), or, under
    plain ``python``, creates a 1-rank group on a free local port so the same code path runs. Without CUDA:
    gloo, and unless OMP_NUM_THREADS says otherwise each rank takes its share of the cores minus one (torch's
    elementwise ops slow down ~100x when their threads compete with another busy process, docs/background.md).
    A collective that waits ``timeout_s`` for a peer that hangs or died raises instead of blocking, so the job
    ends (under srun, ``--wait`` then stops the rest)."""
    has_cuda = select_accelerator()
    mpi = launched_by_mpi()
    if "RANK" not in os.environ and not mpi:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())),
        )
    import deepspeed

    # under mpirun or srun --mpi=pmi2, DeepSpeed's MPI discovery (mpi4py) sets RANK, WORLD_SIZE, LOCAL_RANK,
    # MASTER_ADDR (rank 0's host) and MASTER_PORT, the last to distributed_port
    discovery = dict(distributed_port=mpi_master_port()) if mpi else {}
    # DeepSpeed prints "DeepSpeed <its CPU shared-memory op> built successfully" at every start, with print
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            deepspeed.init_distributed(
                dist_backend="nccl" if has_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s), **discovery
            )
    finally:
        lines = captured.getvalue().splitlines(keepends=True)
        print("".join(line for line in lines if not OP_BUILT.fullmatch(line.rstrip("\n"))), end="", flush=True)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not has_cuda and "OMP_NUM_THREADS" not in os.environ:
        # torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE; else assume one node
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world_size)))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks - 1))
    device = torch.device("cuda", local_rank) if has_cuda else torch.device("cpu")
    if has_cuda:
        torch.cuda.set_device(device)
    return DistInfo(rank, world_size, local_rank, device)


def close_distributed(*, wait_for_peers: bool) -> None:
    """Leaves the process group; launchers call it last. Left to the interpreter's exit, gloo's threads can
    abort a rank that finished first ("terminate called without an active exception", seen under srun).
    After a success the ranks first wait for each other, so none tears down connections a peer still uses;
    after an error they don't (a peer may be gone)."""
    if not torch.distributed.is_initialized():
        return
    if wait_for_peers:
        torch.distributed.barrier()
    rank = torch.distributed.get_rank()
    torch.distributed.destroy_process_group()
    remove_shm_buffer(rank)


def remove_shm_buffer(rank: int) -> None:
    """Unlinks this rank's buffer of DeepSpeed's shared-memory allreduce (CPU ranks on one machine), which
    DeepSpeed leaves behind: 64 MiB of /dev/shm (RAM) per rank per run, until the machine runs out. Peers
    that still map it keep their mapping."""
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{rank}"
    )
    Path("/dev/shm", name).unlink(missing_ok=True)


def set_group_timeouts(timeout_s: float) -> None:
    """DeepSpeed makes its own groups (data parallelism runs in a copy of the world group), and torch gives a
    new group its default timeout (30 min on gloo), not the world group's: all get init_distributed's."""
    from torch.distributed import distributed_c10d

    for group in list(distributed_c10d._world.pg_map):
        distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s), group)


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
