from .associative import AssociativeMemory, AssociativeState, dpfp
from .backbones import DECODER_TYPES, ENCODER_TYPES, UnsupportedBackboneError
from .config import ARMTConfig, ConfigError, RMTConfig
from .modeling import RecurrentMemoryModel, RMTOutput

__all__ = [
    "ARMTConfig",
    "AssociativeMemory",
    "AssociativeState",
    "dpfp",
    "ConfigError",
    "DECODER_TYPES",
    "ENCODER_TYPES",
    "RMTConfig",
    "RMTOutput",
    "RecurrentMemoryModel",
    "UnsupportedBackboneError",
]
