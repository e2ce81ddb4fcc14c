"""The memory wrapper on real small backbones of every supported family: the behaviour RMT and ARMT share,
tested on both, and RMT's own."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
import transformers

from rmt_scale import (
    ARMTConfig,
    AssociativeState,
    ConfigError,
    RecurrentMemoryModel,
    RMTConfig,
    UnsupportedBackboneError,
)
from support.models import (
    CLS_ID,
    DECODERS,
    ENCODERS,
    SEP_ID,
    VOCAB,
    armt,
    assert_states_close,
    build,
    ids,
    rmt,
    rmt_gated,
)


def gradients(model: RecurrentMemoryModel) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_memory_close(actual, expected, atol: float, rtol: float) -> None:
    """RMT's memory tokens to ``atol``/``rtol``; ARMT's associative states relative to their size (they are
    sums over every write)."""
    if isinstance(expected, AssociativeState):
        assert_states_close(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def memory_rows(memory, rows: slice):
    if isinstance(memory, AssociativeState):
        return AssociativeState.from_tuple([t[rows] for t in memory.to_tuple()])
    return memory[rows]


# ---------------------------------------------------------------- config
@pytest.mark.parametrize(
    "config",
    [
        RMTConfig(
            num_mem_tokens=5,
            segment_size=100,
            bptt_depth=3,
            backprop="replay",
            segment_alignment="right",
            memory_gate=True,
        ),
        ARMTConfig(
            num_mem_tokens=4,
            segment_size=64,
            d_mem=8,
            num_heads=2,
            dpfp_nu=2,
            gating=False,
            correction=False,
            execution="wavefront",
            backprop="replay",
        ),
    ],
    ids=["rmt", "armt"],
)
def test_config_round_trips_through_json_and_dispatches_by_model_type(tmp_path, config):
    config.save_pretrained(tmp_path)
    loaded = RMTConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config) and loaded == config


@pytest.mark.parametrize(
    "config_class, field, value, words",
    [
        (RMTConfig, "num_mem_tokens", -1, "num_mem_tokens=-1"),
        (RMTConfig, "segment_size", 0, "segment_size=0"),
        (RMTConfig, "bptt_depth", -2, "bptt_depth=-2"),
        (RMTConfig, "backprop", "magic", "bptt, checkpoint, replay, sublinear"),
        (RMTConfig, "segment_alignment", "middle", "left, right"),
        (ARMTConfig, "num_mem_tokens", 0, "at least 1.*RMTConfig\\(num_mem_tokens=0\\)"),
        (ARMTConfig, "d_mem", 0, "d_mem=0"),
        (ARMTConfig, "dpfp_nu", -1, "dpfp_nu=-1"),
        (ARMTConfig, "gating", "yes", "true or false"),
        (ARMTConfig, "execution", "diagonal", "sequential, wavefront"),
        (ARMTConfig, "write_gate", "tanh", "write_gate='tanh' is unknown: choose one of sigmoid, clamp"),
        (ARMTConfig, "gated_normaliser", 1, "gated_normaliser=1 is invalid: it must be true or false"),
        (RMTConfig, "memory_gate", 1, "memory_gate=1 is invalid: it must be true or false"),
        (ARMTConfig, "memory_gate", True, "memory_gate is an RMT setting.*set memory_gate=False"),
    ],
)
def test_config_rejects_bad_values_with_a_clear_message(config_class, field, value, words):
    with pytest.raises(ConfigError, match=words):
        config_class(**{field: value})


def test_config_refuses_a_write_gate_shape_without_the_gate():
    with pytest.raises(ConfigError, match="gating=False has none: set gating=True"):
        ARMTConfig(gating=False, write_gate="clamp")


def test_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown config keys.*num_memory"):
        RMTConfig.from_dict({"num_memory": 4})


# ---------------------------------------------------------------- equivalence with the backbone
@pytest.mark.parametrize("family", DECODERS)
def test_without_memory_one_segment_equals_the_backbone(load_backbone, family):
    model = rmt(load_backbone, family, num_mem_tokens=0, segment_size=16)
    x = ids(2, 16)
    ours = model(x, labels=x, return_logits=True)
    theirs = model.backbone(x, labels=x)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-6, rtol=1e-6)
    assert ours.memory is None and ours.num_segments == 1


@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_without_memory_equals_the_backbone_on_cls_text_sep(load_backbone, family):
    """RoBERTa's positions start at padding_idx + 1, BERT's at 0: the wrapper must place tokens as the
    backbone itself does."""
    model = rmt(load_backbone, family, num_mem_tokens=0, segment_size=16)
    x = ids(2, 16)
    framed = torch.cat([torch.full((2, 1), CLS_ID), x, torch.full((2, 1), SEP_ID)], dim=1)
    torch.testing.assert_close(model(x).logits, model.backbone(framed).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
def test_loss_is_the_token_weighted_mean_shifted_across_segment_borders(load_backbone, family):
    model = rmt(load_backbone, family, segment_size=5)
    x = ids(2, 23)
    labels = x.clone()
    labels[0, :7] = -100
    out = model(x, labels=labels, return_logits=True)
    assert out.num_segments == 5 and out.logits.shape == (2, 23, VOCAB)
    # the backbone's own loss formula applied to the concatenated per-segment logits
    reference = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, reference, atol=1e-6, rtol=1e-6)
    # without return_logits the LM head runs on labelled positions only, giving the same loss
    torch.testing.assert_close(model(x, labels=labels).loss, reference, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant, family, difference", [("rmt", "opt", 1e-4), ("armt", "llama", 1e-3)])
def test_memory_carries_information_between_segments(load_backbone, variant, family, difference):
    model = build(load_backbone, variant, family, segment_size=8)
    a, b = ids(1, 16, seed=1), ids(1, 16, seed=2)
    b[:, 8:] = a[:, 8:]  # same second segment, different first one
    out_a, out_b = model(a, return_logits=True), model(b, return_logits=True)
    assert (out_a.logits[:, 8:] - out_b.logits[:, 8:]).abs().max() > difference


@pytest.mark.parametrize("family", ["opt", "bert"])
def test_a_shut_memory_gate_keeps_the_memory_and_an_open_one_is_the_plain_rmt(load_backbone, family):
    """The gate's two ends: shut, every segment leaves the learned memory exactly as it was (so a fact written
    into it would survive any length); open, the update is the plain RMT's, what the segment wrote."""
    plain, gated = rmt(load_backbone, family), rmt_gated(load_backbone, family)
    gated.load_state_dict(plain.state_dict(), strict=False)  # the same backbone and memory tokens
    x = ids(2, 37)
    labels = torch.tensor([0, 2]) if family in ENCODERS else None
    with torch.no_grad():
        gated.memory_gate.proj.weight.zero_()
        gated.memory_gate.proj.bias.fill_(-1.0)
        assert torch.equal(gated(x, labels=labels).memory, gated.memory.expand(2, -1, -1))
        gated.memory_gate.proj.bias.fill_(2.0)
        torch.testing.assert_close(gated(x, labels=labels).memory, plain(x, labels=labels).memory)
    assert set(gated.state_dict()) - set(plain.state_dict()) == {"memory_gate.proj.weight", "memory_gate.proj.bias"}


