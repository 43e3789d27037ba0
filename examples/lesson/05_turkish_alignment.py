"""Exercise 5 (lesson section 11): vision-text alignment for Turkish.

1. What Turkish costs in tokens: the tokenizer's fertility (tokens per word) on the same scenes described in
   English and in Turkish, and how many words of each fit beside an image in a 4K context.
2. Why answers must be compared the Turkish way: "İKİ" lower-cases to "iki" only with Turkish rules.
3. Alignment: train the projection strategy on English and Turkish colour questions about drawn scenes (the
   single-stage recipe: connector + LLM) and measure held-out answer accuracy per language against chance.
   `kopru compare` measures the three strategies on every task, over seeds.
"""

import torch
from _common import build, setup

from kopru.alignment import normalize_text, text_budget, tokenizer_fertility
from kopru.data.batching import collate
from kopru.data.encoding import SampleEncoder
from kopru.data.synthetic import shapes_dataset
from kopru.data.turkish import tr_lower
from kopru.evaluation import answer_accuracy
from kopru.training.recipes import apply_recipe, template_for

seed = setup()
model, processor = build("projection", seed)

captions = shapes_dataset(100, seed=0, kind="caption", split="train")
by_language = {lang: [s.messages[-1]["content"] for s in captions if s.meta["language"] == lang] for lang in ("en", "tr")}
print(f"the same scene: {by_language['en'][0]!r} / {by_language['tr'][0]!r}")
fertility = tokenizer_fertility(processor.tokenizer, by_language)
for language, stats in fertility.items():
    print(f"{language}: {stats['tokens_per_word']:.2f} tokens per word, {stats['chars_per_token']:.2f} characters "
          f"per token")
budget = text_budget(fertility, context_tokens=4096, image_tokens=576)
print(f"words that fit beside one 576-token image in a 4,096 context: en {budget['en']:,}, tr {budget['tr']:,}")

print(f"\nPython: 'İKİ'.lower() = {'İKİ'.lower()!r} ({len('İKİ'.lower())} characters); Turkish rules: "
      f"{tr_lower('İKİ')!r}")
print(f"answers compared after normalize_text: 'İKİ.' -> {normalize_text('İKİ.', 'tr')!r}, 'Üç' -> "
      f"{normalize_text('Üç', 'tr')!r}, '3' -> {normalize_text('3', 'tr')!r}")

encoder = SampleEncoder(processor, template=template_for("single-stage"))


def colour_questions(samples):
    return [s for s in samples if s.meta["task"] == "shapes-colour"]


# "What colour is the triangle?" / "Üçgen ne renk?" about one-shape scenes: the answer is in the pixels, and the
# model has to learn the colour's name in the question's language.
train = encoder.encode_all(colour_questions(shapes_dataset(150, seed=0, split="train", max_groups=1)))
held_out = colour_questions(shapes_dataset(60, seed=1, split="test", max_groups=1))
pad = processor.tokenizer.pad_token_id
before = answer_accuracy(model, encoder, held_out)
apply_recipe(model, "single-stage")
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
draw = torch.Generator().manual_seed(seed)
model.train()
for _ in range(200):
    rows = [train[i] for i in torch.randint(len(train), (16,), generator=draw).tolist()]
    model(**collate(rows, pad)).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
after = answer_accuracy(model, encoder, held_out)
print(f"\nsingle-stage, 200 steps of 16 colour questions ({len(train)} training questions, English and Turkish):")
for language in ("en", "tr"):
    key = f"all/{language}"
    print(f"  {language}: held-out accuracy {before[key]['accuracy']:.2f} before, {after[key]['accuracy']:.2f} after "
          f"(chance {after[key]['chance']:.2f}, {after[key]['n']} questions)")
