"""The training loop: one engine call per micro-batch, with the whole segment loop inside the model's forward
(ZeRO-3 traces parameter prefetch per call; one call per segment would break the trace). Everything
DeepSpeed is in ``engine.py``.

    config -> DeepSpeed config -> tokenizer -> backbone check (its config only) -> engine (builds the model)
        -> [resume] -> loop:
        draw the step's segment count (same on all ranks) -> forward/backward/step per micro-batch
        -> log -> evaluate by length -> promote the curriculum -> checkpoint -> stop on a signal
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from ..data import (
    LM_TASK,
    AnswerClasses,
    ShardStream,
    TaskGenerator,
    TextTokenizer,
    check_shard_task,
    check_shard_tokenizer,
    has_tokenizer,
    load_tokenizer,
)
from ..data.tars import shard_index
from ..model import AssociativeState, ConfigError, RecurrentMemoryModel, RMTConfig
from ..model.backbones import auto_model_class, backbone_kind, load_pretrained, pretrained_config
from ..model.gguf import is_gguf
from ..model.modeling import check_backbone, step_class
from ..model.presets import BUILTIN_BACKBONES, preset_config
from ..model.recurrence import StateSpillError, kept_at_peak, last_state_memory
from ..runtime.memory import peak_rss_mb
from . import checkpoint, signals
from .batches import EVAL_SEED_OFFSET, DataError, TrainBatches, micro_batch_at
from .config import TrainConfig, as_config_error
from .curriculum import Curriculum
from .distributed import DistInfo
from .ds_config import activation_settings, build_ds_config, load_ds_config
from .engine import PipelineEngine, build_engine
from .evaluation import (
    batch_bytes,
    check_memory,
    evaluate_by_length,
    evaluate_by_segment,
    lm_eval_samples,
    loss_by_segment,
)
from .metrics import MetricsLogger

# Exit code after a SIGUSR1/SIGTERM stop with a checkpoint written: "requeue me" (BSD EX_TEMPFAIL).
EXIT_PREEMPTED = 75
# Exit code after corrupt training data stopped the run (BSD EX_DATAERR): rerunning alone does not help.
EXIT_DATA_ERROR = 65
# Exit code after the disk filled up while a checkpoint was written (BSD EX_IOERR): free space, then resume.
EXIT_DISK_FULL = 74

# Exit code after --max_nonfinite_steps steps in a row had a non-finite loss: the run diverged (a lower --lr or a
# --grad_clip may help; rerunning alone does not).
EXIT_DIVERGED = 3


class Diverged(Exception):
    """Training stopped after ``--max_nonfinite_steps`` consecutive non-finite losses, with a checkpoint written;
    the launcher exits with EXIT_DIVERGED."""


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint; the launcher exits with EXIT_PREEMPTED."""


def backbone_setup(
    backbone_name: str, tokenizer: TextTokenizer, model_config: RMTConfig
) -> tuple[transformers.PretrainedConfig, RMTConfig]:
    """The backbone's config (a built-in preset's, or ``AutoConfig``'s: no weights read) and the model config
    for it, checked together with the tokenizer (``check_backbone``). An encoder becomes a sequence classifier
    with one class per answer (``AnswerClasses``), its segments framed with the tokenizer's [CLS] and [SEP]."""
    if backbone_name in BUILTIN_BACKBONES:
        backbone_config = preset_config(
            BUILTIN_BACKBONES[backbone_name],
            vocab_size=tokenizer.vocab_size,
            pad_token_id=tokenizer.pad_id,
            eos_token_id=tokenizer.eos_id,
        )
    else:
        backbone_config = pretrained_config(backbone_name)
    if backbone_kind(backbone_config) == "encoder":
        model_config = dataclasses.replace(model_config, cls_token_id=tokenizer.cls_id, sep_token_id=tokenizer.sep_id)
        backbone_config.num_labels = len(AnswerClasses(tokenizer))
    check_backbone(backbone_config, model_config, tokenizer.vocab_size)
    return backbone_config, model_config