def test_without_memory_segments_do_not_see_each_other(load_backbone):
    no_memory = rmt(load_backbone, "opt", num_mem_tokens=0, segment_size=8)
    a, b = ids(1, 16, seed=1), ids(1, 16, seed=2)
    b[:, 8:] = a[:, 8:]
    torch.testing.assert_close(
        no_memory(a, return_logits=True).logits[:, 8:], no_memory(b, return_logits=True).logits[:, 8:]
    )


# ---------------------------------------------------------------- backprop modes and truncation
@pytest.mark.parametrize(
    "variant, family",
    [
        ("rmt", "opt"),
        ("rmt", "llama"),
        ("rmt", "gpt2"),
        ("rmt", "bert"),
        ("rmt-gated", "opt"),
        ("rmt-gated", "bert"),
        ("armt", "opt"),
        ("armt", "gpt2"),
        ("armt", "llama"),
    ],
)
@pytest.mark.parametrize("bptt_depth", [-1, 2])
def test_checkpoint_and_replay_give_the_bptt_gradients(load_backbone, variant, family, bptt_depth):
    x = ids(2, 37)
    labels = torch.tensor([0, 2]) if family == "bert" else x
    results = {}
    modes = {"bptt": {}, "checkpoint": {}, "replay": {}, "sublinear": {}, "sublinear-2": {"state_keep_every": 2}}
    for mode, settings in modes.items():
        model = build(load_backbone, variant, family, backprop=mode.split("-")[0], bptt_depth=bptt_depth, **settings)
        out = model(x, labels=labels)
        out.loss.backward()
        results[mode] = (out.loss.detach(), out.memory.detach(), gradients(model))
    loss, memory, grads = results["bptt"]
    if variant == "armt":
        assert grads["associative.memories.0.value.weight"].abs().sum() > 0
        assert grads["associative.memories.1.gate.weight"].abs().sum() > 0
    elif bptt_depth == -1:  # with truncation, a classification loss at the end cannot reach the initial memory
        assert grads["memory"].abs().sum() > 0
    for mode in list(modes)[1:]:
        other_loss, other_memory, other_grads = results[mode]
        torch.testing.assert_close(other_loss, loss, atol=1e-6, rtol=1e-6)
        assert_memory_close(other_memory, memory, atol=1e-6, rtol=1e-6)
        assert other_grads.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(other_grads[name], grads[name], atol=1e-5, rtol=1e-4, msg=f"{mode} {name}")


