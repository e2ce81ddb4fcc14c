"""Analytic FLOP formulas, the paper's 29x / 295x claim, slopes and the pass/fail verdict."""

import math

import pytest
import torch
import transformers

from rmt_scale.profiling import analytic, report
from rmt_scale.profiling.measure import backbone_config, counted_flops
from rmt_scale.profiling.opt_configs import OPT_NAMES, opt_config

PAPER_TOLERANCE = 0.05  # the closest convention must land within 5% of both claimed ratios


@pytest.mark.parametrize("name, params", [("opt-125m", 125_239_296), ("opt-350m", 331_196_416)])
def test_opt_configs_match_published_parameter_counts(name, params):
    with torch.device("meta"):
        model = transformers.OPTForCausalLM(opt_config(name))
    assert sum(p.numel() for p in model.parameters()) == params


def test_opt_350m_is_post_ln_with_projected_embeddings():
    config = opt_config("facebook/opt-350m")
    assert (config.word_embed_proj_dim, config.do_layer_norm_before) == (512, False)
    assert len(OPT_NAMES) == 9 and opt_config("opt-175b").num_hidden_layers == 96


def test_kaplan_count_equals_twice_the_real_models_non_embedding_weights_per_token():
    """Kaplan et al.'s C_forward = 2 N + 2 n_layer n_ctx d per token, with N counted from the weight matrices
    of a real OPT-125M (not from the formula under test)."""
    with torch.device("meta"):
        model = transformers.OPTForCausalLM(opt_config("opt-125m"))
    decoder = model.model.decoder
    weights = sum(m.weight.numel() for m in decoder.layers.modules() if isinstance(m, torch.nn.Linear))
    n, layers, d = 2048, len(decoder.layers), model.config.hidden_size
    assert analytic.forward_flops(opt_config("opt-125m"), n, "kaplan") == n * (2 * weights + 2 * layers * n * d)


def test_terms_grow_exactly_linearly_or_quadratically_with_length():
    config = opt_config("opt-350m")
    short, long = analytic.forward_flop_terms(config, 1000), analytic.forward_flop_terms(config, 3000)
    quadratic = {"attention_logits", "attention_softmax", "attention_values"}
    for term in analytic.TERMS:
        assert long[term] == (9 if term in quadratic else 3) * short[term], term
    assert short["embedding_projections"] > 0 and analytic.forward_flop_terms(opt_config("opt-125m"), 1000)[
        "embedding_projections"] == 0


def test_paper_claim_reproduced_by_the_closest_convention():
    best = report.best_match(report.paper_reproduction())
    assert (best["convention"], best["layout"]) == ("chinchilla-no-embed", analytic.PAPER_LAYOUTS[0].name)
    assert best["ratios"]["opt-125m"] == pytest.approx(295, rel=PAPER_TOLERANCE)  # 287.9
    assert best["ratios"]["opt-175b"] == pytest.approx(29, rel=PAPER_TOLERANCE)  # 28.6
    # Chinchilla with the embedding matmul kept still gets OPT-175B, but not OPT-125M, whose
    # per-token cost is dominated by its 50k-word vocabulary.
    layout = analytic.PAPER_LAYOUTS[0]
    assert analytic.flop_savings(opt_config("opt-175b"), analytic.PAPER_LENGTH, layout, "chinchilla") == \
        pytest.approx(29, rel=PAPER_TOLERANCE)
    assert analytic.flop_savings(opt_config("opt-125m"), analytic.PAPER_LENGTH, layout, "chinchilla") < 250


def test_rmt_is_linear_and_full_attention_superlinear():
    config = opt_config("opt-1.3b")
    assert analytic.rmt_flops(config, 8192, 512, 32) == 2 * analytic.rmt_flops(config, 4096, 512, 32)
    # a partial last segment costs its real size
    assert analytic.rmt_flops(config, 700, 512) == analytic.forward_flops(config, 512) + analytic.forward_flops(config, 188)
    sweep = report.analytic_sweep()
    assert all(s["rmt_slope"] == pytest.approx(1.0, abs=1e-3) and s["full_slope"] > 1.4 for s in sweep.values())
    assert analytic.training_flops(10, "replay") == 40 and analytic.training_flops(10, "bptt") == 30


@pytest.mark.parametrize("embed_dim", [64, 32], ids=["opt-micro", "projected-embeddings"])
def test_measured_flops_match_the_analytic_terms_flopcounter_sees(embed_dim):
    """FlopCounterMode counts matmuls and SDPA: chinchilla-no-embed without the softmax term. The second case
    has OPT-350M's layout (embeddings narrower than the model, projected in and out)."""
    config = backbone_config("opt-micro", 256)
    config.word_embed_proj_dim = embed_dim
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    input_ids = torch.randint(config.vocab_size, (1, 256))
    with torch.no_grad():
        measured = counted_flops(model, input_ids)
    terms = analytic.forward_flop_terms(config, 256)
    assert measured == analytic.forward_flops(config, 256, "chinchilla-no-embed") - terms["attention_softmax"]


def test_loglog_slope_and_verdict():
    lengths = [512, 1024, 2048, 4096]
    assert report.loglog_slope(lengths, [n**2 for n in lengths]) == pytest.approx(2.0)
    flat = dict(train_flops=1.0, forward_flops=1.0, train_seconds=1.0, forward_seconds=1.0,
                train_peak_mb=0.0, forward_peak_mb=0.0)
    slopes = {"full attention": {**flat, "train_flops": 1.7}, "rmt-bptt": {**flat, "train_peak_mb": 1.0},
              "rmt-replay": dict(flat)}
    verdict = report.judge(slopes, flop_slope_limit=1.05, memory_slope_limit=0.15)
    assert verdict.passed and (verdict.rmt_flop_slope, verdict.full_flop_slope) == (1.0, 1.7)
    slopes["rmt-replay"] = {**flat, "train_flops": 1.2, "train_peak_mb": 0.5}
    failures = report.judge(slopes, 1.05, 0.15).failures
    assert len(failures) == 2 and "1.200 exceeds" in failures[0] and "rmt-replay" in failures[1]
    assert math.isnan(report.judge({"full attention": flat}, 1.05, 0.15).rmt_flop_slope)


@pytest.mark.parametrize("call", [
    lambda: opt_config("gpt2"),
    lambda: analytic.forward_flops(opt_config("opt-125m"), 0),
    lambda: analytic.forward_flops(opt_config("opt-125m"), 512, "palm"),
    lambda: analytic.rmt_flops(opt_config("opt-125m"), -5),
    lambda: analytic.rmt_flops(opt_config("opt-125m"), 1024, segment_size=0),
    lambda: analytic.training_flops(1, "adjoint"),
    lambda: backbone_config("no-such-model", 512),
    lambda: report.loglog_slope([512], [1.0]),
    lambda: report.loglog_slope([512, 1024], [0.0, 1.0]),
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()
