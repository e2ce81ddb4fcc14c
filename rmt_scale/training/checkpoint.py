"""Checkpoints: DeepSpeed's engine state plus each rank's trainer state, written atomically and verified on resume.

Layout under ``OUT/checkpoints``::

    step000200/            engine files (model, optimizer, ZeRO partitions) + trainer_state_rank{r}.pt
                           + manifest.json: the world size, and every file's size and SHA-256
    latest                 the tag of the newest complete checkpoint

Every rank writes into ``.tmp-<tag>``; after a barrier the ranks hash the files (each rank a share), rank 0
writes the manifest last, renames the directory to ``<tag>`` and then replaces ``latest``. A run killed at
any moment leaves either the previous checkpoint or the new one as ``latest``, never a half-written one.
Each rank's trainer state holds the step, the curriculum (stage and its RNG), the data position and the
Python/NumPy/torch RNG states, so ``--resume`` continues the exact same run.

Files can still be damaged afterwards (a copy cut short, a bad block). ``--resume auto`` therefore takes
the newest checkpoint that matches its manifest, whatever ``latest`` says (a copy may lose it, or a kill
between the rename and ``latest``), saying which ones it skipped and why. Checkpoints written before
manifests existed are checked only for one trainer state per rank.

A run only ever deletes or overwrites checkpoints of its own chain: a fresh run refuses a directory that
holds checkpoints, and a resume from a named checkpoint refuses one with newer checkpoints; so what lies past
the resume point is only what ``--resume auto`` skipped as damaged. A full disk while saving, at any of its
files (the manifest and ``latest`` included), removes the new checkpoint and raises ``DiskFull`` on every rank,
leaving ``latest`` at the previous one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..model.recurrence import FULL_DISK_BYTES
from ..rng import rng_state, set_rng_state
from .distributed import all_gather_objects
from .engine import TrainEngine

log = logging.getLogger(__name__)
LATEST = "latest"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
STATE_FILE = "trainer_state_rank{}.pt"


class DiskFull(Exception):
    """The disk ran out of space while a checkpoint was written; the partial checkpoint was removed."""


def tag_for(step: int) -> str:
    return f"step{step:06d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save(engine: TrainEngine, directory: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Saves on every rank (DeepSpeed needs all of them); returns the final checkpoint directory. Raises
    ``DiskFull`` on every rank when a rank's disk ran out of space, after removing the partial checkpoint."""
    rank = _rank_and_world()[0]
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(directory / tmp_tag, ignore_errors=True)  # left by a run killed while saving
    _barrier()
    state_file = directory / tmp_tag / STATE_FILE.format(rank)
    full = _fills_disk(lambda: engine.save(directory, tmp_tag), directory)
    if full:
        _barrier()  # DeepSpeed's save ends in a barrier, which the other ranks wait in
    else:
        full = _fills_disk(lambda: torch.save({**trainer_state, "rng": rng_state()}, state_file), directory)
    if not any(all_gather_objects(full)):
        # rank 0 writes the manifest and `latest`, each of which may be the file that fills the disk
        full = _fills_disk(lambda: _write_manifest(directory / tmp_tag), directory)
        if rank == 0 and not full:
            full = _fills_disk(lambda: _publish(directory, tag), directory)
    if any(all_gather_objects(full)):  # every rank stops, not only those whose disk filled
        _raise_disk_full(directory, directory / tmp_tag)
    if rank == 0:
        _prune(directory, step, keep)
    _barrier()
    return directory / tag


def _publish(directory: Path, tag: str) -> None:
    """Renames the complete ``.tmp-<tag>`` to ``<tag>``, then points ``latest`` at it; when ``latest`` cannot
    be written the checkpoint goes back to ``.tmp-<tag>``, so that ``latest`` names the newest one still."""
    final, partial = directory / tag, directory / (TMP_PREFIX + tag)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    try:
        _write_atomically(directory / LATEST, tag)
    except BaseException:
        os.replace(final, partial)
        raise


def _fills_disk(write: Callable[[], object], directory: Path) -> bool:
    """Runs ``write``: True when it failed on a full disk; any other error propagates."""
    try:
        write()
    except (OSError, RuntimeError) as error:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        # torch's zip writer reports a write that ran out of space as RuntimeError ("unexpected pos"), no errno
        if shutil.disk_usage(directory).free < FULL_DISK_BYTES:
            return True
        raise
    return False


def _raise_disk_full(directory: Path, partial: Path) -> None:
    """Removes the partial checkpoint (it would keep the disk full) and raises DiskFull naming the last intact
    one, which ``latest`` still points to."""
    if _rank_and_world()[0] == 0:
        shutil.rmtree(partial, ignore_errors=True)
    _barrier()
    raise DiskFull(f"disk full at {partial}: free space or pass another --out_dir; {last_intact(directory)}")


def last_intact(directory: Path) -> str:
    """Where a run stopped by a full disk resumes from: the checkpoint that ``latest`` names in ``directory``."""
    latest = directory / LATEST
    if latest.is_file():
        return f"the last intact checkpoint is {latest.read_text().strip()} (resume with --resume auto)"
    return "no checkpoint was written yet"


