from .backbones import DECODER_TYPES, ENCODER_TYPES, UnsupportedBackboneError
from .config import ConfigError, RMTConfig
from .modeling import RecurrentMemoryModel, RMTOutput

__all__ = [
    "ConfigError",
    "DECODER_TYPES",
    "ENCODER_TYPES",
    "RMTConfig",
    "RMTOutput",
    "RecurrentMemoryModel",
    "UnsupportedBackboneError",
]
