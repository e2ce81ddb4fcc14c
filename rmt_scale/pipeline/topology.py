"""The ranks of a pipeline run as process groups (plain torch.distributed): who is which stage of which replica."""

from __future__ import annotations

import torch.distributed as dist


class StageTopology:
    """P pipeline stages x D data-parallel replicas. Rank ``r`` is stage ``r % P`` of replica ``r // P``, so a
    pipeline's stages are neighbouring ranks (on one node when P divides the GPUs per node). Also DeepSpeed's
    ``mpu`` interface: its "model parallel" group is the pipeline, so a gradient norm spans every stage."""

    def __init__(self, rank: int, world_size: int, stages: int):
        self.stages, self.replicas = stages, world_size // stages
        self.stage, self.replica = rank % stages, rank // stages
        pipelines = [list(range(replica * stages, (replica + 1) * stages)) for replica in range(self.replicas)]
        self.stage_ranks = pipelines[self.replica]
        # every rank creates every group, in the same order, as torch requires
        pipe_groups = [dist.new_group(ranks) for ranks in pipelines]
        data_groups = [dist.new_group(list(range(stage, world_size, stages))) for stage in range(stages)]
        tied_groups = [dist.new_group([ranks[0], ranks[-1]]) for ranks in pipelines] if stages > 1 else None
        self.pipe_group, self.data_group = pipe_groups[self.replica], data_groups[self.stage]
        self.tied_group = tied_groups[self.replica] if stages > 1 and self.stage in (0, stages - 1) else None

    def get_model_parallel_group(self):
        return self.pipe_group

    def get_model_parallel_world_size(self) -> int:
        return self.stages

    def get_model_parallel_rank(self) -> int:
        return self.stage

    def get_data_parallel_group(self):
        return self.data_group

    def get_data_parallel_world_size(self) -> int:
        return self.replicas

    def get_data_parallel_rank(self) -> int:
        return self.replica
