"""Configuration of the memory wrapper: what is added around an unchanged backbone."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

BACKPROP_MODES = ("bptt", "checkpoint", "replay", "sublinear")
STATE_OFFLOADS = ("none", "cpu", "disk")
SEGMENT_ALIGNMENTS = ("left", "right")
CONFIG_NAME = "rmt_config.json"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and how to fix it."""


@dataclass
class RMTConfig:
    """Recurrent Memory Transformer settings.

    Args:
        num_mem_tokens: memory tokens per segment. 0 turns memory off (the no-memory baseline).
        segment_size: input tokens per segment, memory tokens not included.
        bptt_depth: gradients flow through the last ``bptt_depth`` memory transitions; -1 = all of them.
        backprop: ``"bptt"`` keeps every segment's activations (fastest, memory grows with segments);
            ``"checkpoint"`` recomputes each segment in backward (activation checkpointing per segment);
            ``"replay"`` runs all segments without grad, then replays them last to first
            (memory replay backprop); ``"sublinear"`` replays too, keeping the state of every
            ``state_keep_every``-th segment only and recomputing the others. The last three keep activation
            memory independent of the number of segments and give the same gradients as ``"bptt"``; the
            states they keep grow with the segments (``checkpoint``, ``replay``) or with their square root.
        state_keep_every: ``"sublinear"``'s k: the state is kept at every k-th segment; 0 = ceil(sqrt(S)) for
            S segments, which bounds the kept states by about 2 sqrt(S) for one extra forward per segment.
        state_offload: where ``"replay"`` and ``"sublinear"`` keep their states: ``"none"`` (the model's
            device), ``"cpu"`` (host memory, pinned on CUDA) or ``"disk"`` (spill files).
        state_offload_dir: the directory of the spill files ("": the system's temporary directory).
        segment_alignment: ``"left"`` cuts each sample's segments from its first real token (the last one
            may be short), wherever its padding is; ``"right"`` cuts the row's segments from its last token
            (the first one may be short), so the end of the text, where the question usually is, fills a
            whole segment: pad on the left there.
        cls_token_id, sep_token_id: special tokens of encoder backbones, whose segments are laid out as
            ``[CLS] memory [SEP] segment [SEP]``. Filled from the tokenizer by ``from_backbone``.
        memory_gate: RMT: update the memory through a learned gate, ``m' = m + g * (w - m)`` with
            ``g = clamp(W [m; w] + b, 0, 1)`` per channel (``w``: what the segment wrote), instead of replacing
            it by ``w``. A segment with nothing worth keeping can then leave the memory exactly as it was.
    """

    num_mem_tokens: int = 16
    segment_size: int = 512
    bptt_depth: int = -1
    backprop: str = "bptt"
    state_keep_every: int = 0
    state_offload: str = "none"
    state_offload_dir: str = ""
    segment_alignment: str = "left"
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    memory_gate: bool = False

    model_type: ClassVar[str] = "rmt"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        need_int = self._need_int
        need_int("num_mem_tokens", 0)
        need_int("segment_size", 1)
        depth = self.bptt_depth
        if depth != -1 and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 0):
            raise ConfigError(f"bptt_depth={depth!r} is invalid: it must be -1 (all transitions) or an integer >= 0.")
        self._need_choice("backprop", BACKPROP_MODES)
        need_int("state_keep_every", 0)
        self._need_choice("state_offload", STATE_OFFLOADS)
        if not isinstance(self.state_offload_dir, str):
            raise ConfigError(f"state_offload_dir={self.state_offload_dir!r} is invalid: it must be a directory path.")
        self._need_choice("segment_alignment", SEGMENT_ALIGNMENTS)
        for name in ("cls_token_id", "sep_token_id"):
            if getattr(self, name) is not None:
                need_int(name, 0)
        self._need_bool("memory_gate")

    def _need_int(self, name: str, low: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}={value!r} is invalid: it must be an integer >= {low}.")

    def _need_bool(self, name: str) -> None:
        if not isinstance(getattr(self, name), bool):
            raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: it must be true or false.")

    def _need_choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            raise ConfigError(f"{name}={getattr(self, name)!r} is unknown: choose one of {', '.join(choices)}.")

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RMTConfig:
        data = dict(data)
        model_type = data.pop("model_type", cls.model_type)
        target = _config_class(model_type)
        if not issubclass(target, cls):
            raise ConfigError(f"a {model_type!r} config cannot be loaded as {cls.__name__}.")
        known = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; the known ones are {sorted(known)}.")
        return target(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | Path) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(self.to_json_string())

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> RMTConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: pass a directory written by save_pretrained.")
        return cls.from_dict(json.loads(path.read_text()))


