"""Bad input a new user gives (issue 30): each is refused before any work with one line naming the flag or file
and the fix, a ConfigError (exit 2 from the launchers)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

from rmt_scale import ARMTConfig, RecurrentMemoryModel
from rmt_scale.cli.make_shards import main as make_shards
from rmt_scale.data import TaskGenerator, build_word_tokenizer, filler_sentences, tokenizer_index_fields, write_shards
from rmt_scale.model import ConfigError
from rmt_scale.model.backbones import UnsupportedBackboneError, pretrained_config
from rmt_scale.model.presets import preset_config
from rmt_scale.model.recurrence import kept_at_peak
from rmt_scale.training import TrainConfig
from rmt_scale.training.evaluation import batch_bytes
from rmt_scale.training.trainer import backbone_setup, check_batch_memory
from support import ROOT
from support.runs import LAUNCHER, environment, launch, refused_in_one_line, run_args, scalars

SUPPORTED = r"Supported decoders: opt, gpt2, llama, mistral, qwen2, gpt_neox; encoders: bert, roberta\."


@pytest.fixture
def t5_dir(tmp_path):
    """A T5, which has no memory adapter, saved with a tokenizer like a user's pretrained backbone."""
    config = transformers.T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    build_word_tokenizer().save(str(tmp_path / "t5"))
    return tmp_path / "t5"


# ------------------------------------------------------------------------------------------ backbones
def test_an_unsupported_backbone_is_refused_from_its_config_first(t5_dir, tmp_path):
    with pytest.raises(UnsupportedBackboneError, match=f"architecture 't5' is not supported. {SUPPORTED}"):
        TrainConfig(backbone=str(t5_dir), out_dir=str(tmp_path / "out")).check_paths()
    # transformers' own answers list every model type it knows, or ask to upgrade it
    for name, config in [("no_type", '{"hidden_size": 4}'), ("unknown_type", '{"model_type": "t5x"}')]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
        with pytest.raises(UnsupportedBackboneError, match=f"{name}/config.json names no architecture.*{SUPPORTED}"):
            pretrained_config(tmp_path / name)


