"""The DeepSpeed config (ds_config.py): the JSON filled and checked, and the activation-checkpointing mapping onto
the recurrent model (measured on the real model). The engine itself runs in tests/test_train_e2e.py."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmt_scale.data import TaskGenerator, build_word_tokenizer
from rmt_scale.model import ARMTConfig, ConfigError, RMTConfig
from rmt_scale.model.activations import LayerOffload, SavedTensorBytes, checkpoint_layers
from rmt_scale.model.presets import preset_config
from rmt_scale.training import TrainConfig
from rmt_scale.training.batches import collate
from rmt_scale.training.ds_config import activation_settings, build_ds_config, load_ds_config, zero_stage
from rmt_scale.training.trainer import build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "ds_configs"


def tiny_model(tokenizer, model_config: RMTConfig):
    return build_model("tiny", tokenizer, 0, model_config)


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3", "zero3_bf16"])
def test_shipped_configs_fill_auto(name):
    config = TrainConfig(micro_batch_size=3, grad_accum=2, lr=5e-4, max_steps=40, warmup_steps=7)
    ds = build_ds_config(load_ds_config(str(CONFIGS / f"{name}.json")), config, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24
    assert ds["optimizer"]["params"]["lr"] == 5e-4
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 7
    assert ds["scheduler"]["params"]["total_num_steps"] == 41  # the decay reaches 0 one past the last step
    assert "auto" not in json.dumps(ds)


def test_unknown_key_is_refused():
    raw = load_ds_config(str(CONFIGS / "ddp.json")) | {"zero_optimisation": {"stage": 2}}
    with pytest.raises(ValueError, match=r"unknown DeepSpeed config keys \['zero_optimisation'\]"):
        build_ds_config(raw, TrainConfig(), world_size=1)
    raw = load_ds_config(str(CONFIGS / "zero2.json"))
    raw["zero_optimization"]["overlap_com"] = True
    with pytest.raises(ValueError, match="zero_optimization section.*overlap_com"):
        build_ds_config(raw, TrainConfig(), world_size=1)


def test_a_config_of_the_wrong_shape_or_types_names_the_key(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=f"--ds_config='{listed}' holds a JSON array, not an object"):
        load_ds_config(str(listed))
    ddp = load_ds_config(str(CONFIGS / "ddp.json"))
    cases = {
        "optimizer.params.lr='banana' in --ds_config='ds_configs/ddp.json' must be a number, or \"auto\"": (
            "optimizer",
            {**ddp["optimizer"], "params": {"lr": "banana"}},
        ),
        r"optimizer.params.betas=\[0.9, 'x'\] .* must be a number \(or a list of numbers\)": (
            "optimizer",
            {**ddp["optimizer"], "params": {"betas": [0.9, "x"]}},
        ),
        r"optimizer.type='Adamm' .* is not a optimizer DeepSpeed builds: use one of DeepSpeed's \(adagrad, adam, ": (
            "optimizer",
            {"type": "Adamm"},
        ),
        r"scheduler.type='Cosine' .* use one of DeepSpeed's \(LRRangeTest, OneCycle, ": (
            "scheduler",
            {"type": "Cosine"},
        ),
        "scheduler in --ds_config='ds_configs/ddp.json' is a JSON string: make it an object": ("scheduler", "WarmupLR"),
    }
    for message, (key, value) in cases.items():
        with pytest.raises(ConfigError, match=message):
            build_ds_config(ddp | {key: value}, TrainConfig(), world_size=1)
    # DeepSpeed's names in any case, and torch's classes, are built
    for optimizer in ({"type": "adamw"}, {"type": "SGD", "params": {"lr": "auto", "momentum": 0.9}}):
        build_ds_config(ddp | {"optimizer": optimizer}, TrainConfig(), world_size=1)
    build_ds_config(ddp | {"scheduler": {"type": "StepLR", "params": {"step_size": 5}}}, TrainConfig(), world_size=1)


def test_batch_sizes_that_do_not_divide_are_refused():
    raw = load_ds_config(str(CONFIGS / "ddp.json")) | {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}
    with pytest.raises(ValueError, match=r"train_batch_size=30 must equal .* x 2 data-parallel ranks = 8"):
        build_ds_config(raw, TrainConfig(), world_size=2)


@pytest.mark.parametrize("name,stages", [("pipeline", 2), ("pipeline4", 4)])
def test_pipeline_configs_count_replicas_not_ranks(name, stages):
    config = TrainConfig(micro_batch_size=8, grad_accum=2)
    ds = build_ds_config(load_ds_config(str(CONFIGS / f"{name}.json")), config, world_size=4)
    assert ds["pipeline"]["stages"] == stages
    assert ds["train_batch_size"] == 8 * 2 * (4 // stages)  # the stages of a pipeline share its batch
    assert ds["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize(
    "change,world_size,message",
    [
        ({"zero_optimization": {"stage": 3}}, 2, "ZeRO stage 3 cannot run with pipeline stages"),
        ({"pipeline": {"stages": 2}}, 3, "pipeline.stages=2 does not divide the 3 ranks"),
        ({"pipeline": {"stages": 0}}, 2, "must be a positive integer"),
        (
            {"pipeline": {"stages": 2, "chains": 5}},
            2,
            r"pipeline.chains=5 must be between 1 and the micro-batch size \(4\)",
        ),
    ],
)
def test_bad_pipeline_configs_are_refused(change, world_size, message):
    raw = load_ds_config(str(CONFIGS / "pipeline.json")) | change
    with pytest.raises(ValueError, match=message):
        build_ds_config(raw, TrainConfig(micro_batch_size=4), world_size=world_size)


def test_a_token_capped_micro_batch_is_refused_with_pipeline_stages():
    with pytest.raises(ValueError, match="pipeline stages split a fixed one into chains: drop it"):
        build_ds_config(
            load_ds_config(str(CONFIGS / "pipeline.json")), TrainConfig(micro_batch_tokens=512), world_size=2
        )


@pytest.mark.parametrize("mode", ["replay", "sublinear"])
def test_replay_and_sublinear_are_accepted_with_every_zero_stage(mode):
    replay = TrainConfig(model=RMTConfig(backprop=mode))
    for name, stage in (("ddp.json", 0), ("zero2.json", 2), ("zero3.json", 3)):
        assert zero_stage(build_ds_config(load_ds_config(str(CONFIGS / name)), replay, world_size=1)) == stage


def memorize_batch(tokenizer, batch_size: int, segments: int, segment_size: int = 16) -> dict:
    generator = TaskGenerator("memorize", tokenizer, seed=0)
    return collate([generator.sample(i, segments * segment_size) for i in range(batch_size)], tokenizer.pad_id)


def test_layer_checkpointing_and_offload_keep_gradients():
    """zero3.json's block: per-segment checkpointing, the backbone's layers checkpointed inside each segment,
    their inputs offloaded. The checkpoints nest; the gradients are those of plain BPTT, bit for bit, and the
    offload moves each layer's input once per segment, in the segment's recomputation (its first forward keeps
    nothing, so moves nothing): segments x layers x (batch, memory + segment + memory, hidden) floats."""
    tokenizer = build_word_tokenizer()
    config = RMTConfig(segment_size=16, num_mem_tokens=4)
    mapped, layers, offload = activation_settings(config, load_ds_config(str(CONFIGS / "zero3.json")))
    assert (mapped.backprop, layers, offload) == ("checkpoint", True, True)
    assert activation_settings(config, load_ds_config(str(CONFIGS / "ddp.json"))) == (config, False, False)
    batch_size, segments = 3, 3
    batch = memorize_batch(tokenizer, batch_size, segments)

    grads, offloaded = {}, {}
    for mode, layers, offload in (("bptt", False, False), ("checkpoint", True, False), ("checkpoint", True, True)):
        model = tiny_model(tokenizer, dataclasses.replace(config, backprop=mode))
        layer_offload = LayerOffload() if offload else None
        if layers:
            checkpoint_layers(model.backbone, layer_offload)
        model(**batch).loss.backward()
        grads[mode, layers, offload] = [p.grad.clone() for p in model.parameters()]
        offloaded[mode, layers, offload] = layer_offload and layer_offload.offloaded_bytes
    for variant in (("checkpoint", True, False), ("checkpoint", True, True)):
        for plain, checkpointed in zip(grads["bptt", False, False], grads[variant]):
            torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-6)
    shapes = model.backbone.config
    layer_input = batch_size * (config.segment_size + 2 * config.num_mem_tokens) * shapes.hidden_size * 4
    assert offloaded["checkpoint", True, True] == segments * shapes.num_hidden_layers * layer_input == 221_184


def test_layer_offload_cuts_what_a_segment_keeps_on_the_device():
    """What one segment keeps for backward (all a checkpointed segment's recomputation holds at once), counted
    with saved-tensor hooks. Without the block: every layer's activations. With it, each layer keeps only its
    input, which goes to host memory; on the device stays what lies outside the layers. Per OPT layer (pre-norm,
    SDPA attention) over N = batch x (memory + segment + memory) positions, hidden H, FFN F, heads h, the
    activations are 4N(8H + F + h + 4) bytes: the layer input, the normed inputs of q/k/v and of fc1, the
    attention output before out_proj, SDPA's q, k, v and output (4NH), fc1's ReLU output (NF), SDPA's log-sum-exp
    (Nh) and both layer norms' mean and rstd (4N)."""
    tokenizer = build_word_tokenizer()
    config = RMTConfig(segment_size=16, num_mem_tokens=4, backprop="bptt")
    batch_size = 3
    batch = memorize_batch(tokenizer, batch_size, segments=1)
    counted = {}
    for offload in (None, LayerOffload()):
        model = tiny_model(tokenizer, config)
        if offload is not None:
            checkpoint_layers(model.backbone, offload)
        with SavedTensorBytes(model, offload) as saved:
            model(**batch)
        counted[offload is not None] = saved.kept, saved.offloaded

    shapes = model.backbone.config
    hidden, ffn, heads, layers = (
        shapes.hidden_size,
        shapes.ffn_dim,
        shapes.num_attention_heads,
        shapes.num_hidden_layers,
    )
    positions = batch_size * (config.segment_size + 2 * config.num_mem_tokens)
    layer_activations = 4 * positions * (8 * hidden + ffn + heads + 4)
    (kept_without, _), (kept_with, offloaded_with) = counted[False], counted[True]
    assert counted[False][1] == 0
    assert offloaded_with == layers * positions * hidden * 4 == 73_728
    assert kept_with == kept_without - layers * layer_activations
    expected_factor = kept_without / (kept_without - layers * layer_activations)
    assert kept_without / kept_with == pytest.approx(expected_factor) == pytest.approx(21.78, abs=0.01)


def test_armt_gets_segment_checkpointing_only():
    """ARMT's layer hooks must run inside the segment step, so the block checkpoints its segments, not its layers."""
    config, layers, offload = activation_settings(
        ARMTConfig(segment_size=16, backprop="bptt"), load_ds_config(str(CONFIGS / "zero3.json"))
    )
    assert (config.backprop, layers, offload) == ("checkpoint", False, False)


@pytest.mark.slow
def test_zero3_run_logs_the_offloaded_bytes(tmp_path):
    """A real launcher run on the shipped zero3.json: TensorBoard's memory/offloaded_bytes is, at every step,
    what the step's segments moved: segments x layers x (batch, memory + segment + memory, hidden) floats."""
    out = tmp_path / "run"
    segment_size, num_mem, batch_size = 16, 4, 2
    command = [
        sys.executable,
        str(ROOT / "launchers" / "train.py"),
        "--ds_config",
        str(CONFIGS / "zero3.json"),
        "--memory",
        "rmt",
        "--segment_size",
        str(segment_size),
        "--num_mem_tokens",
        str(num_mem),
        "--micro_batch_size",
        str(batch_size),
        "--curriculum",
        "1,3",
        "--stage_steps",
        "2",
        "--max_steps",
        "4",
        "--eval_every",
        "4",
        "--eval_segments",
        "1",
        "--eval_samples",
        "2",
        "--out_dir",
        str(out),
        "--no-baseline",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    offloaded = [(e.step, e.value) for e in events.Scalars("memory/offloaded_bytes")]
    segments = [(e.step, e.value) for e in events.Scalars("train/segments")]
    shapes = preset_config("opt-quickstart")
    layer_input = batch_size * (segment_size + 2 * num_mem) * shapes.hidden_size * 4
    assert [step for step, _ in offloaded] == [1, 2, 3, 4]
    assert [count for _, count in segments][:2] == [1, 1] and max(count for _, count in segments) > 1, segments
    assert offloaded == [(step, count * shapes.num_hidden_layers * layer_input) for step, count in segments]


def test_checkpoint_mapping_acts_and_keeps_gradients():
    """The activation_checkpointing block switches the model to per-segment recomputation, which gives the
    gradients of plain BPTT; each segment's layers run twice (forward, then recomputed in backward)."""
    tokenizer = build_word_tokenizer()
    ds = load_ds_config(str(CONFIGS / "zero3.json"))
    config = RMTConfig(segment_size=16, num_mem_tokens=4)
    backprop = activation_settings(config, ds)[0].backprop
    batch = memorize_batch(tokenizer, 3, segments=3)
    grads, calls = {}, {}
    for mode in ("bptt", backprop):
        model = tiny_model(tokenizer, dataclasses.replace(config, backprop=mode))
        assert model.config.backprop == mode
        calls[mode] = 0
        first_layer = model.backbone.model.decoder.layers[0]
        first_layer.register_forward_hook(lambda *args, mode=mode: calls.__setitem__(mode, calls[mode] + 1))
        model(**batch).loss.backward()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    assert backprop == "checkpoint"
    assert (calls["bptt"], calls["checkpoint"]) == (3, 6)
    for plain, checkpointed in zip(grads["bptt"], grads["checkpoint"]):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)
