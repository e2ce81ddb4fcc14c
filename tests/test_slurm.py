"""The SLURM scripts on a real one-node SLURM cluster (tools/slurm_cluster.sh: munged, slurmctld, slurmd).

Jobs run launchers/train.py with its embedded tiny model on CPU, two tasks, one thread each.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from support.slurm import QUICK_FLAGS, job_info, logged_steps, run, submit, wait_for, wait_until_final

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("slurm/*.sh"), *REPO.glob("slurm/*.sbatch"), REPO / "tools" / "slurm_cluster.sh"])
SBATCH_SCRIPTS = sorted(REPO.glob("slurm/*.sbatch"))
EXIT_PREEMPTED = 75
SIGUSR1 = 10

pytestmark = pytest.mark.slow


def tensorboard_steps(out_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    files = list((out_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event files in {out_dir / 'tensorboard'}"
    multiplexer = EventMultiplexer({"run": str(out_dir / "tensorboard")}).Reload()
    return sorted(event.step for event in multiplexer.Scalars("run", tag))


def test_scripts_are_shellcheck_clean(slurm_env):  # the cluster script installs shellcheck with SLURM
    result = subprocess.run(
        ["shellcheck", "--external-sources", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_sbatch_accepts_every_script(slurm_env, tmp_path):
    for script in SBATCH_SCRIPTS:
        result = subprocess.run(
            ["sbatch", "--test-only", "--nodes=1", "--ntasks-per-node=2", str(script)],
            env=slurm_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0 and "to start at" in result.stderr, f"{script.name}: {result.stderr}"


def test_train_job_two_tasks_writes_checkpoint_and_tensorboard(slurm_env, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(
        slurm_env,
        log,
        "--nodes=1",
        "--ntasks-per-node=2",
        str(REPO / "slurm" / "train.sbatch"),
        "--out_dir",
        str(out),
        "--max_steps",
        "6",
        "--save_every",
        "3",
        "--eval_every",
        "6",
        *QUICK_FLAGS,
    )
    info = wait_until_final(slurm_env, job, log, timeout=240)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), text
    assert f"rmt: job {job} restart 0" in text and "2 tasks" in text
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step000006"
    for tag in ("step000003", "step000006"):
        # one trainer state per rank: both tasks joined the same 2-rank run
        assert sorted(p.name for p in (checkpoints / tag).glob("trainer_state_rank*.pt")) == [
            "trainer_state_rank0.pt",
            "trainer_state_rank1.pt",
        ]
    assert tensorboard_steps(out, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]

    # the real evaluation launcher on the exported model, as 2 SLURM tasks, reproduces the run's accuracies
    eval_log = tmp_path / "eval.out"
    job = submit(
        slurm_env,
        eval_log,
        "--nodes=1",
        "--ntasks-per-node=2",
        str(REPO / "slurm" / "eval.sbatch"),
        "--model",
        str(out / "export"),
        "--out",
        str(tmp_path / "eval"),
        "--eval_segments",
        "1",
        "2",
        "--eval_samples",
        "8",
    )
    info = wait_until_final(slurm_env, job, eval_log, timeout=180)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), eval_log.read_text()
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())["accuracy"]
    trained = json.loads((out / "results.json").read_text())["accuracy"]["rmt"]
    assert evaluated == {k: pytest.approx(trained[k]) for k in ("1", "2")}


def test_train_job_launched_through_mpi(slurm_env, tmp_path):
    """RMT_LAUNCH=mpi: srun --mpi=pmi2 starts the tasks with no RANK/WORLD_SIZE/LOCAL_RANK; MPICH (the venv's,
    from PyPI) reaches SLURM's PMI2 server, and the 2 tasks find each other through mpi4py and train as one
    2-rank run."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(
        {**slurm_env, "RMT_LAUNCH": "mpi"},
        log,
        "--nodes=1",
        "--ntasks-per-node=2",
        str(REPO / "slurm" / "train.sbatch"),
        "--out_dir",
        str(out),
        "--max_steps",
        "3",
        "--save_every",
        "3",
        "--eval_every",
        "3",
        *QUICK_FLAGS,
    )
    info = wait_until_final(slurm_env, job, log, timeout=240)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert "2 tasks" in text and "launch mpi" in text
    checkpoint = out / "checkpoints" / "step000003"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["world_size"] == 2  # not two 1-rank runs: each task alone would write world size 1
    assert {"trainer_state_rank0.pt", "trainer_state_rank1.pt"} <= set(manifest["files"])
    assert logged_steps(out) == [1, 2, 3]

    bad_log = tmp_path / "bad.out"
    job = submit({**slurm_env, "RMT_LAUNCH": "mpirun"}, bad_log, "--ntasks=1", str(REPO / "slurm" / "train.sbatch"))
    info = wait_until_final(slurm_env, job, bad_log, timeout=60)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0")
    assert "RMT_LAUNCH=mpirun is not a launch mode: use srun (the default) or mpi" in bad_log.read_text()