def check_own_tokenizer(backbone_name: str, tokenizer_name: str, tokenizer: TextTokenizer) -> None:
    """A pretrained backbone's embeddings were learned for its own tokenizer: another tokenizer whose vocabulary
    differs would hand it ids that mean other tokens. Checked where the backbone ships one (a GGUF file, a
    directory that holds a tokenizer), against its vocabulary and special ids (``TextTokenizer.fingerprint``)."""
    local = Path(backbone_name).expanduser()
    ships_one = is_gguf(backbone_name) or (local.is_dir() and has_tokenizer(str(local)))
    if tokenizer_name == backbone_name or not ships_one:
        return
    own = load_tokenizer(backbone_name)
    if own.fingerprint != tokenizer.fingerprint:
        raise ConfigError(
            f"--tokenizer {tokenizer_name} ({tokenizer.vocab_size} tokens) is not the tokenizer of --backbone "
            f"{backbone_name} ({own.vocab_size} tokens), whose embeddings belong to its own: drop --tokenizer to "
            "use the backbone's."
        )


# Bytes a training step's autograd graph holds per position and hidden unit of one layer, at least: 143 measured
# for the default ARMT (tiny OPT, 100-token segments, bptt), which includes attention probabilities; 96 stays
# below it, so that only a step that cannot fit is refused.
TRAINING_ACTIVATION_BYTES = 96


