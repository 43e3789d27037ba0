"""Figures of docs/high_resolution.md: positions per image for each resolution mode and strategy
(CLIP-L/336 geometry, counted from configs alone), then forward latency on the tiny pretrained backbones."""

import time

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig
from transformers.utils import logging as hf_logging

from kopru import KopruConfig, KopruForConditionalGeneration, VisionTowerConfig, image_positions
from kopru.backbones import default_backbones

hf_logging.disable_progress_bar()

clip_l = CLIPVisionConfig(image_size=336, patch_size=14)
modes = {"fixed": {}, "anyres": {"mode": "anyres"}, "anyres + avg_pool 2": {"mode": "anyres", "reduction": "avg_pool"},
         "dynamic (Qwen2-VL, pixel_shuffle 2)": {"mode": "dynamic", "reduction": "pixel_shuffle"}}
print("| resolution | strategy | 640x480 | 1920x1080 |")
for name, res in modes.items():
    for strategy in ("projection", "qformer", "cross_attention"):
        cfg = KopruConfig(vision="clip-l", llm="llm", strategy=strategy, resolution=res)
        cells = []
        for w, h in [(640, 480), (1920, 1080)]:
            c = image_positions(cfg, clip_l, w, h)
            cells.append(f"{c.llm_positions}" + (f" (+{c.cross_attention_kv} K/V)" if c.cross_attention_kv else ""))
        print(f"| {name} | {strategy} | {cells[0]} | {cells[1]} |")

torch.set_num_threads(1)
b = default_backbones()
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8))
print("\n| resolution (tiny backbones, 200x150 image, projection) | LLM positions | forward ms |")
for name, res in {"fixed": {}, "anyres": {"mode": "anyres"}, "anyres + pixel_shuffle 2": {"mode": "anyres", "reduction": "pixel_shuffle"},
                  "dynamic (max 128*128 px), pixel_shuffle 2": {"mode": "dynamic", "reduction": "pixel_shuffle", "max_pixels": 128 * 128}}.items():
    torch.manual_seed(0)
    cfg = KopruConfig(vision=VisionTowerConfig(str(b["vision"])), llm=str(b["llm"]), resolution=res)
    model, processor = KopruForConditionalGeneration.from_backbones(cfg)
    batch = processor("<image> what is here?", [image])
    with torch.no_grad():
        model(**batch)
        times = []
        for _ in range(20):
            start = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - start)
    print(f"| {name} | {processor.count(image).llm_positions} | {1000 * float(np.median(times)):.1f} |")
