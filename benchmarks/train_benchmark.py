"""Training throughput: Köprü vs HF `LlavaForConditionalGeneration` on the same weights, in the same run.

Prints tokens/s and (on GPU) model FLOPs utilisation for a stage-1 step (projector trains, LLM back-propagates
activations) and a stage-2 step (LLM trains too), forward + backward (and the full step with AdamW), and
non-padding tokens/s on a LLaVA-like length distribution: HF with padded random batches vs Köprü with
length-grouped batches and packing.

    python benchmarks/train_benchmark.py --preset tiny          # CPU, seconds
    python benchmarks/train_benchmark.py --preset llava-7b      # one H100/H200, random weights, bf16

`--json PATH` also writes every printed row (with the device, torch / transformers versions, preset and date).

Model FLOPs are counted as in the reference anchor: tokens x (4 for stage 1, 6 for stage 2) x LLM parameters
+ the attention score/value products + the vision forward (2 x vision parameters x patches per image).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from kopru.config import KopruConfig, VisionTowerConfig
from kopru.data.batching import collate, collate_packed, pack
from kopru.data.encoding import EncodedSample
from kopru.model import KopruForConditionalGeneration
from kopru.run_info import environment, write_json
from kopru.vision import VisionTower


@dataclass
class Preset:
    vision: dict
    llm: dict
    batch: int
    text_tokens: int  # per sample, after the image
    lengths: tuple[int, int]  # range of the length-distribution benchmark
    peak_tflops: float | None  # dense bf16 peak for MFU (None on CPU)


PRESETS = {
    "tiny": Preset(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    image_size=64, patch_size=8),
        llm=dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2000, max_position_embeddings=4096),
        batch=8, text_tokens=64, lengths=(150, 600), peak_tflops=None,
    ),
    "llava-7b": Preset(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14),
        llm=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096),
        batch=16, text_tokens=64, lengths=(150, 2000), peak_tflops=989.0,
    ),
}
IMAGE_TOKEN = 32000


def build_pair(preset: Preset, device: torch.device, dtype: torch.dtype):
    """HF LLaVA and the Köprü model sharing the very same vision tower, projector weights and LLM modules."""
    vision_config = CLIPVisionConfig(**preset.vision)
    text_config = LlamaConfig(**preset.llm)
    image_token = min(IMAGE_TOKEN, text_config.vocab_size - 1)
    hf = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision_config, text_config=text_config,
                                                   image_token_id=image_token)).to(device, dtype)
    llm = LlamaForCausalLM(text_config)
    llm.model = hf.model.language_model
    llm.lm_head = hf.lm_head
    config = KopruConfig(vision=VisionTowerConfig("benchmark"), llm="benchmark", strategy="projection",
                         image_start_token=None, image_end_token=None, image_token_id=image_token)
    vision = VisionTower(hf.model.vision_tower, config.vision)
    kopru = KopruForConditionalGeneration(config, vision, llm).to(device, dtype)
    kopru.connector.layers[0] = hf.model.multi_modal_projector.linear_1
    kopru.connector.layers[2] = hf.model.multi_modal_projector.linear_2
    return hf, kopru, image_token


def batch_for(preset: Preset, image_token: int, per_image: int, device: torch.device, dtype: torch.dtype) -> dict:
    size = preset.vision["image_size"]
    text = torch.randint(0, image_token, (preset.batch, preset.text_tokens), device=device)
    ids = torch.cat([torch.full((preset.batch, per_image), image_token, device=device), text], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "pixel_values": torch.randn(preset.batch, 3, size, size, device=device, dtype=dtype)}


def set_stage(model: torch.nn.Module, projector: list[torch.nn.Module], llm: torch.nn.Module, stage: int) -> None:
    model.requires_grad_(False)
    for module in projector:
        module.requires_grad_(True)
    if stage == 2:
        llm.requires_grad_(True)


def timed(step, repeats: int, device: torch.device) -> float:
    """Fastest of `repeats` runs after a warm-up (the least disturbed by other work on a shared machine)."""
    step()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def model_flops(preset: Preset, tokens: int, stage: int, llm_params: int, vision_params: int, images: int,
                seq: int) -> float:
    layers, hidden = preset.llm["num_hidden_layers"], preset.llm["hidden_size"]
    factor = 4 if stage == 1 else 6
    attention = factor * layers * hidden * seq * tokens  # QK^T and AV, forward 2x, backward 2x more
    patches = (preset.vision["image_size"] // preset.vision["patch_size"]) ** 2 + 1
    return factor * tokens * llm_params + attention + 2 * vision_params * patches * images


def step_benchmark(preset: Preset, device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict]:
    hf, kopru, image_token = build_pair(preset, device, dtype)
    per_image = kopru.image_count.placeholders
    batch = batch_for(preset, image_token, per_image, device, dtype)
    tokens = batch["input_ids"].numel()
    llm_params = sum(p.numel() for p in kopru.llm.parameters())
    vision_params = sum(p.numel() for p in kopru.vision.parameters())
    rows = []
    for stage in (1, 2):
        for name, model, projector, llm in (
            ("HF LlavaForConditionalGeneration", hf, [hf.model.multi_modal_projector], hf.model.language_model),
            ("Köprü", kopru, [kopru.connector], kopru.llm),
        ):
            set_stage(model, projector, llm, stage)
            if name == "HF LlavaForConditionalGeneration":
                hf_batch = {k: v for k, v in batch.items()}
                hf_batch["labels"] = hf_batch["labels"].masked_fill(hf_batch["input_ids"] == image_token, -100)
                run = model
            else:
                hf_batch, run = batch, model

            def forward_backward(run=run, hf_batch=hf_batch) -> None:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    run(**hf_batch).loss.backward()

            seconds = timed(forward_backward, repeats, device)
            flops = model_flops(preset, tokens, stage, llm_params, vision_params, preset.batch, tokens // preset.batch)
            rows.append({"stage": stage, "implementation": name, "tokens_per_s": tokens / seconds,
                         "mfu": flops / seconds / (preset.peak_tflops * 1e12) if preset.peak_tflops else None})
            model.zero_grad(set_to_none=True)
    # The full stage-2 step, optimizer included (AdamW, state in the parameters' dtype: bf16 on GPU, so a 7B
    # model's weights + gradients + two moments take ~56 GB and fit one 80 GB card).
    set_stage(kopru, [kopru.connector], kopru.llm, 2)
    optimizer = torch.optim.AdamW([p for p in kopru.parameters() if p.requires_grad], lr=1e-5,
                                  fused=device.type == "cuda")

    def full_step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            kopru(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(full_step, repeats, device)
    flops = model_flops(preset, tokens, 2, llm_params, vision_params, preset.batch, tokens // preset.batch)
    rows.append({"stage": "2 + AdamW", "implementation": "Köprü", "tokens_per_s": tokens / seconds,
                 "mfu": flops / seconds / (preset.peak_tflops * 1e12) if preset.peak_tflops else None})
    return rows


def length_benchmark(preset: Preset, device: torch.device, dtype: torch.dtype, repeats: int, seed: int = 0) -> list[dict]:
    """Text-only samples with lengths uniform in `preset.lengths` (LLaVA's instruction data spans ~150-2000)."""
    _, kopru, _ = build_pair(preset, device, dtype)
    llm = kopru.llm
    llm.requires_grad_(True)
    rng = random.Random(seed)
    vocab = preset.llm["vocab_size"] - 1
    samples = []
    for i in range(preset.batch * 4):
        length = rng.randint(*preset.lengths)
        ids = torch.randint(0, vocab, (length,))
        samples.append(EncodedSample(ids, ids.clone(), torch.empty(0, 3, 1, 1), id=str(i)))
    real_tokens = sum(s.length for s in samples)
    rows = []

    def run(batches: list[dict]) -> None:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                llm(**batch).loss.backward()

    shuffled = samples[:]
    rng.shuffle(shuffled)
    padded = [collate(shuffled[i:i + preset.batch], 0) for i in range(0, len(shuffled), preset.batch)]
    by_length = sorted(samples, key=lambda s: s.length)
    grouped = [collate(by_length[i:i + preset.batch], 0) for i in range(0, len(by_length), preset.batch)]
    packed = [collate_packed(pack(by_length, preset.lengths[1] * 2), 0)]
    packed = [{k: v for k, v in b.items()} for b in packed]
    for name, batches in (("HF-style padded random batches", padded), ("Köprü length-grouped", grouped),
                          ("Köprü packed", packed)):
        slots = sum(b["input_ids"].numel() for b in batches)
        seconds = timed(lambda batches=batches: run(batches), repeats, device)
        rows.append({"batching": name, "real_tokens_per_s": real_tokens / seconds, "padding": 1 - real_tokens / slots})
        llm.zero_grad(set_to_none=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--lengths", type=int, nargs=2, metavar=("SHORTEST", "LONGEST"),
                        help="token lengths of the length-distribution benchmark, uniform between the two (default: "
                             "the preset's; scripts/gpu_check.sh --dry takes short ones to be quick)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write every row (tokens/s and MFU per stage and implementation; non-padding "
                             "tokens/s and padding per batching), the ratios, the device, torch / transformers "
                             "versions, preset and date as JSON to PATH")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if args.lengths:
        shortest, longest = args.lengths
        if not 0 < shortest <= longest:
            parser.error(f"--lengths expects 0 < SHORTEST <= LONGEST, found {shortest} {longest}")
        preset = dataclasses.replace(preset, lengths=(shortest, longest))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, dtype {dtype}, "
          f"preset {args.preset}, batch {preset.batch}")
    print("\nforward + backward, 1 image + text per sample")
    rows = step_benchmark(preset, device, dtype, args.repeats)
    step_rows = rows
    for row in rows:
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a (CPU)"
        print(f"  stage {row['stage']:<9} {row['implementation']:<34} {row['tokens_per_s']:>10,.0f} tokens/s   MFU {mfu}")
    step_ratios = {}
    for stage in (1, 2):
        hf, ours = (r["tokens_per_s"] for r in rows if r["stage"] == stage)
        step_ratios[f"stage {stage}"] = ours / hf
        print(f"  stage {stage}: Köprü / HF = {ours / hf:.2f}x")
    about = {"benchmark": "train", **environment(args.preset), "dtype": str(dtype), "batch": preset.batch,
             "text_tokens": preset.text_tokens, "lengths": preset.lengths, "peak_tflops": preset.peak_tflops,
             "repeats": args.repeats, "steps": step_rows, "step_ratios_kopru_over_hf": step_ratios}
    if args.json:  # now too: a run stopped in the length benchmark (a time limit) still leaves the steps' figures
        write_json(args.json, {**about, "complete": False})
    print(f"\nlengths uniform in {preset.lengths}, LLM forward + backward")
    rows = length_benchmark(preset, device, dtype, args.repeats)
    for row in rows:
        print(f"  {row['batching']:<34} {row['real_tokens_per_s']:>10,.0f} non-padding tokens/s   "
              f"padding {row['padding']:.0%}")
    length_ratios = {"grouped / padded": rows[1]["real_tokens_per_s"] / rows[0]["real_tokens_per_s"],
                     "packed / padded": rows[2]["real_tokens_per_s"] / rows[0]["real_tokens_per_s"]}
    print("  " + ", ".join(f"{name} = {ratio:.2f}x" for name, ratio in length_ratios.items()))
    if args.json:
        write_json(args.json, {**about, "complete": True, "length_batching": rows, "length_ratios": length_ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
