"""`kopru train`: one loop for every recipe, from one CPU to many GPUs through torchrun.

The global batch (batch_size x processes x grad_accum samples) is cut from one seeded order of the data, so a
run gives the same losses whatever the number of processes; the loss of each micro-batch is its summed token
loss divided by the token count of the whole global batch, so accumulation and data parallelism are exact.

A resume (`resume=True`) takes the newest intact checkpoint (`kopru.training.checkpoint.resume_checkpoint`) and refuses
settings that would make it another run (`RUN_SETTINGS`) unless `resume_allow_changes`; raising `max_steps` is
allowed. Skipped samples are remembered by index and reason, so their counts come out the same whether a run
was resumed or not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import tomllib
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from kopru.backbones import default_backbones
from kopru.config import KopruConfig, VisionTowerConfig, coerce, type_name
from kopru.data.batching import LengthGroupedSampler, collate, collate_packed, pack
from kopru.data.builtin import builtin_dataset
from kopru.data.encoding import EncodedSample, SampleEncoder
from kopru.data.formats import SKIP_REASONS, SampleError, SkipReport, load_samples
from kopru.data.sample import Sample, samples_fingerprint
from kopru.evaluation import answer_results, summarize_answers
from kopru.llm import context_window, decoder_layers
from kopru.model import KopruForConditionalGeneration
from kopru.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    remove_partial_saves,
    resume_checkpoint,
    save_checkpoint,
)
from kopru.training.qformer_stage1 import QFormerPretrainer, pretrain_qformer
from kopru.training.recipes import (
    LoraSettings,
    OptimizerSettings,
    apply_recipe,
    count_parameters,
    make_optimizer,
    merge_lora,
    template_for,
)


@dataclass
class TrainConfig:
    # Model: a Köprü model directory to continue from, or backbones + strategy for a new one (vision and llm
    # both None: the built-in tiny pretrained backbones, kopru.backbones.default_backbones()).
    model: str | None = None
    vision: str | None = field(default=None, metadata={"help": (
        "vision encoder path / hub id; none with --llm none: the built-in tiny pretrained backbones")})
    llm: str | None = field(default=None, metadata={"help": "causal LM path / hub id; none: see --vision"})
    strategy: str = "projection"
    connector: dict[str, Any] = field(default_factory=dict)
    feature_layer: int | list[int] = -2
    # ResolutionConfig fields (kopru.config): mode fixed / anyres / dynamic / tiled (Mllama encoders), grid_pinpoints, min/max_pixels,
    # reduction, reduction_factor; empty: one native-size pass per image.
    resolution: dict[str, Any] = field(default_factory=dict)
    init_connector: str | None = None  # a stage-1 connector checkpoint to start from
    # Data: a file / directory (see kopru.data.formats) or "builtin:shapes", "builtin:digits", "builtin:all".
    train_data: str = "builtin:shapes"
    eval_data: str | None = None  # None with builtin data: its held-out split
    image_root: str | None = None
    builtin_train_size: int = 2000
    builtin_eval_size: int = 200
    eval_questions: int | None = 400  # answer accuracy on at most this many held-out questions (a fixed subset)
    languages: list[str] = field(default_factory=lambda: ["en", "tr"])
    eval_languages: list[str] | None = None  # None: `languages` (set it apart for cross-lingual transfer)
    skip_policy: str = field(default="skip", metadata={"help": (
        "'error' stops at the first bad sample (checked before step 1 unless --validate-data false); 'skip' "
        "leaves it out and counts it by reason (default skip)")})
    validate_data: bool | None = field(default=None, metadata={"help": (
        "encode every training and held-out sample before step 1 (images decoded, placeholders against images, "
        "text encodable, length within the context) and print the counts per reason (default: on with "
        "--skip-policy error, off with skip)")})
    max_length: int | None = None  # None: the LLM's context window
    # Recipe and optimisation.
    recipe: str = "single-stage"
    lora: dict[str, Any] | None = None  # LoraSettings fields; None = full fine-tuning
    lr: float = 1e-3
    connector_lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_steps: int = 200
    batch_size: int = 16  # per process and micro-batch
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    group_by_length: bool = field(default=False, metadata={"help": (
        "batch samples of similar length together (less padding, faster on mixed-length data; default off, as in "
        "HF's Trainer). On the built-in shapes data one length is one question template, so grouped batches let "
        "the model answer from the question's wording: seed 0, cross-attention, colour accuracy en / tr 0.32 / "
        "0.30 grouped against 0.63 / 0.59 shuffled")})
    # Pack each micro-batch's samples into rows of at most pack_length tokens, attention kept within each sample
    # (projection and qformer only).
    packing: bool = False
    pack_length: int = 2048
    gradient_checkpointing: bool = False
    bf16: bool | None = None  # None: on when CUDA is available
    seed: int = 0
    # Bookkeeping.
    output_dir: str = "runs/train"
    eval_every: int = 50
    save_every: int = field(default=100, metadata={"help": (
        "write a checkpoint every N steps, 0 never (default 100); its manifest.json records each file's size and "
        "sha256, which --resume checks")})
    log_every: int = field(default=10, metadata={"help": (
        "every N steps (and at the last) update the progress bar's loss, lr and tokens/s and append a line to "
        "OUTPUT_DIR/metrics.jsonl with the mean loss of those N steps; 0 never (default 10)")})
    resume: bool = field(default=False, metadata={"help": (
        "continue from the newest intact checkpoint under --output-dir: the one 'latest' names when its files "
        "match their recorded sizes and sha256, else the newest intact checkpoint-N (each one passed over is "
        "named with the reason)")})
    resume_allow_changes: bool = field(default=False, metadata={"help": (
        "resume even when settings that alter the run differ from the checkpoint's (global batch, seed, "
        "training data, max_length, length grouping, learning-rate schedule, gradient clipping); the new values "
        "apply from the resume step. Without it such a resume is refused with each difference listed. Raising "
        "--max-steps is always allowed")})
    keep_last: int | None = field(default=None, metadata={"help": (
        "keep only the newest N checkpoints (and always the one 'latest' names); default: keep all. 2 or more "
        "leaves a checkpoint to fall back to if the newest is damaged")})
    fsdp: bool = False
    stop_after: int | None = None  # stop (as if killed) after this many steps; for resume tests and debugging

    def __post_init__(self) -> None:
        template_for(self.recipe)
        if self.skip_policy not in ("error", "skip"):
            raise ValueError(f"skip_policy must be 'error' or 'skip', found {self.skip_policy!r}")
        if self.model is None and (self.vision is None) != (self.llm is None):
            raise ValueError("expected both vision and llm (or neither: the built-in tiny backbones), found one")
        for name in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, found {getattr(self, name)}")
        if self.log_every < 0:
            raise ValueError(f"log_every must be >= 0 (0: never), found {self.log_every}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (or None: keep every checkpoint), found {self.keep_last}")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """A YAML or TOML file; keyword arguments (e.g. command-line flags) override it."""
        return cls(**{**read_config_file(path), **{k: v for k, v in overrides.items() if v is not None}})


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix == ".toml":
        data = tomllib.loads(path.read_text())
    elif path.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text()) or {}
    else:
        raise ValueError(f"expected a .yaml, .yml or .toml config file, found {path.name}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {unknown}; expected some of {sorted(known)}")
    # Each value of its field's type, checked here where the file can be named: YAML reads `lr: 1e-3` (no dot) as
    # a string, which would otherwise fail steps later inside the optimizer.
    hints = typing.get_type_hints(TrainConfig)
    checked = {}
    for name, value in data.items():
        try:
            checked[name] = coerce(hints[name], value)
        except TypeError:
            raise ValueError(f"{path}: {name}: expected {type_name(hints[name])}, found {value!r} "
                             f"({type(value).__name__})") from None
    return checked


@dataclass
class TrainSummary:
    steps: int
    losses: list[float]
    eval: list[dict[str, Any]]
    skipped: dict[str, int]
    trainable_params: int
    total_params: int
    tokens_per_second: float
    seconds: float
    output_dir: str
    final_model: str | None


# ------------------------------------------------------------------------------------------------- setup
def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(config: TrainConfig) -> tuple[KopruForConditionalGeneration, Any]:
    if config.model is not None:
        model, processor = KopruForConditionalGeneration.from_pretrained(config.model)
    else:
        vision, llm = config.vision, config.llm
        if vision is None:
            defaults = default_backbones()
            vision, llm = str(defaults["vision"]), str(defaults["llm"])
        kopru_config = KopruConfig(
            vision=VisionTowerConfig(vision, feature_layer=config.feature_layer), llm=llm,
            strategy=config.strategy, connector=dict(config.connector) or None, resolution=dict(config.resolution),
        )
        model, processor = KopruForConditionalGeneration.from_backbones(kopru_config)
    if config.init_connector is not None:
        model.load_connector(config.init_connector)
    return model, processor


def load_data(spec: str, config: TrainConfig, split: str, report: SkipReport) -> list[Sample]:
    if spec.startswith("builtin:"):
        size = config.builtin_train_size if split == "train" else config.builtin_eval_size
        kind = "caption" if template_for(config.recipe) == "plain" else "qa"
        languages = config.languages if split == "train" else config.eval_languages or config.languages
        return builtin_dataset(spec.removeprefix("builtin:"), size, split=split, seed=config.seed,
                               languages=tuple(languages), kind=kind)

    samples, file_report = load_samples(spec, image_root=config.image_root, policy=config.skip_policy)
    report.counts.update(file_report.counts)
    return samples


class EncodedDataset:
    """Encodes samples on first use and remembers the result. A skipped sample is remembered by index and reason
    (`skipped`), which checkpoints carry, so a resumed run counts each bad sample once, as an uninterrupted one
    does."""

    def __init__(self, samples: list[Sample], encoder: SampleEncoder, policy: str = "skip") -> None:
        self.samples, self.encoder, self.policy = samples, encoder, policy
        self._cache: dict[int, EncodedSample] = {}
        self.skipped: dict[int, str] = {}
        self.report = SkipReport()  # the first messages of each reason, for the data check's printout

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> EncodedSample | None:
        if index in self.skipped:
            return None
        if index not in self._cache:
            encoded = self._encode(index)
            if encoded is None:
                return None
            self._cache[index] = encoded
        return self._cache[index]

    def check(self, index: int) -> None:
        """Encode without keeping the result (the data check): only whether and why it is skipped stays."""
        if index not in self.skipped and index not in self._cache:
            self._encode(index)

    def _encode(self, index: int) -> EncodedSample | None:
        try:
            return self.encoder.encode_or_raise(self.samples[index])
        except SampleError as error:
            self.report.handle(error, self.policy)  # raises under policy "error"
            self.skipped[index] = error.reason
            return None

    def skip_counts(self) -> Counter[str]:
        return Counter(self.skipped.values())

    def skipped_by_reason(self) -> dict[str, list[int]]:
        by_reason: dict[str, list[int]] = {}
        for index, reason in sorted(self.skipped.items()):
            by_reason.setdefault(reason, []).append(index)
        return by_reason

    def restore_skipped(self, by_reason: dict[str, list[int]]) -> None:
        for reason, indices in by_reason.items():
            for index in indices:
                self.skipped[index] = reason
                self._cache.pop(index, None)

    def lengths(self) -> tuple[list[int], list[bool]]:
        """Cheap length estimates for grouping: text characters + image count (no tokenisation)."""
        lengths = [sum(len(m["content"]) for m in s.messages) for s in self.samples]
        return lengths, [bool(s.images) for s in self.samples]


def global_batches(dataset: EncodedDataset, global_size: int, seed: int, epoch: int, grouped: bool) -> list[list[int]]:
    """The epoch's order cut into global batches; identical for any number of processes."""
    if grouped:  # the sampler yields whole batches of one modality, similar lengths
        lengths, has_image = dataset.lengths()
        sampler = LengthGroupedSampler(lengths, has_image, global_size, seed)
        sampler.set_epoch(epoch)
        return [batch for batch in sampler if len(batch) == global_size]
    else:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(len(dataset), generator=generator).tolist()
    return [order[i:i + global_size] for i in range(0, len(order) - global_size + 1, global_size)]


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------- resume
# The settings that make a run what it is: a resume that changed one would silently become another run (the
# losses diverge, or a new --lr is overridden by the optimizer state). Name -> how a refusal names it.
RUN_SETTINGS = {
    "global_batch_size": "global batch (--batch-size x processes x --grad-accum)",
    "seed": "--seed",
    "train_data": "training data (--train-data: its samples' fingerprint)",
    "max_length": "--max-length (which samples are too long)",
    "group_by_length": "--group-by-length (the batch order)",
    "lr_schedule": "learning-rate schedule",
    "lr": "--lr",
    "connector_lr": "--connector-lr",
    "weight_decay": "--weight-decay",
    "warmup_steps": "--warmup-steps",
    "max_steps": "--max-steps",
    "max_grad_norm": "--max-grad-norm",
}
LR_SCHEDULE = "linear warmup, then cosine to 0 at max_steps"