def test_signalled_job_checkpoints_requeues_and_resumes(slurm_env, tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@120 sends before the time limit) mid-run: the
    trainer checkpoints at the end of its step, the script requeues the job, and the restarted job
    resumes from that checkpoint and trains to the last step."""
    max_steps = 80
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(
        slurm_env,
        log,
        "--nodes=1",
        "--ntasks-per-node=2",
        str(REPO / "slurm" / "train.sbatch"),
        "--out_dir",
        str(out),
        "--max_steps",
        str(max_steps),
        "--save_every",
        "0",
        "--eval_every",
        str(max_steps),
        *QUICK_FLAGS,
    )
    # signal once training is under way (the trainer's handler is installed before the first step)
    wait_for(lambda: len(logged_steps(out)) >= 2, timeout=180, what="the first training steps")
    run(["scancel", "--signal=USR1", "--batch", job], slurm_env)

    info = wait_until_final(slurm_env, job, log, timeout=240)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    assert "rmt: SIGUSR1 received" in text and f"requeueing job {job}" in text
    assert f"rmt: job {job} restart 1" in text
    stopped = re.search(
        rf"stopped by signal {SIGUSR1} at step (\d+); checkpoint written, exit code "
        rf"{EXIT_PREEMPTED}",
        text,
    )
    assert stopped, text
    stop_step = int(stopped.group(1))
    assert 2 <= stop_step < max_steps
    # the restarted job loaded the checkpoint written at the signal (save_every 0: the only one before the end)
    assert re.search(rf"resumed from \S*step{stop_step:06d} at step {stop_step}\b", text), text
    # steps continue from the checkpoint: 1..stop in the first run, stop+1..max in the second, none twice
    assert logged_steps(out) == list(range(1, max_steps + 1))
    assert tensorboard_steps(out, "train/loss") == list(range(1, max_steps + 1))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{max_steps:06d}"
    assert (out / "checkpoints" / f"step{stop_step:06d}" / "trainer_state_rank1.pt").is_file()


def test_chain_continues_one_run_in_the_next_job(slurm_env, tmp_path):
    """slurm/chain.sh: job 2 waits (afterok) for job 1; job 1 is told to stop (the SIGUSR1 before its time
    limit), checkpoints and ends successfully instead of requeueing; job 2 then resumes the run to its end."""
    max_steps = 80
    out = tmp_path / "run"
    chain = [
        str(REPO / "slurm" / "chain.sh"),
        "2",
        "--nodes=1",
        "--ntasks-per-node=2",
        f"--output={tmp_path}/job-%j.out",
        "--",
    ]
    first, second = run(
        [
            *chain,
            "--out_dir",
            str(out),
            "--max_steps",
            str(max_steps),
            "--save_every",
            "0",
            "--eval_every",
            str(max_steps),
            *QUICK_FLAGS,
        ],
        slurm_env,
    ).split()
    assert job_info(slurm_env, second)["Dependency"] == f"afterok:{first}(unfulfilled)"
    wait_for(lambda: len(logged_steps(out)) >= 2, timeout=180, what="the first training steps")
    run(["scancel", "--signal=USR1", "--batch", first], slurm_env)

    first_info = wait_until_final(slurm_env, first, tmp_path / f"job-{first}.out", timeout=120)
    first_log = (tmp_path / f"job-{first}.out").read_text()
    assert (first_info["JobState"], first_info["ExitCode"], first_info["Restarts"]) == ("COMPLETED", "0:0", "0")
    assert "a job started with the same --out_dir resumes from it" in first_log
    stop_step = int(re.search(r"stopped by signal \d+ at step (\d+)", first_log).group(1))
    assert 2 <= stop_step < max_steps

    second_info = wait_until_final(slurm_env, second, tmp_path / f"job-{second}.out", timeout=180)
    second_log = (tmp_path / f"job-{second}.out").read_text()
    assert (second_info["JobState"], second_info["ExitCode"]) == ("COMPLETED", "0:0"), second_log
    assert re.search(rf"resumed from \S*step{stop_step:06d} at step {stop_step}\b", second_log), second_log
    assert logged_steps(out) == list(range(1, max_steps + 1))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{max_steps:06d}"

    refused = subprocess.run([*chain, "--max_steps", "3"], env=slurm_env, capture_output=True, text=True)
    assert refused.returncode == 2 and "pass --out_dir" in refused.stderr


PROBE = """
import json, os, sys
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out, exist_ok=True)
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "SLURM_ARRAY_TASK_ID")
record = {key: os.environ.get(key) for key in keys} | {"argv": sys.argv[1:], "cwd": os.getcwd()}
with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(record, f)
"""


def test_eval_sweep_array_runs_one_value_per_task_with_ranks(slurm_env, tmp_path):
    """An evaluation sweep as a job array: each array task gets its RMT_SWEEP value in place of "{}" and runs
    the evaluation script once per SLURM task with its torch.distributed rank environment. The evaluation
    script here records what it was given."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    values = ["first", "second", "third"]
    env = {**slurm_env, "RMT_SWEEP": " ".join(values), "RMT_EVAL_SCRIPT": str(probe)}
    job = submit(
        env,
        tmp_path / "job-%A_%a.out",
        "--array=0-2",
        "--ntasks=2",
        str(REPO / "slurm" / "eval.sbatch"),
        "--model",
        "{}",
        "--out",
        f"{tmp_path}/{{}}",
    )
    for index, value in enumerate(values):
        task = f"{job}_{index}"
        info = wait_until_final(env, task, tmp_path / f"job-{job}_{index}.out", timeout=120)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), task
        records = [json.loads((tmp_path / value / f"rank{rank}.json").read_text()) for rank in (0, 1)]
        for rank, record in enumerate(records):
            assert record["argv"] == ["--model", value, "--out", f"{tmp_path}/{value}"]
            assert (record["RANK"], record["LOCAL_RANK"], record["WORLD_SIZE"]) == (str(rank), str(rank), "2")
            assert record["SLURM_ARRAY_TASK_ID"] == str(index) and record["OMP_NUM_THREADS"] == "1"
            assert record["cwd"] == str(REPO)
        assert records[0]["MASTER_ADDR"] == records[1]["MASTER_ADDR"]
        assert records[0]["MASTER_PORT"] == records[1]["MASTER_PORT"]


def test_train_job_on_pipeline_stages(slurm_env, tmp_path):
    """slurm/train.sbatch with the shipped pipeline config: the two tasks are the two stages of one pipeline."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(
        slurm_env,
        log,
        "--nodes=1",
        "--ntasks-per-node=2",
        str(REPO / "slurm" / "train.sbatch"),
        "--ds_config",
        str(REPO / "ds_configs" / "pipeline.json"),
        "--out_dir",
        str(out),
        "--max_steps",
        "2",
        "--save_every",
        "2",
        "--eval_every",
        "2",
        *QUICK_FLAGS,
        "--micro_batch_size",
        "4",
    )  # the config's 4 chains
    info = wait_until_final(slurm_env, job, log, timeout=240)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()
    names = {p.name for p in (out / "checkpoints" / "step000002").iterdir()}
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= names
    assert logged_steps(out) == [1, 2]
    assert (out / "export" / "memory.safetensors").is_file()
