"""Evaluation for every model the launcher trains: batches with class labels for encoders, and streaming
inference (one segment per call, the memory passed on) that predicts exactly what one forward over the
whole input predicts, for RMT, ARMT and an RMT encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rmt_scale import ARMTConfig, RecurrentMemoryModel, RMTConfig
from rmt_scale.data import LOCATIONS, AnswerClasses, TaskGenerator, build_word_tokenizer, collate
from rmt_scale.model.presets import preset_config
from rmt_scale.model.segments import IGNORE_INDEX
from rmt_scale.training import evaluation
from rmt_scale.training.evaluation import samples_at, stacked_batch, streaming_correct

SEGMENT = 16
SEGMENTS = 5


def drawn(generator: TaskGenerator, count: int) -> list:
    """The first ``count`` evaluation samples of SEGMENTS segments, as evaluation draws them."""
    return [generator.sample(index, SEGMENTS * SEGMENT) for index in range(count)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer()


def test_encoder_batches_hold_the_context_and_the_answer_class(tokenizer):
    classes = AnswerClasses(tokenizer)
    samples = [TaskGenerator("reason", tokenizer, seed=3).sample(i, n) for i, n in ((0, 64), (1, 50))]
    batch = collate(samples, tokenizer.pad_id, classes=classes)
    assert batch["labels"].tolist() == [LOCATIONS.index(s.answer_text) for s in samples]
    assert batch["attention_mask"].sum(dim=1).tolist() == [63, 49]  # the answer is not read
    assert batch["input_ids"][0].tolist() == samples[0].tokens.tolist()
    assert len(classes) == 6
    with pytest.raises(ValueError, match=r"answer ids \[5\] are none of the encoder's classes \(bathroom, bedroom"):
        classes(np.array([5]))


def build(variant: str, vocab_size: int, tokenizer) -> RecurrentMemoryModel:
    torch.manual_seed(0)
    if variant == "encoder":
        backbone = AutoModelForSequenceClassification.from_config(
            preset_config("test-bert", vocab_size=vocab_size, num_labels=6, max_position_embeddings=64)
        )
        config = RMTConfig(
            num_mem_tokens=4, segment_size=SEGMENT, cls_token_id=tokenizer.cls_id, sep_token_id=tokenizer.sep_id
        )
    else:
        backbone = AutoModelForCausalLM.from_config(preset_config("test-opt", vocab_size=vocab_size))
        config_class = ARMTConfig if variant == "armt" else RMTConfig
        config = config_class(num_mem_tokens=4, segment_size=SEGMENT)
    model = RecurrentMemoryModel(backbone, config).eval()
    if model.associative is not None:  # a fresh ARMT reads an empty memory: give it something to read
        for parameter in model.associative.parameters():
            parameter.data.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("variant", ["rmt", "armt", "encoder"])
def test_streaming_predicts_what_the_whole_input_predicts(variant, tokenizer):
    model = build(variant, tokenizer.vocab_size, tokenizer)
    encoder = variant == "encoder"
    classes = AnswerClasses(tokenizer) if encoder else None
    generator = TaskGenerator("detect", tokenizer, seed=11)
    batch = collate(drawn(generator, 6), tokenizer.pad_id, classes=classes)
    input_ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        whole = model(input_ids, return_logits=not encoder).logits
    # labels that are the whole-input predictions: streaming must match every one of them, and none of the others
    if encoder:
        predicted = whole.argmax(dim=-1)
        matching, other = predicted, (predicted + 1) % 6
    else:
        answer = labels != IGNORE_INDEX
        predicted = torch.full_like(labels, IGNORE_INDEX)
        predicted[:, 1:][answer[:, 1:]] = whole[:, :-1].argmax(dim=-1)[answer[:, 1:]]
        matching = predicted
        other = torch.where(answer, (predicted + 1) % tokenizer.vocab_size, predicted)

    lengths = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(args[0].shape[1]), with_kwargs=True
    )
    assert streaming_correct(model, input_ids, matching, SEGMENT).tolist() == [True] * 6
    hook.remove()
    assert not streaming_correct(model, input_ids, other, SEGMENT).any()
    # one call per segment: what is held is one segment and the memory, whatever the length
    assert lengths == [SEGMENT] * (SEGMENTS - 1) + [SEGMENT - 1 if encoder else SEGMENT]
    # the compact batch evaluation builds (int32 tokens, a decoder's labels for the last segment only) scores alike
    tail = (lambda labels: labels) if encoder else (lambda labels: labels[:, -SEGMENT:])
    assert streaming_correct(model, input_ids.int(), tail(matching), SEGMENT).tolist() == [True] * 6
    assert not streaming_correct(model, input_ids.int(), tail(other), SEGMENT).any()


@pytest.mark.parametrize("encoder", [False, True])
def test_evaluation_batches_hold_the_tokens_at_four_bytes_and_only_the_last_segments_labels(encoder, tokenizer):
    classes = AnswerClasses(tokenizer) if encoder else None
    generator = TaskGenerator("reason", tokenizer, seed=5)
    full = collate(drawn(generator, 6), tokenizer.pad_id, classes=classes)
    input_ids, labels = stacked_batch(generator, range(6), SEGMENTS * SEGMENT, SEGMENT, tokenizer.pad_id, classes)
    assert input_ids.dtype == torch.int32 and input_ids.tolist() == full["input_ids"].tolist()
    if encoder:
        assert labels.tolist() == full["labels"].tolist()
    else:
        assert labels.shape == (6, SEGMENT) and labels.tolist() == full["labels"][:, -SEGMENT:].tolist()
        assert bool((full["labels"][:, :-SEGMENT] == IGNORE_INDEX).all())  # the answer is all in the last segment
        model = build("rmt", tokenizer.vocab_size, tokenizer)
        with pytest.raises(ValueError, match="labels cover the last 15 tokens, fewer than the last segment's 16"):
            streaming_correct(model, input_ids, labels[:, 1:], SEGMENT)


def test_a_model_without_memory_is_scored_on_its_last_segment_alone(tokenizer):
    """Nothing passes between its segments, so streaming runs only the last one, and predicts what one forward
    over the whole input predicts."""
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(preset_config("test-opt", vocab_size=tokenizer.vocab_size))
    model = RecurrentMemoryModel(backbone, RMTConfig(num_mem_tokens=0, segment_size=SEGMENT)).eval()
    batch = collate(drawn(TaskGenerator("detect", tokenizer, seed=11), 6), tokenizer.pad_id)
    input_ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        whole = model(input_ids, return_logits=True).logits
    answer = labels != IGNORE_INDEX
    predicted = torch.full_like(labels, IGNORE_INDEX)
    predicted[:, 1:][answer[:, 1:]] = whole[:, :-1].argmax(dim=-1)[answer[:, 1:]]
    lengths = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(args[0].shape[1]), with_kwargs=True
    )
    assert streaming_correct(model, input_ids, predicted, SEGMENT).tolist() == [True] * 6
    hook.remove()
    assert lengths == [SEGMENT]
    other = torch.where(answer, (predicted + 1) % tokenizer.vocab_size, predicted)
    assert not streaming_correct(model, input_ids, other, SEGMENT).any()


def test_an_answer_across_a_segment_border_is_refused(tokenizer):
    """A two-token answer whose first token ends one segment and second starts the next cannot be scored from the
    last segment alone: the batch is refused, not scored on half an answer."""
    sample = TaskGenerator("memorize", tokenizer, seed=1).sample(0, 2 * SEGMENT)
    sample.tokens, sample.answer = sample.tokens[: SEGMENT - 1], np.array([5, 6], dtype=np.int32)

    class TwoTokenAnswers:
        def sample(self, index, num_tokens):
            return sample

    with pytest.raises(ValueError, match="sample 0's answer starts before its last segment"):
        stacked_batch(TwoTokenAnswers(), [0], SEGMENT + 1, SEGMENT, tokenizer.pad_id)


def test_long_lengths_get_fewer_samples_down_to_one():
    assert samples_at(32, 64, 4_000_000) == 64
    assert samples_at(131_072, 64, 4_000_000) == 30
    assert samples_at(1_000_000, 64, 4_000_000) == 4
    assert samples_at(10_000_000, 64, 4_000_000) == 1
    assert samples_at(10_000_000, 64, None) == 64


def test_the_progress_bar_counts_every_segment_read(tokenizer, monkeypatch):
    bars = []

    class Recorded(evaluation.tqdm):
        def close(self):
            if not self.disable:  # tqdm closes again when it is collected
                bars.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(evaluation, "tqdm", Recorded)
    monkeypatch.setattr(evaluation, "PROGRESS_MIN_SEGMENTS", 1)
    model = build("rmt", tokenizer.vocab_size, tokenizer)
    generator = TaskGenerator("memorize", tokenizer, seed=1)
    common = dict(segment_size=SEGMENT, samples=4, batch_size=2, pad_id=tokenizer.pad_id, rank=0, world_size=1)
    evaluation.evaluate_by_length(model, generator, [3, 5], **common)
    assert bars == [(6, 6), (10, 10)]  # 2 batches of 3 and of 5 segments
