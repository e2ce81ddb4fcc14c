"""Faults injected into real runs of launchers/train.py (tiny model, CPU, gloo): damaged checkpoints,
corrupt shards, a changed rank count, bad paths, and a rank that hangs under SLURM."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from rmt_scale.data import TaskGenerator, build_word_tokenizer, write_shards
from rmt_scale.training import EXIT_DATA_ERROR, checkpoint
from rmt_scale.training.distributed import free_port
from support import ROOT
from support.runs import LAUNCHER, environment, launch, losses, run_args, scalars
from support.slurm import QUICK_FLAGS, logged_steps, submit, wait_for, wait_until_final

pytestmark = pytest.mark.slow
MODEL_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's model file without ZeRO


def quick_args(backbone: Path, out: Path, **flags) -> list[str]:
    """A 4-step run, checkpointed at steps 2 and 4, evaluated once at the end."""
    settings = dict(max_steps=4, save_every=2, eval_every=4, eval_segments="1,2")
    return run_args(backbone, out, **{**settings, **flags}) + ["--no-export"]


@pytest.fixture(scope="module")
def finished(backbone, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    launch(quick_args(backbone, out), ranks=1)
    return out


def test_manifest_lists_every_file_with_size_and_sha256(finished):
    for tag in ("step000002", "step000004"):
        directory = finished / "checkpoints" / tag
        manifest = json.loads((directory / "manifest.json").read_text())
        files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
        assert manifest["world_size"] == 1
        assert sorted(manifest["files"]) == [name for name in files if name != "manifest.json"]
        assert {MODEL_FILE, "trainer_state_rank0.pt"} <= set(manifest["files"])
        for name, entry in manifest["files"].items():
            data = (directory / name).read_bytes()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


FAULTS = {
    "truncated model file": (
        lambda step: truncate(step / MODEL_FILE),
        rf"{MODEL_FILE} has \d+ bytes, the manifest says \d+",
    ),
    "truncated trainer state": (
        lambda step: truncate(step / "trainer_state_rank0.pt"),
        r"trainer_state_rank0.pt has \d+ bytes, the manifest says \d+",
    ),
    "deleted trainer state": (
        lambda step: (step / "trainer_state_rank0.pt").unlink(),
        "trainer_state_rank0.pt is missing",
    ),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(finished, backbone, tmp_path, fault):
    """The damaged step-4 checkpoint is skipped with the reason; the run resumes from step 2 and repeats
    steps 3 and 4 exactly."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    damage, reason = FAULTS[fault]
    damage(out / "checkpoints" / "step000004")
    result = launch(quick_args(backbone, out) + ["--resume", "auto"], ranks=1)
    assert re.search(rf"--resume auto: skipping checkpoint \S+/step000004: {reason}", result.stderr), result.stderr
    assert re.search(r"resumed from \S+/step000002 at step 2\n", result.stdout), result.stdout
    assert losses(out) == pytest.approx(losses(finished), abs=1e-6)
    # the rewritten step-4 checkpoint is whole again
    assert (out / "checkpoints" / "latest").read_text() == "step000004"
    assert checkpoint.find(out, "auto") == out / "checkpoints" / "step000004"


def test_resume_refuses_damaged_checkpoints_it_cannot_fall_back_from(finished, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    checkpoints = out / "checkpoints"
    truncate(checkpoints / "step000004" / MODEL_FILE)
    with pytest.raises(
        ValueError,
        match=r"--resume='step000004' is not a complete checkpoint: "
        rf"{MODEL_FILE} has \d+ bytes",
    ):
        checkpoint.find(out, "step000004")  # a named checkpoint is not swapped for another
    (checkpoints / "step000002" / "trainer_state_rank0.pt").unlink()
    with pytest.raises(
        ValueError,
        match=r"found no intact checkpoint .*: skipped step000004 \(.*\); step000002 "
        r"\(trainer_state_rank0.pt is missing\)",
    ):
        checkpoint.find(out, "auto")
    # one byte changed, size kept: only the checksum tells
    state = checkpoints / "step000004" / "trainer_state_rank0.pt"
    shutil.copy(finished / "checkpoints" / "step000004" / MODEL_FILE, checkpoints / "step000004" / MODEL_FILE)
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="trainer_state_rank0.pt does not match its SHA-256"):
        checkpoint.find(out, "step000004")


