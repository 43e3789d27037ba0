"""Tiny *pretrained* backbones for the built-in tasks: an encoder that sees, an LLM that speaks. No downloads.

`kopru.lesson.tiny` makes random backbones (the machinery works, nothing is learned). This module trains small ones
on the synthetic data of `kopru.data.synthetic`, in a few minutes on a laptop CPU, so that a Köprü model
built on them has something to connect:

- `pretrain_vision`: a CLIP-style ViT (64 px images, 8 px patches: 64 patch tokens + CLS, width 128, 4 layers)
  trained with supervised heads on its patch features. Shapes scenes: for each of the five regions, the
  shape, colour and count in it (linear heads on the region's pooled patches); for each patch the fraction
  of its pixels of each colour and shape, and the group of shapes in its grid cell (shape, colour, count and
  the cell: "object" heads, so that every patch of a group carries the whole group and a connector or LLM
  that attends to any one of them reads what a question asks; without them a patch's own shape was right for
  0.76 of mostly-inked held-out patches, and a group had to be assembled from patches that each saw a fragment). Digits: the left and right digit (linear head on the
  pooled left / right half). The heads read layers -2 and -1, the features the connectors take; a head on
  CLS predicts the same from the CLS token. Only the encoder is saved (plus a `preprocessor_config.json`).
- `pretrain_language`: a byte-level BPE tokenizer trained on the tasks' English and Turkish text, with a
  chat template, and a Llama (width 128, 4 layers, grouped-query attention) trained as a causal LM on that
  text rendered the way Köprü renders it (questions and answers as chat turns, captions both as chat turns
  and as plain "<s>caption</s>" text), images left out: it knows the words and the answer format, not what
  is in any picture.
- `build_tiny_backbones`: both, into out_dir/"vision" and out_dir/"llm"; the same seed gives the same
  data, initialisation and batches.
- `pretrained_backbones`: for seed 0 the copy shipped in `kopru/assets/tiny` (`kopru.backbones`, which owns where
  the library's default backbones are), for another seed (or without the shipped copy) built once into the cache.

Held-out numbers (the "test" split of the synthetic tasks, never trained on) are written to
`pretrain_report.json` in each directory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from tqdm import tqdm
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from kopru.backbones import ASSETS_DIR, backbone_paths, missing_backbone_files
from kopru.data import turkish
from kopru.data.formats import IMAGE_PLACEHOLDER
from kopru.data.sample import Sample
from kopru.data.synthetic import (
    CELLS,
    COLOURS,
    EN_NUMBERS,
    EN_WHERE,
    MAX_COUNT,
    REGIONS,
    RGB,
    SHAPES,
    Split,
    digits_dataset,
    shapes_dataset,
)
from kopru.image_processing import CONFIG_NAME as PREPROCESSOR_CONFIG
from kopru.threads import default_threads

DEFAULT_SEED = 0
REPORT_NAME = "pretrain_report.json"
VISION_STEPS = 800
LLM_STEPS = 200

# --- vision ---------------------------------------------------------------------------------------------------

PATCH_SIZE = 8
VISION_HIDDEN, VISION_LAYERS, VISION_HEADS, VISION_INTERMEDIATE = 128, 4, 4, 512
FEATURE_LAYERS = (-2, -1)  # the hidden states the connectors read (LLaVA takes -2)
SHAPE_CLASSES = ("none", *SHAPES)  # what a region holds
COLOUR_CLASSES = ("none", *COLOURS)
COUNT_CLASSES = MAX_COUNT + 1  # 0-4 shapes in a region
REGION_OUTPUTS = len(SHAPE_CLASSES) + len(COLOUR_CLASSES) + COUNT_CLASSES
PATCH_OUTPUTS = len(COLOUR_CLASSES) + len(SHAPE_CLASSES)  # pixel fractions per patch ("none" = background)
# Per patch, the group of shapes in the patch's grid cell (shape, colour, count) and the cell itself ("none" for
# the empty corners): every patch of a group carries the whole group, so that a connector or an LLM that
# attends to any one of its patches reads what the questions ask about it.
OBJECT_REGION_CLASSES = ("none", *REGIONS)
OBJECT_OUTPUTS = len(SHAPE_CLASSES) + len(COLOUR_CLASSES) + COUNT_CLASSES + len(OBJECT_REGION_CLASSES)
NUM_DIGITS = 10
SIDES = ("left", "right")


@dataclass
class ShapesBatch:
    pixels: torch.Tensor  # uint8 [N, 3, H, W]
    regions: torch.Tensor  # long [N, regions, 3]: shape class, colour class, count
    patches: torch.Tensor  # float [N, patches, PATCH_OUTPUTS]: colour fractions, then shape fractions

    def take(self, index: torch.Tensor) -> ShapesBatch:
        return ShapesBatch(self.pixels[index], self.regions[index], self.patches[index])


@dataclass
class DigitsBatch:
    pixels: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # long [N, 2]: left digit, right digit

    def take(self, index: torch.Tensor) -> DigitsBatch:
        return DigitsBatch(self.pixels[index], self.labels[index])


def _pixels(sample: Sample) -> np.ndarray:
    return np.asarray(sample.images[0].convert("RGB"), dtype=np.uint8)  # [H, W, 3]


def _patch_fractions(classes: np.ndarray, num_classes: int, patch: int) -> np.ndarray:
    """[H, W] class map -> [patches, num_classes]: the fraction of each patch's pixels in each class."""
    grid = classes.shape[0] // patch
    one_hot = np.eye(num_classes, dtype=np.float32)[classes[: grid * patch, : grid * patch]]
    return one_hot.reshape(grid, patch, grid, patch, num_classes).mean(axis=(1, 3)).reshape(grid * grid, -1)


