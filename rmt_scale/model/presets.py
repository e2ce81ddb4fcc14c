"""The registry of backbone presets: named configs built with random weights (no download).

Each entry says what it is for: the launcher's built-in backbones (``BUILTIN_BACKBONES``), the models of the
benchmarks and the profiler, and one small model per supported family for the tests.
"""

from __future__ import annotations

from transformers import (
    BertConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    RobertaConfig,
)

_OPT = dict(
    vocab_size=8192,
    max_position_embeddings=2048,
    dropout=0.0,
    attention_dropout=0.0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_TEST = dict(vocab_size=96, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)

# name -> (config class, its settings); `preset_config` builds one.
BACKBONE_PRESETS: dict[str, tuple[type[PretrainedConfig], dict]] = {
    # the launcher's default: the quick start trains it in minutes on one CPU core
    "opt-quickstart": (
        OPTConfig,
        dict(
            _OPT,
            hidden_size=128,
            word_embed_proj_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=512,
            max_position_embeddings=128,
        ),
    ),
    # `--backbone tiny-bert`: the quick-start model as an encoder, a sequence classifier over the answers
    "bert-quickstart": (
        BertConfig,
        dict(
            vocab_size=8192,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=512,
            max_position_embeddings=128,
            pad_token_id=0,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
    ),
    # the benchmarks and the profiler's full run
    "opt-bench": (
        OPTConfig,
        dict(_OPT, hidden_size=256, word_embed_proj_dim=256, num_hidden_layers=4, num_attention_heads=4, ffn_dim=1024),
    ),
    # the profiler's --quick run
    "opt-micro": (
        OPTConfig,
        dict(
            _OPT,
            hidden_size=64,
            word_embed_proj_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=256,
            vocab_size=512,
        ),
    ),
    # the tests: one per supported family, d=32, 2 layers, 96 tokens, 64 positions
    "test-opt": (OPTConfig, dict(_TEST, word_embed_proj_dim=32, ffn_dim=64, dropout=0.0, attention_dropout=0.0)),
    "test-gpt2": (
        GPT2Config,
        dict(
            vocab_size=96,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
    ),
    "test-llama": (LlamaConfig, dict(_TEST, intermediate_size=64, num_key_value_heads=2)),
    "test-mistral": (MistralConfig, dict(_TEST, intermediate_size=64, num_key_value_heads=2)),
    "test-gpt_neox": (GPTNeoXConfig, dict(_TEST, intermediate_size=64, hidden_dropout=0.0, attention_dropout=0.0)),
    "test-bert": (
        BertConfig,
        dict(_TEST, intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    ),
    # pad_token_id=0 keeps the tests' CLS/SEP ids (1, 2) from being read as padding; positions still start at
    # padding_idx + 1, as in every RoBERTa
    "test-roberta": (
        RobertaConfig,
        dict(
            _TEST,
            max_position_embeddings=65,
            intermediate_size=64,
            num_labels=3,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
    ),
}

# the launcher's built-in `--backbone` names, and their entries above
BUILTIN_BACKBONES = {"tiny": "opt-quickstart", "tiny-bert": "bert-quickstart"}


def preset_config(name: str, **overrides) -> PretrainedConfig:
    """The config of the backbone preset `name`, with `overrides` (config fields) applied."""
    if name not in BACKBONE_PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}: choose one of {', '.join(BACKBONE_PRESETS)}")
    config_class, settings = BACKBONE_PRESETS[name]
    return config_class(**{**settings, **overrides})
