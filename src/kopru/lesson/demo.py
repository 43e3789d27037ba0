"""The built-in end-to-end run: every strategy on tiny local backbones, no downloads.

For each strategy: build the model through the real loading path (HF checkpoints saved on disk), count
its image positions, run a forward pass, train on drawn images with captions (stage 1: the connector alone;
stage 2: connector + LLM, or the gated blocks alone for cross-attention), generate a caption for each image,
and save + reload the model. The LLM is random, so this shows the machinery working, not a capable model.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from kopru.config import KopruConfig, VisionTowerConfig
from kopru.lesson.tiny import save_tiny_llm, save_tiny_vision
from kopru.model import KopruForConditionalGeneration
from kopru.training.recipes import apply_recipe

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220)}
STRATEGIES: dict[str, dict] = {
    "projection": {"kind": "mlp", "depth": 2},
    "qformer": {"num_queries": 8, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128},
    "cross_attention": {"every_n_layers": 2},
}


@dataclass
class DemoResult:
    strategy: str
    trainable: int
    total: int
    llm_positions: int
    cross_attention_kv: int
    loss_before: float
    loss_stage1: float
    loss_stage2: float
    forward_ms: float
    captions: list[str]
    reload_max_diff: float


def drawn_image(colour: str, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=COLOURS[colour])
    return image


def run_demo(workdir: str | Path | None = None, steps: int = 40, seed: int = 0) -> list[DemoResult]:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="kopru-demo-"))
    vision_dir, llm_dir = workdir / "tiny-vit", workdir / "tiny-llama"
    if not vision_dir.exists():
        save_tiny_vision(vision_dir, "clip", image_size=32, patch_size=8, hidden=64, layers=2, seed=seed)
    if not llm_dir.exists():
        save_tiny_llm(llm_dir, "llama", hidden=64, layers=4, seed=seed)
    results = []
    for strategy, connector in STRATEGIES.items():
        torch.manual_seed(seed)
        config = KopruConfig(vision=VisionTowerConfig(str(vision_dir)), llm=str(llm_dir), strategy=strategy,
                             connector=dict(connector))
        model, processor = KopruForConditionalGeneration.from_backbones(config)
        colours = list(COLOURS)
        images = [drawn_image(c) for c in colours]
        eos = processor.tokenizer.eos_token_id
        # The caption ends with eos so that generation learns where to stop.
        texts = [f"<image>a {c} square{processor.tokenizer.eos_token}" for c in colours]
        batch = processor(texts, images, return_labels=True)
        model.eval()
        with torch.no_grad():
            model(**batch)  # warm-up, so the timing below is of a steady-state forward
            start = time.perf_counter()
            loss_before = float(model(**batch).loss)
            forward_ms = 1000 * (time.perf_counter() - start)
        apply_recipe(model, "align")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        loss_stage1 = _train(model, batch, steps, f"stage 1 · {strategy}")
        apply_recipe(model, "instruct")
        loss_stage2 = _train(model, batch, steps, f"stage 2 · {strategy}")
        prompts = processor(["<image>"] * len(images), images, padding_side="left")
        new_tokens = model.generate(**prompts, max_new_tokens=6, eos_token_id=eos,
                                    pad_token_id=processor.tokenizer.pad_token_id)
        captions = [c.strip() for c in processor.batch_decode(new_tokens)]
        saved = workdir / f"kopru-{strategy}"
        model.save_pretrained(saved, processor)
        reloaded, _ = KopruForConditionalGeneration.from_pretrained(saved)
        reloaded.eval()
        with torch.no_grad():
            diff = float((reloaded(**batch).logits - model(**batch).logits).abs().max())
        results.append(DemoResult(
            strategy=strategy,
            trainable=trainable,
            total=sum(p.numel() for p in model.parameters()),
            llm_positions=model.image_count.llm_positions,
            cross_attention_kv=model.image_count.cross_attention_kv,
            loss_before=loss_before, loss_stage1=loss_stage1, loss_stage2=loss_stage2, forward_ms=forward_ms, captions=captions,
            reload_max_diff=diff,
        ))
    return results


def _train(model: KopruForConditionalGeneration, batch: dict, steps: int, label: str, lr: float = 3e-3) -> float:
    """`steps` AdamW steps on `batch` with whatever is trainable now; returns the loss afterwards (eval mode)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in tqdm(range(steps), desc=label, leave=False):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def format_results(results: list[DemoResult]) -> str:
    header = ("| strategy | trainable (stage 1) | total params | LLM positions / image | cross-attn K/V / image "
              "| loss before | after stage 1 | after stage 2 | forward ms | reload max diff |")
    lines = [header, "|" + "---|" * 10]
    for r in results:
        lines.append(
            f"| {r.strategy} | {r.trainable:,} | {r.total:,} | {r.llm_positions} | {r.cross_attention_kv} "
            f"| {r.loss_before:.3f} | {r.loss_stage1:.3f} | {r.loss_stage2:.3f} | {r.forward_ms:.1f} | {r.reload_max_diff:.1e} |"
        )
    lines.append("")
    for r in results:
        pairs = ", ".join(f"{colour} -> {caption!r}" for colour, caption in zip(COLOURS, r.captions, strict=True))
        lines.append(f"{r.strategy}: captions after training: {pairs}")
    return "\n".join(lines)
