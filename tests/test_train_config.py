"""Fast checks of the training components: flags, DeepSpeed config filling and validation, curriculum,
activation-checkpointing mapping. No process group is needed."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmt_scale.data import TaskGenerator, build_word_tokenizer, collate
from rmt_scale.training import Curriculum, TrainConfig, build_ds_config, build_parser, load_ds_config, parse_args
from rmt_scale.training.trainer import activation_settings, build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "ds_configs"


def test_help_documents_every_flag():
    text = build_parser().format_help()
    for flag in ("--backbone", "--num_mem_tokens", "--segment_size", "--task", "--shards", "--curriculum",
                 "--eval_segments", "--out_dir", "--max_steps", "--resume", "--ds_config", "--save_every",
                 "--baseline", "--no-baseline"):
        assert flag in text
    assert text.count("%(") == 0  # every help string rendered


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
    config = TrainConfig(segment_size=16, num_mem_tokens=4)
    backprop, offload = activation_settings(config, load_ds_config(str(CONFIGS / "zero3.json")))
    assert (backprop, offload) == ("checkpoint", True)
    assert activation_settings(config, load_ds_config(str(CONFIGS / "ddp.json"))) == ("bptt", False)
    batch_size, segments = 3, 3
    generator = TaskGenerator("memorize", tokenizer, seed=0)
    batch = collate([generator.sample(i, segments * 16) for i in range(batch_size)], tokenizer.pad_id)

    grads, packed = {}, {}
    for mode, offloaded in ((backprop, False), (backprop, True), ("bptt", True)):
        model = build_model(config, tokenizer, mode)
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
    raw = load_ds_config(str(CONFIGS / "zero2.json"))
    with pytest.raises(ValueError, match="--backprop=replay cannot run with ZeRO stage 2"):
        build_ds_config(raw, TrainConfig(backprop="replay"), world_size=1)
    build_ds_config(load_ds_config(str(CONFIGS / "ddp.json")), TrainConfig(backprop="replay"), world_size=1)


@pytest.mark.parametrize("argv, message", [
    (["--curriculum", "4,2"], "must be increasing"),
    (["--eval_segments", "a,b"], "comma-separated positive integers"),
    (["--micro_batch_size", "0"], "--micro_batch_size=0 must be at least 1"),
    (["--task", "nope"], "--task='nope' is unknown"),
])
def test_bad_flags_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_launcher_stops_before_work_on_a_segment_that_does_not_fit(tmp_path):
    """The built-in backbone has 128 positions; 120 + 2 x 8 memory tokens do not fit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    result = subprocess.run([sys.executable, str(ROOT / "launchers" / "train.py"), "--segment_size", "120",
                             "--out_dir", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: a segment needs 136 positions" in result.stderr
    assert "lower segment_size to at most 112" in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_curriculum_draws_are_rank_identical_and_resumable():
    ranks = [Curriculum([1, 2, 4], 0.9, stage_steps=3, seed=7) for _ in range(2)]
    draws = [[c.draw() for _ in range(20)] for c in ranks]
    assert draws[0] == draws[1]
    fresh = Curriculum([1, 2, 4], 0.9, stage_steps=3, seed=7)
    fresh.stage = 2
    seen = {fresh.draw() for _ in range(200)}
    assert seen == {1, 2, 3, 4}
    state = fresh.state_dict()
    after = [fresh.draw() for _ in range(5)]
    restored = Curriculum([1, 2, 4], 0.9, stage_steps=3, seed=7)
    restored.load_state_dict(state)
    assert [restored.draw() for _ in range(5)] == after
    with pytest.raises(ValueError, match="same --curriculum"):
        Curriculum([1, 2], 0.9, 3, 7).load_state_dict(state)


def test_curriculum_promotes_on_accuracy_or_budget():
    curriculum = Curriculum([1, 2, 4], promote_accuracy=0.9, stage_steps=5, seed=0)
    curriculum.draw()
    assert not curriculum.maybe_promote({1: 0.5})
    assert curriculum.maybe_promote({1: 0.95}) and curriculum.max_segments == 2
    for _ in range(4):
        curriculum.draw()
        assert not curriculum.maybe_promote()
    curriculum.draw()
    assert curriculum.maybe_promote() and curriculum.max_segments == 4
    assert not curriculum.maybe_promote({4: 1.0})  # the last stage stays


def test_checkpoint_mapping_acts_and_keeps_gradients():
    """The activation_checkpointing block switches the model to per-segment recomputation, which gives the
    gradients of plain BPTT; each segment's layers run twice (forward, then recomputed in backward)."""
    tokenizer = build_word_tokenizer()
    ds = load_ds_config(str(CONFIGS / "zero3.json"))
    config = TrainConfig(segment_size=16, num_mem_tokens=4)
    backprop, _ = activation_settings(config, ds)
    generator = TaskGenerator("memorize", tokenizer, seed=0)
    batch = collate([generator.sample(i, 48) for i in range(3)], tokenizer.pad_id)
    grads, calls = {}, {}
    for mode in ("bptt", backprop):
        model = build_model(config, tokenizer, mode)
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


def test_resume_names_a_complete_checkpoint(tmp_path):
    from rmt_scale.training import checkpoint

    assert checkpoint.find(tmp_path, "auto") is None  # nothing yet: start fresh
    (tmp_path / "checkpoints" / ".tmp-step000004").mkdir(parents=True)  # a save killed half-way
    with pytest.raises(ValueError, match="is not a complete checkpoint"):
        checkpoint.find(tmp_path, ".tmp-step000004")
    done = tmp_path / "checkpoints" / "step000002"
    done.mkdir()
    (done / "trainer_state_rank0.pt").write_bytes(b"")
    (tmp_path / "checkpoints" / "latest").write_text("step000002")
    assert checkpoint.find(tmp_path, "auto") == done
    assert checkpoint.find(tmp_path, "step000002") == done
    assert checkpoint.find(tmp_path, str(done)) == done


def test_resume_refuses_other_settings():
    saved = json.loads(TrainConfig().to_json())
    TrainConfig(max_steps=999, eval_segments="1,32").check_resumable(saved)  # budget and evaluation may change
    with pytest.raises(ValueError, match=r"--num_mem_tokens 8 -> 4; --segment_size 32 -> 64"):
        TrainConfig(num_mem_tokens=4, segment_size=64).check_resumable(saved)


def test_tokenizer_larger_than_the_backbone_is_refused(tmp_path):
    import transformers

    small = transformers.OPTConfig(vocab_size=50, hidden_size=16, word_embed_proj_dim=16, num_hidden_layers=1,
                                   num_attention_heads=2, ffn_dim=32, max_position_embeddings=64)
    transformers.OPTForCausalLM(small).save_pretrained(tmp_path / "opt")
    config = TrainConfig(backbone=str(tmp_path / "opt"), tokenizer="builtin", segment_size=16)
    with pytest.raises(ValueError, match="the tokenizer has 232 tokens but the backbone embeds only 50"):
        build_model(config, build_word_tokenizer(), "bptt")
