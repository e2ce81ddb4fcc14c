"""What the memory wrapper needs to know about each Hugging Face architecture, and nothing more.

The backbone is never edited: a decoder is driven through ``inputs_embeds`` and explicit ``position_ids``
on its base model plus its LM head; an encoder through its sequence-classification model.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from .config import ConfigError
from .gguf import gguf_config, is_gguf, load_gguf_model

DECODER_TYPES = ("opt", "gpt2", "llama", "mistral", "qwen2", "gpt_neox")
ENCODER_TYPES = ("bert", "roberta")


class UnsupportedBackboneError(ConfigError):
    """The backbone's architecture has no memory adapter."""


@dataclass(frozen=True)
class BackboneSpec:
    kind: str  # "decoder" or "encoder"
    model_type: str
    hidden_size: int  # width of input embeddings, which is what memory tokens live in
    max_positions: int
    num_layers: int


SUPPORTED = f"Supported decoders: {', '.join(DECODER_TYPES)}; encoders: {', '.join(ENCODER_TYPES)}."


def backbone_kind(config) -> str:
    """``"decoder"`` or ``"encoder"``, from the backbone's config alone (``AutoConfig``, no weights)."""
    model_type = getattr(config, "model_type", None)
    if model_type in DECODER_TYPES:
        return "decoder"
    if model_type in ENCODER_TYPES:
        return "encoder"
    raise UnsupportedBackboneError(f"architecture {model_type!r} is not supported. {SUPPORTED}")


def pretrained_config(name_or_path) -> transformers.PretrainedConfig:
    """``AutoConfig``'s config of a backbone (a hub id, a directory, a ``.gguf`` file or a GGUF registry name),
    refused unless its family is supported: the first thing read of a backbone, so nothing else (tokenizer,
    weights, transformers' own list of every model type it knows) comes before that answer."""
    if is_gguf(name_or_path):
        config = gguf_config(name_or_path)
        backbone_kind(config)
        return config
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
    except ValueError as error:  # no model_type in config.json, or one this transformers does not know
        raise UnsupportedBackboneError(
            f"{name_or_path}/config.json names no architecture transformers knows: pass a backbone saved with "
            f"save_pretrained. {SUPPORTED}"
        ) from error
    backbone_kind(config)
    return config


def auto_model_class(config) -> type:
    """The Auto class that builds a backbone of ``config``: a causal LM for a decoder; for an encoder a sequence
    classifier, as in the 1M-token RMT paper."""
    if backbone_kind(config) == "encoder":
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForCausalLM


def load_pretrained(auto_class: type, name_or_path, **kwargs) -> transformers.PreTrainedModel:
    """``auto_class.from_pretrained(name_or_path, **kwargs)``, also of a GGUF file (a path or a registry name),
    which is dequantized into an ordinary model."""
    if is_gguf(name_or_path):
        return load_gguf_model(auto_class, name_or_path, **kwargs)
    return auto_class.from_pretrained(name_or_path, **kwargs)


def max_positions(config) -> int:
    return config.max_position_embeddings - first_position(config)


def describe_backbone(backbone: nn.Module) -> BackboneSpec:
    config = getattr(backbone, "config", None)
    kind = backbone_kind(config)
    if kind == "decoder" and backbone.get_output_embeddings() is None:
        raise UnsupportedBackboneError(
            f"{type(backbone).__name__} has no LM head: wrap a causal LM (e.g. AutoModelForCausalLM)."
        )
    if kind == "encoder" and not type(backbone).__name__.endswith("ForSequenceClassification"):
        raise UnsupportedBackboneError(
            f"{type(backbone).__name__} is an encoder without a classification head: wrap an "
            "AutoModelForSequenceClassification model, as in the 1M-token RMT paper."
        )
    hidden_size = backbone.get_input_embeddings().embedding_dim
    return BackboneSpec(kind, config.model_type, hidden_size, max_positions(config), config.num_hidden_layers)


def first_position(config) -> int:
    """The position id of a sequence's first token: RoBERTa's positions start after its padding_idx."""
    return config.pad_token_id + 1 if config.model_type == "roberta" else 0


def decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a supported decoder (for per-layer hooks such as ARMT's)."""
    base = backbone.base_model
    for path in ("layers", "h", "decoder.layers"):
        module = base
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise UnsupportedBackboneError(f"cannot find the decoder layers of {type(backbone).__name__}.")


def decoder_final_modules(backbone: nn.Module) -> list[nn.Module]:
    """What a supported decoder's base model applies after its last layer (final norm, OPT's projection)."""
    base = backbone.base_model
    if backbone.config.model_type == "opt":
        modules = [base.decoder.final_layer_norm, base.decoder.project_out]
    else:
        modules = [getattr(base, name, None) for name in ("norm", "ln_f", "final_layer_norm")]
    modules = [module for module in modules if module is not None]
    if not modules and backbone.config.model_type != "opt":
        raise UnsupportedBackboneError(f"cannot find the final norm of {type(backbone).__name__}.")
    return modules


def decoder_final_norm(backbone: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function of :func:`decoder_final_modules`."""
    modules = decoder_final_modules(backbone)

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        for module in modules:
            hidden = module(hidden)
        return hidden

    return apply


class _StopBeforeFirstLayer(Exception):
    pass


def layer_inputs(
    backbone: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
) -> tuple[torch.Tensor, tuple, dict]:
    """The hidden states and the other arguments (masks, positions, rotary embeddings) that a decoder's base
    model hands its first layer; every layer gets the same arguments. Runs only the part before the layers,
    so callers can run the layers one by one (wavefront cells, pipeline stages)."""
    captured = {}

    def capture(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _StopBeforeFirstLayer

    handle = decoder_layers(backbone)[0].register_forward_pre_hook(capture, with_kwargs=True, prepend=True)
    try:
        run_decoder(backbone, embeds, attention_mask, position_ids)
    except _StopBeforeFirstLayer:
        pass
    finally:
        handle.remove()
    args = captured["args"]
    hidden = args[0] if args else captured["kwargs"].pop("hidden_states")
    return hidden, tuple(args[1:]), captured["kwargs"]


def run_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """One decoder layer's output hidden states (layers return a tuple in some transformers versions)."""
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_decoder(
    backbone: nn.Module,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    past_key_values=None,
    use_cache: bool = False,
):
    """Final hidden states (after the final norm) of a decoder's base model, plus its KV cache."""
    name = cache_argument(type(backbone.base_model))
    out = backbone.base_model(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=use_cache,
        **{name: past_key_values},
    )
    return out.last_hidden_state, getattr(out, name)


@functools.cache
def cache_argument(model_class: type) -> str:
    """What the base model calls its KV cache: ``cache`` from transformers 5 on, which warns on every call that
    passes the older ``past_key_values``, even as None."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def run_encoder(backbone: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
    """Classification logits and last-layer hidden states of a sequence-classification encoder;
    ``position_ids`` count from 0."""
    out = backbone(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids + first_position(backbone.config),
        token_type_ids=torch.zeros_like(position_ids),
        output_hidden_states=True,
    )
    return out.logits, out.hidden_states[-1]
