"""Segment recurrence on pipeline stages: the backbone's layers split over ranks, segments scheduled as a chain."""

from .schedule import PipelineStep, SegmentPipeline, ideal_busy_fraction
from .stages import PipelineStage, head_cost_in_layers, split_layers
from .topology import StageTopology
