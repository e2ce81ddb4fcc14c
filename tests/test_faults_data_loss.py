"""Faults that used to lose work, on real runs of launchers/train.py (tiny model, CPU, gloo) and real processes:
a missing or garbage ``latest``, two runs in one --out_dir, a stop signal during the final evaluation, Ctrl-C,
a full disk while checkpointing, metrics.jsonl after a resume, and the spill files of ``--state_offload disk``: a
read-only, small or filling spill directory, and a kill while spilling."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rmt_scale.model.config import ConfigError
from rmt_scale.model.recurrence import SPILL_PREFIX
from rmt_scale.training import EXIT_DISK_FULL, EXIT_PREEMPTED, checkpoint, lock, signals
from rmt_scale.training.metrics import MetricsLogger
from support.runs import LAUNCHER, environment, launch, losses, run_args

QUICK = dict(max_steps=6, save_every=2, eval_every=6, eval_segments="1,2")


def quick_args(backbone: Path, out: Path, **flags) -> list[str]:
    return run_args(backbone, out, **{**QUICK, **flags}) + ["--no-export"]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, LAUNCHER, *args], env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240, poll: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(poll)


def logged_steps(out: Path) -> list[int]:
    """The step of every train/loss line of metrics.jsonl, in file order."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [record["step"] for record in records if "train/loss" in record]


