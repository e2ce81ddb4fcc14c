"""tools/profile_flops.py end to end, in a subprocess as users and CI run it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "profile_flops.py"


def run_tool(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_help_explains_every_flag():
    result = run_tool("--help")
    assert result.returncode == 0
    for flag in (
        "--quick",
        "--out",
        "--backbone",
        "--lengths",
        "--segment-size",
        "--mem-tokens",
        "--modes",
        "--memory",
        "--no-full",
        "--repeats",
        "--threads",
        "--memory-budget-mb",
        "--flop-slope-limit",
        "--memory-slope-limit",
        "--tensorboard",
    ):
        assert flag in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lengths", "512", "0"], "--lengths must all be positive"),
        (["--segment-size", "-1"], "--segment-size must be positive"),
        (["--backbone", "no-such-model"], "unknown backbone"),
    ],
)
def test_bad_arguments_fail_clearly(args, message, tmp_path):
    result = run_tool(*args, "--out", str(tmp_path))
    assert result.returncode != 0 and message in result.stderr


@pytest.mark.slow
def test_quick_run_writes_reports_and_passes_the_gate(tmp_path):
    # --quick takes 25-35 s on an idle 2-core box and 75 s when other jobs share it; the timeout leaves room.
    result = run_tool("--quick", "--out", str(tmp_path), "--tensorboard", timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    last_two = result.stdout.strip().splitlines()[-2:]
    rmt = re.fullmatch(r"RMT FLOP slope: ([\d.]+)", last_two[0])
    full = re.fullmatch(r"full attention FLOP slope: ([\d.]+)", last_two[1])
    assert rmt and full, last_two
    assert float(rmt.group(1)) <= 1.05
    assert float(full.group(1)) > float(rmt.group(1)) + 0.3

    for name in ("report.md", "report.json", "flops.png", "time.png", "memory.png", "analytic_flops.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert any((tmp_path / "tensorboard").iterdir())
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["verdict"]["passed"]
    assert {m["variant"] for m in data["measurements"]} == {
        "full attention",
        *(f"{kind}-{mode}" for kind in ("rmt", "armt") for mode in ("bptt", "checkpoint", "replay")),
    }
    # the gate covers ARMT too: its FLOPs grow linearly with length like the RMT's
    for mode in ("bptt", "checkpoint", "replay"):
        assert data["slopes"][f"armt-{mode}"]["train_flops"] <= 1.05
    assert all(not m["error"] for m in data["measurements"])
    # DeepSpeed's FlopsProfiler saw the same forward matmuls (2 x MACs) as FlopCounterMode, for every run
    agreement = data["counter_agreement"]
    assert len(agreement) == len(data["measurements"])
    assert all(abs(row["matmul_ratio"] - 1) < 1e-3 and 1 < row["flops_ratio"] < 1.02 for row in agreement)
    assert "FlopCounterMode vs DeepSpeed" in (tmp_path / "report.md").read_text()