EXECUTION_MODES = ("sequential", "wavefront")
WRITE_GATES = ("sigmoid", "clamp")


@dataclass
class ARMTConfig(RMTConfig):
    """Associative Recurrent Memory Transformer settings: everything of :class:`RMTConfig` plus an
    associative memory in every decoder layer.

    Decoder segments are ``[segment | memory tokens]``; the memory tokens are the same learned embeddings
    every segment, and what a sample remembers lives in each layer's associative state (A, z).

    Args:
        num_mem_tokens: memory tokens per segment, whose layer outputs are written into the associative
            memory (at least 1; the no-memory baseline is ``RMTConfig(num_mem_tokens=0)``).
        d_mem: size of keys and queries per head before the DPFP feature map.
        num_heads: associative heads; the hidden size is split between them, each with its own (A, z).
        dpfp_nu: order of the DPFP feature map; features have ``2 * dpfp_nu * d_mem`` dimensions.
        gating: scale each memory token's write by a learned gate beta = f(W_b m + b_b).
        write_gate: the gate's ``f``: ``"sigmoid"``, or ``"clamp"`` (clamped to [0, 1]), which can be exactly
            0, so that a segment of background writes nothing at all.
        gated_normaliser: add ``beta k`` to the normaliser z instead of ``k``, so that a read is the gated
            average of what was written; with ungated z every write, gated shut or not, divides later reads
            further, and what was stored fades with the number of segments.
        correction: delta-rule write (store v minus what the memory already returns for the key) and the
            corrected normaliser update; off gives the plain linear-attention update A += k v^T, z += k.
        execution: ``"sequential"`` runs segment after segment; ``"wavefront"`` runs the cells (segment s,
            layer l) with equal s + l together (diagonal batching). Wavefront is an inference schedule: it is
            used when gradients are off; with gradients on, ``backprop`` decides. A model left in train mode
            keeps its dropout there, each cell drawing its own mask.
    """

    d_mem: int = 64
    num_heads: int = 1
    dpfp_nu: int = 3
    gating: bool = True
    write_gate: str = "sigmoid"
    gated_normaliser: bool = False
    correction: bool = True
    execution: str = "sequential"

    model_type: ClassVar[str] = "armt"

    def validate(self) -> None:
        super().validate()
        if self.num_mem_tokens < 1:
            raise ConfigError(
                f"num_mem_tokens={self.num_mem_tokens} is invalid for ARMT: memory is written from the memory "
                "tokens, so use at least 1 (the no-memory baseline is RMTConfig(num_mem_tokens=0))."
            )
        for name in ("d_mem", "num_heads", "dpfp_nu"):
            self._need_int(name, 1)
        if self.memory_gate:
            raise ConfigError(
                "memory_gate is an RMT setting: ARMT's memory tokens are the same every segment and "
                "its writes are gated by `gating`; set memory_gate=False."
            )
        for name in ("gating", "gated_normaliser", "correction"):
            self._need_bool(name)
        self._need_choice("write_gate", WRITE_GATES)
        self._need_choice("execution", EXECUTION_MODES)
        if (self.write_gate != "sigmoid" or self.gated_normaliser) and not self.gating:
            raise ConfigError(
                "write_gate and gated_normaliser shape the write gate, and gating=False has none: "
                "set gating=True, or leave them at their defaults."
            )


def _config_class(model_type: str) -> type[RMTConfig]:
    registry = {sub.model_type: sub for sub in _all_subclasses(RMTConfig)} | {RMTConfig.model_type: RMTConfig}
    if model_type not in registry:
        raise ConfigError(f"model_type={model_type!r} is unknown: expected one of {sorted(registry)}.")
    return registry[model_type]


def _all_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_all_subclasses(sub)]
    return found
