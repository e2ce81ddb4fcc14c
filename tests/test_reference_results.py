"""The reference checkpoint of docs/results.md keeps its accuracy at 1,000,000 tokens, read by the real
evaluation launcher (streaming, constant memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "results" / "armt-memorize"


@pytest.mark.slow
def test_reference_checkpoint_answers_at_a_million_tokens(tmp_path):
    segments = 31_250  # of 32 tokens: 1,000,000 tokens, 7,812 times the longest training input
    result = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "eval.py"), "--model", str(REFERENCE), "--eval_segments",
         str(segments), "--eval_samples", "3", "--batch_size", "3", "--out", str(tmp_path)],
        # every core: the launcher alone would leave one free for other ranks
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))},
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["segment_size"] * segments == 1_000_000
    # chance is 1/6 per sample: 2 of 3 right by chance happens in 7% of tries; the model gets all 3
    assert evaluation["accuracy"][str(segments)] >= 2 / 3
    assert f"| {segments} | 1000000 |" in result.stdout
