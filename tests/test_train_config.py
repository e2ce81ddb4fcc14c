"""Fast checks of the training configuration: flags, validation, resume compatibility, the baseline twin.
No process group is needed. (The batching tests below move to tests/test_batching.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rmt_scale.cli.train import EXIT_CONFIG_ERROR, exit_status
from rmt_scale.data import build_word_tokenizer
from rmt_scale.model import ARMTConfig, ConfigError, RMTConfig
from rmt_scale.training import (
    EXIT_DATA_ERROR,
    EXIT_DIVERGED,
    EXIT_PREEMPTED,
    DataError,
    Diverged,
    Preempted,
    TrainConfig,
    build_parser,
    parse_args,
    run,
)
from rmt_scale.training.trainer import backbone_setup, build_model

ROOT = Path(__file__).resolve().parents[1]


def test_help_documents_every_flag():
    text = build_parser().format_help()
    for flag in (
        "--backbone",
        "--num_mem_tokens",
        "--segment_size",
        "--task",
        "--shards",
        "--curriculum",
        "--eval_segments",
        "--out_dir",
        "--max_steps",
        "--resume",
        "--ds_config",
        "--save_every",
        "--baseline",
        "--no-baseline",
        "--memory {rmt,armt}",
        "--d_mem",
        "--num_heads",
        "--dpfp_nu",
        "--gating, --no-gating",
        "--write_gate",
        "--gated_normaliser, --no-gated_normaliser",
        "--correction, --no-correction",
        "--execution",
        "'tiny-bert'",
        "--memory_gate, --no-memory_gate",
    ):
        assert flag in text
    assert text.count("%(") == 0  # every help string rendered


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--curriculum", "4,2"], "must be increasing"),
        (["--eval_segments", "a,b"], "comma-separated positive integers"),
        (["--micro_batch_size", "0"], "--micro_batch_size=0 must be at least 1"),
        (["--task", "nope"], "--task='nope' is unknown"),
        (["--task", "lm"], "--task lm trains on documents: write shards with tools/make_shards.py --task lm"),
        (
            ["--task", "lm", "--shards", "d", "--lm_loss", "first"],
            "--lm_loss='first' is unknown: choose one of all, last",
        ),
        (["--eval_shards", "d"], "--eval_shards holds lm samples: use it with --task lm, or drop it"),
        (["--num_mem_tokens", "-1"], "num_mem_tokens=-1 is invalid: it must be an integer >= 0"),
        (["--backprop", "nope"], "backprop='nope' is unknown: choose one of bptt, checkpoint, replay"),
        (["--bptt_depth", "-2"], "bptt_depth=-2 is invalid"),
        (["--memory", "armt", "--num_mem_tokens", "0"], "num_mem_tokens=0 is invalid for ARMT: .* use at least 1"),
        (["--memory", "armt", "--d_mem", "0"], "d_mem=0 is invalid: it must be an integer >= 1"),
        (["--memory", "armt", "--num_heads", "0"], "num_heads=0 is invalid: it must be an integer >= 1"),
        (["--memory", "armt", "--dpfp_nu", "-1"], "dpfp_nu=-1 is invalid: it must be an integer >= 1"),
        (
            ["--memory", "armt", "--execution", "nope"],
            "execution='nope' is unknown: choose one of sequential, wavefront",
        ),
        (
            ["--memory", "rmt", "--d_mem", "32", "--no-gating"],
            r"--d_mem, --gating only apply to --memory armt: add --memory armt, or drop",
        ),
        (["--memory_gate"], r"--memory_gate only applies to --memory rmt: add --memory rmt, or drop it"),
        (["--curriculum_draw", "last"], "--curriculum_draw='last' is unknown: choose one of uniform, stage"),
        (["--micro_batch_tokens", "-1"], "--micro_batch_tokens=-1 must be 0 or more"),
        (
            ["--shards", "d", "--micro_batch_tokens", "1000"],
            "--micro_batch_tokens sizes a batch by its samples' length before reading them, which task shards fix",
        ),
    ],
)
def test_bad_flags_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("micro_batch_size", 0),
        ("task", "nope"),
        ("curriculum", "4,2"),
        ("eval_segments", "a,b"),
        ("warmup_steps", -1),
        ("lr", 0.0),
    ],
)
def test_a_config_built_in_python_fails_like_the_flag(flag, value):
    """``TrainConfig(...)`` checks its values when it is built, so ``run(TrainConfig(...))`` fails exactly as
    ``--flag value`` does: the same ConfigError, the same message."""
    with pytest.raises(ConfigError) as from_flag:
        parse_args([f"--{flag}", str(value)])
    with pytest.raises(ConfigError) as from_python:
        TrainConfig(**{flag: value})
    assert str(from_python.value) == str(from_flag.value)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("lr", "nan", "--lr=nan must be a finite number"),
        ("lr", "inf", "--lr=inf must be a finite number"),
        ("lr", "-1", "--lr=-1.0 must be positive"),
        ("grad_clip", "nan", "--grad_clip=nan must be a finite number"),
        ("grad_clip", "-1", r"--grad_clip=-1.0 must be 0 \(no clipping\) or more"),
        ("weight_decay", "inf", "--weight_decay=inf must be a finite number"),
        ("weight_decay", "-0.1", r"--weight_decay=-0.1 must be 0 \(no decay\) or more"),
        ("promote_accuracy", "nan", "--promote_accuracy=nan must be a finite number"),
        ("promote_accuracy", "-0.5", "--promote_accuracy=-0.5 must be an accuracy from 0 to 1, or above 1"),
        ("seed", "-1", "--seed=-1 must be 0 or more"),
        ("data_seed", "-1", "--data_seed=-1 must be 0 or more"),
        ("max_nonfinite_steps", "0", "--max_nonfinite_steps=0 must be at least 1"),
    ],
)
def test_numbers_out_of_range_name_their_flag(flag, value, message):
    """Issue 30, items 9 and 16: NaN passes every `<` and `>=` check, so a NaN lr, clip or threshold used to be
    accepted; a negative seed failed deep inside numpy."""
    with pytest.raises(ConfigError, match=f"^{message}"):
        parse_args([f"--{flag}", value])


def test_bptt_depth_names_both_allowed_forms():
    assert parse_args(["--bptt_depth", "-1"]).model.bptt_depth == -1
    assert parse_args(["--bptt_depth", "0"]).model.bptt_depth == 0
    with pytest.raises(ConfigError, match=r"bptt_depth=-5 is invalid: it must be -1 \(all transitions\) or an "):
        parse_args(["--bptt_depth", "-5"])


def test_help_names_the_baseline_switch_that_exists():
    """--help advertised --no_baseline, which argparse refuses: the switch is --no-baseline."""
    text = build_parser().format_help()
    assert "--no_baseline" not in text
    assert parse_args(["--no-baseline"]).baseline is False


def test_the_documented_tiny_bert_commands_start():
    """docs/training.md's encoder commands: `--backbone tiny-bert` alone meets the default --memory armt, which
    needs a decoder, so the documented command must say --memory rmt."""
    commands = [
        line.split()[2:]
        for line in (ROOT / "docs" / "training.md").read_text().splitlines()
        if line.startswith("python launchers/train.py --backbone tiny-bert")
    ]
    assert commands
    for argv in commands:
        config = parse_args(argv)
        backbone_setup(config.backbone, build_word_tokenizer(), config.model)


def test_run_checks_the_paths_before_any_work(tmp_path):
    (tmp_path / "notes.txt").write_text("not a directory\n")
    with pytest.raises(ConfigError, match="--backbone /nonexistent: no such directory"):
        run(TrainConfig(backbone="/nonexistent", out_dir=str(tmp_path / "out")))
    with pytest.raises(ConfigError, match=f"--shards {tmp_path}/notes.txt is a file, but neither"):
        run(TrainConfig(shards=str(tmp_path / "notes.txt"), out_dir=str(tmp_path / "out")))


@pytest.mark.parametrize(
    "backprop, offload, checked",
    [("sublinear", "disk", True), ("replay", "disk", True), ("sublinear", "cpu", False), ("bptt", "disk", False)],
)
def test_a_spill_directory_that_is_a_file_is_refused_where_states_are_spilled(tmp_path, backprop, offload, checked):
    """Only replay and sublinear backprop keep states, and only ``disk`` puts them in files."""
    (tmp_path / "notes.txt").write_text("not a directory\n")
    model = ARMTConfig(backprop=backprop, state_offload=offload, state_offload_dir=str(tmp_path / "notes.txt"))
    config = TrainConfig(model=model, out_dir=str(tmp_path / "out"))
    if checked:
        message = f"--state_offload_dir {tmp_path}/notes.txt is a file: pass a directory (it is created if missing)."
        with pytest.raises(ConfigError, match=re.escape(message)):
            config.check_paths()
    else:
        config.check_paths()
    config.model.state_offload_dir = str(tmp_path / "new" / "spills")
    config.check_paths()
    assert (tmp_path / "new" / "spills").is_dir() == checked


def test_the_backbone_is_checked_from_its_config_before_it_is_built(tmp_path):
    """Only the backbone's config.json is there: no weights are needed to refuse it."""
    import transformers

    transformers.OPTConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=32,
        max_position_embeddings=64,
    ).save_pretrained(tmp_path / "opt")
    tokenizer = build_word_tokenizer()
    with pytest.raises(ConfigError, match="the tokenizer has 233 tokens but the backbone embeds only 50"):
        backbone_setup(str(tmp_path / "opt"), tokenizer, RMTConfig(segment_size=16))
    with pytest.raises(ConfigError, match=r"a segment needs 136 positions .* lower segment_size to at most 112"):
        backbone_setup("tiny", tokenizer, RMTConfig(segment_size=120, num_mem_tokens=8))
    with pytest.raises(ConfigError, match="ARMT needs a decoder backbone, and 'bert' is an encoder"):
        backbone_setup("tiny-bert", tokenizer, ARMTConfig(segment_size=16))


