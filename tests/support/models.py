"""The tiny backbones' families (conftest.py saves one of each) and the memory models the model tests build on
them."""

from __future__ import annotations

import torch

from rmt_scale import ARMTConfig, AssociativeState, RecurrentMemoryModel, RMTConfig
from rmt_scale.model.presets import preset_config

VOCAB = preset_config("test-opt").vocab_size
DECODERS = ["opt", "gpt2", "llama", "mistral", "gpt_neox"]
ENCODERS = ["bert", "roberta"]
CLS_ID, SEP_ID = 1, 2


def rmt(load_backbone, family: str, **config) -> RecurrentMemoryModel:
    torch.manual_seed(0)
    config.setdefault("num_mem_tokens", 3)
    config.setdefault("segment_size", 8)
    if family in ENCODERS:
        config.update(cls_token_id=CLS_ID, sep_token_id=SEP_ID)
    return RecurrentMemoryModel(load_backbone(family), RMTConfig(**config))


def armt(load_backbone, family: str, trained: bool = True, **config) -> RecurrentMemoryModel:
    """An ARMT on a tiny backbone. ``trained`` gives W_v random values, as training would: at init W_v is
    zero, the memory stores nothing and most tests would pass vacuously."""
    torch.manual_seed(0)
    config = {"num_mem_tokens": 3, "segment_size": 8, "d_mem": 4, "num_heads": 2, **config}
    model = RecurrentMemoryModel(load_backbone(family), ARMTConfig(**config))
    if trained:
        with torch.no_grad():
            for memory in model.associative.memories:
                memory.value.weight.normal_(std=0.3)
    return model


def rmt_gated(load_backbone, family: str, **config) -> RecurrentMemoryModel:
    """An RMT whose memory update goes through the gate; a fresh gate's channels are part open, part shut."""
    return rmt(load_backbone, family, memory_gate=True, **config)


def build(load_backbone, variant: str, family: str, **config) -> RecurrentMemoryModel:
    return {"rmt": rmt, "rmt-gated": rmt_gated, "armt": armt}[variant](load_backbone, family, **config)


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_states_close(a: AssociativeState, b: AssociativeState, tol: float = 1e-5) -> None:
    for x, y in zip(a.to_tuple(), b.to_tuple(), strict=True):
        torch.testing.assert_close(x, y, atol=tol * max(1.0, y.abs().max().item()), rtol=1e-4)
