"""The client side of the test SLURM cluster (tools/slurm_cluster.sh, started by the slurm_env fixture): submit a
job, wait for it, read the steps it trained."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
# Small and fast: evaluation only at the end, on few samples of one length; no no-memory twin.
QUICK_FLAGS = [
    "--memory",
    "rmt",
    "--no-baseline",
    "--micro_batch_size",
    "2",
    "--eval_samples",
    "8",
    "--eval_segments",
    "1,2",
]


def free_port_pair() -> int:
    """A free port whose next one is free too, for the test cluster (slurmctld listens on it, slurmd on the next)."""
    while True:
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def run(command: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def submit(env: dict[str, str], log: Path, *sbatch_args: str) -> str:
    return run(["sbatch", "--parsable", f"--output={log}", *sbatch_args], env).strip().split(";")[0]


def job_info(env: dict[str, str], job: str) -> dict[str, str]:
    """`scontrol show job` as a dict (finished jobs stay visible for MinJobAge, 10 minutes here)."""
    text = run(["scontrol", "show", "job", "--oneliner", job], env)
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def wait_for(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_until_final(env: dict[str, str], job: str, log: Path, timeout: float) -> dict[str, str]:
    try:
        return wait_for(
            lambda: (info := job_info(env, job))["JobState"] in FINAL_STATES and info, timeout, f"job {job} to finish"
        )
    except AssertionError:
        subprocess.run(["scancel", job], env=env)
        raise AssertionError(f"job {job} did not finish; its log:\n{log.read_text() if log.exists() else ''}") from None


def logged_steps(out_dir: Path) -> list[int]:
    """Training steps in OUT/metrics.jsonl, in the order they were written (evaluation lines excluded)."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line["step"] for line in lines if "train/loss" in line]
