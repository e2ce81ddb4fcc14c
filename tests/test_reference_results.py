"""The reference checkpoints of docs/results.md keep their accuracy far beyond their training length, read by
the real evaluation launcher (streaming, constant memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = ROOT / "docs" / "results"


def evaluate(
    task: str, segments: int, samples: int, out: Path, model: str = "armt", timeout: int = 900
) -> tuple[dict, str]:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launchers" / "eval.py"),
            "--model",
            str(REFERENCES / f"{model}-{task}"),
            "--task",
            task,
            "--eval_segments",
            str(segments),
            "--eval_samples",
            str(samples),
            "--batch_size",
            str(samples),
            "--out",
            str(out),
        ],
        # every core: the launcher alone would leave one free for other ranks
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "eval.json").read_text()), result.stdout


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 197 s on a quiet 2-core machine, 667 and 827 s beside a CPU hog
def test_memorize_checkpoint_answers_at_a_million_tokens(tmp_path):
    segments = 31_250  # of 32 tokens: 1,000,000 tokens, 7,812 times the longest training input
    evaluation, printed = evaluate("memorize", segments, 3, tmp_path, timeout=2100)
    assert evaluation["segment_size"] * segments == 1_000_000
    # chance is 1/6 per sample: 2 of 3 right by chance happens in 7% of tries; the model gets all 3
    assert evaluation["accuracy"][str(segments)] >= 2 / 3
    assert f"| {segments} | 1000000 |" in printed
    assert evaluation["memory"] == "armt" and evaluation["eval_samples"] == 3 and evaluation["wall_time_s"] > 0
    # streaming holds the model, its memory, one segment's activations and 3 x 4 MB of tokens: measured 437 MB;
    # a single hidden state of the whole input would take 1.5 GB (3 x 1M tokens x 128 floats)
    assert evaluation["peak_rss_mb"] < 1000

    # tools/plot_results.py draws an evaluation as points of its own, with their sample count
    plotted = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plot_results.py"), str(tmp_path), "--out", str(tmp_path / "plot")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plotted.returncode == 0, plotted.stderr[-2000:]
    new_plot = tmp_path / "plot" / "memorize_by_length.json"
    (curve,) = json.loads(new_plot.read_text())
    assert curve["model"] == "armt" and curve["evaluation"]
    assert curve["points"] == [[1_000_000, evaluation["accuracy"][str(segments)], 3]]
    assert (tmp_path / "plot" / "memorize_by_length.png").stat().st_size > 10_000

    # a plot's JSON joins a later plot with its curves unchanged, as docs/results' plots gain evaluations
    earlier_plot = REFERENCES / "memorize_by_length.json"
    replotted = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "plot_results.py"),
            str(earlier_plot),
            str(new_plot),
            "--out",
            str(tmp_path / "replot"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replotted.returncode == 0, replotted.stderr[-2000:]
    earlier = json.loads(earlier_plot.read_text())
    assert json.loads((tmp_path / "replot" / "memorize_by_length.json").read_text()) == [
        {"evaluation": False, **c} for c in earlier
    ] + [curve]


@pytest.mark.parametrize(
    "model, task, segments", [("armt", "detect", 2_048), ("armt", "reason", 1_024), ("rmt", "memorize", 1_024)]
)
def test_checkpoints_answer_far_beyond_their_training_length(model, task, segments, tmp_path):
    """32 times armt-detect's training length (64 segments), 16 times armt-reason's (the facts sit anywhere,
    the question at the end), 32 times the gated RMT's."""
    evaluation, _ = evaluate(task, segments, 8, tmp_path, model)
    # 6 of 8 right by chance (1/6 each) happens in 0.05% of tries; the models get all 8
    assert evaluation["accuracy"][str(segments)] >= 6 / 8