def longest_training_sample(config: TrainConfig) -> tuple[int, str]:
    """``(segments, what they are)`` of the longest sample a step trains on: the longest curriculum stage, or the
    longest shard sample that the shards' index records (0 when it records none; --task lm cuts documents to the
    curriculum's length, so the shorter of the two)."""
    segment, stage = config.model.segment_size, max(config.curriculum_stages)
    if not config.shards:
        return stage, "the longest --curriculum stage"
    found = shard_index(config.shards)
    tokens = found[1].get("max_sample_tokens", 0) if found else 0
    segments = -(-tokens // segment)
    if config.task == LM_TASK and (not tokens or segments > stage):
        return stage, "the longest --curriculum stage"
    return segments, f"--shards' longest sample ({tokens:,} tokens)"


def check_batch_memory(
    config: TrainConfig, backbone_config, world_size: int, device: torch.device, ds_config: dict
) -> None:
    """Refuses (``check_memory``), before anything is built, a training step on the longest sample
    (``check_step_memory``), or an evaluation batch of the longest evaluation length, that cannot fit even by a
    lower bound of what it holds. Evaluation: int32 ids, and one segment without grad with its logits."""
    model = activation_settings(config.model, ds_config)[0]
    check_step_memory(config, model, backbone_config, device)
    segment, kind = model.segment_size, backbone_kind(backbone_config)
    positions = segment + step_class(kind, model).extra_positions(model)
    hidden = backbone_config.hidden_size
    length, samples = max(config.eval_samples_by_length.items())
    batch = min(config.eval_batch_size, -(-samples // world_size))
    logits = segment * backbone_config.vocab_size if kind == "decoder" else 0
    check_memory(
        f"--eval_segments {length} with --eval_batch_size {batch}",
        batch_bytes(batch, length * segment, 4, positions, hidden, logits=logits),
        device,
        "lower --eval_segments or --eval_batch_size",
    )


def check_step_memory(config: TrainConfig, model: RMTConfig, backbone_config, device: torch.device) -> None:
    """Refuses a training step on the longest sample (``longest_training_sample``) that cannot fit: its tokens
    (int64 ids, labels and mask), the segments' activations (``model`` is the config the engine builds) and the
    float32 states its backprop mode holds at once (``kept_at_peak``, with labels in the last segment only, the
    fewest a sample has), in memory; and with ``--state_offload disk``, the states it spills, in the spill
    directory (a lower bound: each file's header comes on top, and ranks that share the directory each spill as
    much)."""
    segments, longest = longest_training_sample(config)
    if not segments:
        return
    step = step_class(backbone_kind(backbone_config), model)
    hidden, layers = backbone_config.hidden_size, backbone_config.num_hidden_layers
    segment_units = (model.segment_size + step.extra_positions(model)) * hidden * layers
    batch = micro_batch_at(config.micro_batch_size, config.micro_batch_tokens, segments * model.segment_size)
    kept_segments, kept, recomputed = kept_at_peak(
        model.backprop, [False] * (segments - 1) + [True], model.bptt_depth, model.state_keep_every
    )
    state_bytes = batch * step.state_numel(model, hidden, layers) * 4
    stored = kept * state_bytes if model.backprop in ("replay", "sublinear") else 0
    on_device = batch * kept_segments * segment_units * TRAINING_ACTIVATION_BYTES + (kept + recomputed) * state_bytes
    if model.state_offload != "none":
        on_device -= stored
    remedy = "" if model.backprop == "sublinear" else "--backprop sublinear (about 2 sqrt(segments) states), "
    sized_by = f"--micro_batch_size {batch}"
    if batch < config.micro_batch_size:
        samples = f"{batch} sample{'s' if batch > 1 else ''}"
        sized_by = f"{samples} a micro-batch (--micro_batch_tokens {config.micro_batch_tokens:,})"
    check_memory(
        f"a step of {sized_by} on {longest}, {segments:,} segments, with --backprop {model.backprop}",
        ((batch + 2) * segments * model.segment_size * 24, on_device),
        device,
        f"use {remedy}--state_offload cpu or disk, or lower --micro_batch_size or the sample length",
        holds=f"its tokens, {kept_segments:,} segments' activations and {kept + recomputed:,} states",
        host_only=stored if model.state_offload == "cpu" else 0,
    )
    if config.spills_states and stored > (free := shutil.disk_usage(config.state_spill_dir).free):
        raise ConfigError(
            f"--state_offload disk spills {stored / 2**20:.1f} MiB of segment states ({kept} per micro-batch at "
            f"{segments} segments) into {config.state_spill_dir}, which has {free / 2**20:.1f} MiB free: free "
            "space there, pass another --state_offload_dir, or --state_offload cpu."
        )


def build_model(
    backbone_name: str, tokenizer: TextTokenizer, seed: int, model_config: RMTConfig, freeze_backbone: bool = False
) -> RecurrentMemoryModel:
    """The backbone (built-in, or ``from_pretrained``) of ``backbone_setup`` wrapped with memory; with
    ``freeze_backbone`` only the memory's own parameters train (the engines optimize those that need a gradient).
    Under ZeRO-3 the engine has created an ``HfDeepSpeedConfig``, so ``from_config``/``from_pretrained`` build it
    partitioned."""
    backbone_config, model_config = backbone_setup(backbone_name, tokenizer, model_config)
    auto = auto_model_class(backbone_config)
    torch.manual_seed(seed)
    if backbone_name in BUILTIN_BACKBONES:
        backbone = auto.from_config(backbone_config)
    else:  # a pretrained encoder's own classification head, if any, is replaced by one over the answers
        backbone = load_pretrained(
            auto,
            backbone_name,
            config=backbone_config,
            ignore_mismatched_sizes=backbone_kind(backbone_config) == "encoder",
        )
    # the memory's initial value must not depend on how the backbone was built (partitioned or not)
    torch.manual_seed(seed + 1)
    backbone.requires_grad_(not freeze_backbone)
    if backbone_kind(backbone_config) == "encoder":  # its classifier over the answers is new: it always trains
        backbone.classifier.requires_grad_(True)
    return RecurrentMemoryModel(backbone, model_config)


class Trainer:
    def __init__(self, config: TrainConfig, dist_info: DistInfo):
        self.config, self.dist = config, dist_info
        self.out_dir = Path(config.out_dir)
        self.is_main = dist_info.rank == 0
        self.label = config.memory if config.model.num_mem_tokens else "baseline"
        self.lm = config.task == LM_TASK
        # everything that can be wrong with the flags is found before the model is built, as a ConfigError
        with as_config_error():
            self.ds_config = build_ds_config(load_ds_config(config.ds_config), config, dist_info.world_size)
            self.resume_from = self._find_resume()
            self.resume_state = checkpoint.read_state(self.resume_from) if self.resume_from is not None else None
            if self.resume_state is not None:
                config.check_resumable(json.loads(self.resume_state["config"]))
            self.tokenizer = load_tokenizer(config.tokenizer_name)
            check_own_tokenizer(config.backbone, config.tokenizer_name, self.tokenizer)
            for source in filter(None, (config.shards, config.eval_shards)):
                check_shard_tokenizer(source, self.tokenizer, config.tokenizer_name)
                check_shard_task(source, config.task)
            backbone_config, _ = backbone_setup(config.backbone, self.tokenizer, config.model)
            if self.lm and backbone_kind(backbone_config) == "encoder":
                raise ConfigError(
                    f"--task {LM_TASK} predicts the next token, which the encoder {config.backbone} cannot: "
                    "pass a decoder (causal LM) --backbone."
                )
            check_batch_memory(config, backbone_config, dist_info.world_size, dist_info.device, self.ds_config)
        self.engine = build_engine(
            partial(build_model, config.backbone, self.tokenizer, config.seed, freeze_backbone=config.freeze_backbone),
            config.model,
            self.ds_config,
            config.collective_timeout_s,
        )
        self.model = self.engine.module
        # an encoder is trained and scored on the answer's class; a decoder on the answer's tokens
        self.classes = AnswerClasses(self.tokenizer) if self.model.spec.kind == "encoder" else None

        # task shards fix their samples' lengths; documents are cut to the curriculum's
        stages = [1] if config.shards and not self.lm else config.curriculum_stages
        stage_steps = config.stage_steps or -(-config.max_steps // len(stages))
        self.curriculum = Curriculum(stages, config.promote_accuracy, stage_steps, config.seed, config.curriculum_draw)
        generator = self.eval_generator = self.eval_documents = None
        if not self.lm:
            generator = TaskGenerator(config.task, self.tokenizer, seed=config.data_seed)
            self.eval_generator = TaskGenerator(
                config.task, self.tokenizer, generator.background, seed=config.data_seed + EVAL_SEED_OFFSET
            )
        elif config.eval_shards:
            self.eval_documents = lm_eval_samples(config.eval_shards, config.eval_samples, self.tokenizer.vocab_size)
        # the stages of a pipeline read the same batches; replicas read different ones
        data_rank, data_world = self.engine.data_rank, self.engine.data_world_size
        shards = (
            ShardStream(
                config.shards,
                rank=data_rank,
                world_size=data_world,
                seed=config.data_seed,
                skip_corrupt=config.skip_corrupt_samples > 0,
                vocab_size=self.tokenizer.vocab_size,
            )
            if config.shards
            else None
        )
        self.batches = TrainBatches(
            None if shards else generator,
            shards,
            micro_batch=config.micro_batch_size,
            micro_batch_tokens=config.micro_batch_tokens,
            grad_accum=config.grad_accum,
            rank=data_rank,
            world_size=data_world,
            segment_size=config.model.segment_size,
            pad_id=self.tokenizer.pad_id,
            max_corrupt=config.skip_corrupt_samples,
            classes=self.classes,
            lm_loss=config.lm_loss if self.lm else None,
        )
        self.step = 0
        self.saved_step = -1
        # steps whose update was dropped for a non-finite loss: in all, and in a row up to the current step
        self.skipped_nonfinite = self.nonfinite_in_a_row = 0
        self.accuracy: dict[int, float] = {}
        self.segment_loss: dict[int, float] = {}  # --task lm: the evaluation's loss of each segment

    # ------------------------------------------------------------------ setup helpers
    def _find_resume(self) -> Path | None:
        found = checkpoint.find(self.out_dir, self.config.resume) if self.config.resume else None
        directory = self.out_dir / "checkpoints"
        if not self.config.resume and (checkpoint.checkpoints(directory) or (directory / checkpoint.LATEST).exists()):
            raise ValueError(
                f"{self.out_dir} already holds checkpoints: pass --resume auto to continue that run, "
                "or a new --out_dir to start another."
            )
        return found

    def _write_run_files(self) -> None:
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "train_config.json").write_text(self.config.to_json())
        self.tokenizer.save(str(self.out_dir / "tokenizer"))

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[int, float]:
        """Trains to ``max_steps`` (or until a stop signal); returns the final accuracy by length (``--task lm``:
        the loss by segment)."""
        config = self.config
        self._write_run_files()
        if self.resume_from is not None:
            state = self.resume_state
            checkpoint.load(self.engine, self.resume_from, state)
            self.step = self.saved_step = state["step"]
            self.curriculum.load_state_dict(state["curriculum"])
            self.batches.load_state_dict(state["data"])
            self.accuracy = state["accuracy"]
            self.segment_loss = state.get("segment_loss", {})
        signals.install()  # normally done by the launcher at start-up; again here for library callers
        logger = MetricsLogger(self.out_dir, self.is_main, self.step, config.max_steps, self.label)
        if self.resume_from is not None:
            logger.write(f"[{self.label}] resumed from {self.resume_from} at step {self.step}")
        self._note_repeated_samples(logger)
        try:
            while self.step < config.max_steps:
                try:
                    self._train_step(logger)
                except DataError:
                    self._save_on_data_error(logger)
                    raise
                except StateSpillError as error:  # the step's spill files go with its store: nothing is left
                    last = checkpoint.last_intact(self.out_dir / "checkpoints")
                    raise checkpoint.DiskFull(f"{str(error).rstrip('.')}; {last}") from error
                if self.step == config.max_steps:
                    break
                if self.step % config.eval_every == 0:
                    self._evaluate(logger)
                else:
                    self._promote(logger)
                if config.save_every and self.step % config.save_every == 0:
                    self._save()
                if self._stop_requested():
                    self._stop(logger)
            # checkpointed first: the final evaluation (minutes at long lengths) then risks nothing, and a stop
            # signal may cut it short (a resume repeats it)
            self._save()
            self._evaluate(logger, final=True)
            if config.export:
                self.export(self.out_dir / "export")
        finally:
            logger.close()
        return self.segment_loss if self.lm else self.accuracy

    def _note_repeated_samples(self, logger: MetricsLogger) -> None:
        """Says so when a step takes more samples than the shards hold: the stream runs on into the next epoch, so
        every step reads the same samples several times (a 2-sample shard under the default --micro_batch_size
        16 trains 8 copies of each, 8 times the tokens and time of one pass)."""
        shards = self.batches.shards
        config = self.config
        taken = config.micro_batch_size * config.grad_accum * self.engine.data_world_size
        if shards is None or taken <= shards.total_samples:
            return
        fits = max(1, shards.total_samples // (config.grad_accum * self.engine.data_world_size))
        logger.write(
            f"[{self.label}] note: a step takes up to {taken} samples (--micro_batch_size {config.micro_batch_size} "
            f"x --grad_accum {config.grad_accum} x {self.engine.data_world_size} replica(s)) from --shards' "
            f"{shards.total_samples}, so each step reads them several times; --micro_batch_size {fits} reads each "
            "at most once a step"
        )

    def _stop(self, logger: MetricsLogger, during: str = "") -> None:
        """Checkpoints (if not done yet) and raises Preempted: the launcher exits with EXIT_PREEMPTED."""
        self._save()
        source = signals.received() or "from another rank"
        logger.write(
            f"[{self.label}] stopped by signal {source} at step {self.step}{during}; checkpoint written, "
            f"exit code {EXIT_PREEMPTED}"
        )
        raise Preempted

    def _save_on_data_error(self, logger: MetricsLogger) -> None:
        """The step's data was read before its forward, so the model is as the last step left it: worth a
        checkpoint (unless nothing has been trained since the start or the resume)."""
        if self.step == 0 or self.saved_step == self.step:
            logger.write(
                f"[{self.label}] stopped at step {self.step} on a data error (no new checkpoint: no step "
                "trained since the last one)"
            )
            return
        self._save()
        logger.write(
            f"[{self.label}] stopped at step {self.step} on a data error; checkpoint written, exit code "
            f"{EXIT_DATA_ERROR}; once the data is fixed (or --skip_corrupt_samples raised), --resume auto "
            "continues"
        )

    def _train_step(self, logger: MetricsLogger) -> None:
        curriculum_before = self.curriculum.state_dict()
        num_segments = self.curriculum.draw()
        try:
            batches = self.batches.step(num_segments)
        except DataError:
            self.curriculum.load_state_dict(curriculum_before)  # a checkpoint written now redoes this step
            raise
        started = time.perf_counter()
        losses, memory_norms, tokens = [], [], 0
        for micro, batch in enumerate(batches):
            batch = {name: tensor.to(self.dist.device) for name, tensor in batch.items()}
            output = self.engine.forward(batch)
            self.engine.backward(output.loss)
            losses.append(output.loss.detach().float())
            # the step's last micro-batch ends the accumulation (its norm counts): drop the update if any rank's
            # loss in the step was not finite, as DeepSpeed's loss scaler drops an overflowed one
            skip = micro == len(batches) - 1 and not self._losses_finite(losses)
            grad_norm = self.engine.step(skip=skip)
            if output.memory is not None:
                memory_norms.append(state_norm(output.memory))
            tokens += int(batch["attention_mask"].sum())
            num_segments = output.num_segments  # the input's own length: shards fix it, not the curriculum
        self.step += 1
        # loss and tokens over all ranks; each rank's loss is a mean over the same number of answer tokens
        memory_norm = torch.stack(memory_norms).mean() if memory_norms else torch.tensor(0.0)
        summary = torch.stack([torch.stack(losses).mean(), torch.tensor(float(tokens)), memory_norm])
        summary = summary.to(self.dist.device)
        if self.dist.world_size > 1:
            dist.all_reduce(summary)
            summary[0] /= self.dist.world_size
            summary[2] /= self.dist.world_size
        loss, total_tokens, memory_norm = summary.tolist()
        self.skipped_nonfinite += skip
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skip else 0
        if skip:
            logger.write(
                f"[{self.label}] step {self.step}: the loss is not finite ({loss}); the update was skipped "
                f"({self.nonfinite_in_a_row} in a row, {self.config.max_nonfinite_steps} stop the run)"
            )
        total_tokens *= self.engine.data_world_size / self.dist.world_size  # a pipeline's stages saw the same tokens
        tokens_per_s = total_tokens / max(time.perf_counter() - started, 1e-9)
        if self.step % self.config.log_every == 0 or self.step == self.config.max_steps:
            values = {
                "train/loss": loss,
                "train/lr": self.engine.lr,
                "train/grad_norm": grad_norm,
                "train/skipped_nonfinite": self.skipped_nonfinite,
                "train/segments": num_segments,
                "train/micro_batch_size": len(batch["input_ids"]),
                "curriculum/stage_segments": self.curriculum.max_segments,
                "perf/tokens_per_s": tokens_per_s,
                "perf/peak_memory_mb": peak_memory_mb(),
            }
            if memory_norms:
                values["memory/state_norm"] = memory_norm
            if self.engine.offloaded_bytes is not None:
                values["memory/offloaded_bytes"] = self.engine.offloaded_bytes
            if isinstance(self.engine, PipelineEngine):
                values["memory/stash_peak_bytes"] = self.engine.stash_peak_bytes
            kept = last_state_memory()
            if kept is not None:  # replay and sublinear backprop: the segment states kept from forward to backward
                values["memory/state_kept_bytes"] = kept.kept_bytes
                values["memory/state_offloaded_bytes"] = kept.offloaded_bytes
            if self.config.shards:
                values["data/corrupt_samples"] = self.batches.corrupt_samples
            logger.scalars(self.step, values)
        logger.progress(loss, self.accuracy.get(self.curriculum.max_segments), tokens_per_s)
        if self.nonfinite_in_a_row >= self.config.max_nonfinite_steps:
            self._save()  # the skipped steps left the weights as the last finite step made them
            logger.write(
                f"[{self.label}] stopped at step {self.step}: the loss was not finite for {self.nonfinite_in_a_row} "
                f"steps in a row (--max_nonfinite_steps); checkpoint written with the weights of step "
                f"{self.step - self.nonfinite_in_a_row}, exit code {EXIT_DIVERGED}; lower --lr (or set --grad_clip) "
                "and train again"
            )
            raise Diverged(
                f"the loss was not finite for {self.nonfinite_in_a_row} steps in a row up to step {self.step}: "
                "the run diverged; lower --lr (or set --grad_clip) and train again."
            )

    def _losses_finite(self, losses: list[torch.Tensor]) -> bool:
        """Whether every rank's losses of this step are finite (the same answer on all ranks)."""
        bad = (~torch.isfinite(torch.stack(losses))).any().float().reshape(1).to(self.dist.device)
        if self.dist.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad.item())

    def _evaluate(self, logger: MetricsLogger, final: bool = False) -> None:
        """Accuracy by length. Lengths past the curriculum (extrapolation, up to millions of tokens) are
        evaluated only at the end, so that the evaluations during training stay short."""
        config = self.config
        if self.lm:
            self._evaluate_documents(logger)
            return
        lengths = config.eval_lengths
        if not (final or config.shards):
            lengths = [k for k in lengths if k <= max(config.curriculum_stages)]
        # only the final evaluation gives way to a stop signal: the promotion that follows one during training
        # shapes the steps after it, so cutting it short would make the resumed run differ
        stop = partial(self._stop_if_requested, logger) if final else None
        self.accuracy = evaluate_by_length(
            self.engine.whole_model(),
            self.eval_generator,
            lengths,
            segment_size=config.model.segment_size,
            samples=config.eval_samples,
            batch_size=config.eval_batch_size,
            pad_id=self.tokenizer.pad_id,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            classes=self.classes,
            max_tokens=config.eval_max_tokens,
            between_batches=stop,
        )
        logger.scalars(self.step, {f"eval/accuracy_{k}seg": acc for k, acc in self.accuracy.items()})
        self._promote(logger, self.accuracy)

    def _evaluate_documents(self, logger: MetricsLogger) -> None:
        """--task lm: the loss and perplexity of each segment of the held-out documents, given the memory of the
        segments before it (none without --eval_shards); the curriculum advances by budget."""
        if self.eval_documents:
            model = self.engine.whole_model()
            was_training = model.training
            model.eval()
            self.segment_loss = evaluate_by_segment(
                partial(loss_by_segment, model, segment_size=self.config.model.segment_size),
                self.eval_documents,
                max(self.config.eval_lengths),
                segment_size=self.config.model.segment_size,
                batch_size=self.config.eval_batch_size,
                pad_id=self.tokenizer.pad_id,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                device=self.dist.device,
            )
            model.train(was_training)
            values = {f"eval/loss_{k}seg": loss for k, loss in self.segment_loss.items()}
            values |= {f"eval/perplexity_{k}seg": math.exp(loss) for k, loss in self.segment_loss.items()}
            logger.scalars(self.step, values)
        self._promote(logger)

    def _promote(self, logger: MetricsLogger, accuracy: dict[int, float] | None = None) -> None:
        """The curriculum's next stage, if the stage's accuracy or budget says so, logged with which of the two."""
        reason = self.curriculum.maybe_promote(accuracy)
        if reason is not None:
            logger.write(
                f"[{self.label}] step {self.step}: promoted by {reason} -> stage {self.curriculum.max_segments} "
                "segments"
            )

    def _stop_if_requested(self, logger: MetricsLogger) -> None:
        if self._stop_requested():
            self._stop(logger, during=" during the final evaluation (a resume repeats it)")

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if signals.received() is not None else 0.0], device=self.dist.device)
        if self.dist.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _save(self) -> None:
        if self.saved_step == self.step:
            return
        self.saved_step = self.step
        state = {
            "step": self.step,
            "curriculum": self.curriculum.state_dict(),
            "data": self.batches.state_dict(),
            "accuracy": self.accuracy,
            "segment_loss": self.segment_loss,
            "config": self.config.to_json(),
        }
        checkpoint.save(self.engine, self.out_dir / "checkpoints", self.step, state, self.config.keep_checkpoints)

    # ------------------------------------------------------------------ export
    def export(self, directory: Path) -> None:
        """A plain ``save_pretrained`` directory (with the tokenizer) for ``RecurrentMemoryModel.from_pretrained``;
        under ZeRO-3 the partitioned weights are gathered first (on every rank, as DeepSpeed requires)."""
        with self.engine.gathered_parameters():
            model = self.engine.whole_model()
            if self.is_main:
                tmp = directory.with_name(".tmp-" + directory.name)
                shutil.rmtree(tmp, ignore_errors=True)
                model.save_pretrained(tmp)
                self.tokenizer.save(str(tmp / "tokenizer"))
                shutil.rmtree(directory, ignore_errors=True)
                os.replace(tmp, directory)
        if dist.is_initialized():
            dist.barrier()


def state_norm(memory: torch.Tensor | AssociativeState) -> torch.Tensor:
    """Mean L2 norm of the memory tokens, or for ARMT of each layer's associative matrix A."""
    if isinstance(memory, AssociativeState):
        return torch.stack([a.detach().float().flatten(1).norm(dim=1).mean() for a in memory.matrices]).mean()
    return memory.detach().float().norm(dim=-1).mean()


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()
