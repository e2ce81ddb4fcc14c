"""Real DeepSpeed runs on CPU (gloo, 2 ranks where it matters, a few steps of a tiny model): loss
equivalence across rank counts and ZeRO stages, TensorBoard events, checkpoints, exact resume after
SIGKILL, a graceful stop on SIGUSR1, the exported model, and ARMT and encoder runs with their baselines."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from rmt_scale import ARMTConfig, RecurrentMemoryModel, RMTConfig
from rmt_scale.data import load_tokenizer
from rmt_scale.training.distributed import free_port
from rmt_scale.training.trainer import EXIT_PREEMPTED
from support import ROOT
from support.runs import (
    LAUNCHER,
    LOSS_TOLERANCE,
    SEGMENT,
    environment,
    exported_accuracy,
    launch,
    losses,
    run_args,
    scalars,
)

pytestmark = pytest.mark.slow


def shm_buffers() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def test_ranks_and_zero_stages_follow_the_same_losses(backbone, cpu_adam_built, tmp_path):
    """1 rank x batch 4, 2 ranks x batch 2 (no ZeRO) and 2 ranks x batch 2 (the shipped zero3.json, unchanged:
    offload, checkpointing, DeepSpeed CPU Adam) see the same samples and must give the same losses; the
    ZeRO-3 run's logs, checkpoints and export are then read back."""
    shm_buffers_before = shm_buffers()
    one = tmp_path / "one"
    launch(run_args(backbone, one, micro_batch_size=4, ds_config=ROOT / "ds_configs" / "ddp.json"), ranks=1)
    two = tmp_path / "two"
    launch(run_args(backbone, two, ds_config=ROOT / "ds_configs" / "ddp.json"), ranks=2)
    zero3 = tmp_path / "zero3"
    launch(run_args(backbone, zero3, ds_config=ROOT / "ds_configs" / "zero3.json", save_every=2), ranks=2)
    # DeepSpeed's shared-memory allreduce buffers (64 MiB of RAM per rank) are gone with the runs
    assert shm_buffers() <= shm_buffers_before

    reference = losses(one)
    assert sorted(reference) == [1, 2, 3, 4]
    assert reference[4] < reference[1]  # it trains
    for other in (two, zero3):
        observed = losses(other)
        difference = max(abs(observed[step] - reference[step]) for step in reference)
        assert difference < LOSS_TOLERANCE, (other.name, observed, reference)

    # TensorBoard: every scalar the issue lists, at every step, readable by tensorboard's own reader
    logged = scalars(zero3)
    for tag in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "curriculum/stage_segments",
        "perf/tokens_per_s",
        "perf/peak_memory_mb",
        "memory/state_norm",
        "eval/accuracy_1seg",
        "eval/accuracy_4seg",
    ):
        assert tag in logged, sorted(logged)
    assert [step for step, _ in logged["train/loss"]] == [1, 2, 3, 4]
    for step, value in logged["train/loss"]:
        assert value == pytest.approx(losses(zero3)[step], abs=1e-6)
    assert all(value > 0 for _, value in logged["train/grad_norm"])
    assert all(value > 0 for _, value in logged["perf/tokens_per_s"])
    assert [step for step, _ in logged["eval/accuracy_2seg"]] == [2, 4]
    assert [step for step, _ in logged["eval/accuracy_4seg"]] == [4]  # past the curriculum: at the end only

    # checkpoints: both ranks' states in complete, renamed directories; 'latest' names the last
    checkpoints = zero3 / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step000004"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step000002", "step000004"]
    state = torch.load(checkpoints / "step000002" / "trainer_state_rank1.pt", weights_only=False)
    assert state["step"] == 2 and state["data"]["position"] == 2 * 4
    assert state["curriculum"]["stages"] == [1, 2]
    assert any(p.name.startswith("zero_pp_rank_1") for p in (checkpoints / "step000002").iterdir())

    # the ZeRO-3 export is a plain save_pretrained directory whose accuracy matches the run's evaluation
    results = json.loads((zero3 / "results.json").read_text())["accuracy"]["rmt"]
    for segments in (1, 4):
        assert exported_accuracy(zero3 / "export", segments) == pytest.approx(results[str(segments)])


