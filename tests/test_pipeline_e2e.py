"""The launcher under the shipped pipeline configs, on real gloo ranks: the losses of the one-process run,
exact resume, per-stage checkpoints, the exported model, TensorBoard, and stages x replicas."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rmt_scale import RecurrentMemoryModel
from support import ROOT
from support.runs import LOSS_TOLERANCE, exported_accuracy, launch, losses, run_args, scalars

pytestmark = pytest.mark.slow
PIPELINE = ROOT / "ds_configs" / "pipeline.json"
DDP = ROOT / "ds_configs" / "ddp.json"


def assert_same_losses(observed: dict, reference: dict) -> None:
    assert sorted(observed) == sorted(reference)
    difference = max(abs(observed[step] - reference[step]) for step in reference)
    assert difference < LOSS_TOLERANCE, (observed, reference)


def test_two_stages_follow_one_process_and_resume_exactly(backbone, cpu_adam_built, tmp_path):
    one = tmp_path / "one"
    launch(run_args(backbone, one, ds_config=DDP, micro_batch_size=4), ranks=1)
    piped = tmp_path / "piped"
    args = run_args(backbone, piped, ds_config=PIPELINE, save_every=2, micro_batch_size=4)  # the config's 4 chains
    launch(args, ranks=2)
    reference = losses(one)
    assert reference[4] < reference[1]  # it trains
    assert_same_losses(losses(piped), reference)

    # each stage's engine state in its own files, both ranks' trainer states, in every checkpoint
    for tag in ("step000002", "step000004"):
        names = sorted(p.name for p in (piped / "checkpoints" / tag).iterdir())
        for stage in ("00", "01"):
            assert (
                f"mp_rank_{stage}_model_states.pt" in names
                and f"zero_pp_rank_0_mp_rank_{stage}_optim_states.pt" in names
            )
        assert "trainer_state_rank1.pt" in names

    # what a stage stashes per segment is counted (and would move to the host from a GPU)
    logged = scalars(piped)
    offloaded = dict(logged["memory/offloaded_bytes"])
    assert offloaded[1] > 0 and offloaded[4] > offloaded[1]  # step 4 runs 2 segments, step 1 one

    # the export holds every stage's weights: it scores what the run's evaluation scored
    results = json.loads((piped / "results.json").read_text())["accuracy"]["rmt"]
    for segments in (1, 4):
        assert exported_accuracy(piped / "export", segments) == pytest.approx(results[str(segments)])
    exported = dict(RecurrentMemoryModel.from_pretrained(piped / "export").named_parameters())
    reference_model = RecurrentMemoryModel.from_pretrained(one / "export")
    for name, param in reference_model.named_parameters():
        torch.testing.assert_close(exported[name], param, rtol=0, atol=1e-4, msg=name)

    # resume from step 2: steps 3 and 4 again, to the same losses
    shutil.rmtree(piped / "checkpoints" / "step000004")
    (piped / "checkpoints" / "latest").write_text("step000002")
    before = losses(piped)
    launch([*args, "--resume", "auto"], ranks=2)
    after = losses(piped)
    for step in (3, 4):
        assert after[step] == pytest.approx(before[step], abs=1e-6)


def test_two_stages_times_two_replicas_follow_one_process_at_twice_the_batch(backbone, cpu_adam_built, tmp_path):
    """ARMT on 4 ranks (2 stages x 2 replicas of batch 4) against 1 rank x batch 8; the stages run sublinear
    blocks (2 segments: one block, recomputed from its first segment in backward)."""
    one = tmp_path / "one"
    launch(run_args(backbone, one, ds_config=DDP, memory="armt", micro_batch_size=8), ranks=1)
    grid = tmp_path / "grid"
    flags = dict(memory="armt", micro_batch_size=4, backprop="sublinear")
    launch(run_args(backbone, grid, ds_config=PIPELINE, **flags), ranks=4)
    assert_same_losses(losses(grid), losses(one))
    assert json.loads((grid / "results.json").read_text())["world_size"] == 4
    stashed = dict(scalars(grid)["memory/stash_peak_bytes"])
    assert stashed[1] > 0 and stashed[4] > stashed[1]  # step 4 runs 2 segments, step 1 one
