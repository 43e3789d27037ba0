"""Answer accuracy: generate an answer for each question and compare it with the reference, per task and
language, beside the chance level of that task."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from kopru.alignment import normalize_text
from kopru.data.encoding import SampleEncoder, open_image
from kopru.data.sample import Sample


@torch.no_grad()
def answer_accuracy(model, encoder: SampleEncoder, samples: list[Sample], batch_size: int = 16,
                    max_new_tokens: int = 8) -> dict[str, dict[str, Any]]:
    """{"<task>/<language>": {"accuracy", "chance", "n"}, "all/<language>": ...} for samples whose meta holds
    "answer" (and "choices" for the chance level). The prompt is each sample's conversation up to its last
    assistant turn, rendered as in training; decoding is greedy."""
    return summarize_answers(answer_results(model, encoder, samples, batch_size, max_new_tokens))


@torch.no_grad()
def answer_results(model, encoder: SampleEncoder, samples: list[Sample], batch_size: int = 16,
                   max_new_tokens: int = 8) -> list[dict[str, Any]]:
    """One record per sample, in order: {"id", "task", "language", "answer", "correct", "chance"} (answer: the
    generated text; chance: 1 / the number of `meta["choices"]`, NaN without them): what `summarize_answers`
    counts and what a paired comparison of two models on the same questions resamples."""
    processor = encoder.processor
    model.eval()
    device = model.device
    records = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        prompts = [encoder.prompt(_until_last_answer(s.messages)) for s in chunk]
        images = [[open_image(image) for image in s.images] for s in chunk]
        batch = processor(prompts, images, padding_side="left", add_special_tokens=False)
        batch = {k: v.to(device) for k, v in batch.items()}
        new_tokens = model.generate(**batch, max_new_tokens=max_new_tokens)
        for sample, answer in zip(chunk, processor.batch_decode(new_tokens), strict=True):
            language = sample.meta.get("language", "any")
            # Turkish-correct case folding, punctuation and number words ("Üç." == "3" == "üç").
            correct = normalize_text(answer, language) == normalize_text(str(sample.meta["answer"]), language)
            choices = sample.meta.get("choices")
            records.append({"id": sample.id, "task": sample.meta.get("task", "qa"), "language": language,
                            "answer": answer.strip(), "correct": correct, "chance": 1.0 / len(choices) if choices else float("nan")})
    return records


def summarize_answers(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-sample records of `answer_results` -> accuracy, chance level and count per task/language and
    all/language."""
    hits: dict[str, list[bool]] = defaultdict(list)
    chance: dict[str, list[float]] = defaultdict(list)
    for record in records:
        for key in (f"{record['task']}/{record['language']}", f"all/{record['language']}"):
            hits[key].append(record["correct"])
            chance[key].append(record["chance"])
    return {key: {"accuracy": sum(v) / len(v), "chance": sum(chance[key]) / len(chance[key]), "n": len(v)}
            for key, v in sorted(hits.items())}


def _until_last_answer(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return messages[:last]
