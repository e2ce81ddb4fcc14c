"""Wavefront (diagonal) execution of ARMT.

Cell (segment s, layer l) needs the hidden states of (s, l-1) and the associative state that (s-1, l)
wrote. In RMT, segment s+1's first layer waits for segment s's last one; in ARMT it does not, so all cells
with equal s + l are independent and run as one call. The cells of a diagonal belong to different layers,
so the call is ``torch.func.vmap`` of one layer (plus its associative memory) over the layers' stacked
weights and the cells' stacked inputs: every matmul becomes one batched matmul over the diagonal.

A run takes ``num_segments + num_layers - 1`` calls instead of ``num_segments * num_layers``. It is an
inference schedule: ``steps.AssociativeStep`` uses it when ``ARMTConfig.execution == "wavefront"``
and gradients are off. Outputs equal sequential execution up to float round-off. In train mode, dropout
stays on and each cell of a diagonal draws its own mask, so the masks (not their distribution) differ from
sequential execution's.
"""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, stack_module_state, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .associative import AssociativeCell, flat_state, layer_states
from .backbones import decoder_final_norm, decoder_layers, layer_inputs
from .segments import keep_if_empty, padding_mask, positions


class _LayerCall:
    """A segment's layer arguments, flattened so that the cells of a diagonal can share or stack them."""

    def __init__(self, args, kwargs):
        self.leaves, self.spec = tree_flatten((args, kwargs))
        self.tensor_slots = [i for i, leaf in enumerate(self.leaves) if isinstance(leaf, torch.Tensor)]

    def signature(self):
        """Calls with equal signatures can run in one vmap: same structure, constants and tensor shapes."""
        constants = tuple(repr(leaf) for leaf in self.leaves if not isinstance(leaf, torch.Tensor))
        shapes = tuple(tuple(self.leaves[i].shape) for i in self.tensor_slots)
        return str(self.spec), constants, shapes


def run_wavefront(step, state: tuple[torch.Tensor, ...], segments: list):
    """Same contract as ``recurrence.run_segments`` (summed loss, final state, per-segment logits) for an
    ARMT decoder's ``step`` (``steps.AssociativeStep``), computed diagonal by diagonal."""
    backbone = step.backbone
    layers = decoder_layers(backbone)
    num_layers, num_segments = len(layers), len(segments)
    num_mem = step.config.num_mem_tokens

    # a segment's inputs are built when its first cell runs and freed after its last one, so at most
    # num_layers segments are in flight
    hidden: list = [None] * num_segments
    calls: list = [None] * num_segments

    cells = [AssociativeCell(layer, memory, num_mem) for layer, memory in zip(layers, step.associative.memories)]
    params, buffers = stack_module_state(cells)
    template = copy.deepcopy(cells[0]).to("meta")
    layer_state = layer_states(state)
    final_norm = decoder_final_norm(backbone)
    loss_sum, extras = None, [None] * num_segments

    for diagonal in range(num_segments + num_layers - 1):
        on_diagonal = [
            (s, diagonal - s) for s in range(min(num_segments - 1, diagonal), -1, -1) if diagonal - s < num_layers
        ]  # by layer, ascending
        if diagonal < num_segments:
            segment = segments[diagonal]
            embeds, mask = step.inputs(segment, step.memory_tokens(segment.input_ids.shape[0]))
            hidden[diagonal], args, kwargs = layer_inputs(backbone, embeds, padding_mask(mask), positions(mask))
            calls[diagonal] = _LayerCall(args, kwargs)
        groups: dict = {}
        for s, layer in on_diagonal:
            groups.setdefault((tuple(hidden[s].shape), calls[s].signature()), []).append((s, layer))
        for cells_of_group in groups.values():
            outputs = _run_cells(template, params, buffers, cells_of_group, hidden, layer_state, calls)
            for (s, layer), (out, matrix, normaliser) in zip(cells_of_group, outputs):
                token_mask = segments[s].attention_mask
                old_matrix, old_normaliser = layer_state[layer]
                layer_state[layer] = (
                    keep_if_empty(matrix, old_matrix, token_mask),
                    keep_if_empty(normaliser, old_normaliser, token_mask),
                )
                if layer < num_layers - 1:
                    hidden[s] = out
                    continue
                hidden[s] = calls[s] = None  # the segment is done
                _, loss, extras[s] = step.finish(final_norm(out), segments[s])
                loss_sum = loss if loss_sum is None else loss_sum + loss
    return loss_sum, flat_state(layer_state), extras


def _run_cells(template, params, buffers, cells, hidden, layer_state, calls):
    """Runs the cells ``[(segment, layer), ...]`` (same shapes) as one vmapped call over their layers."""
    layer_ids = [layer for _, layer in cells]
    first = layer_ids[0]
    if layer_ids == list(range(first, first + len(cells))):
        pick = slice(first, first + len(cells))  # a view: no copy of the weights
    else:
        pick = torch.tensor(layer_ids)
    cell_params = {name: value[pick] for name, value in params.items()}
    cell_buffers = {name: value[pick] for name, value in buffers.items()}
    hiddens = torch.stack([hidden[s] for s, _ in cells])
    matrices = torch.stack([layer_state[layer][0] for _, layer in cells])
    normalisers = torch.stack([layer_state[layer][1] for _, layer in cells])

    reference = calls[cells[0][0]]
    leaves = list(reference.leaves)
    varying_slots, varying = [], []
    for slot in reference.tensor_slots:
        values = [calls[s].leaves[slot] for s, _ in cells]
        if all(v is values[0] or torch.equal(v, values[0]) for v in values[1:]):
            continue  # shared by every cell (the usual case: positions restart every segment)
        varying_slots.append(slot)
        varying.append(torch.stack(values))

    def one_cell(p, b, h, matrix, normaliser, *varying_leaves):
        cell_leaves = list(leaves)
        for slot, value in zip(varying_slots, varying_leaves):
            cell_leaves[slot] = value
        args, kwargs = tree_unflatten(cell_leaves, reference.spec)
        return functional_call(template, (p, b), (h, matrix, normaliser, args, kwargs))

    # a model left in train mode keeps its dropout: every cell draws its own mask
    outs, new_matrices, new_normalisers = vmap(one_cell, randomness="different")(
        cell_params, cell_buffers, hiddens, matrices, normalisers, *varying
    )
    return list(zip(outs.unbind(0), new_matrices.unbind(0), new_normalisers.unbind(0)))