def shapes_targets(samples: Sequence[Sample], patch: int = PATCH_SIZE) -> ShapesBatch:
    """Pixels and targets of shapes scenes (one sample per scene), read from `meta["scene"]` and the pixels:
    every shape is drawn in its exact colour, and colours are unique within a scene."""
    pixels, regions, patches = [], [], []
    for sample in samples:
        image = _pixels(sample)
        colour_map = np.zeros(image.shape[:2], dtype=np.int64)
        shape_map = np.zeros(image.shape[:2], dtype=np.int64)
        target = np.zeros((len(REGIONS), 3), dtype=np.int64)
        for group in sample.meta["scene"]:
            ink = (image == np.array(RGB[group["colour"]], dtype=np.uint8)).all(axis=-1)
            colour_map[ink] = COLOUR_CLASSES.index(group["colour"])
            shape_map[ink] = SHAPE_CLASSES.index(group["shape"])
            target[REGIONS.index(group["region"])] = (
                SHAPE_CLASSES.index(group["shape"]), COLOUR_CLASSES.index(group["colour"]), group["count"])
        pixels.append(image)
        regions.append(target)
        patches.append(np.concatenate([_patch_fractions(colour_map, len(COLOUR_CLASSES), patch),
                                       _patch_fractions(shape_map, len(SHAPE_CLASSES), patch)], axis=-1))
    return ShapesBatch(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous(),
                       torch.from_numpy(np.stack(regions)), torch.from_numpy(np.stack(patches)))


def digits_targets(samples: Sequence[Sample]) -> DigitsBatch:
    """Pixels and (left, right) labels of digits samples (one per image)."""
    pixels = np.stack([_pixels(sample) for sample in samples])
    labels = [[sample.meta["left_label"], sample.meta["right_label"]] for sample in samples]
    return DigitsBatch(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels))


def vision_data(num_scenes: int, num_digits: int, seed: int, split: Split, image_size: int = 64,
                patch: int = PATCH_SIZE) -> tuple[ShapesBatch, DigitsBatch]:
    """Shapes scenes (half with up to two groups, as the built-in tasks ask, half with up to three) and digit
    pairs of one split, as tensors."""
    half = num_scenes // 2
    scenes = [
        *shapes_dataset(half, seed=seed, languages=("en",), kind="caption", image_size=image_size, split=split),
        *shapes_dataset(num_scenes - half, seed=seed + 1, languages=("en",), kind="caption", image_size=image_size,
                        split=split, max_groups=3),
    ]
    digits = digits_dataset(num_digits, seed=seed, languages=("en",), image_size=image_size, split=split)
    return shapes_targets(scenes, patch), digits_targets(digits)