def test_only_a_config_error_exits_2(capsys):
    """The launcher's mapping: a ConfigError is bad input (one line, exit 2); a ValueError raised inside the run
    (evaluation, checkpoint loading, torch) is a failure of the run and keeps its traceback."""

    def raising(error):
        def job():
            raise error

        return job

    assert exit_status(lambda: None) == 0
    assert exit_status(raising(ConfigError("--lr=0 must be positive."))) == EXIT_CONFIG_ERROR == 2
    assert capsys.readouterr().err == "error: --lr=0 must be positive.\n"
    assert exit_status(raising(DataError("sample 3 is corrupt"))) == EXIT_DATA_ERROR
    assert exit_status(raising(Preempted())) == EXIT_PREEMPTED
    assert exit_status(raising(Diverged("the run diverged"))) == EXIT_DIVERGED == 3
    assert capsys.readouterr().err.endswith("error: the run diverged\n")
    with pytest.raises(ValueError, match="mid-run"):
        exit_status(raising(ValueError("mid-run")))


def test_the_launchers_import_nothing_heavy_before_their_restart():
    """``rmt_scale.cli`` restarts the process under its allocator first: importing a launcher must not load torch
    (nor, through the package, DeepSpeed before the accelerator is chosen)."""
    program = (
        "import sys, rmt_scale, rmt_scale.cli.train, rmt_scale.cli.eval; "
        "print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == "[]"


def test_model_flags_fill_the_model_config():
    assert parse_args([]).model == ARMTConfig(
        num_mem_tokens=8, segment_size=32, backprop="bptt", bptt_depth=-1, correction=False
    )
    config = parse_args(
        [
            "--memory",
            "rmt",
            "--num_mem_tokens",
            "2",
            "--segment_size",
            "64",
            "--backprop",
            "replay",
            "--bptt_depth",
            "3",
            "--memory_gate",
            "--output_dir",
            "runs/x",
        ]
    )
    assert config.model == RMTConfig(
        num_mem_tokens=2, segment_size=64, backprop="replay", bptt_depth=3, memory_gate=True
    )
    assert config.out_dir == "runs/x"  # --output_dir is Hugging Face's name of --out_dir
    with pytest.raises(ConfigError, match="segment_size=0 is invalid"):
        TrainConfig(model=RMTConfig(segment_size=0))


def test_unknown_memory_kind_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(["--memory", "lstm"])
    assert stop.value.code == 2
    assert "argument --memory: invalid choice: 'lstm' (choose from 'rmt', 'armt')" in capsys.readouterr().err


def test_write_gate_flags_fill_the_armt_config():
    config = parse_args(["--write_gate", "clamp", "--gated_normaliser"])
    assert config.model.write_gate == "clamp" and config.model.gated_normaliser is True
    assert RMTConfig.from_dict(json.loads(config.to_json())["model"]) == config.model


def test_armt_flags_fill_an_armt_config_that_round_trips_through_train_config_json():
    config = parse_args(
        [
            "--memory",
            "armt",
            "--num_mem_tokens",
            "4",
            "--d_mem",
            "16",
            "--num_heads",
            "2",
            "--dpfp_nu",
            "2",
            "--no-gating",
            "--no-correction",
            "--execution",
            "wavefront",
        ]
    )
    assert config.memory == "armt"
    assert config.model == ARMTConfig(
        num_mem_tokens=4,
        segment_size=32,
        d_mem=16,
        num_heads=2,
        dpfp_nu=2,
        gating=False,
        correction=False,
        execution="wavefront",
    )
    saved = json.loads(config.to_json())
    assert saved["model"]["model_type"] == "armt" and saved["model"]["d_mem"] == 16
    restored = RMTConfig.from_dict(saved["model"])
    assert type(restored) is ARMTConfig and restored == config.model
    assert type(parse_args([]).model) is ARMTConfig  # --memory armt is the default
    config.check_resumable(saved)


def test_resume_checks_the_memory_kind_and_the_armt_fields():
    armt = TrainConfig(model=ARMTConfig(num_mem_tokens=8, segment_size=32))
    saved = json.loads(armt.to_json())
    with pytest.raises(ValueError, match=r"cannot resume: .*\(--memory 'armt' -> 'rmt'\)"):
        TrainConfig(model=RMTConfig(num_mem_tokens=8, segment_size=32)).check_resumable(saved)
    with pytest.raises(ValueError, match=r"--d_mem 64 -> 32; --gating True -> False"):
        TrainConfig(model=ARMTConfig(num_mem_tokens=8, segment_size=32, d_mem=32, gating=False)).check_resumable(saved)
    # the inference schedule and how gradients are computed may change
    TrainConfig(
        model=ARMTConfig(num_mem_tokens=8, segment_size=32, execution="wavefront", backprop="checkpoint")
    ).check_resumable(saved)


def test_baseline_twin_of_armt_is_a_plain_rmt_without_memory(tmp_path):
    config = TrainConfig(
        model=ARMTConfig(num_mem_tokens=4, segment_size=16, d_mem=8, backprop="replay"), out_dir=str(tmp_path)
    )
    twin = config.baseline_twin()
    assert type(twin.model) is RMTConfig
    assert twin.model == RMTConfig(num_mem_tokens=0, segment_size=16, backprop="replay")
    assert twin.memory == "rmt" and twin.out_dir == str(tmp_path / "baseline")


def test_launcher_refuses_a_bad_armt_flag_with_exit_code_2(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launchers" / "train.py"),
            "--memory",
            "armt",
            "--num_mem_tokens",
            "0",
            "--out_dir",
            str(tmp_path / "out"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: num_mem_tokens=0 is invalid for ARMT" in result.stderr
    assert not (tmp_path / "out").exists()


def test_launcher_stops_before_work_on_a_segment_that_does_not_fit(tmp_path):
    """The built-in backbone has 128 positions; 120 + 2 x 8 memory tokens (an RMT's read and write) do not fit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launchers" / "train.py"),
            "--memory",
            "rmt",
            "--segment_size",
            "120",
            "--out_dir",
            str(tmp_path / "out"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: a segment needs 136 positions" in result.stderr
    assert "lower segment_size to at most 112" in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_resume_refuses_other_settings():
    saved = json.loads(TrainConfig().to_json())
    TrainConfig(max_steps=999, eval_segments="1,32").check_resumable(saved)  # budget and evaluation may change
    with pytest.raises(ValueError, match=r"--num_mem_tokens 8 -> 4; --segment_size 32 -> 64"):
        TrainConfig(model=RMTConfig(num_mem_tokens=4, segment_size=64)).check_resumable(saved)


def test_resume_reads_flat_configs_of_older_checkpoints():
    """train_config.json from before TrainConfig held the model config has the model flags at the top."""
    rmt = TrainConfig(model=RMTConfig(num_mem_tokens=8, segment_size=32))  # the only memory of those checkpoints
    flat = json.loads(rmt.to_json())
    flat |= {name: flat["model"][name] for name in ("num_mem_tokens", "segment_size", "backprop", "bptt_depth")}
    del flat["model"]
    rmt.check_resumable(flat)
    TrainConfig(model=RMTConfig(num_mem_tokens=8, segment_size=32, backprop="replay", bptt_depth=2)).check_resumable(
        flat
    )  # how gradients are computed may change
    sublinear = RMTConfig(
        num_mem_tokens=8, segment_size=32, backprop="sublinear", state_keep_every=4, state_offload="disk"
    )
    TrainConfig(model=sublinear).check_resumable(flat)  # and where their states are kept
    with pytest.raises(ValueError, match=r"cannot resume: .*\(--segment_size 32 -> 16\)"):
        TrainConfig(model=RMTConfig(num_mem_tokens=8, segment_size=16)).check_resumable(flat)


def test_baseline_twin_has_no_memory_and_the_same_rest(tmp_path):
    config = TrainConfig(
        model=RMTConfig(num_mem_tokens=4, segment_size=16, bptt_depth=2),
        out_dir=str(tmp_path),
        resume="auto",
        max_steps=7,
    )
    twin = config.baseline_twin()
    assert twin.model == RMTConfig(num_mem_tokens=0, segment_size=16, bptt_depth=2)
    assert (twin.out_dir, twin.resume, twin.baseline, twin.max_steps) == (str(tmp_path / "baseline"), "auto", False, 7)
    saved = json.loads(twin.to_json())
    assert (saved["model"]["model_type"], saved["model"]["num_mem_tokens"]) == ("rmt", 0)


def test_tokenizer_larger_than_the_backbone_is_refused(tmp_path):
    import transformers

    small = transformers.OPTConfig(
        vocab_size=50,
        hidden_size=16,
        word_embed_proj_dim=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=32,
        max_position_embeddings=64,
    )
    transformers.OPTForCausalLM(small).save_pretrained(tmp_path / "opt")
    with pytest.raises(ValueError, match="the tokenizer has 233 tokens but the backbone embeds only 50"):
        build_model(str(tmp_path / "opt"), build_word_tokenizer(), 0, RMTConfig(segment_size=16))


def test_encoder_backbones_become_classifiers_over_the_answers(tmp_path):
    """tiny-bert and a saved BERT (whose own 3-class head is replaced) classify into the 6 locations, their
    segments framed with the built-in tokenizer's [CLS] and [SEP]."""
    import transformers

    tokenizer = build_word_tokenizer()
    model = build_model("tiny-bert", tokenizer, 0, RMTConfig(num_mem_tokens=4, segment_size=16))
    assert type(model.backbone).__name__ == "BertForSequenceClassification"
    assert (model.spec.kind, model.backbone.config.num_labels, model.backbone.config.vocab_size) == ("encoder", 6, 233)
    assert (model.config.cls_token_id, model.config.sep_token_id) == (tokenizer.cls_id, tokenizer.sep_id) == (232, 3)

    saved = transformers.BertConfig(
        vocab_size=240,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=3,
    )
    transformers.BertForSequenceClassification(saved).save_pretrained(tmp_path / "bert")
    model = build_model(str(tmp_path / "bert"), tokenizer, 0, RMTConfig(num_mem_tokens=2, segment_size=16))
    assert model.backbone.classifier.out_features == 6
    with pytest.raises(
        ConfigError,
        match=r"ARMT needs a decoder backbone, and 'bert' is an encoder: use an "
        r"RMTConfig \(--memory rmt\)",
    ):
        build_model("tiny-bert", tokenizer, 0, ARMTConfig(num_mem_tokens=4, segment_size=16))
