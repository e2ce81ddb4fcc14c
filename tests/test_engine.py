"""DeepSpeed in one module: the JSON config filled and checked, and the activation-checkpointing mapping onto
the recurrent model (measured on the real model). The engine itself runs in tests/test_train_e2e.py."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from rmt_scale.data import TaskGenerator, build_word_tokenizer
from rmt_scale.model import RMTConfig
from rmt_scale.training import TrainConfig
from rmt_scale.training.data import collate
from rmt_scale.training.engine import activation_settings, build_ds_config, load_ds_config
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
    assert ds["scheduler"]["params"]["total_num_steps"] == 40
    assert "auto" not in json.dumps(ds)


def test_unknown_key_is_refused():
    raw = load_ds_config(str(CONFIGS / "ddp.json")) | {"zero_optimisation": {"stage": 2}}
    with pytest.raises(ValueError, match=r"unknown DeepSpeed config keys \['zero_optimisation'\]"):
        build_ds_config(raw, TrainConfig(), world_size=1)
    raw = load_ds_config(str(CONFIGS / "zero2.json"))
    raw["zero_optimization"]["overlap_com"] = True
    with pytest.raises(ValueError, match="zero_optimization section.*overlap_com"):
        build_ds_config(raw, TrainConfig(), world_size=1)


def test_batch_sizes_that_do_not_divide_are_refused():
    raw = load_ds_config(str(CONFIGS / "ddp.json")) | {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}
    with pytest.raises(ValueError, match=r"train_batch_size=30 must equal .* x 2 ranks = 8"):
        build_ds_config(raw, TrainConfig(), world_size=2)


def test_replay_with_zero_is_refused():
    replay = TrainConfig(model=RMTConfig(backprop="replay"))
    raw = load_ds_config(str(CONFIGS / "zero2.json"))
    with pytest.raises(ValueError, match="--backprop=replay cannot run with ZeRO stage 2"):
        build_ds_config(raw, replay, world_size=1)
    build_ds_config(load_ds_config(str(CONFIGS / "ddp.json")), replay, world_size=1)


class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """torch's save_on_cpu, as the trainer enters it, recording each tensor it packs for backward."""

    def __init__(self):
        super().__init__(pin_memory=torch.cuda.is_available())
        self.packed = []
        pack = self.pack_hook

        def counting_pack(tensor):
            device, stored = pack(tensor)
            self.packed.append(stored)
            return device, stored

        self.pack_hook = counting_pack


def test_cpu_checkpointing_offloads_each_segments_input_memory_and_keeps_gradients():
    """zero3.json's cpu_checkpointing puts the forward under save_on_cpu, around per-segment checkpoints: what
    it moves to host memory is each segment's input memory, (batch, memory tokens, hidden) floats per segment,
    and nothing else (the layers' activations are recomputed in backward, never saved). Gradients are those
    of the same model without the offload."""
    tokenizer = build_word_tokenizer()
    config = RMTConfig(segment_size=16, num_mem_tokens=4)
    mapped, offload = activation_settings(config, load_ds_config(str(CONFIGS / "zero3.json")))
    assert (mapped.backprop, offload) == ("checkpoint", True)
    assert activation_settings(config, load_ds_config(str(CONFIGS / "ddp.json"))) == (config, False)
    backprop = mapped.backprop
    batch_size, segments = 3, 3
    generator = TaskGenerator("memorize", tokenizer, seed=0)
    batch = collate([generator.sample(i, segments * 16) for i in range(batch_size)], tokenizer.pad_id)

    grads, packed = {}, {}
    for mode, offloaded in ((backprop, False), (backprop, True), ("bptt", True)):
        model = tiny_model(tokenizer, dataclasses.replace(config, backprop=mode))
        counting = CountingSaveOnCpu()
        with counting if offloaded else contextlib.nullcontext():
            loss = model(**batch).loss
        loss.backward()
        grads[mode, offloaded] = [p.grad.clone() for p in model.parameters()]
        packed[mode, offloaded] = counting.packed

    memory_bytes = batch_size * config.num_mem_tokens * model.backbone.config.hidden_size * 4
    offloaded = packed[backprop, True]
    assert [tuple(t.shape) for t in offloaded] == [(batch_size, 4, 128)] * segments
    assert all(t.device.type == "cpu" for t in offloaded)
    assert sum(t.nbytes for t in offloaded) == segments * memory_bytes == 18_432
    # the counter sees activations where there are any: plain BPTT would offload every layer's
    assert sum(t.nbytes for t in packed["bptt", True]) > 100 * segments * memory_bytes
    for plain, with_offload in zip(grads[backprop, False], grads[backprop, True]):
        torch.testing.assert_close(with_offload, plain, rtol=0, atol=0)


def test_checkpoint_mapping_acts_and_keeps_gradients():
    """The activation_checkpointing block switches the model to per-segment recomputation, which gives the
    gradients of plain BPTT; each segment's layers run twice (forward, then recomputed in backward)."""
    tokenizer = build_word_tokenizer()
    ds = load_ds_config(str(CONFIGS / "zero3.json"))
    config = RMTConfig(segment_size=16, num_mem_tokens=4)
    backprop = activation_settings(config, ds)[0].backprop
    generator = TaskGenerator("memorize", tokenizer, seed=0)
    batch = collate([generator.sample(i, 48) for i in range(3)], tokenizer.pad_id)
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
