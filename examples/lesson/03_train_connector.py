"""Exercise 3 (lesson section 2.3, "only the projection trains"): stage 1 of LLaVA on the tiny backbones.

The align recipe freezes the encoder and the LLM; only the connector learns, from image-caption pairs in the
plain template (image, then the caption; the loss is on the caption). 60 AdamW steps of 16 captions, then the
held-out caption loss before and after. (Sixty steps teach the projector to hand the frozen LLM something it
can caption from; telling scenes apart takes hundreds of steps: `kopru compare`, exercise 5.)
"""

import torch
from _common import build, setup

from kopru.data.batching import collate
from kopru.data.encoding import SampleEncoder
from kopru.data.synthetic import shapes_dataset
from kopru.training.recipes import apply_recipe, count_parameters, template_for

seed = setup()
model, processor = build("projection", seed)
apply_recipe(model, "align")
trainable, total = count_parameters(model)
print(f"align recipe: {trainable:,} of {total:,} parameters train (the projector)")

encoder = SampleEncoder(processor, template=template_for("align"))
train = encoder.encode_all(shapes_dataset(240, seed=0, languages=("en",), kind="caption", split="train"))
held_out = encoder.encode_all(shapes_dataset(32, seed=1, languages=("en",), kind="caption", split="test"))
pad = processor.tokenizer.pad_token_id


def held_out_loss() -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**collate(held_out, pad)).loss)


before = held_out_loss()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
for step in range(1, 61):
    model.train()
    rows = [train[int(i)] for i in order[(step - 1) * 16 % len(train):][:16]]
    loss = model(**collate(rows, pad)).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step in (1, 20, 40, 60):
        print(f"step {step:2d}: training loss {loss.item():.3f}")
print(f"held-out caption loss: {before:.3f} before, {held_out_loss():.3f} after")

