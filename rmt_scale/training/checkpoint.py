"""Checkpoints: DeepSpeed's engine state plus each rank's trainer state, written atomically.

Layout under ``OUT/checkpoints``::

    step000200/            engine files (model, optimizer, ZeRO partitions) + trainer_state_rank{r}.pt
    latest                 the tag of the newest complete checkpoint

Every rank writes into ``.tmp-<tag>``; after a barrier rank 0 renames it to ``<tag>`` and then replaces
``latest``. A run killed at any moment leaves either the previous checkpoint or the new one as ``latest``,
never a half-written one. Each rank's trainer state holds the step, the curriculum (stage and its RNG), the
data position and the Python/NumPy/torch RNG states, so ``--resume`` continues the exact same run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..rng import rng_state, set_rng_state

LATEST = "latest"
TMP_PREFIX = ".tmp-"


def tag_for(step: int) -> str:
    return f"step{step:06d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine, directory: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Saves on every rank (DeepSpeed needs all of them); returns the final checkpoint directory."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(directory / tmp_tag, ignore_errors=True)  # left by a run killed while saving
    _barrier()
    engine.save_checkpoint(str(directory), tag=tmp_tag, save_latest=False)
    torch.save({**trainer_state, "rng": rng_state()}, directory / tmp_tag / f"trainer_state_rank{rank}.pt")
    _barrier()
    if rank == 0:
        final = directory / tag
        shutil.rmtree(final, ignore_errors=True)
        os.replace(directory / tmp_tag, final)
        _write_atomically(directory / LATEST, tag)
        _prune(directory, keep)
    _barrier()
    return directory / tag


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(directory: Path, keep: int) -> None:
    tags = sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step"))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find(out_dir: Path, resume: str) -> Path | None:
    """The checkpoint directory that ``--resume`` names (``auto``: the latest in ``OUT``, if any)."""
    directory = out_dir / "checkpoints"
    if resume == "auto":
        latest = directory / LATEST
        return directory / latest.read_text().strip() if latest.is_file() else None
    candidate = Path(resume)
    if not candidate.is_dir():
        candidate = directory / resume
    if not (candidate.is_dir() and any(candidate.glob("trainer_state_rank*.pt"))):
        raise ValueError(f"--resume={resume!r} is not a complete checkpoint (no {candidate}/trainer_state_rank*.pt): "
                         f"pass 'auto' or a tag listed in {directory}.")
    return candidate


def read_state(checkpoint: Path) -> dict:
    """This rank's trainer state, read before anything is built (to check the run matches)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    state_file = checkpoint / f"trainer_state_rank{rank}.pt"
    if not state_file.is_file():
        raise ValueError(f"{state_file} is missing: the checkpoint was written by fewer ranks; resume with the "
                         "same number of ranks.")
    return torch.load(state_file, weights_only=False)


def load(engine, checkpoint: Path, state: dict) -> None:
    """Loads the engine state, then restores this rank's RNGs from its trainer ``state``."""
    path, _ = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    if path is None:
        raise ValueError(f"DeepSpeed could not load {checkpoint}: it holds no engine state for this config.")
    set_rng_state(state["rng"])
