"""Checkpointing of the backbone's layers inside a segment, and the offload of what they keep for backward.

Per-segment checkpointing (``backprop="checkpoint"``) keeps each segment's input memory, but a segment's
backward recomputes the whole segment and holds every layer's activations at once: the memory that grows with
the model. Checkpointing the backbone's layers too (Hugging Face's, non-reentrant, so ZeRO-3 can gather
parameters in the recomputation) holds only each layer's input there, plus one layer's activations while that
layer's backward recomputes it. :class:`LayerOffload` moves those layer inputs to host memory (pinned when they
come from CUDA) and brings each back for its layer's backward.

The inputs move in the data flow (the layer checkpoint is handed host copies), not in saved-tensor hooks:
nested in a segment's checkpoint, they are saved by torch's recomputation hook of that checkpoint, which must
stay the innermost hook for the segment's checkpoint to find them.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .recurrence import saves_are_dropped


class LayerOffload:
    """The checkpoint function of the backbone's layers, holding their inputs in host memory. ``offloaded_bytes``
    counts what it moved (on a CPU-only machine, what it would have moved off an accelerator)."""

    def __init__(self):
        self.offloaded_bytes = 0
        self._host_copies: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()

    def checkpoint(self, function, *args, **checkpoint_kwargs):
        """Called by a layer as ``checkpoint(forward, *tensors)``. In a checkpointed segment's first forward
        nothing is kept, so nothing moves; the segment's recomputation in backward moves its layers' inputs."""
        device = next(a.device for a in args if isinstance(a, torch.Tensor))

        def on_device(*inputs):
            return function(*(a.to(device, non_blocking=True) if isinstance(a, torch.Tensor) else a for a in inputs))

        if not saves_are_dropped():
            args = tuple(self._to_host(a) if isinstance(a, torch.Tensor) else a for a in args)
        return checkpoint(on_device, *args, **{**checkpoint_kwargs, "use_reentrant": False})

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        host = tensor.to("cpu", non_blocking=True)  # into pinned memory when the tensor is on CUDA
        self.offloaded_bytes += host.nbytes
        self._host_copies[id(host)] = host
        return host

    def is_host_copy(self, tensor: torch.Tensor) -> bool:
        return self._host_copies.get(id(tensor)) is tensor


def checkpoint_layers(backbone: nn.Module, offload: LayerOffload | None) -> None:
    """Turns on the backbone's own non-reentrant layer checkpointing, through ``offload`` when given."""
    # renamed in transformers 5; both take the checkpoint's keyword arguments first
    enable = getattr(backbone, "activation_checkpointing_enable", None) or backbone.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    if offload is not None:
        for module in backbone.modules():
            if getattr(module, "gradient_checkpointing", False):
                module._gradient_checkpointing_func = offload.checkpoint


class SavedTensorBytes(torch.autograd.graph.saved_tensors_hooks):
    """While active, counts the bytes saved for backward (each storage once, the model's parameters left out):
    ``kept`` on the compute device and ``offloaded`` by ``offload``. What a checkpoint drops is never saved,
    so it does not count."""

    def __init__(self, model: nn.Module, offload: LayerOffload | None = None):
        self.kept = self.offloaded = 0
        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: set[int] = set()

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in parameters and key not in seen:
                seen.add(key)
                if offload is not None and offload.is_host_copy(tensor):
                    self.offloaded += storage.nbytes()
                else:
                    self.kept += storage.nbytes()
            return tensor

        super().__init__(pack, lambda tensor: tensor)

    def __enter__(self) -> SavedTensorBytes:
        super().__enter__()
        return self