def test_checkpoints_without_manifest_are_checked_for_their_trainer_states(finished, tmp_path, caplog):
    """Checkpoints written before manifests existed: the trainer state of every rank must be there; the rest
    cannot be verified, which is logged."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for tag in ("step000002", "step000004"):
        (out / "checkpoints" / tag / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert checkpoint.find(out, "auto") == out / "checkpoints" / "step000004"
    assert "has no manifest.json (written by an older version): its files are not verified" in caplog.text
    (out / "checkpoints" / "step000004" / "trainer_state_rank0.pt").rename(out / "checkpoints" / "step000004" / "x")
    assert checkpoint.find(out, "auto") == out / "checkpoints" / "step000002"


# ------------------------------------------------------------------------------------------ corrupt data
SHARD_SAMPLES = 16
CORRUPT = (10, 12)  # both in rank 1's half of the single shard (samples 8..15)
BAD_ID = 60_000


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory) -> Path:
    """One shard of 16 one-segment samples; the token payloads of samples 10 and 12 are overwritten in place
    with an id past the vocabulary, so the tar itself stays valid."""
    tokenizer = build_word_tokenizer()
    generator = TaskGenerator("memorize", tokenizer, seed=5)
    out = tmp_path_factory.mktemp("shards")
    write_shards([generator.sample(i, 12) for i in range(SHARD_SAMPLES)], str(out), max_samples=SHARD_SAMPLES)
    overwrite_token(out / "shard-000000.tar", [f"{i:09d}.tokens.npy" for i in CORRUPT], position=3, value=BAD_ID)
    return out


def overwrite_token(shard: Path, members: list[str], position: int, value: int) -> None:
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        for name in members:
            info = tar.getmember(name)
            tokens = np.load(io.BytesIO(tar.extractfile(info).read()))
            offset = info.offset_data + info.size - tokens.nbytes + position * tokens.itemsize
            data[offset : offset + tokens.itemsize] = np.array([value], dtype=tokens.dtype).tobytes()
    shard.write_bytes(bytes(data))


def launch_ranks(args: list[str], ranks: int = 2) -> list[subprocess.CompletedProcess]:
    """The ranks as separate processes with RANK/WORLD_SIZE set, as srun starts them; waits for all."""
    port = str(free_port())
    processes = [
        subprocess.Popen(
            [sys.executable, LAUNCHER, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(
                RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            ),
        )
        for r in range(ranks)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(processes, outputs)]


def test_corrupt_samples_stop_both_ranks_with_a_checkpoint_then_skip_up_to_the_limit(
    backbone, corrupt_shards, tmp_path
):
    out = tmp_path / "run"
    args = quick_args(backbone, out, shards=corrupt_shards, micro_batch_size=2, max_steps=4, save_every=0)

    # 1. no skipping: step 2 reads sample 10 on rank 1; both ranks stop, after a checkpoint of step 1
    first = launch_ranks(args)
    assert [r.returncode for r in first] == [EXIT_DATA_ERROR] * 2, first[1].stderr[-3000:]
    member = f"{CORRUPT[0]:09d}.tokens.npy"
    vocab = build_word_tokenizer().vocab_size
    for result in first:
        assert (
            f"error: rank 1: corrupt shard {corrupt_shards}/shard-000000.tar at member '{member}': token id "
            f"{BAD_ID} at position 3 is outside the vocabulary of {vocab} ids"
        ) in result.stderr
        assert "--skip_corrupt_samples N" in result.stderr
    assert "stopped at step 1 on a data error; checkpoint written, exit code 65" in first[0].stdout
    assert (out / "checkpoints" / "latest").read_text() == "step000001"
    assert sorted(losses(out)) == [1]

    # 2. skip at most 1: step 2 runs with sample 10 skipped; sample 12 in step 3 is one too many
    second = launch_ranks(args + ["--skip_corrupt_samples", "1", "--resume", "auto"])
    assert [r.returncode for r in second] == [EXIT_DATA_ERROR] * 2, second[1].stderr[-3000:]
    assert "skipping corrupt sample (1 so far in this worker): corrupt shard" in second[1].stderr
    assert "error: 2 corrupt samples, more than --skip_corrupt_samples 1" in second[0].stderr
    assert "stopped at step 2 on a data error; checkpoint written" in second[0].stdout
    assert (out / "checkpoints" / "latest").read_text() == "step000002"
    assert sorted(losses(out)) == [1, 2]
    assert scalars(out)["data/corrupt_samples"] == [(1, 0.0), (2, 1.0)]
    state = checkpoint.read_state(out / "checkpoints" / "step000002")  # rank 0's: the position after step 2
    assert state["data"]["shards"]["position"] == 4 and state["data"]["corrupt_samples"] == 1

    # 3. the 2-rank checkpoint is refused on 1 rank, with the reason, before the model is built
    refused = subprocess.run(
        [sys.executable, LAUNCHER, *args, "--resume", "auto"],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert re.search(
        r"error: cannot resume \S+step000002: it was written by 2 ranks and this run has 1\. Another "
        r"rank count changes the global batch",
        refused.stderr,
    ), refused.stderr
    assert "resumed" not in refused.stdout and sorted(losses(out)) == [1, 2]


# ------------------------------------------------------------------------------------------ user paths
def test_path_errors_exit_2_with_one_line_before_any_work(tmp_path):
    """Each case is the real launcher in its own process (all at once, to keep the test short)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a shard\n")
    out = tmp_path / "out"
    cases = {
        "--backbone /nonexistent": (["--backbone", "/nonexistent"], "--backbone /nonexistent: no such directory."),
        "--out_dir file": (
            ["--out_dir", str(tmp_path / "notes.txt")],
            f"--out_dir {tmp_path}/notes.txt is a file: pass a directory",
        ),
        "--out_dir under a file": (
            ["--out_dir", str(tmp_path / "notes.txt" / "run")],
            f"--out_dir {tmp_path}/notes.txt/run is not a writable directory (Not a directory)",
        ),
        "--shards empty dir": (
            ["--shards", str(tmp_path / "empty")],
            f"--shards {tmp_path}/empty: {tmp_path}/empty/index.json does not exist. Write shards "
            "with tools/make_shards.py",
        ),
        "--shards text file": (
            ["--shards", str(tmp_path / "notes.txt")],
            f"--shards {tmp_path}/notes.txt is a file, but neither a .tar/.tar.gz/.tgz shard nor an index .json",
        ),
        "--shards unreachable": (
            ["--shards", "http://127.0.0.1:9/x.tar"],
            "--shards: shard http://127.0.0.1:9/x.tar cannot be reached (ClientConnectorError: "
            "Cannot connect to host 127.0.0.1:9",
        ),
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, LAUNCHER, "--out_dir", str(out), *flags],
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (flags, _) in cases.items()
    }
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 2, (name, stderr[-3000:])
        assert stderr.count("\n") == 1 and stderr.startswith(f"error: {cases[name][1]}"), (name, stderr)
        assert stdout == ""  # DeepSpeed, which logs as it starts, was never started
    assert not (out / "checkpoints").exists() and not (out / "tensorboard").exists()


