"""--task lm through the launcher on real DeepSpeed ranks: lm shards made from real text by tools/make_shards.py,
the same losses on 2 ranks without ZeRO and under ZeRO-3 (RMT), on 1 rank and on 2 pipeline stages (ARMT, loss
on the last segment), the curriculum's lengths, the evaluation by segment in TensorBoard and results.json, and
the launcher's refusal of an encoder."""

from __future__ import annotations

import glob
import json
import subprocess
import sys

import pytest

from support import ROOT
from support.runs import LAUNCHER, LOSS_TOLERANCE, SEGMENT, environment, launch, losses, run_args, scalars

pytestmark = pytest.mark.slow
# real reStructuredText from Debian's python3-doc (tools/install_system_packages.sh installs it)
TRAIN_TEXT = sorted(glob.glob("/usr/share/doc/python3-doc/html/_sources/library/os*.txt"))[:2]
HELD_OUT_TEXT = sorted(glob.glob("/usr/share/doc/python3-doc/html/_sources/library/json*.txt"))[:1]


@pytest.fixture(scope="module")
def lm_shards(tmp_path_factory):
    """Training and held-out lm shards of 4-segment samples."""
    root = tmp_path_factory.mktemp("lm")
    for name, inputs, samples in (("train", TRAIN_TEXT, 64), ("held_out", HELD_OUT_TEXT, 4)):
        command = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--task", "lm", "--inputs", *inputs]
        command += ["--tokens", str(4 * SEGMENT), "--samples", str(samples), "--out", str(root / name)]
        subprocess.run(command, env=environment(), check=True, capture_output=True, timeout=120)
    return root / "train", root / "held_out"


def lm_args(backbone, out, shards, **flags):
    train, held_out = shards
    settings = dict(task="lm", shards=train, eval_shards=held_out, eval_segments=4, eval_samples=4)
    return [*run_args(backbone, out, **settings, **flags), "--no-export"]


def check_run(out, reference: dict) -> None:
    observed = losses(out)
    assert sorted(observed) == [1, 2, 3, 4]
    assert max(abs(observed[step] - reference[step]) for step in reference) < LOSS_TOLERANCE, (observed, reference)
    logged = scalars(out)
    # documents are cut to the curriculum's 1 or 2 segments
    assert {value for _, value in logged["train/segments"]} <= {1.0, 2.0}
    assert [step for step, _ in logged["eval/perplexity_4seg"]] == [2, 4]
    results = json.loads((out / "results.json").read_text())
    by_segment = next(iter(results["loss_by_segment"].values()))
    assert sorted(by_segment) == ["1", "2", "3", "4"] and all(0 < loss < 10 for loss in by_segment.values())
    assert dict(logged["eval/loss_4seg"])[4] == pytest.approx(by_segment["4"], rel=1e-5)


def test_rmt_on_two_ranks_follows_the_same_losses_without_zero_and_under_zero3(
    backbone, cpu_adam_built, lm_shards, tmp_path
):
    """Both runs split the shards over 2 ranks alike (ShardStream gives each rank a contiguous half of an epoch, so
    1 rank x batch 4 reads other samples than 2 ranks x batch 2)."""
    ddp, zero3 = tmp_path / "ddp", tmp_path / "zero3"
    launch(lm_args(backbone, ddp, lm_shards, ds_config=ROOT / "ds_configs" / "ddp.json"), ranks=2)
    launch(lm_args(backbone, zero3, lm_shards, ds_config=ROOT / "ds_configs" / "zero3.json"), ranks=2)
    reference = losses(ddp)
    assert reference[4] < reference[1]  # it trains
    check_run(ddp, reference)
    check_run(zero3, reference)


def test_armt_on_two_pipeline_stages_follows_one_process_with_the_loss_on_the_last_segment(
    backbone, cpu_adam_built, lm_shards, tmp_path
):
    flags = dict(memory="armt", micro_batch_size=4, lm_loss="last")
    one, piped = tmp_path / "one", tmp_path / "piped"
    launch(lm_args(backbone, one, lm_shards, ds_config=ROOT / "ds_configs" / "ddp.json", **flags), ranks=1)
    launch(lm_args(backbone, piped, lm_shards, ds_config=ROOT / "ds_configs" / "pipeline.json", **flags), ranks=2)
    check_run(piped, losses(one))


def test_the_launcher_refuses_an_encoder_with_exit_2(lm_shards, tmp_path):
    """(Task shards with --task lm are refused by the same check as in tests/test_lm.py, before the backbone.)"""
    train, _ = lm_shards
    argv = [sys.executable, LAUNCHER, "--task", "lm", "--shards", str(train), "--backbone", "tiny-bert"]
    argv += ["--memory", "rmt", "--out_dir", str(tmp_path / "out")]
    result = subprocess.run(argv, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot: pass a decoder (causal LM) --backbone" in result.stderr.strip().splitlines()[-1]
