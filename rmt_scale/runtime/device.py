"""The accelerator choice, which must be made before anything imports DeepSpeed."""

from __future__ import annotations

import os

import torch


def select_accelerator() -> bool:
    """Chooses DeepSpeed's CPU accelerator when there is no GPU; must run before ``import deepspeed``."""
    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return has_cuda
