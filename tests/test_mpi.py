"""Launching through MPI: the venv's own MPICH ``mpirun`` (from the ``mpich`` PyPI package) starts the ranks and
sets none of torch.distributed's variables; the ranks are found through mpi4py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmt_scale.training.distributed import MPI_RANK_VARIABLES, launched_by_mpi

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = str(ROOT / "launchers" / "train.py")
MPIRUN = str(Path(sys.executable).parent / "mpirun")
# largest loss difference over 3 steps, 2 ranks x batch 2 against 1 rank x batch 4 (the same samples): measured
# 4.8e-7, one float32 ulp at these loss values
LOSS_TOLERANCE = 1e-5

# each rank writes its own file: mpirun merges the ranks' stdout, and lines can interleave
PROBE = """
import json, os, sys
from rmt_scale.training.distributed import launched_by_mpi, mpi_master_port
from mpi4py import MPI
found = {"mpi": launched_by_mpi(), "free_port": mpi_master_port()}
os.environ["MASTER_PORT"] = "23456"
found["given_port"] = mpi_master_port()
with open(f"{sys.argv[1]}/rank{MPI.COMM_WORLD.Get_rank()}.json", "w") as file:
    json.dump(found, file)
"""


def environment(**extra) -> dict:
    """This environment without any launcher's rank variables (torch.distributed's, MPI's, SLURM's)."""
    launcher_prefixes = ("PMI_", "PMIX_", "OMPI_", "MPI_", "HYDRA_", "SLURM_")
    env = {name: value for name, value in os.environ.items() if not name.startswith(launcher_prefixes)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **extra}


def mpirun(ranks: int, *command: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [MPIRUN, "-np", str(ranks), *command], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_mpirun_ranks_are_recognised_and_share_one_port(tmp_path):
    """Under mpirun the ranks are found through MPI; rank 0 picks a free port for the rendezvous (DeepSpeed's
    discovery alone would give every job 29500) and sends it to the other rank. A MASTER_PORT set by the user
    (or slurm/common.sh) wins."""
    mpirun(2, sys.executable, "-c", PROBE, str(tmp_path), env=environment(), timeout=120)
    found = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["mpi"] for rank in found] == [True, True]
    assert found[0]["free_port"] == found[1]["free_port"] != 29500
    assert [rank["given_port"] for rank in found] == [23456, 23456]


def test_only_an_mpi_launch_without_rank_needs_discovery(monkeypatch):
    for name in ("RANK", *MPI_RANK_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    assert not launched_by_mpi()  # plain python
    monkeypatch.setenv("PMI_RANK", "1")
    assert launched_by_mpi()  # MPICH's mpirun, srun --mpi=pmi2
    monkeypatch.setenv("RANK", "1")
    assert not launched_by_mpi()  # RANK given as well (torchrun, deepspeed, slurm/task_env.sh): no discovery


def train_args(out: Path, micro_batch_size: int, steps: int) -> list[str]:
    return [
        "--memory",
        "rmt",
        "--out_dir",
        str(out),
        "--max_steps",
        str(steps),
        "--save_every",
        str(steps),
        "--eval_every",
        str(steps),
        "--micro_batch_size",
        str(micro_batch_size),
        "--eval_samples",
        "8",
        "--eval_segments",
        "1,2",
        "--no-baseline",
    ]


def train_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [record["train/loss"] for record in records if "train/loss" in record]


@pytest.mark.slow
def test_mpirun_trains_two_ranks_as_one_run(tmp_path):
    """``mpirun -np 2 python launchers/train.py`` with no RANK/WORLD_SIZE/MASTER_* set: one 2-rank run, in which
    each rank trains on its half of every batch. Its losses (the mean over both ranks) equal those of 1 rank
    with the whole batch at every step, so both halves went through the same weights, updated with both
    ranks' gradients; the data position counts both ranks' samples, and each rank wrote its part of the
    checkpoint."""
    steps = 3
    mpi_run, reference = tmp_path / "mpirun", tmp_path / "one_rank"
    mpirun(
        2,
        sys.executable,
        LAUNCHER,
        *train_args(mpi_run, micro_batch_size=2, steps=steps),
        env=environment(),
        timeout=400,
    )
    subprocess.run(
        [sys.executable, LAUNCHER, *train_args(reference, micro_batch_size=4, steps=steps)],
        env=environment(),
        check=True,
        capture_output=True,
        timeout=300,
    )

    checkpoint = mpi_run / "checkpoints" / f"step{steps:06d}"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert {"trainer_state_rank0.pt", "trainer_state_rank1.pt"} <= set(manifest["files"])
    for rank in (0, 1):
        state = torch.load(checkpoint / f"trainer_state_rank{rank}.pt", weights_only=False)
        assert state["step"] == steps
        assert state["data"]["position"] == steps * 2 * 2  # samples drawn: steps x batch 2 x 2 ranks
    losses, expected = train_losses(mpi_run), train_losses(reference)
    assert len(losses) == len(expected) == steps
    assert losses == pytest.approx(expected, abs=LOSS_TOLERANCE)