@pytest.fixture(scope="module")
def reference(backbone, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run, checkpointed every 2 steps (steps 4 and 6 are kept)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    launch(quick_args(backbone, out), ranks=1)
    return out


# ------------------------------------------------------------------------------------------ 1. latest
def fake_checkpoint(directory: Path, tag: str) -> Path:
    """A checkpoint directory with one trainer state and its manifest, as ``checkpoint.save`` lays it out."""
    path = directory / tag
    path.mkdir(parents=True)
    data = tag.encode()
    (path / "trainer_state_rank0.pt").write_bytes(data)
    files = {"trainer_state_rank0.pt": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    (path / "manifest.json").write_text(json.dumps({"world_size": 1, "files": files}))
    return path


@pytest.mark.parametrize("latest", [None, "garbage", "step000002"])
def test_resume_auto_takes_the_newest_intact_checkpoint_whatever_latest_says(tmp_path, latest):
    """``latest`` lost (a copy without it), garbage, or behind (a kill between the rename and ``latest``):
    the manifests decide."""
    directory = tmp_path / "checkpoints"
    fake_checkpoint(directory, "step000002")
    newest = fake_checkpoint(directory, "step000004")
    if latest is not None:
        (directory / "latest").write_text(latest)
    assert checkpoint.find(tmp_path, "auto") == newest
    (newest / "trainer_state_rank0.pt").write_bytes(b"damaged")
    assert checkpoint.find(tmp_path, "auto") == directory / "step000002"


def test_resume_from_a_named_checkpoint_refuses_to_overwrite_newer_ones(tmp_path):
    directory = tmp_path / "checkpoints"
    fake_checkpoint(directory, "step000002")
    fake_checkpoint(directory, "step000004")
    with pytest.raises(ValueError, match=r"--resume='step000002': \S+ holds newer checkpoints \(step000004\) that"):
        checkpoint.find(tmp_path, "step000002")
    assert checkpoint.find(tmp_path, "step000004") == directory / "step000004"


@pytest.mark.slow
def test_checkpoints_without_latest_are_resumed_and_refused_to_a_fresh_run(reference, backbone, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "checkpoints" / "latest").unlink()
    saved = {p.name: (p / "manifest.json").read_text() for p in (out / "checkpoints").glob("step*")}

    fresh = subprocess.run(
        [sys.executable, LAUNCHER, *quick_args(backbone, out)], env=environment(), capture_output=True, text=True
    )
    assert fresh.returncode == 2, fresh.stderr[-3000:]
    assert fresh.stderr.startswith(f"error: {out} already holds checkpoints: pass --resume auto"), fresh.stderr
    assert fresh.stderr.count("\n") == 1

    # the resume goes on from step 6, the finished run's last checkpoint
    resumed = launch(quick_args(backbone, out, max_steps=8) + ["--resume", "auto"], ranks=1)
    assert re.search(r"resumed from \S+/step000006 at step 6\n", resumed.stdout), resumed.stdout
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert saved["step000006"] == (out / "checkpoints" / "step000006" / "manifest.json").read_text()


# ------------------------------------------------------------------------------------------ 2. the lock
HOLDER = """
import sys, time
from pathlib import Path
from rmt_scale.training import lock
with lock.hold(Path(sys.argv[1]), rank=0):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_out_dir_lock_refuses_a_second_holder_until_the_first_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], env=environment(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(
            ConfigError, match=rf"--out_dir {tmp_path} is in use by pid {holder.pid} on host {socket.gethostname()}: "
        ):
            with lock.hold(tmp_path, rank=0):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the killed holder's lock file is still there, its lock is not
    assert (tmp_path / lock.LOCK_FILE).read_text().split()[0] == str(holder.pid)
    with lock.hold(tmp_path, rank=0):
        assert (tmp_path / lock.LOCK_FILE).read_text() == f"{os.getpid()} {socket.gethostname()}\n"


# ------------------------------------------------------------------------------------------ 2 and 4, launched
@pytest.mark.slow
def test_second_run_in_a_busy_out_dir_is_refused_and_ctrl_c_checkpoints(backbone, tmp_path):
    out = tmp_path / "run"
    args = quick_args(backbone, out, max_steps=100_000, save_every=0, eval_every=100_000)
    first = start(args)
    try:
        wait_for(lambda: len(logged_steps(out)) >= 2, first, "the first steps")
        second = subprocess.run(
            [sys.executable, LAUNCHER, *args, "--resume", "auto"],
            env=environment(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"error: --out_dir {out} is in use by pid {first.pid} on host {socket.gethostname()}" in second.stderr
        first.send_signal(signal.SIGINT)  # what Ctrl-C sends
        stdout, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "KeyboardInterrupt" not in stderr
    stopped_at = logged_steps(out)[-1]
    assert f"stopped by signal {int(signal.SIGINT)} at step {stopped_at}; checkpoint written" in stdout
    assert (out / "checkpoints" / "latest").read_text() == checkpoint.tag_for(stopped_at)
    assert logged_steps(out) == list(range(1, stopped_at + 1))  # the second run wrote nothing


def test_a_second_ctrl_c_interrupts_at_once():
    assert signal.SIGINT in signals.STOP_SIGNALS
    previous = {signum: signal.getsignal(signum) for signum in signals.STOP_SIGNALS}
    try:
        signals.install()
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signals._received = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ------------------------------------------------------------------------------------------ 3. final evaluation
@pytest.mark.slow
def test_final_checkpoint_comes_before_the_final_evaluation_which_a_signal_cuts_short(backbone, tmp_path):
    """The final evaluation at 2,048 segments takes a minute: the step-2 checkpoint is on disk before it
    starts, and SIGTERM ends it within one batch (here one sample)."""
    out = tmp_path / "run"
    args = quick_args(backbone, out, max_steps=2, save_every=0, eval_segments="1,2,2048", eval_batch_size=1)
    run = start(args)
    try:
        latest = out / "checkpoints" / "latest"
        wait_for(latest.is_file, run, "the final checkpoint")
        assert latest.read_text() == "step000002"
        run.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        stdout, stderr = run.communicate(timeout=120)
        waited = time.monotonic() - signalled
    finally:
        run.kill()
    assert run.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert waited < 30, waited
    assert "stopped by signal 15 at step 2 during the final evaluation (a resume repeats it)" in stdout
    assert not (out / "results.json").exists()

    # the resume trains nothing and evaluates again (here at the lengths that are quick)
    launch(quick_args(backbone, out, max_steps=2, save_every=0, eval_segments="1,2") + ["--resume", "auto"], ranks=1)
    assert sorted(json.loads((out / "results.json").read_text())["accuracy"]["rmt"]) == ["1", "2"]
    assert logged_steps(out) == [1, 2]


# ------------------------------------------------------------------------------------------ 5. disk full
PAGE = 4096  # what a tmpfs allocates a file's bytes in


def disk_blocks(path: Path, block: int = PAGE) -> int:
    """Bytes that the files under ``path`` take on a tmpfs (whole pages)."""
    return sum(-(-p.stat().st_size // block) * block for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def tmpfs(directory: Path, options: str):
    """A tmpfs mounted at ``directory`` (created) for the block, with mount ``options`` ("size=12m", "ro")."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


class FillingEngine:
    """An engine whose state is one file that leaves ``free_pages`` pages free on its disk, so that the files
    ``checkpoint.save`` writes after it (the trainer state, the manifest, ``latest``) meet a full disk."""

    def __init__(self, free_pages: int):
        self.free_pages = free_pages

    def save(self, directory: Path, tag: str) -> None:
        (directory / tag).mkdir()
        with open(directory / tag / "engine.bin", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(directory).free - self.free_pages * PAGE)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@needs_root
def test_a_disk_that_fills_at_any_file_of_a_checkpoint_keeps_the_previous_one(tmp_path):
    """For each number of pages left after the engine's files, the step-4 save either completes or raises
    DiskFull with ``latest`` at step 2 and nothing of step 4 left (the manifest and ``latest`` used to raise
    a plain OSError, with the partial checkpoint left behind)."""
    with tmpfs(tmp_path / "disk", "size=2m") as disk:
        directory = disk / "checkpoints"
        checkpoint.save(FillingEngine(free_pages=128), directory, 2, {"step": 2}, keep=2)
        outcomes = []
        for free_pages in range(12):
            try:
                checkpoint.save(FillingEngine(free_pages), directory, 4, {"step": 4}, keep=2)
            except checkpoint.DiskFull as error:
                outcomes.append("full")
                assert str(error).endswith("the last intact checkpoint is step000002 (resume with --resume auto)")
                assert sorted(p.name for p in directory.iterdir()) == ["latest", "step000002"], free_pages
                assert (directory / "latest").read_text() == "step000002"
            else:
                outcomes.append("saved")
                assert (directory / "latest").read_text() == "step000004"
                assert checkpoint.find(disk, "auto") == directory / "step000004"
                shutil.rmtree(directory / "step000004")
                (directory / "latest").write_text("step000002")
            assert checkpoint.find(disk, "auto") == directory / "step000002"
    # every file of the checkpoint met the full disk once: trainer state, manifest, latest; then it fits
    assert outcomes == sorted(outcomes) and outcomes.count("full") >= 3 and outcomes[-1] == "saved", outcomes


@pytest.mark.slow
@needs_root
def test_disk_full_while_checkpointing_keeps_the_last_checkpoint_and_resumes_exactly(reference, backbone, tmp_path):
    """The tmpfs holds the run's files, the step-2 checkpoint and half of another: the step-4 save fails."""
    with tmpfs(tmp_path / "disk", "size=12m") as disk:
        size = disk_blocks(reference / "checkpoints" / "step000004")
        others = disk_blocks(reference) - disk_blocks(reference / "checkpoints")
        filler = shutil.disk_usage(disk).free - (others + size * 3 // 2)
        with open(disk / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, filler)
        out = disk / "run"
        failed = subprocess.run(
            [sys.executable, LAUNCHER, *quick_args(backbone, out)], env=environment(), capture_output=True, text=True
        )
        assert failed.returncode == EXIT_DISK_FULL, failed.stderr[-3000:]
        assert failed.stderr.splitlines()[-1] == (
            f"error: disk full at {out}/checkpoints/.tmp-step000004: free space or pass another --out_dir; the last "
            "intact checkpoint is step000002 (resume with --resume auto)"
        )
        assert "Traceback" not in failed.stderr
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step000002"]
        assert (out / "checkpoints" / "latest").read_text() == "step000002"
        bigger = tmp_path / "bigger"
        shutil.copytree(out, bigger)

    resumed = launch(quick_args(backbone, bigger) + ["--resume", "auto"], ranks=1)
    assert re.search(r"resumed from \S+/step000002 at step 2\n", resumed.stdout), resumed.stdout
    # 6. steps 3 and 4, logged before the failed save, are listed once: metrics.jsonl was purged like TensorBoard
    assert logged_steps(bigger) == [1, 2, 3, 4, 5, 6]
    assert losses(bigger) == pytest.approx(losses(reference), abs=1e-6)


# ------------------------------------------------------------------------------------------ 6. metrics.jsonl
def test_metrics_jsonl_is_purged_of_the_steps_after_the_resumed_checkpoint(tmp_path):
    """A run killed at step 26 logged past its step-20 checkpoint, the last line cut short by the kill."""
    lines = [json.dumps({"step": step, "train/loss": 1.0 / step}) + "\n" for step in range(1, 27)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 27, "train/lo')
    logger = MetricsLogger(tmp_path, enabled=True, start_step=20, max_steps=30, label="rmt")
    logger.scalars(21, {"train/loss": 0.5})
    logger.close()
    assert logged_steps(tmp_path) == list(range(1, 22))
    assert (tmp_path / "metrics.jsonl").read_text().startswith("".join(lines[:20]))


# ------------------------------------------------------------------------------------------ 7. state spill files
# 40 steps (a second or two here), so that a fault injected after the first checkpoint lands inside the run
SPILL = dict(memory="armt", backprop="sublinear", state_offload="disk", max_steps=40, eval_every=40)


def spill_args(backbone: Path, out: Path, spill_dir: Path) -> list[str]:
    """An ARMT run whose sublinear backprop spills a segment state to ``spill_dir`` every step, checkpointed
    every 2 steps."""
    return quick_args(backbone, out, **SPILL, state_offload_dir=spill_dir)


def spill_dirs(spill_dir: Path) -> list[Path]:
    return sorted(spill_dir.glob(f"{SPILL_PREFIX}*"))


def fill_up(directory: Path, leave: int) -> None:
    """Fills the disk of ``directory`` up to ``leave`` bytes with one file, while a run writes to it too."""
    with open(directory / "filler", "wb") as f:
        while True:
            try:
                return os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(directory).free - leave)
            except OSError as error:  # the run's files grew in between: measure again
                if error.errno != errno.ENOSPC:
                    raise


@pytest.fixture(scope="module")
def spill_reference(backbone, tmp_path_factory) -> Path:
    """An uninterrupted spilling run, checkpointed every 2 steps."""
    root = tmp_path_factory.mktemp("spill_reference")
    launch(spill_args(backbone, root / "run", root / "spills"), ranks=1)
    assert spill_dirs(root / "spills") == []
    return root / "run"


@pytest.mark.slow
@needs_root
def test_a_read_only_or_too_small_spill_directory_exits_2_before_training(backbone, tmp_path):
    with tmpfs(tmp_path / "read-only", "ro,size=1m") as read_only:
        refused = subprocess.run(
            [sys.executable, LAUNCHER, *spill_args(backbone, tmp_path / "run", read_only)],
            env=environment(),
            capture_output=True,
            text=True,
        )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr == (
        f"error: --state_offload_dir {read_only} is not a writable directory (Read-only file system): pass one "
        "you can write to, or --state_offload cpu.\n"
    )
    assert refused.stdout == ""  # refused before DeepSpeed started
    # a state of the tiny ARMT is 198 KiB (2 layers x 2 samples x (A, z)); at 2 segments sublinear keeps one
    with tmpfs(tmp_path / "small", "size=1m") as small:
        with open(small / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(small).free - 25 * PAGE)
        refused = subprocess.run(
            [sys.executable, LAUNCHER, *spill_args(backbone, tmp_path / "run", small)],
            env=environment(),
            capture_output=True,
            text=True,
        )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.splitlines()[-1] == (
        f"error: --state_offload disk spills 0.2 MiB of segment states (1 per micro-batch at 2 segments) into "
        f"{small}, which has 0.1 MiB free: free space there, pass another --state_offload_dir, or --state_offload cpu."
    )
    assert logged_steps(tmp_path / "run") == [] and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@needs_root
def test_a_spill_directory_that_fills_mid_run_stops_in_one_line_and_resumes_exactly(
    spill_reference, backbone, tmp_path
):
    """The spill tmpfs fills once the first checkpoint is written: the next spill fails, the run exits 74 naming
    the spill file and the checkpoint to resume from, leaves no spill file, and resumes exactly once freed."""
    out = tmp_path / "run"
    with tmpfs(tmp_path / "spills", "size=4m") as spills:
        run = start(spill_args(backbone, out, spills))
        try:
            # the run takes a second or two: it is stopped as soon as its first checkpoint is seen, so that
            # the disk is full before its next step, however fast the machine (a fast one finished all 40 first)
            wait_for(lambda: (out / "checkpoints" / "latest").is_file(), run, "the first checkpoint", poll=0.002)
            run.send_signal(signal.SIGSTOP)
            fill_up(spills, leave=8 * PAGE)  # a spill file takes 50 pages
            run.send_signal(signal.SIGCONT)
            _, stderr = run.communicate(timeout=240)
        finally:
            run.kill()
        assert run.returncode == EXIT_DISK_FULL, stderr[-3000:]
        assert "Traceback" not in stderr
        stopped = re.fullmatch(
            f"error: cannot spill a segment state to {re.escape(str(spills))}/{SPILL_PREFIX}\\S+/state-\\d+\\.pt "
            r"\([Nn]o space left on (the )?device\): free space there, pass another state_offload_dir, or use "
            r"state_offload='cpu'; the last intact checkpoint is (step\d+) \(resume with --resume auto\)",
            stderr.splitlines()[-1],
        )
        assert stopped, stderr[-3000:]
        assert (out / "checkpoints" / "latest").read_text() == stopped[2]
        assert logged_steps(out)[-1] < SPILL["max_steps"]
        assert spill_dirs(spills) == []
        (spills / "filler").unlink()
        resumed = launch(spill_args(backbone, out, spills) + ["--resume", "auto"], ranks=1)
        assert spill_dirs(spills) == []
    assert f"resumed from {out}/checkpoints/{stopped[2]} at step {int(stopped[2][4:])}\n" in resumed.stdout
    assert losses(out) == pytest.approx(losses(spill_reference), abs=1e-6)


@pytest.mark.slow
def test_sigkill_while_spilling_then_resume_auto_continues_exactly_and_removes_the_spill_files(
    spill_reference, backbone, tmp_path
):
    """SIGKILL runs no cleanup, so the killed run's spill directory stays; the resumed run's first spill removes
    it (its pid is dead), and the losses are those of the uninterrupted run."""
    out, spills = tmp_path / "run", tmp_path / "spills"
    run = start(spill_args(backbone, out, spills))
    try:
        wait_for(
            lambda: (out / "checkpoints" / "latest").is_file() and list(spills.glob(f"{SPILL_PREFIX}*/state-*.pt")),
            run,
            "a spilled state after the first checkpoint",
        )
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=60)
    finally:
        run.kill()
    killed = spill_dirs(spills)
    assert len(killed) == 1 and f"-{run.pid}-" in killed[0].name
    resumed = launch(spill_args(backbone, out, spills) + ["--resume", "auto"], ranks=1)
    assert re.search(r"resumed from \S+/step\d+ at step \d+\n", resumed.stdout), resumed.stdout
    assert spill_dirs(spills) == []
    assert losses(out) == pytest.approx(losses(spill_reference), abs=1e-6)