def test_resume_after_sigkill_is_exact(backbone, tmp_path):
    steps = 10
    straight = tmp_path / "straight"
    launch(run_args(backbone, straight, max_steps=steps, curriculum="1,2,4", stage_steps=3), ranks=1)

    killed = tmp_path / "killed"
    args = run_args(backbone, killed, max_steps=steps, curriculum="1,2,4", stage_steps=3, save_every=4)
    process = subprocess.Popen(
        [sys.executable, LAUNCHER, *args],
        env=environment(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not (latest.is_file() and latest.read_text() == "step000004"):
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = max(losses(killed))
    assert killed_at < steps

    launch([*args, "--resume", "auto"], ranks=1)
    reference, resumed = losses(straight), losses(killed)
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert abs(resumed[step] - reference[step]) < 1e-6, (step, resumed[step], reference[step])
    # the resumed TensorBoard log holds each step once (a killed run's extra events are purged)
    assert [step for step, _ in scalars(killed)["train/loss"]] == list(range(1, steps + 1))
    assert (
        json.loads((killed / "results.json").read_text())["accuracy"]
        == json.loads((straight / "results.json").read_text())["accuracy"]
    )


def test_sigusr1_stops_all_ranks_with_a_checkpoint(backbone, tmp_path):
    """Two ranks started like srun does (RANK/WORLD_SIZE/MASTER_* set). Only rank 1 gets SIGUSR1; both ranks
    agree to stop after the current step, write a checkpoint and exit with EXIT_PREEMPTED; --resume auto
    then finishes the run."""
    out = tmp_path / "run"
    args = run_args(backbone, out, max_steps=400, eval_every=1000)
    port = str(free_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, LAUNCHER, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for r in range(2)
    ]
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert all(p.poll() is None for p in ranks) and time.time() < deadline, "the run did not start"
        time.sleep(0.05)
    ranks[1].send_signal(signal.SIGUSR1)
    codes = [p.wait(timeout=120) for p in ranks]
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], [p.stderr.read()[-2000:] for p in ranks]
    stopped_at = max(losses(out))
    assert 3 <= stopped_at < 400
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest == f"step{stopped_at:06d}"
    assert {p.name for p in (out / "checkpoints" / latest).glob("trainer_state_rank*.pt")} == {
        "trainer_state_rank0.pt",
        "trainer_state_rank1.pt",
    }

    launch(run_args(backbone, out, max_steps=stopped_at + 2, eval_every=1000) + ["--resume", "auto"], ranks=2)
    assert sorted(losses(out)) == list(range(1, stopped_at + 3))


def test_baseline_twin_and_accuracy_table(backbone, tmp_path):
    """The default --baseline trains a no-memory twin with the same budget and prints both in one table, with
    the samples of each length: fewer where --eval_samples would read more than --eval_max_tokens."""
    out = tmp_path / "run"
    result = launch(run_args(backbone, out, max_steps=2, eval_every=2, eval_max_tokens=32) + ["--baseline"], ranks=1)
    summary = json.loads((out / "results.json").read_text())
    assert sorted(summary["accuracy"]) == ["baseline", "rmt"]
    assert summary["allocator"] == "jemalloc"  # the launcher restarted itself under it (tools/test.sh installs it)
    assert sorted(summary["accuracy"]["baseline"]) == ["1", "2", "4"]
    assert summary["eval_samples"] == {"1": 2, "2": 1, "4": 1}
    assert "| segments | tokens | rmt | baseline | samples |" in result.stdout
    assert re.search(r"\| 1 \| 16 \| [01]\.\d{3} \| [01]\.\d{3} \| 2 \|", result.stdout), result.stdout
    assert re.search(r"\| 4 \(extrapolation\) \| 64 \| [01]\.\d{3} \| [01]\.\d{3} \| 1 \|", result.stdout)
    twin = json.loads((out / "baseline" / "train_config.json").read_text())
    assert twin["model"]["num_mem_tokens"] == 0 and twin["max_steps"] == 2
    assert (out / "baseline" / "checkpoints" / "latest").read_text() == "step000002"
    assert "memory/state_norm" not in scalars(out / "baseline")
    assert RecurrentMemoryModel.from_pretrained(out / "baseline" / "export").memory is None

    # tools/plot_results.py turns the run into curves (tokens, accuracy, samples) and a PNG named by its task
    plotted = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plot_results.py"), str(out), "--out", str(tmp_path)],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plotted.returncode == 0, plotted.stderr[-2000:]
    curves = {c["model"]: c for c in json.loads((tmp_path / "memorize_by_length.json").read_text())}
    assert curves["rmt"]["points"] == [
        [SEGMENT * int(n), summary["accuracy"]["rmt"][n], summary["eval_samples"][n]] for n in ("1", "2", "4")
    ]
    assert (tmp_path / "memorize_by_length.png").stat().st_size > 10_000


def test_launcher_trains_armt_and_its_baseline(backbone, tmp_path):
    """--memory armt trains an ARMT with the flags' settings and its no-memory twin; the export loads as an
    ARMT whose streaming accuracy is the run's own."""
    out = tmp_path / "run"
    # steps of 1..4 segments: the memory is written, and read by the next segment, from the first steps
    args = run_args(
        backbone, out, memory="armt", d_mem=8, num_heads=2, dpfp_nu=2, curriculum="4", max_steps=4, eval_every=4
    )
    result = launch(args + ["--baseline"], ranks=1)
    summary = json.loads((out / "results.json").read_text())["accuracy"]
    assert sorted(summary) == ["armt", "baseline"]
    assert sorted(summary["armt"]) == sorted(summary["baseline"]) == ["1", "2", "4"]
    assert "| segments | tokens | armt | baseline |" in result.stdout
    assert json.loads((out / "train_config.json").read_text())["model"]["model_type"] == "armt"

    model = RecurrentMemoryModel.from_pretrained(out / "export")
    assert type(model.config) is ARMTConfig and model.associative is not None
    assert (model.config.d_mem, model.config.num_heads, model.config.dpfp_nu) == (8, 2, 2)
    baseline = RecurrentMemoryModel.from_pretrained(out / "baseline" / "export")
    assert type(baseline.config) is RMTConfig and baseline.memory is None and baseline.associative is None
    for segments in (1, 4):
        assert exported_accuracy(out / "export", segments) == pytest.approx(summary["armt"][str(segments)])
    # the associative matrices stay zero until W_v, zero at init (the model is then its backbone), is trained
    # (the first step's learning rate is 0)
    norms = [value for _, value in scalars(out)["memory/state_norm"]]
    assert len(norms) == 4 and norms[0] == 0 and norms[-1] > 0


def test_a_frozen_backbone_trains_only_the_memory_and_no_twin(backbone, tmp_path):
    """--freeze_backbone: the exported backbone is the loaded one, bit for bit, while ARMT's associative layers
    (W_v zero at init) have trained; --baseline trains no twin, whose place the backbone itself takes."""
    out = tmp_path / "run"
    args = run_args(backbone, out, memory="armt", d_mem=8, curriculum="2", max_steps=3, eval_every=3)
    launch(args + ["--baseline", "--freeze_backbone"], ranks=1)
    assert sorted(json.loads((out / "results.json").read_text())["accuracy"]) == ["armt"]
    assert not (out / "baseline").exists()
    model = RecurrentMemoryModel.from_pretrained(out / "export")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(backbone).state_dict()
    assert all(torch.equal(tensor, loaded[name]) for name, tensor in model.backbone.state_dict().items())
    assert all(memory.value.weight.abs().sum() > 0 for memory in model.associative.memories)


def test_armt_under_the_shipped_zero3_config_follows_one_rank(backbone, cpu_adam_built, tmp_path):
    """The brief's command with the default memory (ARMT): zero3.json's activation_checkpointing block becomes
    per-segment checkpointing (ARMT's layers stay whole), and 2 ranks follow 1 rank at twice the batch."""
    one = tmp_path / "one"
    launch(
        run_args(backbone, one, memory="armt", micro_batch_size=4, ds_config=ROOT / "ds_configs" / "ddp.json"), ranks=1
    )
    zero3 = tmp_path / "zero3"
    launch(run_args(backbone, zero3, memory="armt", ds_config=ROOT / "ds_configs" / "zero3.json"), ranks=2)
    reference, observed = losses(one), losses(zero3)
    assert max(abs(observed[step] - reference[step]) for step in reference) < LOSS_TOLERANCE, (observed, reference)
    assert json.loads((zero3 / "train_config.json").read_text())["model"]["model_type"] == "armt"


@pytest.mark.parametrize(
    "memory, runs", [("armt", [("zero3", "sublinear"), ("zero2", "replay")]), ("rmt", [("zero3", "sublinear")])]
)
def test_replay_and_sublinear_under_zero2_and_zero3_follow_one_rank(backbone, cpu_adam_built, tmp_path, memory, runs):
    """The bounded-memory modes under ZeRO: their backward hands each parameter's gradient on once, so ZeRO-2's
    and ZeRO-3's reduction hooks see it once, and 2 ranks follow 1 rank at twice the batch under bptt. Chains of
    up to 4 segments, sublinear's blocks of 2; the RMT under zero3.json also checkpoints the backbone's layers
    inside each replayed segment, their inputs offloaded."""
    flags = dict(memory=memory, curriculum="4", state_keep_every=2)
    one = tmp_path / "one"
    launch(run_args(backbone, one, micro_batch_size=4, ds_config=ROOT / "ds_configs" / "ddp.json", **flags), ranks=1)
    reference = losses(one)
    for config, mode in runs:
        out = tmp_path / f"{config}-{mode}"
        launch(run_args(backbone, out, backprop=mode, ds_config=ROOT / "ds_configs" / f"{config}.json", **flags), 2)
        observed = losses(out)
        assert max(abs(observed[step] - reference[step]) for step in reference) < LOSS_TOLERANCE, (mode, observed)
        assert all(kept > 0 for _, kept in scalars(out)["memory/state_kept_bytes"])


def test_launcher_trains_an_encoder_classifier_and_its_baseline(tmp_path):
    """--backbone tiny-bert: a BERT sequence classifier over the 6 answers, [CLS] memory [SEP] segment [SEP],
    here with the gated memory update, and its no-memory twin; the exports load as encoders whose streaming
    accuracy is the run's own."""
    out = tmp_path / "run"
    result = launch(run_args("tiny-bert", out, max_steps=3, eval_every=3, memory_gate=True) + ["--baseline"], ranks=1)
    summary = json.loads((out / "results.json").read_text())["accuracy"]
    assert sorted(summary) == ["baseline", "rmt"]
    assert sorted(summary["rmt"]) == sorted(summary["baseline"]) == ["1", "2", "4"]
    assert "| segments | tokens | rmt | baseline |" in result.stdout
    losses_logged = losses(out)
    assert sorted(losses_logged) == [1, 2, 3] and all(value > 0 for value in losses_logged.values())

    tokenizer = load_tokenizer(str(out / "export" / "tokenizer"))
    for export, memory in ((out / "export", 4), (out / "baseline" / "export", 0)):
        model = RecurrentMemoryModel.from_pretrained(export)
        assert type(model.backbone).__name__ == "BertForSequenceClassification"
        assert model.backbone.config.num_labels == 6 and model.config.num_mem_tokens == memory
        assert (model.config.cls_token_id, model.config.sep_token_id) == (tokenizer.cls_id, tokenizer.sep_id)
        assert (model.memory_gate is not None) == bool(memory)  # the twin has no memory to gate
    for segments in (1, 4):
        assert exported_accuracy(out / "export", segments, classes=True) == pytest.approx(summary["rmt"][str(segments)])
        assert exported_accuracy(out / "baseline" / "export", segments, classes=True) == pytest.approx(
            summary["baseline"][str(segments)]
        )
