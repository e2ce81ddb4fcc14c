"""Analytic FLOP counts for OPT-style decoders: full attention over the whole input vs RMT segments.

Counting conventions (all counts are multiply-adds x 2, i.e. one FLOP per add and per multiply):

* Terms follow Hoffmann et al. 2022 (Chinchilla), Appendix F: input embedding as a matmul, Q/K/V
  projections, attention logits QK^T, softmax (3 FLOPs per score per head), softmax x V, output
  projection, the two FFN matmuls and the output logits. OPT-350M's 512 <-> 1024 embedding
  projections are counted like any linear layer. Biases, LayerNorms, activations and positional
  embeddings are left out (they are O(n*d) and vanish next to the matmuls).
* Attention is counted over the full n x n score matrix, as Chinchilla and FlopCounterMode do; the
  causal mask's saving (about half the scores) is not taken.
* Training = 3 x forward (the backward pass costs two forwards). Recomputation adds one more
  forward: activation checkpointing and memory replay both cost 4 x forward; sublinear replay, which also
  rebuilds each block of states once, 5 x forward.
* An RMT segment is one backbone forward over `segment_size + extra_tokens` positions (the memory
  tokens, and any special tokens, ride along in every segment); a last partial segment is
  counted at its real size.
"""

from dataclasses import dataclass

from transformers import OPTConfig

# Chinchilla's forward terms, in the order a token meets them.
TERMS = (
    "embeddings",
    "embedding_projections",
    "attention_qkv",
    "attention_logits",
    "attention_softmax",
    "attention_values",
    "attention_output",
    "ffn",
    "logits",
)

# Which terms each convention sums.
CONVENTIONS = {
    # Hoffmann et al. 2022, Table A4: every term.
    "chinchilla": TERMS,
    # The same, but the input embedding is a table lookup (no FLOPs), as a profiler sees it.
    "chinchilla-no-embed": tuple(t for t in TERMS if t != "embeddings"),
    # Kaplan et al. 2020, Table 1: C_forward = 2 N_non-embedding + 2 n_layer n_ctx d_attn per token.
    "kaplan": ("embedding_projections", "attention_qkv", "attention_logits", "attention_output", "ffn"),
}

# Cost of one training step in units of one forward pass, per way of backpropagating.
TRAINING_MULTIPLIER = {"full": 3, "bptt": 3, "checkpoint": 4, "replay": 4, "sublinear": 5}


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def forward_flop_terms(config: OPTConfig, seq_len: int) -> dict[str, int]:
    """Chinchilla's forward FLOP terms for one sequence of `seq_len` tokens, attending to itself."""
    _check_positive(seq_len=seq_len)
    n, d, layers = seq_len, config.hidden_size, config.num_hidden_layers
    embed_dim, vocab = config.word_embed_proj_dim, config.vocab_size
    projections = 2 * (2 * n * embed_dim * d) if embed_dim != d else 0  # project_in + project_out
    return {
        "embeddings": 2 * n * vocab * embed_dim,
        "embedding_projections": projections,
        "attention_qkv": layers * 2 * 3 * n * d * d,
        "attention_logits": layers * 2 * n * n * d,
        "attention_softmax": layers * 3 * config.num_attention_heads * n * n,
        "attention_values": layers * 2 * n * n * d,
        "attention_output": layers * 2 * n * d * d,
        "ffn": layers * 2 * 2 * n * d * config.ffn_dim,
        "logits": 2 * n * embed_dim * vocab,
    }


def forward_flops(config: OPTConfig, seq_len: int, convention: str = "chinchilla") -> int:
    """Forward FLOPs of one backbone pass over `seq_len` tokens under `convention`."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")
    terms = forward_flop_terms(config, seq_len)
    return sum(terms[t] for t in CONVENTIONS[convention])


def full_attention_flops(config: OPTConfig, length: int, convention: str = "chinchilla") -> int:
    """Forward FLOPs of the plain backbone over all `length` tokens at once (positions permitting)."""
    return forward_flops(config, length, convention)


def rmt_flops(
    config: OPTConfig, length: int, segment_size: int = 512, extra_tokens: int = 0, convention: str = "chinchilla"
) -> int:
    """Forward FLOPs of RMT over `length` tokens: one backbone pass per segment of
    `segment_size` input tokens plus `extra_tokens` memory/special tokens."""
    _check_positive(length=length, segment_size=segment_size)
    if extra_tokens < 0:
        raise ValueError(f"extra_tokens must be >= 0, got {extra_tokens!r}")
    full_segments, remainder = divmod(length, segment_size)
    flops = full_segments * forward_flops(config, segment_size + extra_tokens, convention)
    if remainder:
        flops += forward_flops(config, remainder + extra_tokens, convention)
    return flops


def training_flops(forward: int, mode: str) -> int:
    """Training-step FLOPs from forward FLOPs, for `mode` in TRAINING_MULTIPLIER."""
    if mode not in TRAINING_MULTIPLIER:
        raise ValueError(f"unknown backprop mode {mode!r}; expected one of {', '.join(TRAINING_MULTIPLIER)}")
    return TRAINING_MULTIPLIER[mode] * forward


# The claim of Bulatov et al. 2023 ("Scaling Transformer to 1M tokens and beyond with RMT"):
# at 2,048,000 tokens with 512-token segments RMT needs ~295x fewer FLOPs than full attention
# on OPT-125M and ~29x fewer on OPT-175B.
PAPER_LENGTH = 2_048_000
PAPER_SEGMENT = 512
PAPER_CLAIM = {"opt-125m": 295.0, "opt-175b": 29.0}


@dataclass(frozen=True)
class SegmentLayout:
    """How many input tokens a segment holds and what rides along with them."""

    name: str
    segment_size: int
    extra_tokens: int


# The natural readings of "512-token segments".
PAPER_LAYOUTS = (
    SegmentLayout("512 tokens, no memory", 512, 0),
    SegmentLayout("512 tokens + read/write memory (2x16, this library)", 512, 32),
    SegmentLayout("BERT-RMT window: 499 tokens + 10 memory + 3 special", 499, 13),
)


def flop_savings(config: OPTConfig, length: int, layout: SegmentLayout, convention: str) -> float:
    """How many times fewer forward FLOPs RMT needs than full attention over `length` tokens."""
    rmt = rmt_flops(config, length, layout.segment_size, layout.extra_tokens, convention)
    return full_attention_flops(config, length, convention) / rmt
