"""rmt_scale: Recurrent Memory Transformers on any Hugging Face backbone, at million-token scale.

The names below are imported on first use: a launcher imports ``rmt_scale.runtime`` to restart itself under
its CPU allocator before anything loads torch (``rmt_scale/cli``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".model", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