def region_weights(image_size: int, patch: int = PATCH_SIZE) -> torch.Tensor:
    """[regions, patches]: how much of each patch lies in each region's cell of the 3x3 grid, rows summing to 1
    (mean pooling over a region, patches on a cell edge counted by their overlap)."""
    grid = image_size // patch
    edges = [round(i * image_size / 3) for i in range(4)]
    weights = torch.zeros(len(REGIONS), grid * grid)
    for index, region in enumerate(REGIONS):
        row, col = CELLS[region]
        x0, x1, y0, y1 = edges[col], edges[col + 1], edges[row], edges[row + 1]
        for p in range(grid * grid):
            px, py = (p % grid) * patch, (p // grid) * patch
            overlap_x = max(0, min(x1, px + patch) - max(x0, px))
            overlap_y = max(0, min(y1, py + patch) - max(y0, py))
            weights[index, p] = overlap_x * overlap_y
    return weights / weights.sum(dim=1, keepdim=True)


def patch_regions(image_size: int, patch: int = PATCH_SIZE) -> torch.Tensor:
    """[patches]: the region whose grid cell holds each patch's centre (index into REGIONS), -1 in a corner."""
    grid = image_size // patch
    edges = [round(i * image_size / 3) for i in range(4)]
    cells = {cell: index for index, cell in enumerate(CELLS[region] for region in REGIONS)}
    found = torch.full((grid * grid,), -1, dtype=torch.long)
    for p in range(grid * grid):
        centre_x, centre_y = (p % grid) * patch + patch / 2, (p // grid) * patch + patch / 2
        column = sum(centre_x >= edge for edge in edges[1:3])
        row = sum(centre_y >= edge for edge in edges[1:3])
        found[p] = cells.get((row, column), -1)
    return found


def object_targets(regions: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Per-region targets [N, regions, 3] (shape, colour, count) and `patch_regions` -> per-patch targets
    [N, patches, 4]: the group in the patch's cell (shape, colour, count; none / 0 in an empty cell or a corner)
    and the cell's class in OBJECT_REGION_CLASSES."""
    padded = torch.cat([regions, torch.zeros_like(regions[:, :1])], dim=1)  # index -1: a corner, nothing there
    groups = padded[:, cells]  # [N, patches, 3]
    where = (cells + 1).expand(len(regions), -1)[..., None]
    return torch.cat([groups, where], dim=-1)


def side_weights(image_size: int, patch: int = PATCH_SIZE) -> torch.Tensor:
    """[2, patches]: mean pooling over the left and the right half of the patch grid."""
    grid = image_size // patch
    columns = torch.arange(grid * grid) % grid
    weights = torch.stack([(columns < grid // 2).float(), (columns >= grid // 2).float()])
    return weights / weights.sum(dim=1, keepdim=True)


def tiny_vision_encoder(image_size: int = 64) -> CLIPVisionModel:
    return CLIPVisionModel(CLIPVisionConfig(
        hidden_size=VISION_HIDDEN, intermediate_size=VISION_INTERMEDIATE, num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS, image_size=image_size, patch_size=PATCH_SIZE, projection_dim=VISION_HIDDEN,
    ))


class VisionHeads(nn.Module):
    """Linear heads on the encoder's features; trained with it, then thrown away.

    Per feature layer (own LayerNorm and heads): region logits from the region-pooled patches, patch logits
    per patch, digit logits from the pooled halves. From the CLS token (after the encoder's post-LayerNorm):
    all regions' and both digits' logits at once.
    """

    def __init__(self, hidden: int, image_size: int, patch: int = PATCH_SIZE) -> None:
        super().__init__()
        self.register_buffer("regions", region_weights(image_size, patch), persistent=False)
        self.register_buffer("sides", side_weights(image_size, patch), persistent=False)
        self.register_buffer("cells", patch_regions(image_size, patch), persistent=False)
        layers = len(FEATURE_LAYERS)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.region = nn.ModuleList(nn.Linear(hidden, REGION_OUTPUTS) for _ in range(layers))
        self.patch = nn.ModuleList(nn.Linear(hidden, PATCH_OUTPUTS) for _ in range(layers))
        self.object = nn.ModuleList(nn.Linear(hidden, OBJECT_OUTPUTS) for _ in range(layers))
        self.digit = nn.ModuleList(nn.Linear(hidden, NUM_DIGITS) for _ in range(layers))
        self.cls_region = nn.Linear(hidden, len(REGIONS) * REGION_OUTPUTS)
        self.cls_digit = nn.Linear(hidden, len(SIDES) * NUM_DIGITS)

    def forward(self, hidden_states: Sequence[torch.Tensor], pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """hidden_states: the encoder's, pooled: its CLS output -> logits by name ("region@-2", "digit@cls", ...)."""
        logits: dict[str, torch.Tensor] = {}
        for index, layer in enumerate(FEATURE_LAYERS):
            patches = self.norms[index](hidden_states[layer][:, 1:])  # [B, P, D], CLS dropped
            logits[f"region@{layer}"] = self.region[index](torch.einsum("rp,bpd->brd", self.regions, patches))
            logits[f"patch@{layer}"] = self.patch[index](patches)
            logits[f"object@{layer}"] = self.object[index](patches)
            logits[f"digit@{layer}"] = self.digit[index](torch.einsum("sp,bpd->bsd", self.sides, patches))
        logits["region@cls"] = self.cls_region(pooled).view(-1, len(REGIONS), REGION_OUTPUTS)
        logits["digit@cls"] = self.cls_digit(pooled).view(-1, len(SIDES), NUM_DIGITS)
        return logits


def _split_region(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape, colour = len(SHAPE_CLASSES), len(COLOUR_CLASSES)
    return logits[..., :shape], logits[..., shape:shape + colour], logits[..., shape + colour:]


def _split_object(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    sizes = (len(SHAPE_CLASSES), len(COLOUR_CLASSES), COUNT_CLASSES, len(OBJECT_REGION_CLASSES))
    return tuple(logits.split(sizes, dim=-1))


def _vision_loss(logits: dict[str, torch.Tensor], shapes: ShapesBatch, digits: DigitsBatch, num_shapes: int,
                 cells: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every head; the first `num_shapes` images of the batch are the shapes scenes."""
    losses = []
    objects = object_targets(shapes.regions, cells)
    for name, value in logits.items():
        head = name.split("@")[0]
        if head == "object":
            for part, target in zip(_split_object(value[:num_shapes]), objects.unbind(-1), strict=True):
                losses.append(F.cross_entropy(part.flatten(0, 1), target.flatten()))
        elif head == "region":
            for part, target in zip(_split_region(value[:num_shapes]), shapes.regions.unbind(-1), strict=True):
                losses.append(F.cross_entropy(part.flatten(0, 1), target.flatten()))
        elif head == "patch":
            colour = len(COLOUR_CLASSES)
            for part, target in ((value[:num_shapes, :, :colour], shapes.patches[..., :colour]),
                                 (value[:num_shapes, :, colour:], shapes.patches[..., colour:])):
                losses.append(F.cross_entropy(part.flatten(0, 1), target.flatten(0, 1)))  # soft targets
        else:  # digit
            losses.append(F.cross_entropy(value[num_shapes:].flatten(0, 1), digits.labels.flatten()))
    return torch.stack(losses).mean()


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> what `ImagePreprocessor` gives for mean = std = 0.5 at the native size."""
    return (pixels.float() / 255.0 - 0.5) / 0.5


def _encode(encoder: CLIPVisionModel, heads: VisionHeads, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    output = encoder(pixel_values=_normalise(pixels), output_hidden_states=True)
    return heads(output.hidden_states, output.pooler_output)


def _cosine_lr(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate_vision(encoder: CLIPVisionModel, heads: VisionHeads, shapes: ShapesBatch, digits: DigitsBatch,
                    batch_size: int = 256) -> dict[str, float]:
    """Held-out accuracies of every head: per region (all five regions, and the occupied ones only), per patch
    (the majority class of patches at least 3/4 ink), per digit, and whole scenes (all 15 region answers)."""
    encoder.eval()
    heads.eval()
    shape_logits = _batched(lambda p: _encode(encoder, heads, p), shapes.pixels, batch_size)
    digit_logits = _batched(lambda p: _encode(encoder, heads, p), digits.pixels, batch_size)
    occupied = shapes.regions[..., 2] > 0
    metrics: dict[str, float] = {}
    for source in (*FEATURE_LAYERS, "cls"):
        predictions = torch.stack([part.argmax(-1) for part in _split_region(shape_logits[f"region@{source}"])], -1)
        correct = predictions == shapes.regions
        for index, name in enumerate(("shape", "colour", "count")):
            metrics[f"region_{name}@{source}"] = correct[..., index].float().mean().item()
            metrics[f"occupied_{name}@{source}"] = correct[..., index][occupied].float().mean().item()
        metrics[f"scene_exact@{source}"] = correct.flatten(1).all(-1).float().mean().item()
        digit_predictions = digit_logits[f"digit@{source}"].argmax(-1)
        metrics[f"digit@{source}"] = (digit_predictions == digits.labels).float().mean().item()
        if source != "cls":
            objects = object_targets(shapes.regions, heads.cells)
            in_group = objects[..., 2] > 0  # patches whose cell holds a group
            for name, part, target in zip(("shape", "colour", "count", "region"),
                                          _split_object(shape_logits[f"object@{source}"]), objects.unbind(-1),
                                          strict=True):
                metrics[f"object_{name}@{source}"] = (part.argmax(-1) == target)[in_group].float().mean().item()
            patch_logits = shape_logits[f"patch@{source}"]
            colour = len(COLOUR_CLASSES)
            inked = shapes.patches[..., 0] < 0.25  # at least three quarters of the patch is a shape
            for name, part, target in (("colour", patch_logits[..., :colour], shapes.patches[..., :colour]),
                                       ("shape", patch_logits[..., colour:], shapes.patches[..., colour:])):
                agree = part.argmax(-1) == target.argmax(-1)
                metrics[f"patch_{name}@{source}"] = agree[inked].float().mean().item()
    return metrics


def _batched(run: Callable[[torch.Tensor], dict[str, torch.Tensor]], pixels: torch.Tensor, batch_size: int
             ) -> dict[str, torch.Tensor]:
    outputs = [run(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
    return {name: torch.cat([output[name] for output in outputs]) for name in outputs[0]}


def preprocessor_config(image_size: int) -> dict[str, Any]:
    """An HF CLIP-style `preprocessor_config.json`: squash to image_size (no crop), scale to [-1, 1]."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 3,
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }


def pretrain_vision(out_dir: str | Path, seed: int = DEFAULT_SEED, steps: int = VISION_STEPS, image_size: int = 64,
                    batch_size: int = 48, lr: float = 2e-3, num_scenes: int = 6000, num_digits: int = 3000,
                    eval_size: int = 400, progress: bool = True) -> dict[str, Any]:
    """Train the tiny encoder and save it (safetensors + preprocessor_config.json) to `out_dir`.

    Each step sees `batch_size` images, two thirds shapes scenes and one third digit pairs. Returns (and
    writes to `pretrain_report.json`) the held-out accuracies of the heads on the "test" split.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    train_shapes, train_digits = vision_data(num_scenes, num_digits, seed, "train", image_size)
    test_shapes, test_digits = vision_data(eval_size, eval_size, seed, "test", image_size)
    encoder = tiny_vision_encoder(image_size)
    heads = VisionHeads(VISION_HIDDEN, image_size)
    parameters = [*encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _cosine_lr(step, steps, max(1, steps // 10)))
    generator = torch.Generator().manual_seed(seed)
    num_shapes = batch_size - batch_size // 3
    encoder.train()
    heads.train()
    losses = []
    for _ in tqdm(range(steps), desc="pretrain vision", disable=not progress):
        shapes = train_shapes.take(torch.randint(len(train_shapes.pixels), (num_shapes,), generator=generator))
        digits = train_digits.take(torch.randint(len(train_digits.pixels), (batch_size - num_shapes,),
                                                 generator=generator))
        logits = _encode(encoder, heads, torch.cat([shapes.pixels, digits.pixels]))
        loss = _vision_loss(logits, shapes, digits, num_shapes, heads.cells)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    metrics = evaluate_vision(encoder, heads, test_shapes, test_digits)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out_dir)
    (out_dir / PREPROCESSOR_CONFIG).write_text(json.dumps(preprocessor_config(image_size), indent=2) + "\n")
    report = {"seed": seed, "steps": steps, "batch_size": batch_size, "final_train_loss": _tail_mean(losses),
              "test_accuracy": metrics, "test_images": {"shapes": eval_size, "digits": eval_size},
              "seconds": round(time.perf_counter() - start, 1)}
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _tail_mean(values: Sequence[float], tail: int = 10) -> float:
    return float(np.mean(values[-tail:])) if values else float("nan")


# --- language -------------------------------------------------------------------------------------------------

LLM_HIDDEN, LLM_LAYERS, LLM_HEADS, LLM_KV_HEADS, LLM_INTERMEDIATE = 128, 4, 4, 2, 352
MAX_POSITIONS = 512
# An upper bound: the tasks' text runs out of merges at about 630 tokens (every word of it one token, or two).
VOCAB_SIZE = 1024
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# Köprü's fallback template spelled in Jinja: bos, "User: ...\n", "Assistant: answer</s>\n". The generation
# prompt ends in "Assistant:" and the answer starts with a space, as byte-level BPE splits " answer", so a
# prompt rendered with add_generation_prompt is a prefix of the whole conversation.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}System: {{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def text_samples(num_scenes: int, num_digits: int, seed: int, split: Split) -> tuple[list[Sample], list[Sample]]:
    """The built-in tasks' conversations of one split, both languages: (questions and answers, captions)."""
    half = num_scenes // 2
    qa = [
        *shapes_dataset(half, seed=seed, split=split, image_size=32),
        *shapes_dataset(num_scenes - half, seed=seed + 1, split=split, image_size=32, max_groups=3),
        *digits_dataset(num_digits, seed=seed, split=split, image_size=32),
    ]
    captions = [
        *shapes_dataset(half, seed=seed, split=split, kind="caption", image_size=32),
        *shapes_dataset(num_scenes - half, seed=seed + 1, split=split, kind="caption", image_size=32, max_groups=3),
    ]
    return qa, captions


def _without_images(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{**message, "content": message["content"].replace(IMAGE_PLACEHOLDER, "")} for message in messages]


@functools.cache
def _chat_template() -> jinja2.Template:
    # The environment transformers renders chat templates in (trim_blocks, lstrip_blocks).
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise_template_error
    return environment.from_string(CHAT_TEMPLATE)


def _raise_template_error(message: str) -> None:
    raise ValueError(message)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """`CHAT_TEMPLATE` rendered as `tokenizer.apply_chat_template(..., tokenize=False)` renders it, without
    needing the tokenizer (which is trained on this text)."""
    return _chat_template().render(messages=messages, bos_token=BOS, eos_token=EOS,
                                   add_generation_prompt=add_generation_prompt)


def render_documents(qa: Sequence[Sample], captions: Sequence[Sample]) -> list[str]:
    """The text the LM trains on, as Köprü's recipes render it minus the images: every conversation through the
    chat template, and each caption once more as plain "<s>caption</s>" (the align recipe's layout)."""
    documents = [render_chat(_without_images(sample.messages)) for sample in [*qa, *captions]]
    documents += [f"{BOS}{sample.messages[-1]['content']}{EOS}" for sample in captions]
    return documents


def vocabulary_text() -> list[str]:
    """Every word the phrasebooks know (numbers to ten, all colours and shapes of `turkish`), in case a task
    grows beyond what the sampled data holds."""
    words = [*EN_NUMBERS, *turkish.NUMBERS, *turkish.COLOURS, *turkish.COLOURS.values(), *turkish.SHAPES,
             *turkish.SHAPES.values(), *EN_WHERE.values(), *(turkish.where_word(r) for r in REGIONS),
             *(turkish.plural(s) for s in turkish.SHAPES.values()), "System:", "User:", "Assistant:"]
    return [" ".join(words), " ".join(turkish.tr_capitalize(word) for word in words)]


def train_tokenizer(texts: Sequence[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text round-trips, whatever the merges) with <s>, </s>, <pad> and the chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    # unk_token names an existing id (see kopru.lesson.tiny): a byte-level BPE never produces it, and a loader that
    # would otherwise add a default unk token cannot outgrow the LLM's embedding table.
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=EOS, clean_up_tokenization_spaces=False,
                                   model_max_length=MAX_POSITIONS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llm(tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=LLM_HIDDEN, intermediate_size=LLM_INTERMEDIATE,
        num_hidden_layers=LLM_LAYERS, num_attention_heads=LLM_HEADS, num_key_value_heads=LLM_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def pack(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str], block: int, seed: int) -> torch.Tensor:
    """Shuffle the documents, tokenise, concatenate and cut into [blocks, block] token ids (the tail dropped)."""
    order = list(documents)
    random.Random(seed).shuffle(order)
    ids = [i for ids in tokenizer(order, add_special_tokens=False)["input_ids"] for i in ids]
    usable = len(ids) // block * block
    return torch.tensor(ids[:usable]).view(-1, block)


@torch.no_grad()
def lm_loss(model: LlamaForCausalLM, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token loss over packed blocks."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i:i + batch_size]
        total += model(input_ids=batch, labels=batch).loss.item() * batch.numel()
        count += batch.numel()
    return total / count


@torch.no_grad()
def answer_mass(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, qa: Sequence[Sample],
                batch_size: int = 64) -> float:
    """Mean probability, over held-out questions (image left out), that the LM's answer is one of the task's
    possible answers followed by eos: 1 when it has learnt the answer format (it cannot know which answer)."""
    model.eval()
    prompts, answers, owners = [], [], []
    for index, sample in enumerate(qa):
        prompt = render_chat(_without_images(sample.messages[:-1]), add_generation_prompt=True)
        for choice in sample.meta["choices"]:
            prompts.append(prompt)
            answers.append(f" {choice}{EOS}")
            owners.append(index)
    probabilities = torch.zeros(len(qa))
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        log_probs = _continuation_log_probs(model, tokenizer, prompts[chunk], answers[chunk])
        probabilities.index_add_(0, torch.tensor(owners[chunk]), log_probs.exp())
    return probabilities.mean().item()


def _continuation_log_probs(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                            continuations: list[str]) -> torch.Tensor:
    """log P(continuation | prompt) for each pair, in one right-padded batch."""
    pieces = [(tokenizer(p, add_special_tokens=False)["input_ids"], tokenizer(c, add_special_tokens=False)["input_ids"])
              for p, c in zip(prompts, continuations, strict=True)]
    length = max(len(p) + len(c) for p, c in pieces)
    ids = torch.full((len(pieces), length), tokenizer.pad_token_id)
    scored = torch.zeros(len(pieces), length, dtype=torch.bool)
    for row, (prompt, continuation) in enumerate(pieces):
        ids[row, :len(prompt) + len(continuation)] = torch.tensor(prompt + continuation)
        scored[row, len(prompt):len(prompt) + len(continuation)] = True
    mask = (ids != tokenizer.pad_token_id) | scored
    log_probs = model(input_ids=ids, attention_mask=mask.long()).logits.log_softmax(-1)
    token_log_probs = log_probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_log_probs * scored[:, 1:]).sum(-1)


def pretrain_language(out_dir: str | Path, seed: int = DEFAULT_SEED, steps: int = LLM_STEPS,
                      batch_size: int = 16, block: int = 256, lr: float = 5e-3, num_scenes: int = 1500,
                      num_digits: int = 1000, eval_size: int = 200, progress: bool = True) -> dict[str, Any]:
    """Train the tokenizer and the tiny Llama on the tasks' text and save both (safetensors) to `out_dir`.

    Returns (and writes to `pretrain_report.json`) the held-out LM loss (the "test" split's text), the
    probability it gives to well-formed answers of held-out questions (`answer_mass`), and the vocabulary size.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    qa, captions = text_samples(num_scenes, num_digits, seed, "train")
    test_qa, test_captions = text_samples(eval_size, eval_size, seed, "test")
    documents = render_documents(qa, captions)
    special = re.compile("|".join(re.escape(token) for token in (BOS, EOS, PAD)))
    tokenizer = train_tokenizer([special.sub("", text) for text in [*documents, *vocabulary_text()]])
    train_blocks = pack(tokenizer, documents, block, seed)
    test_blocks = pack(tokenizer, render_documents(test_qa, test_captions), block, seed)
    model = tiny_llm(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _cosine_lr(step, steps, max(1, steps // 10)))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="pretrain language", disable=not progress):
        batch = train_blocks[torch.randint(len(train_blocks), (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    test_loss = lm_loss(model, test_blocks)
    picker = random.Random(seed)
    questions = {language: [s for s in test_qa if s.meta["language"] == language] for language in ("en", "tr")}
    questions = {language: picker.sample(found, min(eval_size, len(found))) for language, found in questions.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report = {
        "seed": seed, "steps": steps, "batch_size": batch_size, "block": block, "vocab_size": len(tokenizer),
        "train_tokens": train_blocks.numel(), "final_train_loss": _tail_mean(losses), "test_loss": test_loss,
        "test_tokens": test_blocks.numel(),
        "answer_mass": {language: answer_mass(model, tokenizer, found) for language, found in questions.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


# --- both, and the shipped copy -----------------------------------------------------------------------------------

def build_tiny_backbones(out_dir: str | Path, seed: int = DEFAULT_SEED, vision_steps: int = VISION_STEPS,
                         llm_steps: int = LLM_STEPS, num_threads: int | None = None, progress: bool = True,
                         vision_options: dict[str, Any] | None = None, llm_options: dict[str, Any] | None = None,
                         ) -> dict[str, Path]:
    """Pretrain both backbones into out_dir/"vision" and out_dir/"llm"; returns those paths.

    num_threads: torch's intra-op threads while training; None: torch's default (one per core), less as many
    cores as the load average says are busy (oversubscribed cores make a small model many times slower).
    vision_options / llm_options: further keyword arguments of `pretrain_vision` / `pretrain_language`.
    """
    out_dir = Path(out_dir)
    paths = {"vision": out_dir / "vision", "llm": out_dir / "llm"}
    with _threads(num_threads):
        pretrain_vision(paths["vision"], seed=seed, steps=vision_steps, progress=progress, **(vision_options or {}))
        pretrain_language(paths["llm"], seed=seed, steps=llm_steps, progress=progress, **(llm_options or {}))
    return paths


@contextlib.contextmanager
def _threads(num_threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads or min(previous, default_threads()))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _complete(root: Path) -> bool:
    """Whether `root` holds both backbones, fully written."""
    return not missing_backbone_files(root)


def cache_dir() -> Path:
    """Where backbones built on demand go: $KOPRU_CACHE, else $XDG_CACHE_HOME/kopru, else ~/.cache/kopru."""
    if os.environ.get("KOPRU_CACHE"):
        return Path(os.environ["KOPRU_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "kopru"


def pretrained_backbones(seed: int = DEFAULT_SEED) -> dict[str, Path]:
    """Paths of the tiny pretrained backbones of `seed`: for seed 0 the copy shipped in the package when present
    (`kopru.backbones.default_backbones`, what the library trains on by default), else the ones in the cache
    (cache_dir()/tiny-<seed>), built there on first use (a few minutes on a CPU)."""
    if seed == DEFAULT_SEED and _complete(ASSETS_DIR):
        root = ASSETS_DIR
    else:
        root = cache_dir() / f"tiny-{seed}"
        if not _complete(root):
            _build_atomically(root, seed)
    return backbone_paths(root)


def _build_atomically(root: Path, seed: int) -> None:
    """Build into a temporary sibling and rename it into place: an interrupted or concurrent build never
    leaves a half-written directory where `pretrained_backbones` looks."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.with_name(f"{root.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    build_tiny_backbones(staging, seed=seed)
    if root.exists() and not _complete(root):
        shutil.rmtree(root, ignore_errors=True)
    try:
        staging.rename(root)
    except OSError:  # another process finished first
        if not _complete(root):
            raise
        shutil.rmtree(staging, ignore_errors=True)


def iter_report_lines(root: str | Path) -> Iterator[str]:
    """A short human-readable summary of the `pretrain_report.json` files under `root`."""
    root = Path(root)
    vision = json.loads((root / "vision" / REPORT_NAME).read_text())
    accuracy = vision["test_accuracy"]
    yield f"vision ({vision['steps']} steps, {vision['seconds']} s), held-out accuracy at layer -2 / -1 / CLS:"
    for name in ("occupied_shape", "occupied_colour", "occupied_count", "region_count", "scene_exact", "digit"):
        values = " / ".join(f"{accuracy[f'{name}@{source}']:.3f}" for source in (*FEATURE_LAYERS, "cls"))
        yield f"  {name:16s} {values}"
    for name in ("object_shape", "object_colour", "object_count", "object_region", "patch_colour", "patch_shape"):
        values = " / ".join(f"{accuracy[f'{name}@{source}']:.3f}" for source in FEATURE_LAYERS)
        yield f"  {name:16s} {values}"
    llm = json.loads((root / "llm" / REPORT_NAME).read_text())
    mass = llm["answer_mass"]
    yield (f"llm ({llm['steps']} steps, {llm['seconds']} s, vocabulary {llm['vocab_size']}): held-out loss "
           f"{llm['test_loss']:.3f}, probability of a well-formed answer en {mass['en']:.3f} / tr {mass['tr']:.3f}")


__all__ = [
    "CHAT_TEMPLATE",
    "build_tiny_backbones",
    "cache_dir",
    "pretrain_language",
    "pretrain_vision",
    "pretrained_backbones",
]
