"""Language modelling on documents: the lm collate, training batches cut to the curriculum's length, the shards'
task check, and the evaluation by segment (memory model, no-memory twin, full attention) with its files."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from rmt_scale import ARMTConfig, RecurrentMemoryModel, RMTConfig
from rmt_scale.cli.eval import evaluate_documents, parse_args
from rmt_scale.data import ShardStream, build_word_tokenizer, check_shard_task, collate_lm, write_shards
from rmt_scale.data.text import lm_sample
from rmt_scale.model.presets import preset_config
from rmt_scale.model.segments import IGNORE_INDEX
from rmt_scale.training.batches import TrainBatches
from rmt_scale.training.evaluation import (
    evaluate_by_segment,
    full_attention_loss_by_segment,
    loss_by_segment,
    segment_report,
)
from support import ROOT

SEGMENT = 8
VOCAB = 96  # the test-opt preset's


def documents(count: int, length: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [lm_sample(rng.integers(4, VOCAB, size=length), f"doc{i}") for i in range(count)]


def tiny_model(num_mem_tokens: int, memory: str = "rmt") -> RecurrentMemoryModel:
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(preset_config("test-opt"))
    config_class = ARMTConfig if memory == "armt" else RMTConfig
    return RecurrentMemoryModel(backbone, config_class(num_mem_tokens=num_mem_tokens, segment_size=SEGMENT)).eval()


def test_collate_lm_labels_every_token_or_each_samples_last_segment():
    samples = [lm_sample(np.arange(1, 21), "a"), lm_sample(np.arange(1, 12), "b")]  # 20 and 11 tokens
    every = collate_lm(samples, pad_id=0)
    assert every["input_ids"].shape == (2, 20) and every["attention_mask"].sum(1).tolist() == [20, 11]
    assert every["labels"][0].tolist() == list(range(1, 21))
    assert every["labels"][1].tolist() == list(range(1, 12)) + [IGNORE_INDEX] * 9
    last = collate_lm(samples, pad_id=0, length=24, last_segment=SEGMENT)["labels"]
    assert last.shape == (2, 24)
    assert (last[0] != IGNORE_INDEX).nonzero().flatten().tolist() == list(range(16, 20))  # its 3rd segment
    assert (last[1] != IGNORE_INDEX).nonzero().flatten().tolist() == list(range(8, 11))  # its 2nd


@pytest.mark.parametrize("lm_loss", ["all", "last"])
def test_training_batches_cut_documents_to_the_steps_segment_count(tmp_path, lm_loss):
    samples = documents(4, 4 * SEGMENT)
    write_shards(samples, str(tmp_path), extra_index={"task": "lm"})
    batches = TrainBatches(
        None,
        ShardStream(str(tmp_path), shuffle=False, rank=0, world_size=1),
        micro_batch=2,
        grad_accum=1,
        rank=0,
        world_size=1,
        segment_size=SEGMENT,
        pad_id=0,
        lm_loss=lm_loss,
    )
    for num_segments, first in ((2, 0), (1, 2)):
        (batch,) = batches.step(num_segments)
        length = num_segments * SEGMENT
        assert batch["input_ids"].shape == (2, length)
        expected = np.stack([s.tokens[:length] for s in samples[first : first + 2]])
        np.testing.assert_array_equal(batch["input_ids"].numpy(), expected)
        labelled = (batch["labels"] != IGNORE_INDEX).sum(1).tolist()
        assert labelled == [length if lm_loss == "all" else SEGMENT] * 2
    assert batches.state_dict()["shards"]["position"] == 4


def test_shards_of_the_other_kind_are_refused(tmp_path):
    write_shards(documents(2, 16), str(tmp_path / "lm"), extra_index={"task": "lm"})
    write_shards(documents(2, 16), str(tmp_path / "task"), extra_index={"task": "detect"})
    check_shard_task(str(tmp_path / "lm"), "lm")
    check_shard_task(str(tmp_path / "task"), "memorize")  # any task's shards train any task
    with pytest.raises(ValueError, match="hold detect samples, not documents: write lm shards with tools/make_sh"):
        check_shard_task(str(tmp_path / "task"), "lm")
    with pytest.raises(ValueError, match=r"hold documents \(task lm\): train them with --task lm"):
        check_shard_task(str(tmp_path / "lm"), "reason")


@pytest.mark.parametrize("memory", ["rmt", "armt"])
def test_streaming_by_segment_matches_one_forward_over_the_whole_input(memory):
    """Segment k's loss, read segment by segment with the memory passed on, is the loss of segment k's logits in
    one forward of the whole input (its within-segment predictions)."""
    model = tiny_model(4, memory)
    batch = collate_lm(documents(3, 3 * SEGMENT) + documents(1, 2 * SEGMENT + 3, seed=1), pad_id=0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    streamed = loss_by_segment(model, ids, mask, SEGMENT)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, return_logits=True).logits
    for k in range(3):
        part = slice(k * SEGMENT, (k + 1) * SEGMENT)
        targets = ids[:, part][:, 1:].clone()
        targets[(mask[:, part][:, 1:] == 0)] = IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(
            logits[:, part][:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        assert streamed[k, 1].item() == (targets != IGNORE_INDEX).sum().item()
        assert streamed[k, 0].item() == pytest.approx(loss.item(), rel=1e-5)
    assert streamed[2, 1].item() == 3 * (SEGMENT - 1) + 2  # the short sample's third segment has 3 tokens


def test_full_attention_twin_and_reach_identities():
    twin = tiny_model(0)
    batch = collate_lm(documents(2, 4 * SEGMENT), pad_id=0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    alone = loss_by_segment(twin, ids, mask, SEGMENT)
    # a twin reads each segment alone: full attention whose reach is one segment
    torch.testing.assert_close(full_attention_loss_by_segment(twin.backbone, ids, mask, SEGMENT, SEGMENT), alone)
    # with every position in reach, full attention is one forward of the backbone over the whole input
    full = full_attention_loss_by_segment(twin.backbone, ids, mask, SEGMENT, reach=64)
    with torch.no_grad():
        logits = twin.backbone(input_ids=ids, attention_mask=mask).logits
    by_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    for k in range(4):
        within = by_token[:, k * SEGMENT : (k + 1) * SEGMENT - 1]
        assert full[k, 0].item() == pytest.approx(within.sum().item(), rel=1e-5)
    # segment 1: both see segment 1 alone
    assert full[0, 0].item() == pytest.approx(alone[0, 0].item(), rel=1e-6)
    assert full[1:, 0].sum() != pytest.approx(alone[1:, 0].sum().item(), rel=1e-3)  # later, context matters


def test_segment_report_numbers_and_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rmt_scale.training.metrics import write_segment_report

    model, twin = tiny_model(4), tiny_model(0)
    samples = documents(5, 10 * SEGMENT)  # 80 tokens: past the test-opt's 64 positions
    settings = dict(batch_size=2, pad_id=0, rank=0, world_size=1, device=torch.device("cpu"))
    report = segment_report(model, twin, samples, 10, **settings)
    assert report["segments"] == list(range(1, 11)) and report["full_attention_reach"] == 64
    assert report["beyond_reach"] == [9, 10]
    losses = report["loss"]
    assert sorted(losses) == ["full attention", "rmt", "twin"]
    assert losses["full attention"][0] == pytest.approx(losses["twin"][0], rel=1e-6)
    twin_alone = evaluate_by_segment(
        lambda ids, mask: loss_by_segment(twin, ids, mask, SEGMENT), samples, 10, segment_size=SEGMENT, **settings
    )
    assert losses["twin"] == pytest.approx(list(twin_alone.values()))
    assert report["perplexity"]["rmt"] == pytest.approx(np.exp(losses["rmt"]).tolist())
    # a shorter cut reads fewer segments
    assert evaluate_by_segment(
        lambda ids, mask: loss_by_segment(twin, ids, mask, SEGMENT), samples, 3, segment_size=SEGMENT, **settings
    ) == pytest.approx({k: twin_alone[k] for k in (1, 2, 3)})

    write_segment_report(report, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == report
    assert (tmp_path / "perplexity_by_segment.png").read_bytes()[:4] == b"\x89PNG"
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("segment/loss/full_attention")]
    assert logged == [(k, pytest.approx(v)) for k, v in zip(report["segments"], losses["full attention"])]


def test_eval_launcher_reports_an_exported_model_and_its_twin(tmp_path, capsys):
    tokenizer = build_word_tokenizer()
    model = RecurrentMemoryModel(
        AutoModelForCausalLM.from_config(
            preset_config("test-opt", vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id)
        ),
        RMTConfig(num_mem_tokens=4, segment_size=SEGMENT),
    )
    twin = RecurrentMemoryModel(
        AutoModelForCausalLM.from_config(
            preset_config("test-opt", vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id)
        ),
        RMTConfig(num_mem_tokens=0, segment_size=SEGMENT),
    )
    run = tmp_path / "run"
    for directory, saved in ((run / "export", model), (run / "baseline" / "export", twin)):
        saved.save_pretrained(directory)
        tokenizer.save(str(directory / "tokenizer"))
    rng = np.random.default_rng(0)
    samples = [lm_sample(rng.integers(5, tokenizer.vocab_size, size=3 * SEGMENT), "doc") for _ in range(4)]
    write_shards(samples, str(tmp_path / "held_out"), extra_index={"task": "lm"})

    argv = ["--model", str(run / "export"), "--task", "lm", "--eval_segments", "3", "--eval_samples", "4"]
    assert evaluate_documents(parse_args(argv), time.perf_counter()) == 2
    assert "pass --shards, written by tools/make_shards.py --task lm" in capsys.readouterr().err
    argv += ["--shards", str(tmp_path / "held_out"), "--out", str(tmp_path / "out")]
    assert evaluate_documents(parse_args([*argv, "--twin", str(run / "export")]), time.perf_counter()) == 2
    assert "is not a no-memory twin" in capsys.readouterr().err
    assert evaluate_documents(parse_args(argv), time.perf_counter()) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["twin"] == str((run / "baseline" / "export").resolve()) and report["segments"] == [1, 2, 3]
    assert report["loss"]["full attention"][0] == pytest.approx(report["loss"]["twin"][0], rel=1e-6)
    assert report["beyond_reach"] == [] and (tmp_path / "out" / "perplexity_by_segment.png").is_file()
    assert "perplexity by segment (4 samples" in capsys.readouterr().out
    # a --freeze_backbone run's twin is the model's own backbone, without memory
    assert evaluate_documents(parse_args([*argv, "--twin", "backbone"]), time.perf_counter()) == 0
    frozen = json.loads((tmp_path / "out" / "results.json").read_text())
    assert frozen["twin"] == "backbone" and frozen["loss"]["twin"][0] != report["loss"]["twin"][0]
    assert frozen["loss"]["full attention"][0] == pytest.approx(frozen["loss"]["twin"][0], rel=1e-6)
    assert frozen["loss"]["rmt"] == report["loss"]["rmt"]


def test_plot_results_sends_an_lm_run_to_the_evaluation_by_segment(tmp_path):
    run = tmp_path / "pydoc"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"loss_by_segment": {"rmt": {"1": 4.9}}, "segment_size": 32}))
    plotted = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plot_results.py"), str(run), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert plotted.returncode == 2
    assert plotted.stderr.startswith(f"error: {run} is a --task lm run (loss by segment, not accuracy by length)")
