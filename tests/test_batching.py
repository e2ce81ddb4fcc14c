"""Samples to model batches: the collate, training's micro-batches (generated and from shards), and the
shards-to-model example of docs/data.md, run as written."""

import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rmt_scale import RecurrentMemoryModel, RMTConfig
from rmt_scale.data import ShardStream, TaskGenerator, build_word_tokenizer, collate, make_sample, write_shards
from rmt_scale.model.presets import preset_config
from rmt_scale.model.segments import IGNORE_INDEX
from rmt_scale.training.batches import TrainBatches, micro_batch_at

DOCS = Path(__file__).resolve().parents[1] / "docs" / "data.md"


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer()


def test_collate_pads_on_the_right_and_labels_only_the_answer(tok):
    samples = [make_sample("reason", n, seed, tok) for seed, n in ((1, 300), (2, 237))]
    batch = collate(samples, pad_id=tok.pad_id)
    assert {name: (tuple(t.shape), t.dtype) for name, t in batch.items()} == {
        name: ((2, 300), torch.int64) for name in ("input_ids", "labels", "attention_mask")
    }
    assert batch["attention_mask"].sum(dim=1).tolist() == [300, 237]
    for row, sample in enumerate(samples):
        context, end = len(sample.tokens), sample.num_tokens
        assert batch["input_ids"][row, :context].tolist() == sample.tokens.tolist()
        assert batch["input_ids"][row, context:end].tolist() == sample.answer.tolist()
        assert (batch["input_ids"][row, end:] == tok.pad_id).all()
        # unshifted: the label sits on the answer token itself, every other position is ignored
        assert (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist() == list(range(context, end))
        assert batch["labels"][row, context:end].tolist() == sample.answer.tolist()
    assert collate(samples, tok.pad_id, length=320)["input_ids"].shape == (2, 320)


def test_ranks_split_the_global_batch(tok):
    generator = TaskGenerator("memorize", tok, seed=0)

    def make(rank, world, micro):
        return TrainBatches(
            generator,
            None,
            micro_batch=micro,
            grad_accum=1,
            rank=rank,
            world_size=world,
            segment_size=16,
            pad_id=tok.pad_id,
        )

    whole = make(0, 1, 4).step(2)[0]["input_ids"]
    halves = [make(r, 2, 2).step(2)[0]["input_ids"] for r in range(2)]
    assert whole.shape == (4, 32)
    assert torch.equal(torch.cat(halves), whole)


def test_a_token_cap_shrinks_long_micro_batches_and_the_samples_follow_on(tok):
    assert [micro_batch_at(16, 0, n) for n in (100, 10**6)] == [16, 16]
    assert [micro_batch_at(16, 1000, n) for n in (50, 100, 300, 1000, 10**6)] == [16, 10, 3, 1, 1]
    generator = TaskGenerator("memorize", tok, seed=0)

    def make(rank, world):
        return TrainBatches(
            generator,
            None,
            micro_batch=4,
            micro_batch_tokens=64,
            grad_accum=1,
            rank=rank,
            world_size=world,
            segment_size=16,
            pad_id=tok.pad_id,
        )

    one = make(0, 1)
    shapes = [tuple(one.step(segments)[0]["input_ids"].shape) for segments in (1, 2, 8, 1)]
    assert shapes == [(4, 16), (2, 32), (1, 128), (4, 16)]
    assert one.state_dict() == {"position": 4 + 2 + 1 + 4}
    # 2 ranks take the two halves of each global batch, and both move on by all of it
    ranks = [make(r, 2) for r in range(2)]
    for segments, first in ((2, 0), (8, 4), (1, 6)):
        for rank, batches in enumerate(ranks):
            (batch,) = batches.step(segments)
            size = micro_batch_at(4, 64, segments * 16)
            expected = [generator.sample(first + rank * size + i, segments * 16) for i in range(size)]
            assert torch.equal(batch["input_ids"], collate(expected, tok.pad_id)["input_ids"])
    assert [b.state_dict() for b in ranks] == [{"position": 14}] * 2


def test_shard_batches_pad_to_whole_segments_and_resume(tmp_path, tok):
    generator = TaskGenerator("memorize", tok, seed=0)
    write_shards((generator.sample(i, 20 + 7 * i) for i in range(6)), str(tmp_path / "shards"), max_samples=2)

    def make():
        return TrainBatches(
            None,
            ShardStream(str(tmp_path / "shards"), rank=0, world_size=1, seed=3),
            micro_batch=2,
            grad_accum=1,
            rank=0,
            world_size=1,
            segment_size=16,
            pad_id=tok.pad_id,
        )

    batches = make()
    first = batches.step(num_segments=1)[0]
    state = batches.state_dict()
    later = [batches.step(num_segments=1)[0] for _ in range(4)]  # runs past the end of the first epoch
    for batch in (first, *later):
        assert batch["input_ids"].shape[1] % 16 == 0
        lengths = batch["attention_mask"].sum(dim=1)
        assert batch["input_ids"].shape[1] == -(-int(lengths.max()) // 16) * 16
        assert ((batch["labels"] != -100).sum(dim=1) == 1).all()  # one answer token per sample
    resumed = make()
    resumed.load_state_dict(state)
    for expected in later:
        assert torch.equal(resumed.step(num_segments=1)[0]["input_ids"], expected["input_ids"])


def test_the_docs_example_feeds_shards_to_the_model(tmp_path, monkeypatch, tok):
    """docs/data.md's shards-to-model block, run as written against shards and a tokenizer laid out as
    tools/make_shards.py writes them: 10 samples in batches of 4 are 2 steps, and a real model takes each."""
    (block,) = [code for code in re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S) if "collate" in code]
    monkeypatch.chdir(tmp_path)
    generator = TaskGenerator("memorize", tok, seed=0)
    samples = [generator.sample(i, 40 + 3 * i) for i in range(10)]
    write_shards(samples, "data/memorize-1m", max_samples=3)
    tok.save("data/memorize-1m/tokenizer")
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(preset_config("test-opt", vocab_size=tok.vocab_size))
    rmt = RecurrentMemoryModel(backbone, RMTConfig(num_mem_tokens=4, segment_size=16))
    seen, losses = [], []

    def model(**batch):
        seen.append(batch)
        output = rmt(**batch)
        losses.append(output.loss.item())
        return output

    exec(block, {"rank": 0, "world": 1, "model": model})
    assert len(seen) == 2 and [b["input_ids"].shape[0] for b in seen] == [4, 4]
    lengths = sorted(int(n) for b in seen for n in b["attention_mask"].sum(dim=1))
    assert len(set(lengths)) == 8 and set(lengths) <= {s.num_tokens for s in samples}
    assert all(int((b["labels"] != IGNORE_INDEX).sum()) == 4 for b in seen)  # one answer token per sample
    # an untrained model predicts about uniformly over the vocabulary
    assert all(abs(loss - math.log(tok.vocab_size)) < 1.0 for loss in losses), losses
