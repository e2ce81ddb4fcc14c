"""RecurrentMemoryModel: an unchanged Hugging Face backbone that reads a long input segment by segment,
carrying memory from one segment to the next."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from .associative import AssociativeLayers, AssociativeState
from .backbones import (
    UnsupportedBackboneError,
    auto_model_class,
    backbone_kind,
    describe_backbone,
    load_pretrained,
    max_positions,
    pretrained_config,
)
from .config import CONFIG_NAME, ARMTConfig, ConfigError, RMTConfig
from .gate import MemoryGate
from .generation import GenerationMixin
from .gguf import is_gguf, load_gguf_tokenizer, without_gguf_mark
from .segments import Segment, check_inputs, packing_order, segment_bounds, unpacked
from .steps import AssociativeStep, DecoderStep, EncoderStep

BACKBONE_DIR = "backbone"
WEIGHTS_NAME = "memory.safetensors"


@dataclass
class RMTOutput(ModelOutput):
    """Output of :class:`RecurrentMemoryModel`.

    Attributes:
        loss: decoders: mean next-token loss over every labelled token of every segment; encoders: the
            classification loss. None without labels.
        memory: the memory after the last segment, to pass back as ``memory=`` to continue a stream. RMT:
            the memory tokens ``(batch, num_mem_tokens, hidden)``, None when memory is off; ARMT: an
            :class:`AssociativeState` holding every layer's (A, z).
        logits: decoders: ``(batch, length, vocab)``, only with ``return_logits=True``; encoders: the
            classification logits, taken at each sample's last non-empty segment.
        num_segments: how many segments the input was cut into.
    """

    loss: torch.Tensor | None = None
    memory: torch.Tensor | AssociativeState | None = None
    logits: torch.Tensor | None = None
    num_segments: int | None = None


class RecurrentMemoryModel(GenerationMixin, nn.Module):
    """Wraps a Hugging Face causal LM (OPT, GPT-2, Llama/Mistral/Qwen2, GPT-NeoX) or a BERT-family sequence
    classifier. The segment layout and what is carried between segments belong to the step (``steps.py``)
    picked from the backbone and the config: RMT decoder, RMT encoder, or ARMT (an :class:`ARMTConfig`).
    Learned besides the backbone: ``memory``, the memory tokens (None when off), RMT's ``memory_gate`` (with
    ``config.memory_gate``) and ARMT's ``associative``."""

    def __init__(self, backbone: nn.Module, config: RMTConfig):
        super().__init__()
        config.validate()
        backbone = without_gguf_mark(backbone)  # saved as an ordinary model, like any other backbone
        self.backbone, self.config, self.spec = backbone, config, describe_backbone(backbone)
        check_backbone(backbone.config, config)
        self.associative = None
        if isinstance(config, ARMTConfig):
            # the width of the residual stream inside the layers (OPT-350m projects its embeddings in)
            width = getattr(backbone.config, "hidden_size", self.spec.hidden_size)
            self.associative = AssociativeLayers(backbone, width, config)
        self.memory = None
        if config.num_mem_tokens > 0:
            embedding = backbone.get_input_embeddings().weight
            std = _full_tensor(embedding).float().std().item()
            init = torch.randn(config.num_mem_tokens, self.spec.hidden_size) * std
            self.memory = nn.Parameter(init.to(embedding.dtype))
        self.memory_gate = None
        if config.memory_gate and config.num_mem_tokens > 0:
            self.memory_gate = MemoryGate(self.spec.hidden_size).to(backbone.get_input_embeddings().weight.dtype)
        # the step holds references to the backbone and to the parameters above, which the model owns so
        # that their state-dict names stay `memory`, `memory_gate.*` and `associative.*`
        step = step_class(self.spec.kind, config)
        self.step = step(
            backbone, self.spec, config, self.memory, self.associative if step is AssociativeStep else self.memory_gate
        )

    @classmethod
    def from_backbone(
        cls, name_or_path: str | Path, config: RMTConfig, gguf_file: str | None = None, **backbone_kwargs
    ) -> RecurrentMemoryModel:
        """Loads a backbone with ``from_pretrained`` (a hub id, a local directory, a ``.gguf`` file, the GGUF
        file ``gguf_file`` inside the directory ``name_or_path``, or a GGUF registry name such as
        ``"smollm2-135m"``) and wraps it; an encoder's [CLS] and [SEP] ids, unless ``config`` has them, come from
        the tokenizer in the same place. A GGUF backbone is dequantized into an ordinary model."""
        if gguf_file is not None:
            name_or_path = Path(name_or_path) / gguf_file
        backbone_config = pretrained_config(name_or_path)
        if backbone_kind(backbone_config) == "encoder" and (config.cls_token_id is None or config.sep_token_id is None):
            tokenizer = (
                load_gguf_tokenizer(name_or_path)
                if is_gguf(name_or_path)
                else transformers.AutoTokenizer.from_pretrained(name_or_path)
            )
            config.cls_token_id = tokenizer.cls_token_id if config.cls_token_id is None else config.cls_token_id
            config.sep_token_id = tokenizer.sep_token_id if config.sep_token_id is None else config.sep_token_id
        check_backbone(backbone_config, config)  # before the weights are read
        backbone = load_pretrained(auto_model_class(backbone_config), name_or_path, **backbone_kwargs)
        return cls(backbone, config)

    def save_pretrained(self, directory: str | Path) -> None:
        """Writes ``rmt_config.json``, the memory weights (safetensors) and the backbone in its own format."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        self.backbone.save_pretrained(directory / BACKBONE_DIR)
        own = {
            name: tensor.detach().contiguous()
            for name, tensor in self.state_dict().items()
            if not name.startswith("backbone.")
        }
        save_file(own, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, **backbone_kwargs) -> RecurrentMemoryModel:
        directory = Path(directory)
        config = RMTConfig.from_pretrained(directory)
        weights, backbone_dir = directory / WEIGHTS_NAME, directory / BACKBONE_DIR
        for path in (weights, backbone_dir / "config.json"):  # before the backbone, which may take minutes to read
            if not path.is_file():
                raise ValueError(
                    f"{path} does not exist: copy the whole model directory, or write it again with save_pretrained."
                )
        architectures = transformers.AutoConfig.from_pretrained(backbone_dir).architectures or []
        if not architectures or not hasattr(transformers, architectures[0]):
            raise ValueError(f"{backbone_dir}/config.json names no known architecture; re-save the model.")
        try:
            backbone = getattr(transformers, architectures[0]).from_pretrained(backbone_dir, **backbone_kwargs)
        except SafetensorError as error:
            damaged = [path for path in sorted(backbone_dir.glob("*.safetensors")) if not _readable(path)]
            raise _damaged_weights(damaged[0] if damaged else backbone_dir, error) from error
        model = cls(backbone, config)
        try:
            own = load_file(str(weights))
        except SafetensorError as error:
            raise _damaged_weights(weights, error) from error
        expected = model.state_dict()
        resized = [
            f"{name} {tuple(tensor.shape)} in the weights, {tuple(expected[name].shape)} by the config"
            for name, tensor in own.items()
            if name in expected and tensor.shape != expected[name].shape
        ]
        if resized:
            raise ValueError(
                f"{weights} does not fit {directory / CONFIG_NAME}, which was edited after saving "
                f"({'; '.join(resized)}): restore the saved rmt_config.json, or train a model of the new shape."
            )
        missing, unexpected = model.load_state_dict(own, strict=False)
        missing = [name for name in missing if not name.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not match {directory / CONFIG_NAME} (missing {missing}, unexpected "
                f"{unexpected}): restore the saved rmt_config.json, or train a model of the new shape."
            )
        return model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        memory: torch.Tensor | AssociativeState | None = None,
        return_logits: bool = False,
    ) -> RMTOutput:
        """Reads ``input_ids`` of any length segment by segment.

        Args:
            input_ids: ``(batch, length)`` token ids. Encoders take the text without special tokens.
            attention_mask: ``(batch, length)``, 0 at padding (either side). A sample whose text has ended
                (or not yet begun) keeps its memory unchanged through the segments it has no tokens in.
            labels: decoders: ``(batch, length)`` token ids, not shifted, ``-100`` where no loss is wanted
                (padding is ignored too); labels that are all ``-100`` give a loss of zero that still
                backpropagates (zero gradients), so a training loop needs no special case for a batch without
                targets; encoders: ``(batch,)`` class ids.
            memory: the memory to start from (``RMTOutput.memory`` of a previous call); default: learned.
            return_logits: decoders only: also return all logits (memory grows with the input length).
        """
        segments, targets, order = self.segments(input_ids, attention_mask, labels, return_logits)
        state = self.step.initial_state(input_ids.shape[0], memory)
        loss_sum, state, extras = self.step.run(state, segments)
        loss, memory, logits = self.step.outputs(state, loss_sum, extras, labels, targets)
        if order is not None and return_logits and self.spec.kind == "decoder":
            logits = unpacked(logits, order)
        return RMTOutput(loss=loss, memory=memory, logits=logits, num_segments=len(segments))

    def segments(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = False,
    ):
        """The checked batch cut into :class:`Segment` s, the whole input's targets (decoders: the labels
        shifted once; None without labels or for encoders), both in the order the segments take the tokens,
        and that order (``packing_order``; None when it is the input's own). Left-aligned segments take each
        row's tokens from its first real one, so a padded sample is cut exactly as the sample alone."""
        attention_mask = check_inputs(
            input_ids,
            attention_mask,
            labels,
            per_token_labels=self.spec.kind == "decoder",
            vocab_size=self.backbone.get_input_embeddings().num_embeddings,
        )
        # shifted before packing, so that each target stays with the token that predicts it
        targets = self.step.targets(labels, attention_mask)
        order = packing_order(attention_mask) if self.config.segment_alignment == "left" else None
        if order is not None:
            input_ids, attention_mask = input_ids.gather(1, order), attention_mask.gather(1, order)
            targets = None if targets is None else targets.gather(1, order)
        segments = [
            Segment(
                input_ids[:, start:end],
                attention_mask[:, start:end],
                None if targets is None else targets[:, start:end],
                return_logits,
            )
            for start, end in segment_bounds(
                input_ids.shape[1], self.config.segment_size, self.config.segment_alignment
            )
        ]
        return segments, targets, order


def step_class(kind: str, config: RMTConfig) -> type[DecoderStep | EncoderStep]:
    """The segment step that drives a ``kind`` backbone under ``config``: RMT decoder, RMT encoder, or ARMT."""
    if isinstance(config, ARMTConfig):
        return AssociativeStep
    return DecoderStep if kind == "decoder" else EncoderStep


def check_backbone(
    backbone_config: transformers.PretrainedConfig, config: RMTConfig, vocab_size: int | None = None
) -> None:
    """Raises ConfigError for what the backbone's config alone (``AutoConfig``: no weights read) rules out: an
    unsupported architecture, ARMT around an encoder, an encoder without [CLS]/[SEP] ids, a segment and its
    memory longer than the backbone's positions, or (given the tokenizer's ``vocab_size``) token ids past the
    embeddings. The model runs it when it is built; call it first to fail before a large backbone loads."""
    kind = backbone_kind(backbone_config)
    model_type = backbone_config.model_type
    if isinstance(config, ARMTConfig) and kind != "decoder":
        raise UnsupportedBackboneError(
            f"ARMT needs a decoder backbone, and {model_type!r} is an encoder: use an "
            "RMTConfig (--memory rmt), or a decoder backbone."
        )
    if kind == "encoder" and (config.cls_token_id is None or config.sep_token_id is None):
        raise ConfigError(
            "encoder backbones need cls_token_id and sep_token_id in the RMTConfig: set them from "
            "your tokenizer, or load with RecurrentMemoryModel.from_backbone(path) where path has "
            "a tokenizer."
        )
    step = step_class(kind, config)
    extra, limit = step.extra_positions(config), max_positions(backbone_config)
    needed = config.segment_size + extra
    if needed > limit:
        raise ConfigError(
            f"a segment needs {needed} positions (segment_size={config.segment_size} plus {extra} "
            f"for {step.extras}) but the {model_type} backbone has {limit}: lower segment_size to at "
            f"most {limit - extra}."
        )
    if vocab_size is not None and vocab_size > backbone_config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but the backbone embeds only "
            f"{backbone_config.vocab_size}: use the backbone's own tokenizer (or resize the backbone's "
            "embeddings)."
        )


def _readable(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt"):
            return True
    except SafetensorError:
        return False


def _damaged_weights(path: Path, error: Exception) -> ValueError:
    return ValueError(
        f"{path} is damaged ({error}), e.g. truncated by an interrupted copy: copy or save the model again."
    )


def _full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter, also when DeepSpeed ZeRO-3 has partitioned it away from this rank."""
    if hasattr(param, "ds_id") and param.numel() == 0:
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return param
