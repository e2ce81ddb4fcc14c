"""Process-group setup for every way the launcher is started.

- ``deepspeed --num_gpus N``, ``torchrun`` or ``srun`` with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set: used as is.
- plain ``python launchers/train.py``: a 1-rank group on a free local port, so the same code path runs.
- no CUDA: ``DS_ACCELERATOR=cpu`` (set before DeepSpeed is imported) and the gloo backend. Unless
  OMP_NUM_THREADS says otherwise, each rank takes its share of the cores minus one: on small machines torch's
  elementwise ops slow down ~100x when their threads compete with another busy process (docs/background.md).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch


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


def set_collective_timeout(timeout_s: float) -> None:
    """Gives every process group of this rank the timeout of :func:`init_distributed`. DeepSpeed makes its own
    groups (data parallelism runs in a copy of the world group), and torch gives a new group its default
    timeout (30 min on gloo), not the world group's."""
    from torch.distributed import distributed_c10d

    for group in list(distributed_c10d._world.pg_map):
        distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s), group)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def select_accelerator() -> bool:
    """Chooses DeepSpeed's CPU accelerator when there is no GPU; must run before ``import deepspeed``."""
    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return has_cuda


def init_distributed(timeout_s: float = 600) -> DistInfo:
    """Joins (or creates) the process group. A collective that waits ``timeout_s`` for a peer that hangs or
    died raises instead of blocking, so the job ends (under srun, ``--wait`` then stops the rest)."""
    has_cuda = select_accelerator()
    if "RANK" not in os.environ and not any(k in os.environ for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK")):
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if has_cuda else "gloo",
                               timeout=datetime.timedelta(seconds=timeout_s))
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
