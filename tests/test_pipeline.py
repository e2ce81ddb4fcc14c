"""Pipeline stages on real gloo ranks give the one-process model's loss and gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmt_scale.pipeline import PipelineStage, ideal_busy_fraction, split_layers
from rmt_scale.training.distributed import free_port
from support import pipeline_case
from support.runs import environment

CASE = pipeline_case.__file__


def reference(family: str, memory: str, bptt_depth: int, segments: int = pipeline_case.SEGMENTS):
    model = pipeline_case.build_model(family, memory, bptt_depth)
    input_ids, mask, labels = pipeline_case.batch(model.backbone.config.vocab_size, segments)
    loss = model(input_ids, mask, labels).loss
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def run_pipeline(
    tmp_path: Path, stages: int, family: str, memory: str, bptt_depth: int, chains: int, *sublinear: int
) -> tuple[list, dict, list]:
    """Losses, gradients and each stage's saved results. ``sublinear``: (keep_every, segments)."""
    env = environment(WORLD_SIZE=str(stages), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    case = [CASE, str(tmp_path), family, memory, str(bptt_depth), str(chains), *map(str, sublinear)]
    ranks = [
        subprocess.Popen(
            [sys.executable, *case],
            env=dict(env, RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(stages)
    ]
    outputs = [rank.communicate(timeout=240)[0] for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), "\n".join(outputs)
    losses, grads, saved_by_stage = [], {}, []
    for rank in range(stages):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        saved_by_stage.append(saved)
        losses.append(saved["loss"])
        for name, grad in saved["grads"].items():
            if name in grads:  # a tied head: both ends must hold the same summed gradient
                torch.testing.assert_close(grad, grads[name], rtol=0, atol=1e-6)
            grads[name] = grad
    return losses, grads, saved_by_stage


def assert_one_process_gradients(losses, grads, loss, expected, stages, atol=1e-5):
    assert losses == pytest.approx([loss] * stages, abs=1e-5)
    assert sorted(grads) == sorted(expected)  # every parameter is trained by exactly one stage (or both ends)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=atol, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stages,family,memory,bptt_depth,chains",
    [
        (2, "opt", "rmt", -1, 1),
        (2, "gpt2", "armt", 2, 2),
        (4, "llama", "rmt-gated", 2, 2),  # the last stage gates the memory it sends back
        (4, "gpt_neox", "armt", -1, 1),
        (1, "opt", "rmt", 2, 2),  # one stage: RMT's memory loops back to the same rank
    ],
)
def test_stages_give_the_one_process_gradients(tmp_path, stages, family, memory, bptt_depth, chains):
    loss, expected = reference(family, memory, bptt_depth)
    losses, grads, _ = run_pipeline(tmp_path, stages, family, memory, bptt_depth, chains)
    assert_one_process_gradients(losses, grads, loss, expected, stages)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stages,family,memory,bptt_depth,chains,keep_every",
    [
        # 2 stages: stage 0 sends the last stage both its segments and its memory's gradients, on one pair
        (2, "opt", "rmt", -1, 2, 2),
        (2, "gpt2", "armt", 2, 1, 0),  # blocks of ceil(sqrt(5)) = 3
        (4, "llama", "rmt-gated", 2, 2, 2),
        (1, "opt", "rmt", -1, 2, 3),  # one stage: the memory and its gradients loop back to the same rank
    ],
)
def test_sublinear_stages_give_the_one_process_gradients(
    tmp_path, stages, family, memory, bptt_depth, chains, keep_every
):
    """Five segments in blocks of 2 or 3: every block but the first is recomputed from a kept first segment,
    some of them shorter than the others."""
    loss, expected = reference(family, memory, bptt_depth)
    result = run_pipeline(tmp_path, stages, family, memory, bptt_depth, chains, keep_every, pipeline_case.SEGMENTS)
    assert_one_process_gradients(*result[:2], loss, expected, stages)


@pytest.mark.slow
def test_a_sublinear_stage_stashes_sqrt_segments_not_all_of_them(tmp_path):
    """36 segments on 2 stages: stashing every item keeps all 36; sublinear blocks of 6 keep at most the 5 first
    segments of the blocks not yet recomputed and the 6 items of the one being backpropagated: 11."""
    segments = 36
    loss, expected = reference("gpt2", "armt", -1, segments)
    runs, grads = {}, {}
    for keep_every in (1, 0):
        out = tmp_path / str(keep_every)
        out.mkdir()
        losses, grads[keep_every], runs[keep_every] = run_pipeline(out, 2, "gpt2", "armt", -1, 1, keep_every, segments)
        # over 36 segments the stages sum gradients in another order than one process: 4e-5 of 4.9 measured
        assert_one_process_gradients(losses, grads[keep_every], loss, expected, 2, atol=2e-4)
    assert_one_process_gradients(losses, grads[0], loss, grads[1], 2, atol=1e-6)  # the blocks change nothing
    assert [stage["stash_peak_items"] for stage in runs[1]] == [segments, segments]
    assert [stage["stash_peak_items"] for stage in runs[0]] == [11, 11]
    for every_item, sublinear in zip(runs[1], runs[0]):
        # stage 0 stashes the ARMT states of its layers; stage 1 also each segment's hidden states from stage 0
        assert sublinear["stash_peak_bytes"] * 3 < every_item["stash_peak_bytes"]


def test_truncation_changes_the_gradients_the_pipeline_matches():
    """The depth-2 cases above would pass with full BPTT too if truncation did nothing."""
    _, full = reference("opt", "rmt", -1)
    _, truncated = reference("opt", "rmt", 2)
    assert (full["memory"] - truncated["memory"]).abs().max() > 1e-4


def test_layers_split_evenly_and_bad_splits_are_refused():
    assert split_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert split_layers(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    with pytest.raises(ValueError, match="at most 4 stages"):
        split_layers(4, 5)
    # an LM head worth 2.7 layers on the last stage: 3 + 0 vs 1 + 2.7
    assert split_layers(4, 2, head_cost=2.7) == [range(0, 3), range(3, 4)]
    assert split_layers(12, 4, head_cost=2.7) == [range(0, 4), range(4, 8), range(8, 11), range(11, 12)]


def test_an_encoder_is_refused_with_the_alternative(load_backbone):
    from rmt_scale import RecurrentMemoryModel
    from rmt_scale.model.config import RMTConfig

    model = RecurrentMemoryModel(
        load_backbone("bert"), RMTConfig(num_mem_tokens=2, segment_size=8, cls_token_id=1, sep_token_id=2)
    )
    with pytest.raises(ValueError, match="ZeRO config instead"):
        PipelineStage(model, 0, 2)


def test_a_stage_holds_only_its_layers():
    model = pipeline_case.build_model("opt", "armt", -1)
    total = sum(p.numel() for p in model.parameters())
    owned = [
        sum(
            p.numel()
            for p in PipelineStage(pipeline_case.build_model("opt", "armt", -1), s, 4).owned_parameters().values()
        )
        for s in range(4)
    ]
    tied = model.backbone.get_input_embeddings().weight.numel()
    assert sum(owned) == total + tied  # the tied head is trained by the first and the last stage
    middle = PipelineStage(pipeline_case.build_model("opt", "armt", -1), 1, 4)
    assert sum(p.numel() for p in middle.model.parameters()) < total


def test_ideal_busy_fraction():
    assert ideal_busy_fraction(16, 2, 1, associative=True) == pytest.approx(16 / 17)
    assert ideal_busy_fraction(16, 4, 1, associative=False) == pytest.approx(16 / 64)
    assert ideal_busy_fraction(16, 4, 4, associative=False) == pytest.approx(64 / 67)


@pytest.mark.slow
def test_bench_reports_busy_fractions_step_times_and_a_schedule_plot(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "schedule.png"
    subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parents[1] / "tools" / "bench_pipeline.py"),
            "--backbone",
            "opt-micro",
            "--segments",
            "3",
            "--stages",
            "2",
            "--segment_size",
            "16",
            "--steps",
            "1",
            "--out",
            str(out),
            "--plot",
            str(png),
        ],
        check=True,
        capture_output=True,
        timeout=240,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    results = json.loads(out.read_text())["results"]
    assert [(r["memory"], r["stages"], r["segments"], r["chains"]) for r in results] == [
        ("armt", 2, 3, 1),
        ("rmt", 2, 3, 4),
    ]  # RMT: twice as many chains as stages
    for result in results:
        assert len(result["busy_fraction"]) == 2 and all(0 < b <= 1 for b in result["busy_fraction"])
        assert result["step_s"] > 0 and result["one_process_s"] > 0
    assert results[0]["ideal_busy_fraction"] == pytest.approx(3 / 4, abs=1e-3)
    assert png.read_bytes()[:4] == b"\x89PNG"
