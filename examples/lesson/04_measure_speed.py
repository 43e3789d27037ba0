"""Exercise 4 (lesson section 8, "inference speed"): what each strategy costs per image, counted and timed.

FLOPs come from `kopru explain` on the same model (exact, the same on every machine); the timings come from
`model.generate` on this machine (they vary from run to run and are printed after a "~"). The lesson's claim:
projection is slow because of its many image tokens, Q-Former and cross-attention are fast.
"""

import time

import torch
from _common import CONNECTORS, build, setup, tiny_config

from kopru.data.synthetic import shapes_dataset
from kopru.explain import explain, human

setup()
images = [s.images[0] for s in shapes_dataset(4, seed=0, languages=("en",), split="test")[:4]]
print(f"{'strategy':16s} {'LLM positions':>13s} {'K/V':>4s} {'FLOPs / image':>13s} {'FLOPs / text token':>18s} "
      f"{'prefill ms':>10s} {'decode tok/s':>12s}")
for strategy in CONNECTORS:
    model, processor = build(strategy)
    figures = explain(config=tiny_config(strategy), context=256)
    batch = processor(["<image>\nWhat colour is the circle?"] * 4, images, padding_side="left")
    eos = []  # never stop early: every run decodes the same number of tokens
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=2, eos_token_id=eos)  # warm-up
        start = time.perf_counter()
        model.generate(**batch, max_new_tokens=1, eos_token_id=eos)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(**batch, max_new_tokens=17, eos_token_id=eos)
        decode = 4 * 16 / (time.perf_counter() - start - prefill)
    print(f"{strategy:16s} {figures.image.llm_positions:>13d} {figures.image.cross_attention_kv:>4d} "
          f"{human(figures.flops['per_image']):>13s} {human(figures.flops['per_text_token_at_context']):>18s} "
          f"{'~' + format(1000 * prefill, '.1f'):>10s} {'~' + format(decode, '.0f'):>12s}")

print("\nAt the lesson's scale (CLIP-L/336 + Vicuna-7B, forward FLOPs counted on the meta device):")
for name in ("projection-clip-l-vicuna-7b", "qformer-clip-l-vicuna-7b", "cross-attention-clip-l-vicuna-7b"):
    e = explain(preset=name)
    print(f"  {e.strategy:16s} {e.image.llm_positions:4d} LLM positions, {human(e.flops['per_image'], 'FLOPs')} "
          f"per image, of which LLM {human(e.flops['llm_per_image'], 'FLOPs')}")
