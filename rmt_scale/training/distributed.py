"""What a rank knows about itself and its peers, without DeepSpeed: the accelerator choice (which must run
before ``import deepspeed``), the rank's place, and object exchange. The process group itself is joined by
:func:`rmt_scale.training.engine.init_distributed`.
"""

from __future__ import annotations

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
