"""The associative memory of ARMT: one per decoder layer, attached to an unchanged backbone with hooks.

Per layer ``l`` and per sample, the state is a matrix ``A`` and a normaliser ``z`` (per head). Before the
layer every token reads ``phi(W_q h) A / (phi(W_q h) . z + eps)`` into its residual stream; after the layer
the memory tokens' outputs ``m`` are written with the delta rule::

    k = phi(W_k m), v = W_v m, beta = sigmoid(W_b m)
    A += sum beta k (v - k A / (k . z + eps))^T
    z += sum gamma k,   gamma = clip(1 - z . k / |k|^2, 0, 1)  (no gradient through gamma)

``write_gate="clamp"`` takes ``beta = clamp(W_b m + b_b, 0, 1)``, which can shut exactly, and
``gated_normaliser`` adds ``beta gamma k`` to z, so that a shut write changes neither A nor z.

``phi`` is the DPFP feature map. ``W_v`` starts at zero, so A stays zero and, at init, the wrapped model
computes exactly what the backbone computes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import decoder_layers, run_layer
from .config import ARMTConfig

EPS = 1e-5


def dpfp(x: torch.Tensor, nu: int = 3) -> torch.Tensor:
    """Deterministic parameter-free projection: ``[relu(x), relu(-x)]`` times its rolls by 1..nu, concatenated;
    non-negative features of size ``2 * nu * x.shape[-1]``."""
    x = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    return torch.cat([x * x.roll(shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)


class AssociativeMemory(nn.Module):
    """Read and write of one layer's associative memory. Holds only weights; the state is passed in."""

    def __init__(self, hidden_size: int, config: ARMTConfig):
        super().__init__()
        if hidden_size % config.num_heads:
            raise ValueError(
                f"num_heads={config.num_heads} does not divide the hidden size {hidden_size}: pick a divisor of it."
            )
        self.num_heads, self.d_mem, self.nu = config.num_heads, config.d_mem, config.dpfp_nu
        self.correction = config.correction
        self.head_size = hidden_size // config.num_heads
        self.feature_size = 2 * config.dpfp_nu * config.d_mem
        self.query = nn.Linear(hidden_size, config.num_heads * config.d_mem, bias=False)
        self.key = nn.Linear(hidden_size, config.num_heads * config.d_mem, bias=False)
        self.value = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.value.weight)  # A stays 0 until trained: at init the model is the backbone
        self.gate = nn.Linear(hidden_size, config.num_heads) if config.gating else None
        self.clamped_gate = config.write_gate == "clamp"
        self.gated_normaliser = config.gated_normaliser
        if self.gate is not None and self.clamped_gate:
            nn.init.constant_(self.gate.bias, 0.5)  # start open and inside [0, 1], where the gate has a gradient

    def empty_state(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero ``A`` ``(batch, heads, features, head_size)`` and ``z`` ``(batch, heads, features)``, in float32
        so that long streams accumulate without bf16 round-off."""
        matrix = torch.zeros(batch, self.num_heads, self.feature_size, self.head_size, device=device)
        return matrix, torch.zeros(batch, self.num_heads, self.feature_size, device=device)

    def _features(self, projection: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape[:2]
        projected = projection(x.to(projection.weight.dtype)).float()
        features = dpfp(projected.view(batch, length, self.num_heads, self.d_mem).transpose(1, 2), self.nu)
        # Unit-length features. DPFP is quadratic in its input, and without this the features, A and the
        # reads feed each other through the residual stream until they overflow (measured: NaN after ~500
        # steps on associative recall). A read is unchanged by the scale of its query anyway.
        return features / features.norm(dim=-1, keepdim=True).clamp_min(EPS)

    def read(self, hidden: torch.Tensor, matrix: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
        """What every token retrieves, ``(batch, length, hidden)``, to add to its residual stream."""
        query = self._features(self.query, hidden)  # (batch, heads, length, features)
        retrieved = (query @ matrix) / (query @ normaliser.unsqueeze(-1) + EPS)
        return retrieved.transpose(1, 2).flatten(2).to(hidden.dtype)

    def write(self, memory_out: torch.Tensor, matrix: torch.Tensor, normaliser: torch.Tensor):
        """New ``(A, z)`` after writing the memory tokens' layer outputs ``(batch, num_mem, hidden)``."""
        batch, num_mem = memory_out.shape[:2]
        key = self._features(self.key, memory_out)  # (batch, heads, num_mem, features)
        value = self.value(memory_out.to(self.value.weight.dtype)).float()
        value = value.view(batch, num_mem, self.num_heads, self.head_size).transpose(1, 2)
        beta = None
        if self.gate is not None:
            logits = self.gate(memory_out.to(self.gate.weight.dtype)).float()
            beta = (logits.clamp(0, 1) if self.clamped_gate else torch.sigmoid(logits)).transpose(1, 2).unsqueeze(-1)
        weighted_key = key if beta is None else key * beta
        if self.correction:
            key_norm = key @ normaliser.unsqueeze(-1)  # (batch, heads, num_mem, 1)
            value = value - (key @ matrix) / (key_norm + EPS)
            gamma = (1 - key_norm / key.square().sum(-1, keepdim=True).clamp_min(EPS)).clamp(0, 1).detach()
            key = key * gamma
        matrix = matrix + weighted_key.transpose(-1, -2) @ value
        normaliser = normaliser + (key * beta if self.gated_normaliser else key).sum(dim=2)
        return matrix, normaliser


class AssociativeCell(nn.Module):
    """One decoder layer with its associative memory: the layer's input reads (A, z), its outputs at the
    ``num_mem`` memory tokens that end the input write the new (A, z). The wavefront and the pipeline stages
    call the cell; :class:`AssociativeLayers`' hooks apply its halves around the backbone's call of the layer."""

    def __init__(self, layer: nn.Module, memory: AssociativeMemory, num_mem: int):
        super().__init__()
        self.layer, self.memory, self.num_mem = layer, memory, num_mem

    def read(self, hidden: torch.Tensor, matrix: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
        return hidden + self.memory.read(hidden, matrix, normaliser)

    def write(self, out: torch.Tensor, matrix: torch.Tensor, normaliser: torch.Tensor):
        return self.memory.write(out[:, -self.num_mem :], matrix, normaliser)

    def forward(self, hidden, matrix, normaliser, layer_args, layer_kwargs):
        """The layer's output hidden states and the new ``(A, z)``."""
        out = run_layer(self.layer, self.read(hidden, matrix, normaliser), layer_args, layer_kwargs)
        return (out, *self.write(out, matrix, normaliser))


def layer_states(state: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The flat state ``(A_1, z_1, ..., A_L, z_L)`` as one ``(A, z)`` per layer."""
    return list(zip(state[0::2], state[1::2]))


def flat_state(states) -> tuple[torch.Tensor, ...]:
    """The inverse of :func:`layer_states`."""
    return tuple(t for pair in states for t in pair)


@dataclass
class AssociativeState:
    """What an ARMT remembers about each sample: per layer, ``A`` ``(batch, heads, features, head_size)`` and
    ``z`` ``(batch, heads, features)``. Returned as ``RMTOutput.memory`` and accepted as ``memory=``."""

    matrices: tuple[torch.Tensor, ...]
    normalisers: tuple[torch.Tensor, ...]

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        return flat_state(zip(self.matrices, self.normalisers))

    @classmethod
    def from_tuple(cls, flat) -> AssociativeState:
        return cls(tuple(flat[0::2]), tuple(flat[1::2]))

    def detach(self) -> AssociativeState:
        return AssociativeState.from_tuple(tuple(t.detach() for t in self.to_tuple()))


class _Session:
    """The per-call link between a step and the layer hooks: the state each layer reads, and the state each
    layer writes (with ``write``, when the memory tokens end the input)."""

    def __init__(self, state: tuple[torch.Tensor, ...], write: bool):
        self.state = layer_states(state)
        self.write = write
        self.written: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.state)

    def new_state(self) -> tuple[torch.Tensor, ...]:
        if any(pair is None for pair in self.written):
            raise RuntimeError(
                "a decoder layer was skipped, so its associative memory was not written (turn off layerdrop for ARMT)."
            )
        return flat_state(self.written)


class AssociativeLayers(nn.Module):
    """One :class:`AssociativeMemory` per decoder layer, and the hooks that apply them.

    The hooks act only inside :meth:`session`, which a segment step opens around its backbone call, so the
    backbone behaves as usual elsewhere, and a recomputation (checkpoint, replay) sets the state again."""

    def __init__(self, backbone: nn.Module, hidden_size: int, config: ARMTConfig):
        """``backbone`` is a decoder (``modeling.check_backbone`` refuses ARMT around anything else)."""
        super().__init__()
        layers = decoder_layers(backbone)
        self.memories = nn.ModuleList(AssociativeMemory(hidden_size, config) for _ in layers)
        self._session: _Session | None = None
        for index, layer in enumerate(layers):
            # held by the hooks only: the layers belong to the backbone, not to this module
            cell = AssociativeCell(layer, self.memories[index], config.num_mem_tokens)
            layer.register_forward_pre_hook(self._read_hook(index, cell), with_kwargs=True)
            layer.register_forward_hook(self._write_hook(index, cell))

    def empty_state(self, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        return flat_state(memory.empty_state(batch, device) for memory in self.memories)

    @contextlib.contextmanager
    def session(self, state: tuple[torch.Tensor, ...], write: bool = False):
        """Layers read ``state`` (flat ``(A_1, z_1, ..., A_L, z_L)``) for the duration of the block; with
        ``write`` the input ends with the memory tokens and each layer writes their output."""
        if self._session is not None:
            raise RuntimeError("ARMT sessions do not nest: one segment runs at a time.")
        self._session = _Session(state, write)
        try:
            yield self._session
        finally:
            self._session = None

    def _read_hook(self, index: int, cell: AssociativeCell):
        def hook(layer, args, kwargs):
            if self._session is None:
                return None
            state = self._session.state[index]
            if args:
                return (cell.read(args[0], *state), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cell.read(kwargs["hidden_states"], *state)}

        return hook

    def _write_hook(self, index: int, cell: AssociativeCell):
        def hook(layer, args, output):
            session = self._session
            if session is None or not session.write:
                return None
            out = output[0] if isinstance(output, tuple) else output
            session.written[index] = cell.write(out, *session.state[index])
            return None

        return hook
