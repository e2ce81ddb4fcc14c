"""Training the launcher's default model (ARMT on the built-in tiny OPT) on one long sample: with
``--backprop sublinear`` the segment states kept for backward grow with sqrt(S), where ``replay`` and
``checkpoint`` keep all S of them (the state of this model is 0.8 MB a segment for 2 samples)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from rmt_scale.training import checkpoint
from support import ROOT
from support.runs import LAUNCHER, environment, scalars

pytestmark = pytest.mark.slow

SEGMENT, SEGMENTS, SAMPLES = 32, 2048, 2
# ARMT defaults (d_mem 64, DPFP nu 3) on the tiny OPT (hidden 128, 2 layers): A (384 x 128) and z (384) per
# layer and sample, float32
STATE_BYTES = SAMPLES * 2 * (2 * 3 * 64 * 128 + 2 * 3 * 64) * 4


def test_sublinear_backprop_keeps_sqrt_segments_states_on_a_long_sample(tmp_path):
    shards = tmp_path / "shards"
    made = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--task", "memorize", "--tokens",
         str(SEGMENT * SEGMENTS), "--samples", str(SAMPLES), "--out", str(shards)],
        env=environment(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    out = tmp_path / "run"
    flags = dict(shards=shards, segment_size=SEGMENT, micro_batch_size=SAMPLES, max_steps=1, eval_segments=1,
                 eval_samples=2, backprop="sublinear", out_dir=out)  # fmt: skip
    args = [item for name, value in flags.items() for item in (f"--{name}", str(value))] + ["--no-baseline"]
    result = subprocess.run(
        [sys.executable, LAUNCHER, *args], env=environment(), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    logged = scalars(out)
    every = math.isqrt(SEGMENTS - 1) + 1  # the default k, 46 for 2,048 segments
    kept_states = math.ceil(SEGMENTS / every)
    assert logged["train/segments"] == [(1, SEGMENTS)]
    assert logged["memory/state_kept_bytes"] == [(1, kept_states * STATE_BYTES)]
    assert logged["memory/state_offloaded_bytes"] == [(1, 0)]
    # the states held at once: those kept from forward, plus one block recomputed in backward; keeping all
    # 2,048 would take 1.6 GB on top of the process's own ~0.4 GB
    bound_mb = 600 + (kept_states + every) * STATE_BYTES / 2**20
    peak_mb = logged["perf/peak_memory_mb"][0][1]
    assert peak_mb < bound_mb < 600 + SEGMENTS * STATE_BYTES / 2**20 / 4, (peak_mb, bound_mb)
    assert json.loads((out / "results.json").read_text())["allocator"] in ("jemalloc", "glibc")


def test_a_curriculum_ends_on_its_full_length_with_fewer_samples(tmp_path):
    """``--curriculum_draw stage`` trains every step of a stage on its length, and ``--micro_batch_tokens`` lets a
    long last stage run 1 sample where the short ones ran 8: the recipe of the 1M-token run in docs/results.md,
    at 256 segments."""
    out = tmp_path / "run"
    flags = dict(curriculum="1,256", curriculum_draw="stage", promote_accuracy=1.1, stage_steps=3, max_steps=5,
                 micro_batch_size=8, micro_batch_tokens=256 * SEGMENT, backprop="sublinear", eval_segments="1,256",
                 eval_samples=2, eval_every=100, out_dir=out)  # fmt: skip
    args = [item for name, value in flags.items() for item in (f"--{name}", str(value))] + ["--no-baseline"]
    result = subprocess.run(
        [sys.executable, LAUNCHER, *args], env=environment(), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logged = scalars(out)
    assert [value for _, value in logged["train/segments"]] == [1, 1, 1, 256, 256]
    assert [value for _, value in logged["train/micro_batch_size"]] == [8, 8, 8, 1, 1]
    assert [value for _, value in logged["curriculum/stage_segments"]] == [1, 1, 1, 256, 256]
    # the data position moved on by each step's own batch, so a resume reads the samples that come next
    state = checkpoint.read_state(checkpoint.find(out, "auto"))
    assert state["step"] == 5 and state["data"]["position"] == 3 * 8 + 2 * 1
