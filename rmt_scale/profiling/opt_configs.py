"""The nine published OPT sizes as `transformers.OPTConfig` objects, built in code (no download).

Shapes follow Zhang et al. 2022 (OPT, Table 1) and the configs published on the Hugging Face hub:
every size has vocab 50272, 2048 learned positions, ffn = 4 * hidden and head size 128 except
OPT-125M/350M (head size 64). OPT-350M is the odd one out: post-LayerNorm blocks and a 512-wide
embedding that is projected in and out of the 1024-wide residual stream.
"""

from transformers import OPTConfig

# name -> (hidden_size, num_hidden_layers, num_attention_heads)
_OPT_SHAPES = {
    "opt-125m": (768, 12, 12),
    "opt-350m": (1024, 24, 16),
    "opt-1.3b": (2048, 24, 32),
    "opt-2.7b": (2560, 32, 32),
    "opt-6.7b": (4096, 32, 32),
    "opt-13b": (5120, 40, 40),
    "opt-30b": (7168, 48, 56),
    "opt-66b": (9216, 64, 72),
    "opt-175b": (12288, 96, 96),
}

OPT_NAMES = tuple(_OPT_SHAPES)


def opt_config(name: str, **overrides) -> OPTConfig:
    """The published OPTConfig for `name` (e.g. "opt-125m" or "facebook/opt-125m"); `overrides` win."""
    key = name.lower().removeprefix("facebook/")
    if key not in _OPT_SHAPES:
        raise ValueError(f"unknown OPT backbone {name!r}; expected one of {', '.join(OPT_NAMES)}")
    hidden, layers, heads = _OPT_SHAPES[key]
    is_350m = key == "opt-350m"
    fields = dict(
        vocab_size=50272,
        max_position_embeddings=2048,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        ffn_dim=4 * hidden,
        word_embed_proj_dim=512 if is_350m else hidden,
        do_layer_norm_before=not is_350m,
        activation_function="relu",
        enable_bias=True,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    fields.update(overrides)
    return OPTConfig(**fields)
