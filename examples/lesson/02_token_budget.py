"""Exercise 2 (lesson sections 9-10): the image-token budget, 576 vs 32 vs 1, and what high resolution costs.

For real configurations (no weights allocated) and a 128K context, as the lesson assumes: how many positions
one image takes in the LLM context, what share of the context that is, and how many image positions reach the
LLM through cross-attention instead. LLaVA-NeXT and Qwen2-VL grow with the image; the others resize it.
"""

from _common import setup

from kopru.explain import explain

setup()
CONTEXT = 131072
rows = [
    ("llava-1.5-7b", None), ("blip-2-vicuna-7b", None), ("llama-3.2-11b-vision", None),
    ("llava-next-7b", (336, 336)), ("llava-next-7b", (672, 672)), ("llava-next-7b", (1024, 1024)),
    ("qwen2-vl-7b", (336, 336)), ("qwen2-vl-7b", (1024, 1024)),
]
print(f"{'model':22s} {'image':>9s} {'LLM positions':>13s} {'share of 128K':>13s} {'text left':>9s} "
      f"{'cross-attn K/V':>14s}")
for name, image in rows:
    budget = explain(preset=name, image=image, context=CONTEXT, flops=False).image
    size = f"{budget.image_size[0]}x{budget.image_size[1]}"
    print(f"{name:22s} {size:>9s} {budget.llm_positions:>13,} {100 * budget.context_share:>12.2f}% "
          f"{CONTEXT - budget.llm_positions:>9,} {budget.cross_attention_kv:>14,}")

next_ = explain(preset="llava-next-7b", image=(672, 672), flops=False).image
print(f"\nThe lesson counts LLaVA-NeXT as 576 x 4 + 576 = 2880 tokens; at 672x672 it is {next_.llm_positions}:")
print(f"  {next_.note}")