def test_a_backbone_directory_without_a_tokenizer_asks_for_one(backbone_dirs, tmp_path):
    """A backbone saved alone: AutoTokenizer would build an empty tokenizer of its family, or ask to install
    sentencepiece."""
    for family in ("opt", "llama"):
        with pytest.raises(ConfigError, match=f"{backbone_dirs[family]} has no tokenizer: pass --tokenizer"):
            TrainConfig(backbone=str(backbone_dirs[family]), out_dir=str(tmp_path / "out")).check_paths()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty has no tokenizer: pass --tokenizer \(a tokenizer directory, or"):
        TrainConfig(tokenizer=str(tmp_path / "empty"), out_dir=str(tmp_path / "out")).check_paths()
    TrainConfig(backbone=str(backbone_dirs["opt"]), tokenizer="builtin", out_dir=str(tmp_path / "out")).check_paths()


# ------------------------------------------------------------------------------------------ make_shards
def test_make_shards_refuses_bad_input_in_one_line_before_writing(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "image.png").write_bytes(bytes(range(128, 256)) * 8)
    (tmp_path / "image.txt").write_bytes(bytes(range(128, 256)) * 8)
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "out"
    base = ["--task", "memorize", "--out", str(out)]
    cases = {
        "--samples 0 must be at least 1.": ["--samples", "0", "--tokens", "100"],
        "--samples -3 must be at least 1.": ["--samples", "-3", "--tokens", "100"],
        "--tokens 100 0 must be at least 1.": ["--samples", "1", "--tokens", "100", "0"],
        "--tokens 5 is too short: the facts, question and answer of some memorize samples take 11 tokens; ask for "
        "at least 11.": ["--samples", "1", "--tokens", "5"],
        f"{tmp_path}/missing.txt does not exist": ["--background", str(tmp_path / "missing.txt")],
        f"{tmp_path}/empty.txt is empty": ["--background", str(tmp_path / "empty.txt")],
        f"{tmp_path}/image.txt is not UTF-8 text": ["--background", str(tmp_path / "image.txt")],
        f"{tmp_path}/image.png is neither .txt, .jsonl": ["--background", str(tmp_path / "image.png")],
        f"--out {tmp_path}/a_file is a file: pass a directory": ["--out", str(tmp_path / "a_file")],
    }
    for message, flags in cases.items():
        flags = flags if "--samples" in flags else ["--samples", "1", "--tokens", "100", *flags]
        assert make_shards([*base, *flags]) == 2, message
        err = capsys.readouterr().err
        assert err == f"error: {message}\n" if message.endswith(".") else err.startswith(f"error: {message}"), err
        assert err.count("\n") == 1
    assert not out.exists()


def test_make_shards_warns_when_the_tokenizer_does_not_know_the_background(tmp_path, capsys):
    (tmp_path / "book.txt").write_text("Der Regen fiel auf den Hafen. Das Schiff wartete. " * 40)
    flags = ["--task", "detect", "--samples", "1", "--tokens", "200", "--background", str(tmp_path / "book.txt")]
    assert make_shards([*flags, "--out", str(tmp_path / "out")]) == 0
    assert re.search(
        r"warning: tokenizer builtin reads \d\d% of the background's tokens as \[UNK\]: pass --tokenizer with one "
        r"that knows the text",
        capsys.readouterr().err,
    )
    (tmp_path / "book.txt").write_text(" ".join(filler_sentences(200)))
    assert make_shards([*flags, "--out", str(tmp_path / "known")]) == 0
    assert "warning" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ memory
def test_batches_that_cannot_fit_are_refused_with_the_estimate_and_the_flag(tmp_path):
    tokenizer = build_word_tokenizer()
    cpu = torch.device("cpu")
    cases = {
        r"a step of --micro_batch_size 100000000 on the longest --curriculum stage, 4 segments, with --backprop "
        r"bptt needs at least \d+\.\d GiB \(its tokens, 4 segments' activations and 4 states\) but this "
        r"host has \d+\.\d GiB available: use --backprop sublinear \(about 2 sqrt\(segments\) states\), "
        r"--state_offload cpu or disk, or lower --micro_batch_size or the sample length\.": TrainConfig(
            micro_batch_size=10**8
        ),
        # one sample (--eval_max_tokens) of 32 billion tokens
        r"--eval_segments 1000000000 with --eval_batch_size 1 needs at least .*: lower --eval_segments or "
        r"--eval_batch_size\.": TrainConfig(eval_segments="1,1000000000"),
    }
    for message, config in cases.items():
        backbone_config, _ = backbone_setup(config.backbone, tokenizer, config.model)
        with pytest.raises(ConfigError, match=message):
            check_batch_memory(config, backbone_config, 1, cpu, {})
    backbone_config, _ = backbone_setup("tiny", tokenizer, TrainConfig().model)
    check_batch_memory(TrainConfig(), backbone_config, 1, cpu, {})  # the quick start's
    assert batch_bytes(2, 100, 4, 20, 8, layers=3, logits=50) == (4 * 100 * 4, 2 * (20 * 8 * 3 * 32 + 4 * 50))


def test_what_each_backprop_mode_keeps_at_its_peak():
    last_only = [False] * 99 + [True]
    assert kept_at_peak("bptt", last_only) == (100, 100, 0)
    assert kept_at_peak("bptt", last_only, bptt_depth=3) == (4, 4, 0)  # the last segment and the 3 it reaches back
    assert kept_at_peak("checkpoint", last_only) == (1, 100, 0)
    assert kept_at_peak("replay", last_only) == (1, 100, 0)
    assert kept_at_peak("sublinear", last_only) == (1, 10, 10)  # k = 10: 10 block starts, one block recomputed
    assert kept_at_peak("sublinear", last_only, keep_every=25) == (1, 4, 25)
    assert kept_at_peak("sublinear", last_only, bptt_depth=30) == (1, 4, 10)  # blocks 6-9 reach the labels


def test_the_default_launcher_on_million_token_shards_stops_with_the_estimate_and_the_fix(tmp_path):
    """Issue 26: the launcher's defaults (ARMT, bptt, 16 samples a micro-batch) on 1M-token samples would grow
    past any host's memory; checkpoint and replay keep every segment's ARMT state. Each is refused before any
    work with what it needs; sublinear backprop passes the same check."""
    shards = tmp_path / "shards"
    flags = ["--task", "memorize", "--tokens", "1000000", "--samples", "1", "--out", str(shards)]
    assert make_shards(flags) == 0
    assert json.loads((shards / "index.json").read_text())["max_sample_tokens"] == 1_000_000
    train = [sys.executable, LAUNCHER, "--shards", str(shards), "--segment_size", "100", "--out_dir", str(tmp_path)]
    refused = subprocess.run(train, env=environment(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert re.fullmatch(
        r"error: a step of --micro_batch_size 16 on --shards' longest sample \(1,000,000 tokens\), 10,000 segments, "
        r"with --backprop bptt needs at least (\d+)\.\d GiB \(its tokens, 10,000 segments' activations and 10,000 "
        r"states\) but this host has .* GiB available: use --backprop sublinear .*\n",
        refused.stderr.splitlines(keepends=True)[-1],
    ), refused.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()
    tokenizer = build_word_tokenizer()
    cpu = torch.device("cpu")
    for mode in ("checkpoint", "replay"):  # 10,000 states of 0.4 MB for each of 16 samples
        config = TrainConfig(shards=str(shards), model=replace(TrainConfig().model, segment_size=100, backprop=mode))
        backbone_config, _ = backbone_setup(config.backbone, tokenizer, config.model)
        with pytest.raises(ConfigError, match=f"--backprop {mode} needs at least .* 10,000 states"):
            check_batch_memory(config, backbone_config, 1, cpu, {})
    model = replace(TrainConfig().model, segment_size=100, backprop="sublinear", state_offload="disk")
    config = TrainConfig(shards=str(shards), model=model)
    check_batch_memory(config, backbone_config, 1, cpu, {})  # 200 states, on disk


@pytest.mark.slow
def test_a_micro_batch_larger_than_the_shards_is_named_with_the_fix(tmp_path):
    """Issue 26's 66-minute RMT step: a 2-sample shard under the default --micro_batch_size 16 trains 16 samples a
    step (the stream runs on into the next epochs), 8 times what --micro_batch_size 2 trains."""
    shards = tmp_path / "shards"
    assert make_shards(["--task", "memorize", "--tokens", "64", "--samples", "2", "--out", str(shards)]) == 0
    out = tmp_path / "run"
    train = [sys.executable, LAUNCHER, "--shards", str(shards), "--memory", "rmt", "--max_steps", "1",
             "--eval_segments", "1", "--eval_samples", "2", "--no-baseline", "--out_dir", str(out)]  # fmt: skip
    result = subprocess.run(train, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "[rmt] note: a step takes up to 16 samples (--micro_batch_size 16 x --grad_accum 1 x 1 replica(s)) from "
        "--shards' 2, so each step reads them several times; --micro_batch_size 2 reads each at most once a step"
    ) in result.stdout
    assert scalars(out)["train/micro_batch_size"] == [(1, 16)]


# ------------------------------------------------------------------------------------------ plot_results
def test_plot_results_refuses_to_merge_tasks(tmp_path):
    run, evaluation = tmp_path / "memorize-armt", tmp_path / "eval-detect"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({"task": "memorize"}))
    results = {"accuracy": {"armt": {"1": 1.0}}, "segment_size": 32, "train_segments": 4, "eval_samples": {"1": 8}}
    (run / "results.json").write_text(json.dumps(results))
    evaluation.mkdir()
    (evaluation / "eval.json").write_text(json.dumps({"task": "detect", "segment_size": 32, "accuracy": {"4": 0.5}}))
    plotted = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plot_results.py"), str(run), str(evaluation), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert plotted.returncode == 2, plotted.stderr
    assert plotted.stderr == (
        "error: the runs are of different tasks (memorize: memorize-armt; detect: eval-detect): plot one task at "
        "a time.\n"
    )
    assert not list(tmp_path.glob("*_by_length.*"))


# ------------------------------------------------------------------------------------------ the launchers
NOISE = ("built successfully", "before it has started", "FutureWarning", "deprecated")


def export(directory: Path, **config) -> Path:
    """A small exported ARMT with its tokenizer, as a run's export/ holds them."""
    tokenizer = build_word_tokenizer()
    backbone = transformers.AutoModelForCausalLM.from_config(
        preset_config("test-opt", vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    )
    RecurrentMemoryModel(backbone, ARMTConfig(num_mem_tokens=4, segment_size=16, d_mem=4, **config)).save_pretrained(
        directory
    )
    tokenizer.save(str(directory / "tokenizer"))
    return directory


@pytest.mark.slow
def test_launchers_refuse_bad_input_in_one_line_before_any_work(tmp_path, t5_dir, backbone):
    """Each case is the real launcher in its own process (all at once, to keep the test short)."""
    ddp = json.loads((ROOT / "ds_configs" / "ddp.json").read_text())
    (tmp_path / "list.json").write_text("[]")
    ddp["optimizer"]["params"]["lr"] = "banana"
    (tmp_path / "banana.json").write_text(json.dumps(ddp))
    shards = tmp_path / "shards"
    builtin = build_word_tokenizer()
    generator = TaskGenerator("memorize", builtin)
    write_shards([generator.sample(0, 32)], str(shards), extra_index=tokenizer_index_fields(builtin, "builtin"))
    build_word_tokenizer(extra_words=["zebra"]).save(str(tmp_path / "zebra"))
    edited = export(tmp_path / "edited")
    config = edited / "rmt_config.json"
    config.write_text(config.read_text().replace('"num_mem_tokens": 4', '"num_mem_tokens": 6'))
    incomplete = export(tmp_path / "incomplete")
    (incomplete / "memory.safetensors").unlink()
    model = export(tmp_path / "model")
    train = [sys.executable, LAUNCHER, "--out_dir", str(tmp_path / "out")]
    evaluate = [sys.executable, str(ROOT / "launchers" / "eval.py"), "--out", str(tmp_path / "eval")]
    cases = {
        "architecture 't5' is not supported. Supported decoders: opt, gpt2": [*train, "--backbone", str(t5_dir)],
        f"{backbone} has no tokenizer: pass --tokenizer (a tokenizer directory, or builtin).": [
            *train,
            "--backbone",
            str(backbone),
        ],
        f"--ds_config='{tmp_path}/list.json' holds a JSON array, not an object": [
            *train,
            "--ds_config",
            str(tmp_path / "list.json"),
        ],
        "optimizer.params.lr='banana' in --ds_config": [*train, "--ds_config", str(tmp_path / "banana.json")],
        f"--shards {shards} were made with tokenizer builtin, this run uses {tmp_path}/zebra: pass --tokenizer "
        f"{shards}/tokenizer": [*train, "--shards", str(shards), "--tokenizer", str(tmp_path / "zebra")],
        "a step of --micro_batch_size 100000000 on the longest --curriculum stage, 4 segments, with --backprop bptt "
        "needs at least": [*train, "--micro_batch_size", "100000000"],
        f"{edited}/memory.safetensors does not fit {config}": [*evaluate, "--model", str(edited)],
        f"{incomplete}/memory.safetensors does not exist": [*evaluate, "--model", str(incomplete)],
        "--eval_segments 1000000000 with --batch_size 16 needs at least": [
            *evaluate,
            "--model",
            str(model),
            "--eval_segments",
            "1,1000000000",
        ],
    }
    # each its own --out_dir: a run that passed the path checks holds its directory's lock while it checks the rest
    for index, command in enumerate(cases.values()):
        if command[:2] == train[:2]:
            command[3] = str(tmp_path / f"out-{index}")
    refused_in_one_line(cases)
    assert not list(tmp_path.glob("out-*/checkpoints")) and not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_eval_takes_comma_lists_and_writes_outside_the_model_directory(tmp_path, backbone):
    """Its default output is runs/eval/NAME of the working directory: evaluating a checkpoint kept in a repository
    leaves it as it was. Neither launcher prints what the user cannot act on."""
    model = export(tmp_path / "armt-memorize")
    before = sorted(path.name for path in model.rglob("*"))
    evaluated = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "eval.py"), "--model", str(model), "--eval_segments", "1,2", "4"],
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert sorted(path.name for path in model.rglob("*")) == before
    result = json.loads((tmp_path / "runs" / "eval" / "armt-memorize" / "eval.json").read_text())
    assert sorted(result["accuracy"]) == ["1", "2", "4"]
    trained = launch(run_args(backbone, tmp_path / "run", max_steps=2), ranks=1)
    for output in (evaluated.stdout + evaluated.stderr, trained.stdout + trained.stderr):
        assert not [noise for noise in NOISE if noise in output], output
