"""FLOP, time and memory scaling of RMT against full attention: analytic counts for the published OPT
sizes and measurements of small backbones. The command line is tools/profile_flops.py."""

from rmt_scale.profiling.analytic import (
    CONVENTIONS,
    PAPER_CLAIM,
    flop_savings,
    forward_flops,
    full_attention_flops,
    rmt_flops,
    training_flops,
)
from rmt_scale.profiling.measure import Measurement, Measurer, Variant, sweep
from rmt_scale.profiling.opt_configs import OPT_NAMES, opt_config
from rmt_scale.profiling.report import loglog_slope
