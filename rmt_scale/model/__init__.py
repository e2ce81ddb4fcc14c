from .associative import AssociativeMemory, AssociativeState, dpfp
from .backbones import DECODER_TYPES, ENCODER_TYPES, UnsupportedBackboneError
from .config import ARMTConfig, ConfigError, RMTConfig
from .modeling import RecurrentMemoryModel, RMTOutput