@pytest.mark.parametrize("mode", ["bptt", "checkpoint", "replay"])
def test_bptt_depth_limits_how_far_gradients_flow_back(load_backbone, mode):
    x = ids(1, 24)  # three segments of 8
    labels = torch.full_like(x, -100)
    labels[:, 17:] = x[:, 17:]  # loss only inside the last segment
    memory_grad = {}
    for depth in (-1, 0, 1, 2):
        model = rmt(load_backbone, "opt", backprop=mode, bptt_depth=depth)
        model(x, labels=labels).loss.backward()
        memory_grad[depth] = model.memory.grad
    # the learned memory enters at segment 0; the last segment reaches it through 2 transitions
    assert memory_grad[0] is None or memory_grad[0].abs().max() == 0
    assert memory_grad[1] is None or memory_grad[1].abs().max() == 0
    assert memory_grad[2].abs().max() > 0
    torch.testing.assert_close(memory_grad[2], memory_grad[-1])


# ---------------------------------------------------------------- padding
@pytest.mark.parametrize(
    "variant, family",
    [
        ("rmt", "opt"),
        ("rmt", "llama"),
        ("rmt", "gpt_neox"),
        ("rmt", "bert"),
        ("rmt", "roberta"),
        ("rmt-gated", "gpt2"),
        ("rmt-gated", "bert"),
        ("armt", "opt"),
        ("armt", "llama"),
    ],
)
@pytest.mark.parametrize("side", ["right", "left"])
def test_a_padded_sample_behaves_as_if_alone(load_backbone, variant, family, side):
    model = build(
        load_backbone, variant, family, segment_size=6, segment_alignment="left" if side == "right" else "right"
    )
    long, short = ids(1, 20, seed=3), ids(1, 9, seed=4)
    pad = torch.zeros(1, 11, dtype=torch.long)
    padded = torch.cat([short, pad], 1) if side == "right" else torch.cat([pad, short], 1)
    mask = (
        torch.cat([torch.ones(1, 9), torch.zeros(1, 11)], 1)
        if side == "right"
        else torch.cat([torch.zeros(1, 11), torch.ones(1, 9)], 1)
    )
    batch = model(
        torch.cat([long, padded]),
        attention_mask=torch.cat([torch.ones(1, 20), mask]).long(),
        return_logits=family not in ENCODERS,
    )
    alone = model(short, return_logits=family not in ENCODERS)
    assert_memory_close(memory_rows(batch.memory, slice(1, None)), alone.memory, atol=1e-5, rtol=1e-4)
    if family in ENCODERS:
        torch.testing.assert_close(batch.logits[1:], alone.logits, atol=1e-5, rtol=1e-4)
    else:
        real = mask[0].bool()
        torch.testing.assert_close(batch.logits[1, real], alone.logits[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant, family", [("rmt", "gpt2"), ("armt", "llama"), ("rmt", "bert")])
def test_left_padding_keeps_left_aligned_segment_borders(load_backbone, variant, family):
    """Left-aligned segments start at each sample's first real token: left padding of any length, a whole
    segment and more included, leaves the sample's loss, logits, final memory and gradients as they are alone
    (before, left padding moved every border: on a tiny GPT-2 with 16-token segments, 8 pads took a 37-token
    sample's loss from 4.5755 to 4.5929)."""
    model = build(load_backbone, variant, family, segment_size=16, num_mem_tokens=4)
    encoder, pads, length = family in ENCODERS, range(1, 18), 37
    sample = ids(1, length, seed=5)

    def run(input_ids, attention_mask, labels):
        model.zero_grad()
        out = model(input_ids, attention_mask=attention_mask, labels=labels, return_logits=not encoder)
        out.loss.backward()
        return out, gradients(model)

    alone, alone_grads = run(sample, None, torch.tensor([1]) if encoder else sample)
    # one row per left padding (the rest of the row padded on the right), each pad holding real ids, after
    # a longer unpadded sample
    width = length + pads[-1]
    input_ids, mask = ids(1 + len(pads), width, seed=6), torch.zeros(1 + len(pads), width, dtype=torch.long)
    mask[0] = 1
    for row, pad in enumerate(pads, start=1):
        input_ids[row, pad : pad + length], mask[row, pad : pad + length] = sample[0], 1
    if encoder:  # the classification loss is the batch's mean: the other sample's class counts too
        labels = torch.tensor([0] + [1] * len(pads))
    else:  # only the padded samples' tokens are labelled, so their loss is the batch's
        labels = torch.where(mask.bool(), input_ids, -100)
        labels[0] = -100
    batch, batch_grads = run(input_ids, mask, labels)
    for row, pad in enumerate(pads, start=1):
        rows = slice(row, row + 1)
        assert_memory_close(memory_rows(batch.memory, rows), alone.memory, atol=1e-5, rtol=1e-5)
        if encoder:
            torch.testing.assert_close(batch.logits[rows], alone.logits, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(batch.logits[row, pad : pad + length], alone.logits[0], atol=1e-5, rtol=1e-5)
    if encoder:
        return
    torch.testing.assert_close(batch.loss, alone.loss, atol=1e-5, rtol=1e-5)
    assert batch_grads.keys() == alone_grads.keys()
    for name, grad in alone_grads.items():
        torch.testing.assert_close(batch_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_padding_is_excluded_from_the_loss(load_backbone):
    model = rmt(load_backbone, "gpt2")
    short = ids(1, 10)
    padded = torch.cat([short, torch.zeros(1, 6, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], 1).long()
    torch.testing.assert_close(
        model(padded, attention_mask=mask, labels=padded).loss, model(short, labels=short).loss, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("family", DECODERS)
def test_left_padding_predicts_nothing(load_backbone, family):
    """The last padding position must not predict the first real token: the loss of a left-padded sample
    is the loss of the sample alone (right alignment puts both on the same segment borders)."""
    model = rmt(load_backbone, family, segment_size=5, segment_alignment="right")
    short = ids(1, 12, seed=6)
    padded = torch.cat([torch.zeros(1, 7, dtype=torch.long), short], 1)
    mask = torch.cat([torch.zeros(1, 7), torch.ones(1, 12)], 1).long()
    labels = torch.cat([torch.full((1, 7), -100), short], 1)
    torch.testing.assert_close(
        model(padded, attention_mask=mask, labels=labels).loss, model(short, labels=short).loss, atol=1e-6, rtol=1e-6
    )


# ---------------------------------------------------------------- streaming
@pytest.mark.parametrize("variant", ["rmt", "rmt-gated", "armt"])
def test_streaming_in_chunks_equals_one_call(load_backbone, variant):
    model = build(load_backbone, variant, "llama")
    x = ids(2, 48)
    whole = model(x, return_logits=True)
    memory, logits = None, []
    for chunk in x.split(16, dim=1):
        out = model(chunk, memory=memory, return_logits=True)
        memory = out.memory
        logits.append(out.logits)
    assert_memory_close(memory, whole.memory, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat(logits, 1), whole.logits, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- persistence
@pytest.mark.parametrize("variant, family", [("rmt", "opt"), ("rmt", "bert"), ("rmt-gated", "opt"), ("armt", "gpt2")])
def test_save_and_load_round_trip(load_backbone, variant, family, tmp_path):
    model = build(load_backbone, variant, family, backprop="replay", bptt_depth=4)
    with torch.no_grad():
        model.memory.add_(1.0)  # not the init: the saved value must come back
    model.save_pretrained(tmp_path / "rmt")
    assert (tmp_path / "rmt" / "memory.safetensors").is_file()
    loaded = RecurrentMemoryModel.from_pretrained(tmp_path / "rmt").eval()
    assert type(loaded.config) is type(model.config) and loaded.config == model.config
    x = ids(2, 30)
    ours, theirs = loaded(x, return_logits=True), model(x, return_logits=True)
    torch.testing.assert_close(ours.logits, theirs.logits)
    assert_memory_close(ours.memory, theirs.memory, atol=1e-5, rtol=1.3e-6)


def test_from_backbone_loads_a_local_directory(backbone_dirs):
    model = RecurrentMemoryModel.from_backbone(backbone_dirs["mistral"], RMTConfig(num_mem_tokens=2, segment_size=10))
    assert model.spec.kind == "decoder" and model.memory.shape == (2, 32)


def test_a_real_pretrained_encoder_takes_its_special_tokens_from_its_tokenizer(minilm_dir):
    model = RecurrentMemoryModel.from_backbone(minilm_dir, RMTConfig(num_mem_tokens=4, segment_size=100), num_labels=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    assert (model.config.cls_token_id, model.config.sep_token_id) == (tokenizer.cls_token_id, tokenizer.sep_token_id)
    text = tokenizer(["the cat sat on the mat " * 40], add_special_tokens=False, return_tensors="pt")
    out = model(text.input_ids, labels=torch.tensor([1]))
    assert out.num_segments == 3 and out.logits.shape == (1, 2) and torch.isfinite(out.loss)
    # the learned memory starts at the scale of the pretrained word embeddings
    embedding_std = model.backbone.get_input_embeddings().weight.std()
    assert 0.5 < model.memory.std() / embedding_std < 2.0


# ---------------------------------------------------------------- bad input
def test_segment_must_fit_the_backbone_positions(load_backbone):
    with pytest.raises(ValueError, match="needs 70 positions.*has 64.*at most 58"):
        rmt(load_backbone, "opt", num_mem_tokens=3, segment_size=64)
    with pytest.raises(ValueError, match="needs 68 positions.*at most 57"):
        rmt(load_backbone, "bert", num_mem_tokens=4, segment_size=61)


def test_bad_inputs_raise_clear_errors(load_backbone):
    model = rmt(load_backbone, "opt")
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="add a batch dimension"):
        model(torch.tensor([5, 6, 7]))
    with pytest.raises(ValueError, match="labels have shape"):
        model(ids(2, 10), labels=ids(2, 9))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids(2, 10), attention_mask=torch.ones(2, 11))
    with pytest.raises(ValueError, match=r"samples \[1\] have no tokens"):
        model(ids(2, 10), attention_mask=torch.tensor([[1] * 10, [0] * 10]))
    with pytest.raises(ValueError, match="memory has shape"):
        model(ids(2, 10), memory=torch.zeros(2, 5, 32))
    with pytest.raises(ValueError, match="one class per sample"):
        rmt(load_backbone, "bert")(ids(2, 10), labels=ids(2, 10))


def test_memory_of_another_kind_is_refused(load_backbone):
    model = rmt(load_backbone, "opt")
    armt = RecurrentMemoryModel(load_backbone("opt"), ARMTConfig(num_mem_tokens=3, segment_size=8, d_mem=4))
    with pytest.raises(ValueError, match="memory must be a tensor.*got AssociativeState"):
        model(ids(1, 10), memory=armt(ids(1, 10)).memory)
    as_numpy = model(ids(1, 10)).memory.detach().numpy()
    with pytest.raises(ValueError, match="memory must be a tensor.*got ndarray"):
        model(ids(1, 10), memory=as_numpy)
    with pytest.raises(ValueError, match="memory must be a tensor.*got ndarray"):
        model.generate(ids(1, 10), memory=as_numpy)
    with pytest.raises(ValueError, match="AssociativeState returned by this ARMT"):
        armt(ids(1, 10), memory=np.zeros((1, 3, 32)))


def test_attention_mask_must_be_zeros_and_ones(load_backbone):
    model = rmt(load_backbone, "opt")
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 3] = 2
    with pytest.raises(ValueError, match=r"attention_mask holds values other than 0 and 1 \(2\)"):
        model(ids(2, 10), attention_mask=mask)
    torch.testing.assert_close(model(ids(2, 10), attention_mask=mask.bool()).memory, model(ids(2, 10)).memory)


@pytest.mark.parametrize("damaged", ["memory.safetensors", "backbone/model.safetensors"])
def test_a_damaged_weights_file_is_named(load_backbone, tmp_path, damaged):
    rmt(load_backbone, "opt").save_pretrained(tmp_path / "rmt")
    path = tmp_path / "rmt" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*damaged"):
        RecurrentMemoryModel.from_pretrained(tmp_path / "rmt")


def test_unsupported_architectures_are_named(backbone_dirs):
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    )
    with pytest.raises(UnsupportedBackboneError, match="'t5' is not supported.*opt, gpt2"):
        RecurrentMemoryModel(t5, RMTConfig())
    bare = transformers.BertModel.from_pretrained(backbone_dirs["bert"])
    with pytest.raises(UnsupportedBackboneError, match="AutoModelForSequenceClassification"):
        RecurrentMemoryModel(bare, RMTConfig(segment_size=8))
    with pytest.raises(ValueError, match="cls_token_id"):
        RecurrentMemoryModel(
            transformers.BertForSequenceClassification.from_pretrained(backbone_dirs["bert"]), RMTConfig(segment_size=8)
        )


def test_token_ids_must_be_integers_inside_the_vocabulary(load_backbone):
    model = rmt(load_backbone, "opt")
    with pytest.raises(ValueError, match=r"dtype torch.float32.*input_ids.long\(\)"):
        model(ids(1, 10).float())
    too_large = ids(1, 10)
    too_large[0, 4], too_large[0, 7] = VOCAB, VOCAB + 5
    with pytest.raises(ValueError, match=f"input_ids hold ids from {VOCAB} to {VOCAB + 5}.*vocabulary of {VOCAB}"):
        model(too_large)
    with pytest.raises(ValueError, match="input_ids hold ids from -1 to -1"):
        model(torch.full((1, 10), -1))
    with pytest.raises(ValueError, match=f"labels hold ids from {VOCAB} to {VOCAB}"):
        model(ids(1, 10), labels=torch.full((1, 10), VOCAB))
    with pytest.raises(ValueError, match="input_ids hold ids"):
        model.generate(too_large, max_new_tokens=1)


@pytest.mark.parametrize("variant", ["rmt", "armt"])
@pytest.mark.parametrize("backprop", ["bptt", "replay"])
def test_labels_that_are_all_ignored_give_a_zero_loss_that_backpropagates(load_backbone, variant, backprop):
    model = build(load_backbone, variant, "opt", backprop=backprop)
    loss = model(ids(2, 20), labels=torch.full((2, 20), -100)).loss
    assert loss.item() == 0.0
    loss.backward()
    assert gradients(model) and all(not grad.any() for grad in gradients(model).values())
    memoryless = rmt(load_backbone, "opt", num_mem_tokens=0)
    memoryless(ids(2, 20), labels=torch.full((2, 20), -100)).loss.backward()
    assert model(ids(2, 20)).loss is None


def test_an_incomplete_or_edited_model_directory_is_named(load_backbone, tmp_path):
    armt(load_backbone, "opt").save_pretrained(tmp_path / "armt")
    config = tmp_path / "armt" / "rmt_config.json"
    saved = config.read_text()
    config.write_text(saved.replace('"num_mem_tokens": 3', '"num_mem_tokens": 5'))
    with pytest.raises(
        ValueError,
        match=re.escape(f"{tmp_path}/armt/memory.safetensors does not fit {config}, which was edited after saving ")
        + r"\(memory \(3, 32\) in the weights, \(5, 32\) by the config\): restore the saved rmt_config.json",
    ):
        RecurrentMemoryModel.from_pretrained(tmp_path / "armt")
    config.write_text(saved.replace('"gating": true', '"gating": false'))
    with pytest.raises(ValueError, match=r"does not match .*rmt_config.json \(missing \[\], unexpected \['associative"):
        RecurrentMemoryModel.from_pretrained(tmp_path / "armt")
    config.write_text(saved)
    for name in ("memory.safetensors", "backbone/config.json"):
        (tmp_path / "armt" / name).rename(tmp_path / "moved")
        with pytest.raises(ValueError, match=f"{tmp_path}/armt/{name} does not exist: copy the whole model directory"):
            RecurrentMemoryModel.from_pretrained(tmp_path / "armt")
        (tmp_path / "moved").rename(tmp_path / "armt" / name)
    RecurrentMemoryModel.from_pretrained(tmp_path / "armt")


def test_backbones_are_called_without_deprecated_arguments(load_backbone):
    """transformers 5 warns at every call that passes the KV cache as past_key_values, even as None."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for family in DECODERS:
            model = rmt(load_backbone, family)
            model(ids(1, 10), labels=ids(1, 10))
            model.generate(ids(1, 10), max_new_tokens=2)