# ------------------------------------------------------------------------------------------ SLURM
def task_pid(out: Path, rank: int) -> int | None:
    """The pid of the training task of ``rank`` that writes to ``out`` (this one-node cluster runs it here)."""
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"launchers/train.py" in command and str(out).encode() in command and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def test_job_with_a_hung_rank_ends_in_bounded_time(slurm_env, tmp_path):
    """Rank 1 of a 2-task job stops (SIGSTOP: alive, but silent). Rank 0's next collective times out
    (--collective_timeout_s) and it exits with an error; srun (--wait=RMT_TASK_WAIT_S) then ends rank 1 and
    the job fails instead of waiting for its time limit."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    timeout_s = wait_s = 10
    job = submit(
        {**slurm_env, "RMT_TASK_WAIT_S": str(wait_s)},
        log,
        "--nodes=1",
        "--ntasks-per-node=2",
        str(ROOT / "slurm" / "train.sbatch"),
        "--out_dir",
        str(out),
        "--max_steps",
        "100000",
        "--save_every",
        "0",
        "--eval_every",
        "100000",
        "--collective_timeout_s",
        str(timeout_s),
        *QUICK_FLAGS,
    )
    wait_for(lambda: len(logged_steps(out)) >= 2, timeout=180, what="the first training steps")
    pid = task_pid(out, rank=1)
    assert pid is not None
    try:
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        info = wait_until_final(slurm_env, job, log, timeout=120)
        elapsed = time.monotonic() - stopped
    finally:
        if task_pid(out, rank=1) == pid:
            os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert info["JobState"] == "FAILED", text
    assert timeout_s + wait_s <= elapsed < timeout_s + wait_s + 60, (elapsed, text)
    assert f"Timed out waiting {timeout_s * 1000}ms" in text and "task 0: Exited with exit code 1" in text, text
