"""Issue 30, wrong numbers: the learning rate a step really trains at (item 7) and runs whose loss is not finite
(item 9), checked against DeepSpeed's own scheduler and with real launcher runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from rmt_scale.training import EXIT_DIVERGED, TrainConfig, build_ds_config, load_ds_config
from rmt_scale.training.distributed import free_port
from rmt_scale.training.engine import align_scheduler
from support.runs import DEEPSPEED, LAUNCHER, environment, launch, run_args

LR = 1e-3


def expected_lr(step: int, warmup: int, max_steps: int) -> float:
    """Linear warmup (step s of W at lr s/W), then linear decay reaching 0 one step after the last."""
    warmup = max(warmup, 1)
    if step < warmup:
        return LR * step / warmup
    return LR * (max_steps + 1 - step) / (max_steps + 1 - warmup)


@pytest.mark.parametrize("warmup", [0, 1, 2, 4])
def test_step_s_trains_at_the_schedules_lr_for_step_s(warmup):
    """DeepSpeed's WarmupDecayLR as the trainer sets it up: the lr in the optimizer when step s runs. Unaligned,
    steps 1 and 2 trained at lr 0 (construction sets the warmup's min lr, and its iteration 0 is 0 too)."""
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    max_steps = 10
    ds = build_ds_config(
        load_ds_config("ds_configs/ddp.json"), TrainConfig(lr=LR, warmup_steps=warmup, max_steps=max_steps), 1
    )
    assert ds["scheduler"]["type"] == "WarmupDecayLR"
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = WarmupDecayLR(optimizer, **ds["scheduler"]["params"])
    align_scheduler(SimpleNamespace(lr_scheduler=scheduler), ds)
    applied = []
    for _ in range(max_steps):
        applied.append(optimizer.param_groups[0]["lr"])
        scheduler.step()  # as DeepSpeed's engine does after each optimizer step
    assert applied == pytest.approx([expected_lr(s, warmup, max_steps) for s in range(1, max_steps + 1)])
    assert min(applied) > 0


def read_metrics(out: Path) -> list[dict]:
    """metrics.jsonl, refusing the NaN and Infinity tokens Python's json would otherwise accept."""

    def refuse(token):
        raise ValueError(f"metrics.jsonl holds {token}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]


def trained_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    """The backbone's weights in the checkpoint of ``step`` (one rank: one file holds the whole module)."""
    state = torch.load(
        out / "checkpoints" / f"step{step:06d}" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    return {name.removeprefix("backbone."): w for name, w in state["module"].items() if name.startswith("backbone.")}


@pytest.mark.slow
def test_warmup_0_trains_step_1_at_the_full_lr_and_logs_the_lr_each_step_used(backbone, tmp_path):
    """Issue 30, item 7: with --warmup_steps 0 the weights did not change at step 1 (nor 2), yet step 2 logged
    5e-4. AdamW's first update moves every weight whose gradient is not 0 by lr (m/sqrt(v) = sign(g)), so the
    largest change of a weight at step 1 is the lr step 1 trained at; each later step's change is bounded by its
    lr too (|m/sqrt(v)| <= 1 for beta1 <= sqrt(beta2), as in ds_configs/ddp.json: 0.9 <= sqrt(0.95))."""
    out = tmp_path / "run"
    launch(run_args(backbone, out, warmup_steps=0, max_steps=3, save_every=1, keep_checkpoints=3, lr=LR), ranks=1)
    logged = {r["step"]: r["train/lr"] for r in read_metrics(out) if "train/lr" in r}
    assert logged == pytest.approx({s: expected_lr(s, 0, 3) for s in (1, 2, 3)})
    before = load_file(backbone / "model.safetensors")
    weights = [before] + [trained_weights(out, step) for step in (1, 2, 3)]
    moved = [max((b[n] - a[n]).abs().max().item() for n in a) for a, b in zip(weights, weights[1:])]
    assert moved[0] == pytest.approx(logged[1], rel=1e-3)
    for step in (2, 3):
        assert 0 < moved[step - 1] <= logged[step] * 1.001


@pytest.mark.slow
@pytest.mark.parametrize("ds_config, ranks", [("ddp", 1), ("zero2", 1), ("ddp", 2)])
def test_a_diverged_run_skips_its_non_finite_steps_then_stops_with_a_checkpoint(backbone, tmp_path, ds_config, ranks):
    """Issue 30, item 9: `--lr inf` trained to NaN and exited 0, with NaN in metrics.jsonl. lr 1e30 is finite
    (and accepted): step 1 throws every weight to about 1e30 and every later loss is NaN. Those steps' updates
    are skipped and counted, and the second in a row stops the run with the weights of step 1 saved. ZeRO-0's
    plain optimizer is told to skip; ZeRO-2's skips the step on its own (its gradient norm is not finite). On 2
    ranks both decide together, and the deepspeed launcher passes the exit code on."""
    out = tmp_path / "run"
    flags = dict(lr=1e30, warmup_steps=0, max_steps=8, eval_every=100, save_every=1, keep_checkpoints=3)
    args = run_args(backbone, out, ds_config=f"ds_configs/{ds_config}.json", **flags)
    launcher = [sys.executable] if ranks == 1 else [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port())]
    result = subprocess.run(
        [*launcher, LAUNCHER, *args, "--max_nonfinite_steps", "2"],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == EXIT_DIVERGED, result.stdout[-3000:] + result.stderr[-3000:]
    assert "the loss was not finite for 2 steps in a row up to step 3" in result.stderr
    assert "checkpoint written with the weights of step 1" in result.stdout + result.stderr
    records = [r for r in read_metrics(out) if "train/loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["train/loss"] is not None and [r["train/loss"] for r in records[1:]] == [None, None]
    assert [r["train/skipped_nonfinite"] for r in records] == [0, 1, 2]
    assert (out / "checkpoints" / "latest").read_text() == "step000003"
    after_step_1, at_stop = trained_weights(out, 1), trained_weights(out, 3)
    assert all(torch.equal(after_step_1[name], at_stop[name]) for name in after_step_1)
