"""The gated memory update of an RMT: what a segment writes moves the memory only as far as a learned gate lets it."""

from __future__ import annotations

import torch
from torch import nn


class MemoryGate(nn.Module):
    """``m' = m + g * (w - m)`` with ``g = clamp(W [m; w] + b, 0, 1)``, one gate per memory channel, ``m`` the
    memory the segment read and ``w`` what it wrote; the plain RMT update is ``g = 1``.

    The gate is clamped rather than squashed by a sigmoid so that it can be exactly 0: a segment of background
    then leaves those channels exactly as they were, and a fact written once survives any number of segments. A
    sigmoid gate leaks ``(1 - g)`` of the memory every segment, which compounds over thousands of segments."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, read: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
        gate = self.proj(torch.cat([read, written], dim=-1).to(self.proj.weight.dtype)).clamp(0.0, 1.0)
        return (read + gate.to(read.dtype) * (written - read)).to(written.dtype)