def run_settings(config: TrainConfig, world: int, max_length: int | None, samples: list[Sample]) -> dict[str, Any]:
    """This run's values of `RUN_SETTINGS`, as a checkpoint records them."""
    return {
        "global_batch_size": config.batch_size * world * config.grad_accum,
        "seed": config.seed,
        "train_data": {"spec": config.train_data, "samples": len(samples), "sha256": samples_fingerprint(samples)},
        "max_length": max_length,
        "group_by_length": config.group_by_length,
        "lr_schedule": LR_SCHEDULE,
        "lr": config.lr,
        "connector_lr": config.connector_lr,
        "weight_decay": config.weight_decay,
        "warmup_steps": config.warmup_steps,
        "max_steps": config.max_steps,
        "max_grad_norm": config.max_grad_norm,
    }


def changed_settings(saved: dict[str, Any], given: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(name, saved value, given value) for each run setting that differs; the data by fingerprint only, so a
    moved data file with the same samples is the same data."""
    changes = []
    for name in RUN_SETTINGS:
        old, new = saved.get(name), given[name]
        if name == "train_data" and isinstance(old, dict):
            same = old.get("sha256") == new["sha256"]
        else:
            same = old == new
        if not same:
            changes.append((name, old, new))
    return changes


def _show_setting(name: str, value: Any) -> str:
    if name == "train_data" and isinstance(value, dict):
        return f"{value.get('spec')} ({value.get('samples')} samples, sha256 {str(value.get('sha256'))[:12]})"
    return "not recorded" if value is None and name != "max_length" else json.dumps(value)


def _resume(config: TrainConfig, output: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LambdaLR, settings: dict[str, Any], rank: int, world: int,
            device: torch.device, log) -> dict[str, Any]:
    """Restore the newest intact checkpoint into model, optimizer and scheduler; refuse changed run settings."""
    checkpoint = _choose_checkpoint(output, rank, world, device, log)
    # The optimizer state brings the saved learning rates and weight decay; the configured ones are kept here
    # to apply when a change is allowed.
    configured = [{"initial_lr": g["initial_lr"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    state = load_checkpoint(checkpoint, model, optimizer, scheduler, verify=False)
    changes = changed_settings(state.pop("settings", {}), settings)
    refused = [(n, old, new) for n, old, new in changes
               if not (n == "max_steps" and isinstance(old, int) and new > old)]

    def listed(which: list[tuple[str, Any, Any]]) -> str:
        return "; ".join(f"{RUN_SETTINGS[n]}: saved {_show_setting(n, old)}, given {_show_setting(n, new)}"
                         for n, old, new in which)

    if refused and not config.resume_allow_changes:
        raise ValueError(
            f"--resume from {checkpoint} refused: settings that alter the run differ from the checkpoint's: "
            f"{listed(refused)}. Give the saved values, or pass --resume-allow-changes true to apply the given "
            f"ones from step {state['step']}"
        )
    if changes:
        before = optimizer.param_groups[0]["lr"]
        _apply_configured_schedule(optimizer, scheduler, configured)
        log(f"resuming {checkpoint} at step {state['step']} with changed settings: {listed(changes)}; learning rate "
            f"{before:.4g} -> {optimizer.param_groups[0]['lr']:.4g} (the schedule recomputed for the given "
            "values, as if the run had started with them)")
    return state


def _apply_configured_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                               configured: list[dict[str, float]]) -> None:
    """Put the configured base learning rates and weight decay back after loading a checkpoint, and set each
    group's learning rate to what this run's schedule gives at the restored step."""
    for group, values in zip(optimizer.param_groups, configured, strict=True):
        group.update(values)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _choose_checkpoint(output: Path, rank: int, world: int, device: torch.device, log) -> Path:
    """Process 0 checks the checkpoints (reading every file once) and tells the others which one to load."""
    step, error = -1, None
    if rank == 0:
        try:
            chosen = resume_checkpoint(output, log)
            step = -1 if chosen is None else int(chosen.name.removeprefix("checkpoint-"))
        except CheckpointError as failure:
            step, error = -2, failure
    if world > 1:
        shared = torch.tensor([step], device=device)
        dist.broadcast(shared, 0)
        step = int(shared.item())
    if error is not None:
        raise CheckpointError(f"--resume: {error}") from None
    if step == -2:
        raise CheckpointError("--resume: no intact checkpoint (process 0 says why)")
    if step == -1:
        raise FileNotFoundError(f"--resume: no checkpoint under {output} (expected {output}/latest or "
                                "checkpoint-N folders)")
    return output / f"checkpoint-{step}"


# --------------------------------------------------------------------------------------------- data check
def check_data(dataset: EncodedDataset, what: str, load_report: SkipReport, rank: int, world: int,
               device: torch.device, log) -> None:
    """Encode every sample once, before step 1 (each process its share), so a bad one is found now: raised under
    policy "error", counted under "skip". Prints the counts per reason."""
    started = time.perf_counter()
    for index in range(rank, len(dataset), world):
        dataset.check(index)
    _share_skipped(dataset, world, device)
    counts = dataset.skip_counts()
    line = (f"data check before step 1, {what}: {len(dataset) - len(dataset.skipped):,} of {len(dataset):,} samples "
            f"usable ({time.perf_counter() - started:.1f} s)")
    if counts:
        line += "; skipped: " + ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
    if load_report.counts:
        line += "; records refused when the data was read: " + ", ".join(
            f"{reason} {n}" for reason, n in sorted(load_report.counts.items()))
    log(line)
    for report in (load_report, dataset.report):
        for _reason, examples in sorted(report.examples.items()):
            log(f"  e.g. {examples[0]}")


def _share_skipped(dataset: EncodedDataset, world: int, device: torch.device) -> None:
    """Every process learns every process's skipped samples (a reason code per index, combined by maximum)."""
    if world == 1:
        return
    codes = torch.zeros(len(dataset), dtype=torch.int64, device=device)
    for index, reason in dataset.skipped.items():
        codes[index] = SKIP_REASONS.index(reason) + 1
    dist.all_reduce(codes, op=dist.ReduceOp.MAX)
    for index in codes.nonzero().flatten().tolist():
        dataset.skipped[index] = SKIP_REASONS[int(codes[index]) - 1]
        dataset._cache.pop(index, None)


METRICS_FILE = "metrics.jsonl"


def _start_metrics(output: Path, step: int) -> Path:
    """OUTPUT/metrics.jsonl with the lines of steps up to `step` kept (a resume's start; 0: a new run), so the file
    reads as one uninterrupted run's."""
    path = output / METRICS_FILE
    kept = []
    if step and path.is_file():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    output.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in kept))
    return path


