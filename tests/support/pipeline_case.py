"""One pipeline-gradient case, shared by tests/test_pipeline.py (the one-process reference) and the ranks it
starts (``python tests/support/pipeline_case.py OUT FAMILY MEMORY DEPTH CHAINS [KEEP_EVERY SEGMENTS]``, with
RANK/WORLD_SIZE/MASTER_* and PYTHONPATH set): the same model and batch on every process, built from seeds. With
KEEP_EVERY the stages run sublinear blocks of that many segments (0: ceil(sqrt(S)))."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import transformers

from rmt_scale import RecurrentMemoryModel
from rmt_scale.model.config import ARMTConfig, RMTConfig
from rmt_scale.model.presets import preset_config

NUM_LAYERS, SEGMENT, SEGMENTS, BATCH = 4, 6, 5, 4


def build_model(family: str, memory: str, bptt_depth: int) -> RecurrentMemoryModel:
    """``memory``: rmt, rmt-gated (with the memory gate) or armt."""
    layers = {"n_layer": NUM_LAYERS} if family == "gpt2" else {"num_hidden_layers": NUM_LAYERS}
    torch.manual_seed(0)
    backbone = transformers.AutoModelForCausalLM.from_config(preset_config(f"test-{family}", **layers))
    config_class = ARMTConfig if memory == "armt" else RMTConfig
    extra = {"armt": dict(d_mem=8, num_heads=2), "rmt-gated": dict(memory_gate=True)}.get(memory, {})
    config = config_class(num_mem_tokens=3, segment_size=SEGMENT, bptt_depth=bptt_depth, backprop="bptt", **extra)
    torch.manual_seed(1)
    model = RecurrentMemoryModel(backbone, config)
    if model.associative is not None:
        for memory_module in model.associative.memories:  # A starts at zero: make the memory matter
            torch.nn.init.normal_(memory_module.value.weight, std=0.2)
    return model.train()


def batch(vocab: int, segments: int = SEGMENTS):
    """Four samples of five segments (by default): one left-padded by more than a segment (its segments start at
    its first token, so it skips the last segment, where its memory must be kept), one right-padded, and labels
    with holes."""
    generator = torch.Generator().manual_seed(2)
    length = SEGMENT * segments
    input_ids = torch.randint(3, vocab, (BATCH, length), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, : SEGMENT + 2] = 0
    mask[2, -4:] = 0
    labels = input_ids.clone()
    labels[torch.rand(labels.shape, generator=generator) < 0.3] = -100
    return input_ids, mask, labels


def run_stage(
    out: Path, family: str, memory: str, bptt_depth: int, chains: int, keep_every: int | None, segments: int
) -> None:
    import torch.distributed as dist

    from rmt_scale.pipeline import PipelineStage, SegmentPipeline

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = build_model(family, memory, bptt_depth)
    stage = PipelineStage(model, rank, world)
    tied = dist.new_group([0, world - 1]) if world > 1 and stage.tied_head else None
    sublinear = dict(sublinear=True, keep_every=keep_every) if keep_every is not None else {}
    pipeline = SegmentPipeline(stage, list(range(world)), chains=chains, tied_group=tied, **sublinear)
    result = pipeline.forward_backward(*batch(model.backbone.config.vocab_size, segments))
    grads = {name: p.grad.clone() for name, p in stage.owned_parameters().items() if p.grad is not None}
    saved = {"loss": result.loss, "grads": grads, "stash_peak_items": result.stash_peak_items}
    torch.save({**saved, "stash_peak_bytes": result.stash_peak_bytes}, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    out, family, memory, depth, chains, *blocks = sys.argv[1:]
    keep_every, segments = (int(blocks[0]), int(blocks[1])) if blocks else (None, SEGMENTS)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_stage(Path(out), family, memory, int(depth), int(chains), keep_every, segments)
