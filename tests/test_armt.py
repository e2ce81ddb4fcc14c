"""ARMT's own behaviour: the associative memory, the backbone at init, truncation, wavefront execution and its
errors. What ARMT shares with RMT is tested on both in test_model.py, generation in test_generation.py."""

from __future__ import annotations

import pytest
import torch

from rmt_scale import ARMTConfig, RecurrentMemoryModel
from rmt_scale.model import AssociativeMemory, UnsupportedBackboneError, dpfp
from support.models import armt, assert_states_close, ids

ARMT_FAMILIES = ["opt", "gpt2", "llama", "mistral", "gpt_neox"]


# ---------------------------------------------------------------- the memory module
def test_dpfp_is_the_products_of_relu_features_with_their_rolls():
    x = torch.tensor([[1.0, -2.0, 3.0]])
    r = torch.tensor([[1.0, 0.0, 3.0, 0.0, 2.0, 0.0]])  # [relu(x), relu(-x)]
    expected = torch.cat([r * r.roll(j, dims=-1) for j in (1, 2)], dim=-1)
    torch.testing.assert_close(dpfp(x, nu=2), expected)
    assert dpfp(torch.randn(2, 5, 7), nu=3).shape == (2, 5, 42)


@pytest.mark.parametrize("correction", [True, False])
def test_a_written_association_is_read_back_and_the_delta_rule_does_not_store_it_twice(correction):
    torch.manual_seed(0)
    memory = AssociativeMemory(16, ARMTConfig(d_mem=8, num_heads=2, gating=False, correction=correction))
    torch.nn.init.normal_(memory.value.weight)
    memory.query.weight = memory.key.weight  # the token asks for exactly the key it wrote
    token = torch.randn(1, 1, 16)
    value = memory.value(token)
    once = memory.write(token, *memory.empty_state(1, "cpu"))
    twice = memory.write(token, *once)
    torch.testing.assert_close(memory.read(token, *once), value, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(memory.read(token, *twice), value, atol=1e-4, rtol=1e-4)
    if correction:  # the second write finds the value already stored: nothing changes
        torch.testing.assert_close(twice[0], once[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(twice[1], once[1], atol=1e-6, rtol=1e-6)
    else:  # plain linear attention adds it again
        torch.testing.assert_close(twice[0], 2 * once[0])


def test_a_shut_clamped_gate_with_the_gated_normaliser_leaves_the_memory_exactly_as_it_was():
    """What makes the read independent of how much background follows a fact: a write whose gate is shut
    changes neither A nor z. With the plain normaliser the same shut write still grows z, so every later read
    of the fact is divided further."""
    torch.manual_seed(0)
    config = ARMTConfig(d_mem=8, num_heads=2, correction=False, write_gate="clamp", gated_normaliser=True)
    memory = AssociativeMemory(16, config)
    torch.nn.init.normal_(memory.value.weight)
    fact, background = torch.randn(1, 1, 16), torch.randn(1, 3, 16)
    stored = memory.write(fact, *memory.empty_state(1, "cpu"))
    torch.nn.init.constant_(memory.gate.bias, -100.0)  # every gate shut: clamp(...) = 0 exactly
    after = memory.write(background, *stored)
    assert torch.equal(after[0], stored[0]) and torch.equal(after[1], stored[1])
    assert torch.equal(memory.read(fact, *after), memory.read(fact, *stored))

    memory.gated_normaliser = False
    matrix, normaliser = memory.write(background, *stored)
    assert torch.equal(matrix, stored[0]) and (normaliser - stored[1]).min() >= 0
    assert (normaliser - stored[1]).sum() > 1  # the 3 shut writes' unit-length keys went into z


# ---------------------------------------------------------------- the backbone at init
@pytest.mark.parametrize("family", ARMT_FAMILIES)
def test_at_init_every_segment_gives_the_backbone_logits_on_that_segment_alone(load_backbone, family):
    model = armt(load_backbone, family, trained=False)
    x = ids(2, 29)
    ours = model(x, return_logits=True)
    alone = torch.cat([model.backbone(x[:, start : start + 8]).logits for start in range(0, 29, 8)], dim=1)
    assert ours.num_segments == 4
    torch.testing.assert_close(ours.logits, alone, atol=1e-5, rtol=1e-5)
    # nothing is stored, yet the normaliser counts what was written
    assert all(a.abs().max() == 0 for a in ours.memory.matrices)
    assert all(z.abs().max() > 0 for z in ours.memory.normalisers)


def test_the_first_segment_reads_an_empty_memory(load_backbone):
    """Trained or not, nothing has been written before the first segment: it computes what the backbone does."""
    model = armt(load_backbone, "llama")
    x = ids(1, 16)
    torch.testing.assert_close(
        model(x, return_logits=True).logits[:, :8], model.backbone(x[:, :8]).logits, atol=1e-5, rtol=1e-5
    )


def test_the_state_belongs_to_the_sample_not_to_the_module(load_backbone):
    model = armt(load_backbone, "opt")
    assert not any("matri" in name or "normal" in name for name, _ in model.named_buffers())
    x = ids(2, 20)
    first = model(x, return_logits=True)
    model(ids(2, 20, seed=5))  # another batch in between changes nothing
    again = model(x, return_logits=True)
    torch.testing.assert_close(again.logits, first.logits)
    assert_states_close(again.memory, first.memory)


# ---------------------------------------------------------------- truncation
def test_bptt_depth_stops_gradients_from_reaching_early_segments(load_backbone):
    x = ids(1, 32)  # four segments of 8
    labels = torch.full_like(x, -100)
    labels[:, 25:] = x[:, 25:]  # loss only inside the last segment
    key_grad = {}
    for depth in (0, 3):
        model = armt(load_backbone, "opt", bptt_depth=depth)
        model(x, labels=labels).loss.backward()
        key_grad[depth] = model.associative.memories[0].key.weight.grad
    # with depth 0 the last segment's loss reaches keys only through what the last segment reads, which
    # was written before the cut: no gradient; with depth 3 it reaches every write
    assert key_grad[0] is None or key_grad[0].abs().max() == 0
    assert key_grad[3].abs().max() > 0


# ---------------------------------------------------------------- wavefront execution
@pytest.mark.parametrize("family", ARMT_FAMILIES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_wavefront_equals_sequential_execution(load_backbone, family, dtype, tol):
    """The schedule is exact (float64 agrees to the last bit here); in float32 the batched matmuls round
    differently and the reads, divided by small normalisers, amplify it to ~1e-5 over six segments."""
    model = armt(load_backbone, family).to(dtype)
    x = ids(2, 45)
    mask = torch.ones_like(x)
    mask[1, :13] = 0  # a left-padded sample: its first segment is empty, its second one partly
    with torch.no_grad():
        sequential = model(x, attention_mask=mask, labels=x, return_logits=True)
        model.config.execution = "wavefront"
        wavefront = model(x, attention_mask=mask, labels=x, return_logits=True)
    assert wavefront.num_segments == 6
    torch.testing.assert_close(wavefront.logits, sequential.logits, atol=tol, rtol=tol)
    torch.testing.assert_close(wavefront.loss, sequential.loss, atol=tol, rtol=tol)
    assert_states_close(wavefront.memory, sequential.memory, tol)


def test_wavefront_equals_sequential_execution_with_the_clamped_gate_and_gated_normaliser(load_backbone):
    model = armt(load_backbone, "opt", write_gate="clamp", gated_normaliser=True).to(torch.float64)
    with torch.no_grad():
        for memory in model.associative.memories:  # some writes shut, some open, some in between
            memory.gate.weight.normal_(std=2.0)
        x = ids(2, 45)
        sequential = model(x, labels=x, return_logits=True)
        model.config.execution = "wavefront"
        wavefront = model(x, labels=x, return_logits=True)
    torch.testing.assert_close(wavefront.logits, sequential.logits, atol=1e-5, rtol=1e-5)
    assert_states_close(wavefront.memory, sequential.memory, 1e-5)


def test_with_gradients_on_wavefront_falls_back_to_the_backprop_mode(load_backbone, monkeypatch):
    """Wavefront is inference-only. Run under grad, its vmap over stacked copies of the weights would send
    no gradient to the layers; the documented fallback trains them."""
    import rmt_scale.model.steps as steps

    wavefront_runs = []

    def counting_run_wavefront(*args):
        wavefront_runs.append(torch.is_grad_enabled())
        return run_wavefront(*args)

    run_wavefront = steps.run_wavefront
    monkeypatch.setattr(steps, "run_wavefront", counting_run_wavefront)
    model = armt(load_backbone, "opt", execution="wavefront", backprop="checkpoint")
    x = ids(2, 30)
    model(x, labels=x).loss.backward()
    assert wavefront_runs == []
    layer_weight = model.backbone.model.decoder.layers[0].fc1.weight
    assert layer_weight.grad is not None and layer_weight.grad.abs().max() > 0
    assert model.associative.memories[0].key.weight.grad.abs().max() > 0
    with torch.no_grad():
        model(x)
    assert wavefront_runs == [False]


def test_wavefront_in_train_mode_draws_dropout_per_cell(load_backbone):
    """Under no_grad a model left in train mode keeps its dropout; the wavefront draws an independent mask
    for every cell of a diagonal, as sequential execution draws one per layer call."""
    model = armt(load_backbone, "gpt2", execution="wavefront")
    for module in model.backbone.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3
    x = ids(2, 30)
    with torch.no_grad():
        evaluated = model.eval()(x, labels=x).loss
        model.train()
        torch.manual_seed(1)
        dropped = model(x, labels=x).loss
        torch.manual_seed(1)
        again = model(x, labels=x).loss
    torch.testing.assert_close(again, dropped, atol=0, rtol=0)  # reproducible under a seed
    assert torch.isfinite(dropped) and (dropped - evaluated).abs() > 1e-3  # dropout was applied


# ---------------------------------------------------------------- errors
def test_unsupported_backbones_and_bad_inputs_raise_clear_errors(load_backbone):
    with pytest.raises(UnsupportedBackboneError, match="ARMT needs a decoder.*'bert'"):
        RecurrentMemoryModel(load_backbone("bert"), ARMTConfig(segment_size=8, cls_token_id=1, sep_token_id=2))
    with pytest.raises(ValueError, match="num_heads=3 does not divide"):
        RecurrentMemoryModel(load_backbone("opt"), ARMTConfig(segment_size=8, num_heads=3))
    with pytest.raises(ValueError, match="needs 65 positions.*at most 61"):
        RecurrentMemoryModel(load_backbone("opt"), ARMTConfig(num_mem_tokens=3, segment_size=62))
    model = armt(load_backbone, "opt")
    with pytest.raises(ValueError, match="AssociativeState returned by this ARMT for a batch of 2"):
        model(ids(2, 10), memory=model(ids(1, 10)).memory)
    model.backbone.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="activation checkpointing"):
        model(ids(1, 10))
