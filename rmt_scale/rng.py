"""Capturing and restoring random number generator states: torch's for replaying a segment with the dropout
masks it drew in forward, and every library's for resuming a run exactly."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def torch_rng_state() -> dict:
    """torch's CPU generator and the current CUDA device's (the only one a segment draws from)."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_torch_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def restored_torch_rng(state: dict):
    """Runs a block with torch's generators set to ``state``, and puts back the ones before it afterwards."""
    outer = torch_rng_state()
    set_torch_rng_state(state)
    try:
        yield
    finally:
        set_torch_rng_state(outer)


def rng_state() -> dict:
    """Python's, NumPy's, torch's CPU and every CUDA device's generator: what a resumed run needs."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
