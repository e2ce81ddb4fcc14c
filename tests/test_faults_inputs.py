"""Bad input a new user gives (issue 30): each is refused before any work with one line naming the flag or file
and the fix, a ConfigError (exit 2 from the launchers)."""

from __future__ import annotations

import pytest
import transformers

from rmt_scale.data import build_word_tokenizer
from rmt_scale.model import ConfigError
from rmt_scale.model.backbones import UnsupportedBackboneError, pretrained_config
from rmt_scale.training import TrainConfig

SUPPORTED = r"Supported decoders: opt, gpt2, llama, mistral, qwen2, gpt_neox; encoders: bert, roberta\."


@pytest.fixture
def t5_dir(tmp_path):
    """A T5, which has no memory adapter, saved with a tokenizer like a user's pretrained backbone."""
    config = transformers.T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    build_word_tokenizer().save(str(tmp_path / "t5"))
    return tmp_path / "t5"


# ------------------------------------------------------------------------------------------ backbones
def test_an_unsupported_backbone_is_refused_from_its_config_first(t5_dir, tmp_path):
    with pytest.raises(UnsupportedBackboneError, match=f"architecture 't5' is not supported. {SUPPORTED}"):
        TrainConfig(backbone=str(t5_dir), out_dir=str(tmp_path / "out")).check_paths()
    # transformers' own answers list every model type it knows, or ask to upgrade it
    for name, config in [("no_type", '{"hidden_size": 4}'), ("unknown_type", '{"model_type": "t5x"}')]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
        with pytest.raises(UnsupportedBackboneError, match=f"{name}/config.json names no architecture.*{SUPPORTED}"):
            pretrained_config(tmp_path / name)


def test_a_backbone_directory_without_a_tokenizer_asks_for_one(backbone_dirs, tmp_path):
    """A backbone saved alone: AutoTokenizer would build an empty tokenizer of its family, or ask to install
    sentencepiece."""
    for family in ("opt", "llama"):
        with pytest.raises(ConfigError, match=f"{backbone_dirs[family]} has no tokenizer: pass --tokenizer"):
            TrainConfig(backbone=str(backbone_dirs[family]), out_dir=str(tmp_path / "out")).check_paths()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty has no tokenizer: pass --tokenizer \(a tokenizer directory, or"):
        TrainConfig(tokenizer=str(tmp_path / "empty"), out_dir=str(tmp_path / "out")).check_paths()
    TrainConfig(backbone=str(backbone_dirs["opt"]), tokenizer="builtin", out_dir=str(tmp_path / "out")).check_paths()
