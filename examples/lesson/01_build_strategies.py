"""Exercise 1 (lesson sections 2-7): build each strategy and follow an image from pixels to logits.

Part 1 runs the three strategies on the tiny backbones and prints the shape after every step, as the lesson
writes them for LLaVA (336x336x3 -> 577 x 1024 -> 576 x 1024 -> 576 x 4096 -> concatenated with the text).
Part 2 gives the same figures at the lesson's scale (CLIP-L/336 + a 7B LLM) without allocating a weight.
"""

import torch
from _common import CONNECTORS, build, setup, shape

from kopru.data.synthetic import shapes_dataset
from kopru.explain import explain
from kopru.training.recipes import apply_recipe, count_parameters

setup()
image = shapes_dataset(1, seed=0, languages=("en",), split="test")[0].images[0]

print("Part 1: the tiny backbones (ViT 64 px, width 128; Llama width 128, 4 layers)")
for strategy in CONNECTORS:
    model, processor = build(strategy)
    batch = processor(["<image>\nWhat colour is the circle?"], [image])
    with torch.no_grad():
        pixels = batch["pixel_values"]
        hidden = model.vision.encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        features = model.vision(pixels)
        image_vectors = model.connector(features)
        embeds, _ = model.prepare_inputs(batch["input_ids"], pixels)
        logits = model(**batch).logits
    apply_recipe(model, "align")
    trainable, total = count_parameters(model)
    count = model.image_count
    print(f"\n{strategy}")
    print(f"  pixels {shape(pixels)} -> encoder layer -2 {shape(hidden)} -> features {shape(features)}")
    print(f"  connector {shape(image_vectors)} -> LLM input {shape(embeds)} -> logits {shape(logits)}")
    print(f"  LLM positions per image: {count.llm_positions} ({count.placeholders} image + {count.markers} markers), "
          f"cross-attention K/V per image: {count.cross_attention_kv}")
    print(f"  parameters: {total:,} in all, {trainable:,} trainable in stage 1 (align)")

print("\nPart 2: CLIP-L/336 + Vicuna-7B on the meta device (no weights allocated)")
for name in ("projection-clip-l-vicuna-7b", "qformer-clip-l-vicuna-7b", "cross-attention-clip-l-vicuna-7b"):
    e = explain(preset=name, flops=False)
    stages = " -> ".join(f"{s.name} {s.shape}" for s in e.stages[1:4])
    print(f"\n{e.strategy}: {stages}")
    print(f"  connector {e.component('connector'):,} parameters (align trains {e.trainable('align'):,}); "
          f"{e.image.llm_positions} LLM positions per image, {e.image.cross_attention_kv} cross-attention K/V")
llava = explain(preset="llava-1.5-7b", flops=False)
print(f"\nLLaVA-1.5-7B's MLP projector (1024 -> 4096 -> 4096): {llava.component('connector'):,} parameters")
