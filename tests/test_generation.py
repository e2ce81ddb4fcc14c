"""Generation with the KV cache inside segments, for RMT and ARMT decoders."""

from __future__ import annotations

import pytest
import torch

from support.models import build, ids, rmt

GREEDY_CASES = [
    ("rmt", family, alignment) for family in ("opt", "gpt2", "llama", "gpt_neox") for alignment in ("left", "right")
]
GREEDY_CASES += [("rmt-gated", "opt", "left"), ("rmt-gated", "llama", "right")]
GREEDY_CASES += [
    ("armt", "opt", "left"),
    ("armt", "gpt2", "left"),
    ("armt", "llama", "left"),
    ("armt", "opt", "right"),
    ("armt", "llama", "right"),
]


@pytest.mark.parametrize("variant, family, alignment", GREEDY_CASES)
@pytest.mark.parametrize("context", [1, 5, 21])
def test_greedy_generation_matches_the_segmented_forward(load_backbone, variant, family, alignment, context):
    """Decoding with the KV cache across segment borders picks the argmax of what forward computes on
    the whole text, both for a context shorter than a segment and for text running over several borders.
    Right-aligned, the borders depend on the final length (1 + 14 tokens: a first segment of 7)."""
    model = build(load_backbone, variant, family, segment_size=8, segment_alignment=alignment)
    prompt = ids(2, context)
    generated = model.generate(prompt, max_new_tokens=14)
    assert generated.shape == (2, context + 14) and torch.equal(generated[:, :context], prompt)
    logits = model(generated, return_logits=True).logits
    torch.testing.assert_close(logits[:, context - 1 : -1].argmax(-1), generated[:, context:])


@pytest.mark.parametrize("variant", ["rmt", "armt"])
def test_generation_stops_at_eos_and_continues_from_given_memory(load_backbone, variant):
    model = build(load_backbone, variant, "opt")
    prompt = ids(1, 12)
    first = model.generate(prompt, max_new_tokens=1)[0, -1].item()
    stopped = model.generate(prompt, max_new_tokens=10, eos_token_id=first)
    assert stopped.shape[1] == 13
    memory = model(prompt[:, :8]).memory
    torch.testing.assert_close(
        model.generate(prompt[:, 8:], max_new_tokens=6, memory=memory),
        torch.cat([prompt[:, 8:], model.generate(prompt, max_new_tokens=6)[:, 12:]], 1),
    )


@pytest.mark.parametrize("variant", ["rmt", "armt"])
def test_sampling_settings_are_checked(load_backbone, variant):
    model = build(load_backbone, variant, "opt")
    prompt = ids(1, 5)
    for temperature in (0, -1):
        with pytest.raises(ValueError, match=f"temperature={temperature} .*greater than 0.*do_sample=False"):
            model.generate(prompt, do_sample=True, temperature=temperature)
    with pytest.raises(ValueError, match="top_k=0 .*at least 1"):
        model.generate(prompt, do_sample=True, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens=-1 is negative"):
        model.generate(prompt, max_new_tokens=-1)
    torch.manual_seed(0)
    sampled = model.generate(prompt, max_new_tokens=4, do_sample=True, temperature=0.5, top_k=1)
    torch.testing.assert_close(sampled, model.generate(prompt, max_new_tokens=4))  # top_k=1 is greedy


def test_an_encoder_does_not_generate(load_backbone):
    with pytest.raises(ValueError, match="generate needs a decoder backbone"):
        rmt(load_backbone, "bert").generate(ids(1, 5))