def _logger(rank: int):
    def log(message: str) -> None:
        if rank == 0:  # through tqdm, so a progress bar on the same terminal is not torn
            tqdm.write(f"kopru train: {message}", file=sys.stderr)

    return log


# -------------------------------------------------------------------------------------------------- train
def train(config: TrainConfig) -> TrainSummary:
    rank, world = _distributed()
    seed_everything(config.seed)
    device = _device()
    model, processor = build_model(config)
    apply_recipe(model, config.recipe, LoraSettings(**config.lora) if config.lora else None)
    model.to(device)
    if config.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = count_parameters(model)

    if config.recipe == "qformer-stage1":
        return _qformer_stage1(model, processor, config, trainable, total)

    log = _logger(rank)
    output = Path(config.output_dir)
    if rank == 0:
        remove_partial_saves(output, log)
    max_length = config.max_length or context_window(model.llm.config)
    encoder = SampleEncoder(processor, template=template_for(config.recipe), max_length=max_length,
                            policy=config.skip_policy)
    # Records refused while reading the files are counted again at every start (the files are read again);
    # samples skipped while encoding are counted by the datasets, by index, and carried by checkpoints.
    train_read, eval_read = SkipReport(), SkipReport()
    train_set = EncodedDataset(load_data(config.train_data, config, "train", train_read), encoder, config.skip_policy)
    eval_spec = config.eval_data or (config.train_data if config.train_data.startswith("builtin:") else None)
    eval_set = (EncodedDataset(load_data(eval_spec, config, "test", eval_read), encoder, config.skip_policy)
                if eval_spec else None)
    # Only a run that saves or resumes needs them (the fingerprint reads every sample once).
    settings = run_settings(config, world, max_length, train_set.samples) if config.save_every or config.resume else {}

    forward_model = _wrap(model, config, world, device)
    optimizer = make_optimizer(model, OptimizerSettings(lr=config.lr, connector_lr=config.connector_lr,
                                                        weight_decay=config.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, config.max_steps))

    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "losses": [], "eval": [],
                             "tokens": 0}
    if config.resume:
        state = _resume(config, output, model, optimizer, scheduler, settings, rank, world, device, log)
        skipped = state.pop("skipped", {})
        train_set.restore_skipped(skipped.get("train", {}))
        if eval_set is not None:
            eval_set.restore_skipped(skipped.get("eval", {}))
    validate = config.validate_data if config.validate_data is not None else config.skip_policy == "error"
    if validate:
        check_data(train_set, "training data", train_read, rank, world, device, log)
        if eval_set is not None:
            check_data(eval_set, "held-out data", eval_read, rank, world, device, log)

    global_size = config.batch_size * world * config.grad_accum
    if len(train_set) < global_size:
        raise ValueError(f"the training data has {len(train_set)} samples, fewer than one global batch "
                         f"({config.batch_size} x {world} processes x {config.grad_accum} accumulation)")
    autocast = _autocast(config, device)
    pad_id = processor.tokenizer.pad_token_id
    metrics = _start_metrics(output, state["step"]) if rank == 0 and config.log_every else None
    started, tokens_at_start = time.perf_counter(), state["tokens"]
    progress = tqdm(total=config.max_steps, initial=state["step"], desc=f"train {config.recipe}",
                    disable=rank != 0)
    model.train()
    batches, batches_epoch = [], None
    while state["step"] < config.max_steps:
        if batches_epoch != state["epoch"]:  # the order is computed once per epoch, not once per step
            batches = global_batches(train_set, global_size, config.seed, state["epoch"], config.group_by_length)
            batches_epoch = state["epoch"]
        if state["batch_in_epoch"] >= len(batches):
            state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
            continue
        indices = batches[state["batch_in_epoch"]]
        micro = _micro_batches(train_set, indices, config.batch_size, world, rank, pad_id,
                               config.pack_length if config.packing else None)
        global_tokens = _all_reduce_sum(sum(model.count_loss_tokens(b["input_ids"], b["labels"]) for b in micro if b), device)
        step_loss = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            if batch is None:
                continue
            batch = _move(batch, device)
            sync = i == len(micro) - 1 or world == 1
            with _no_sync(forward_model, sync), autocast:
                out = forward_model(**batch, num_items_in_batch=max(global_tokens, 1))
                # DDP averages gradients over processes; the loss is already normalised globally.
                (out.loss * world).backward()
            step_loss += out.loss.detach()
        loss = _all_reduce_sum(step_loss, device)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at step {state['step'] + 1}; stopping. The last good checkpoint is "
                f"{latest_checkpoint(output) or 'none (no checkpoint was written yet)'}"
            )
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
        step_lr = scheduler.get_last_lr()[0]  # the rate this step used (the first group's), before the schedule moves
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["batch_in_epoch"] += 1
        state["losses"].append(loss)
        state["tokens"] += global_tokens
        speed = (state["tokens"] - tokens_at_start) / max(time.perf_counter() - started, 1e-9)
        progress.update(1)
        step = state["step"]
        if config.log_every and (step % config.log_every == 0 or step == config.max_steps):
            # The window starts at the previous multiple of log_every, so a resumed run logs the same lines.
            window = state["losses"][(step - 1) // config.log_every * config.log_every:step]
            line = {"step": step, "loss": sum(window) / len(window), "lr": step_lr,
                    "tokens_per_second": speed, "epoch": state["epoch"]}
            progress.set_postfix(loss=f"{line['loss']:.4f}", lr=f"{line['lr']:.2e}", tok_s=f"{speed:.0f}")
            if metrics is not None:
                with metrics.open("a") as handle:
                    handle.write(json.dumps(line) + "\n")
        if eval_set is not None and config.eval_every and state["step"] % config.eval_every == 0:
            state["eval"].append({"step": state["step"], **evaluate(model, eval_set, config, pad_id, device)})
            model.train()
        if config.save_every and state["step"] % config.save_every == 0:
            for dataset in (train_set, eval_set):
                if dataset is not None:
                    _share_skipped(dataset, world, device)
            skipped = {"train": train_set.skipped_by_reason(),
                       "eval": eval_set.skipped_by_reason() if eval_set is not None else {}}
            save_checkpoint(output, model, optimizer, scheduler, {**state, "skipped": skipped, "settings": settings},
                            keep_last=config.keep_last, log=log)
        if config.stop_after is not None and state["step"] >= config.stop_after:
            break
    progress.close()
    seconds = time.perf_counter() - started
    finished = state["step"] >= config.max_steps
    if finished and eval_set is not None and (not state["eval"] or state["eval"][-1]["step"] != state["step"]):
        state["eval"].append({"step": state["step"], **evaluate(model, eval_set, config, pad_id, device)})
    final_model = None
    if finished:
        final_model = str(_save_final(model, processor, config, output, rank))
    skip_counts = train_read.counts + eval_read.counts
    for dataset in (train_set, eval_set):
        if dataset is not None:
            _share_skipped(dataset, world, device)
            skip_counts += dataset.skip_counts()
    summary = TrainSummary(
        steps=state["step"], losses=state["losses"], eval=state["eval"], skipped=dict(sorted(skip_counts.items())),
        trainable_params=trainable, total_params=total,
        tokens_per_second=(state["tokens"] - tokens_at_start) / max(seconds, 1e-9), seconds=seconds,
        output_dir=str(output), final_model=final_model,
    )
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        (output / "summary.json").write_text(json.dumps(dataclasses.asdict(summary), indent=1))
    return summary


QFORMER_HEADS_FILE = "qformer_heads.safetensors"


def _qformer_stage1(model: KopruForConditionalGeneration, processor, config: TrainConfig, trainable: int,
                    total: int) -> TrainSummary:
    """BLIP-2 stage 1 on captions: one process, no checkpoints (a short phase before align / instruct)."""

    report = SkipReport()
    samples = load_data(config.train_data, config, "train", report)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        pretrainer = QFormerPretrainer(model, processor.tokenizer, seed=config.seed)
    history = pretrain_qformer(model, processor, samples, steps=config.max_steps, batch_size=config.batch_size,
                               lr=config.lr, seed=config.seed, pretrainer=pretrainer)
    output = Path(config.output_dir)
    model.save_connector(output / "final")
    # The contrastive (ITC) head is what image-text retrieval needs; the VLM itself never uses the heads.
    pretrainer.save_heads(output / "final" / QFORMER_HEADS_FILE)
    summary = TrainSummary(
        steps=len(history), losses=[h["total"] for h in history], eval=[], skipped=dict(report.counts),
        trainable_params=trainable, total_params=total, tokens_per_second=0.0,
        seconds=time.perf_counter() - started, output_dir=str(output), final_model=str(output / "final"),
    )
    (output / "summary.json").write_text(json.dumps(dataclasses.asdict(summary), indent=1))
    return summary


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _micro_batches(dataset: EncodedDataset, indices: list[int], batch_size: int, world: int, rank: int,
                   pad_id: int, pack_length: int | None = None) -> list[dict[str, torch.Tensor] | None]:
    """This process's micro-batches of a global batch: chunk (a * world + rank) for accumulation step a."""
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    mine = chunks[rank::world]
    batches = []
    for chunk in mine:
        encoded = [e for e in (dataset[i] for i in chunk) if e is not None]
        if not encoded:
            batches.append(None)
        elif pack_length is not None:
            batches.append(collate_packed(pack(encoded, pack_length), pad_id))
        else:
            batches.append(collate(encoded, pad_id))
    return batches


@torch.no_grad()
def evaluate(model: KopruForConditionalGeneration, dataset: EncodedDataset, config: TrainConfig, pad_id: int,
             device: torch.device) -> dict[str, Any]:
    """Held-out token-weighted loss, and exact-match accuracy per task and language for QA samples."""

    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(dataset), config.batch_size):
        encoded = [e for e in (dataset[i] for i in range(start, min(start + config.batch_size, len(dataset))))
                   if e is not None]
        if not encoded:
            continue
        batch = _move(collate(encoded, pad_id), device)
        count = model.count_loss_tokens(batch["input_ids"], batch["labels"])
        total += float(model(**batch, num_items_in_batch=max(count, 1)).loss) * count
        tokens += count
    result: dict[str, Any] = {"loss": total / max(tokens, 1)}
    qa = [s for s in dataset.samples if "answer" in s.meta]
    if config.eval_questions and len(qa) > config.eval_questions:
        # A fixed random subset: an evenly spaced one would alias with the data's task / language cycle.
        qa = random.Random(config.seed).sample(qa, config.eval_questions)
    if qa:
        # Per question too: comparisons of two models on the same questions are paired (kopru.lesson.report).
        result["answers"] = answer_results(model, dataset.encoder, qa, batch_size=config.batch_size)
        result["accuracy"] = summarize_answers(result["answers"])
    return result