def _write_manifest(checkpoint: Path) -> None:
    """Every file's size and SHA-256 (rank r hashes every world_size-th file), written by rank 0 last."""
    rank, world_size = _rank_and_world()
    # all ranks hash shares of rank 0's listing: another node may not list others' new files yet
    listing = None
    if rank == 0:
        listing = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
    names = all_gather_objects(listing)[0]
    mine = {
        name: {"size": (checkpoint / name).stat().st_size, "sha256": _sha256(checkpoint / name)}
        for name in names[rank::world_size]
    }
    files = {name: entry for share in all_gather_objects(mine) for name, entry in share.items()}
    if rank == 0:
        manifest = {"world_size": world_size, "files": dict(sorted(files.items()))}
        with open(checkpoint / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def checkpoints(directory: Path) -> list[Path]:
    """The checkpoint directories (complete or not, but not ``.tmp-`` ones) in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step"))


def _prune(directory: Path, step: int, keep: int) -> None:
    """Keeps the ``keep`` newest checkpoints up to ``step``. Newer ones can only be damaged ones that
    ``--resume auto`` went back past (``find`` refuses to resume before intact ones), so they go too."""
    tags = checkpoints(directory)
    kept = [p for p in tags if p.name <= tag_for(step)][-keep:]
    for old in tags:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)


def find(out_dir: Path, resume: str) -> Path | None:
    """The checkpoint directory that ``--resume`` names, checked against its manifest.

    ``auto``: the newest in ``OUT`` that checks out, going back past damaged ones (each is logged with the
    reason); None when there is none yet. ``latest`` is not needed: each checkpoint carries its own manifest.
    A named tag or directory is used only if it checks out and no checkpoint in ``OUT`` is newer (the run
    would overwrite them). Raises ValueError when nothing usable is left, or the checkpoint was written by
    another number of ranks. Under torch.distributed every rank must call this: they check a share of the
    files each and agree.
    """
    directory = out_dir / "checkpoints"
    if resume != "auto":
        candidate = Path(resume)
        if not candidate.is_dir():
            candidate = directory / resume
        if not candidate.is_dir():
            raise ValueError(
                f"--resume={resume!r} is not a checkpoint directory: pass 'auto' or a tag listed in {directory}."
            )
        problem = _problem(candidate)
        if problem:
            raise ValueError(
                f"--resume={resume!r} is not a complete checkpoint: {problem}. Pass 'auto' (it falls "
                f"back to the newest intact checkpoint) or another tag listed in {directory}."
            )
        newer = [p.name for p in checkpoints(directory) if p.name > candidate.name]
        if newer:
            raise ValueError(
                f"--resume={resume!r}: {directory} holds newer checkpoints ({', '.join(newer)}) that this run "
                "would overwrite: move them out of it, or resume from a copy of the checkpoint in another --out_dir."
            )
        return candidate
    skipped = []
    for candidate in reversed(checkpoints(directory)):
        problem = _problem(candidate)
        if problem is None:
            return candidate
        skipped.append(f"{candidate.name} ({problem})")
        if _rank_and_world()[0] == 0:
            log.warning("--resume auto: skipping checkpoint %s: %s", candidate, problem)
    if not skipped:
        return None
    raise ValueError(
        f"--resume auto found no intact checkpoint in {directory}: skipped {'; '.join(skipped)}. "
        "Start again with a new --out_dir."
    )


def _problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be loaded (a missing, short or changed file), or None. Raises ValueError
    when it was written by another number of ranks: no older checkpoint of the run can help then."""
    rank, world_size = _rank_and_world()
    manifest_file = checkpoint / MANIFEST
    if not manifest_file.is_file():  # written before manifests: only the trainer states can be counted
        states = sorted(p.name for p in checkpoint.glob(STATE_FILE.format("*")))
        if states:
            _check_world_size(checkpoint, len(states), world_size)
        missing = [STATE_FILE.format(r) for r in range(world_size) if STATE_FILE.format(r) not in states]
        if missing:
            return f"{', '.join(missing)} missing (no {MANIFEST})"
        if rank == 0:
            log.warning(
                "checkpoint %s has no %s (written by an older version): its files are not verified",
                checkpoint,
                MANIFEST,
            )
        return None
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError) as error:
        manifest = {"world_size": world_size, "files": {}}
        mine = f"{MANIFEST} is unreadable ({error})"
    else:
        _check_world_size(checkpoint, manifest["world_size"], world_size)
        mine = None
    for index, (name, expected) in enumerate(sorted(manifest["files"].items())):
        path = checkpoint / name
        if not path.is_file():
            mine = f"{name} is missing"
        elif path.stat().st_size != expected["size"]:
            mine = f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
        elif index % world_size == rank and _sha256(path) != expected["sha256"]:
            mine = f"{name} does not match its SHA-256 in the manifest"
        if mine:
            break
    return next((problem for problem in all_gather_objects(mine) if problem), None)


def _check_world_size(checkpoint: Path, saved: int, world_size: int) -> None:
    if saved != world_size:
        raise ValueError(
            f"cannot resume {checkpoint}: it was written by {saved} ranks and this run has {world_size}. Another "
            "rank count changes the global batch and which samples each rank reads, so the run would not "
            f"continue the same way; resume with {saved} ranks, or start a new --out_dir."
        )


def read_state(checkpoint: Path) -> dict:
    """This rank's trainer state, read before anything is built (to check the run matches)."""
    state_file = checkpoint / STATE_FILE.format(_rank_and_world()[0])
    try:
        return torch.load(state_file, weights_only=False)  # written by this code, and checked against the manifest
    except Exception as error:  # torch raises several types for a damaged file
        raise ValueError(
            f"cannot read {state_file} ({type(error).__name__}: {error}); resume from another "
            "checkpoint with --resume TAG."
        ) from error


def load(engine: TrainEngine, checkpoint: Path, state: dict) -> None:
    """Loads the engine state, then restores this rank's RNGs from its trainer ``state``."""
    if not engine.load(checkpoint.parent, checkpoint.name):
        raise ValueError(f"DeepSpeed could not load {checkpoint}: it holds no engine state for this config.")
    set_rng_state(state["rng"])
