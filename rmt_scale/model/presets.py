"""Small backbones built from configs, for the embedded default run, tests and benchmarks (no download)."""

from __future__ import annotations

from transformers import OPTConfig, OPTForCausalLM


def tiny_opt_config(vocab_size: int = 8192, max_positions: int = 2048, **overrides) -> OPTConfig:
    """The benchmarks' tiny OPT (docs/background.md): d=256, 4 layers, 4 heads, FFN 1024."""
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        word_embed_proj_dim=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        ffn_dim=1024,
        max_position_embeddings=max_positions,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    settings.update(overrides)
    return OPTConfig(**settings)


def tiny_opt(vocab_size: int = 8192, max_positions: int = 2048, **overrides) -> OPTForCausalLM:
    return OPTForCausalLM(tiny_opt_config(vocab_size, max_positions, **overrides))
