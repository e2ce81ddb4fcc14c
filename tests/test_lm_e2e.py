"""--task lm through the launcher on real DeepSpeed ranks: lm shards made from real text by tools/make_shards.py,
the same losses on 1 rank, on 2 ranks under ZeRO-3 (RMT) and on 2 pipeline stages (ARMT, loss on the last
segment), the curriculum's lengths, and the evaluation by segment in TensorBoard and results.json."""

from __future__ import annotations

import glob
import json
import subprocess
import sys

import pytest

from support import ROOT
from support.runs import LOSS_TOLERANCE, SEGMENT, environment, launch, losses, run_args, scalars

pytestmark = pytest.mark.slow
# real reStructuredText from Debian's python3-doc (tools/install_system_packages.sh installs it)
TRAIN_TEXT = sorted(glob.glob("/usr/share/doc/python3*/html/_sources/library/os*.txt"))[:2]
HELD_OUT_TEXT = sorted(glob.glob("/usr/share/doc/python3*/html/_sources/library/json*.txt"))[:1]


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


def test_rmt_on_one_rank_and_on_two_under_zero3_follow_the_same_losses(backbone, cpu_adam_built, lm_shards, tmp_path):
    one, zero3 = tmp_path / "one", tmp_path / "zero3"
    launch(lm_args(backbone, one, lm_shards, micro_batch_size=4, ds_config=ROOT / "ds_configs" / "ddp.json"), 1)
    launch(lm_args(backbone, zero3, lm_shards, ds_config=ROOT / "ds_configs" / "zero3.json"), ranks=2)
    reference = losses(one)
    assert reference[4] < reference[1]  # it trains
    check_run(one, reference)
    check_run(zero3, reference)


def test_armt_on_two_pipeline_stages_follows_one_process_with_the_loss_on_the_last_segment(
    backbone, cpu_adam_built, lm_shards, tmp_path
):
    flags = dict(memory="armt", micro_batch_size=4, lm_loss="last")
    one, piped = tmp_path / "one", tmp_path / "piped"
    launch(lm_args(backbone, one, lm_shards, ds_config=ROOT / "ds_configs" / "ddp.json", **flags), ranks=1)
    launch(lm_args(backbone, piped, lm_shards, ds_config=ROOT / "ds_configs" / "pipeline.json", **flags), ranks=2)
    check_run(piped, losses(one))
