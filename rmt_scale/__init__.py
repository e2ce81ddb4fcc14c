"""rmt_scale: Recurrent Memory Transformers on any Hugging Face backbone, at million-token scale."""

from .model import (
    ARMTConfig,
    AssociativeState,
    ConfigError,
    RecurrentMemoryModel,
    RMTConfig,
    RMTOutput,
    UnsupportedBackboneError,
)

__version__ = "0.1.0"
__all__ = [
    "ARMTConfig",
    "AssociativeState",
    "ConfigError",
    "RMTConfig",
    "RMTOutput",
    "RecurrentMemoryModel",
    "UnsupportedBackboneError",
]