def _save_final(model: KopruForConditionalGeneration, processor, config: TrainConfig, output: Path,
                rank: int) -> Path:
    final = output / "final"
    if config.fsdp and dist.is_initialized():
        _gather_full_weights(model)  # every process takes part; process 0 then holds plain tensors to save
    if rank != 0:
        return final
    if config.recipe == "align":
        model.save_connector(final)  # stage 1 produces a connector for these backbones
    else:
        merge_lora(model)
        model.config.name = output.resolve().name  # runs/NAME/final is served as NAME (kopru.serve)
        model.save_pretrained(final, processor)
    return final


def _gather_full_weights(model: KopruForConditionalGeneration) -> None:
    """Replace FSDP's sharded parameters by full plain tensors (the run is over) so that save_pretrained works."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for name, tensor in full.items():
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attribute in module._parameters:
            module._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)


def _wrap(model: KopruForConditionalGeneration, config: TrainConfig, world: int, device: torch.device):
    if world == 1:
        return model
    if config.fsdp:
        # Lazily: torch < 2.6, which pyproject allows, has no torch.distributed.fsdp.fully_shard.
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model.llm):
            fully_shard(layer)
        fully_shard(model)
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _no_sync(model, sync: bool):
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def _autocast(config: TrainConfig, device: torch.device):
    use_bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda"
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _all_reduce_sum(value: torch.Tensor | int | float, device: torch.device) -> Any:
    is_tensor = torch.is_tensor(value)
    tensor = value.detach().clone().float() if is_tensor else torch.tensor(float(value), device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return float(tensor) if is_tensor else int(tensor.item())
