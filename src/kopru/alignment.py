"""Vision-text alignment for Turkish (and English): text normalisation, tokenizer fertility, caption retrieval.

- `normalize_text`: Turkish-correct case folding, NFC, punctuation and spacing, number words 0-10 as digits,
  so that "Üç." == "3" == "üç" and "IŞIK" → "ışık" (`str.lower` gives "işik").
- `tokenizer_fertility` / `text_budget`: tokens per word per language, and how many words of each language fit
  in a context window once the image tokens are paid for (Turkish, agglutinative, usually needs more tokens per
  word than English, so fewer of its words fit).
- `caption_scores` / `caption_retrieval`: image↔text retrieval by caption likelihood. Every (image, caption)
  pair is scored by the model's mean log-likelihood of the caption given the image (plain template, the
  `align` recipe's), which works for every strategy since it needs nothing but the model's logits.
- `cross_lingual_split`: samples by `meta["language"]`, for train-on-English / test-on-Turkish experiments.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from kopru.data.batching import collate
from kopru.data.encoding import IGNORE_INDEX, EncodedSample, SampleEncoder
from kopru.data.sample import Sample
from kopru.data.turkish import NUMBERS, tr_lower

# --- normalisation ------------------------------------------------------------------------------------------

# Number words per language. Tables are per language on purpose: English "on" is a preposition, Turkish "on"
# is ten. Known ambiguity, accepted because both sides of a comparison are normalised alike: Turkish "bir" is
# also the indefinite article ("kırmızı bir daire" → "kırmızı 1 daire"), English "one" a pronoun.
NUMBER_WORDS: dict[str, dict[str, str]] = {
    "tr": {"sıfır": "0", **{word: str(n) for n, word in enumerate(NUMBERS, start=1)}},
    "en": {
        word: str(n) for n, word in enumerate(
            ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
        )
    },
}
TURKIC_CASING = frozenset({"tr", "az"})  # languages whose dotted/dotless i are two letters


def _is_punctuation(char: str) -> bool:
    return unicodedata.category(char).startswith("P")


def _strip_punctuation(word: str) -> str:
    start, end = 0, len(word)
    while start < end and _is_punctuation(word[start]):
        start += 1
    while end > start and _is_punctuation(word[end - 1]):
        end -= 1
    return word[start:end]


def lower(text: str, language: str) -> str:
    """Lower-case `text` the way `language` does: for Turkish I → ı and İ → i (`tr_lower`), else `str.lower`."""
    return tr_lower(text) if language in TURKIC_CASING else text.lower()


def normalize_text(text: str, language: str) -> str:
    """`text` in a canonical form for exact-match comparison in `language` ("tr", "en", ...).

    1. Unicode NFC (an "İ" written as I + combining dot becomes the single letter İ before casing);
    2. case folding the language's way: Turkish I → ı, İ → i ("IŞIK" → "ışık", "İSTANBUL" → "istanbul");
    3. whitespace-separated words, each stripped of surrounding punctuation ("daire," → "daire", "3." → "3";
       inner punctuation stays: "istanbul'da", "3.5"), joined by single spaces; words that were only
       punctuation are dropped;
    4. number words 0-10 of the language → digits ("üç" → "3" in Turkish, "three" → "3" in English).

    So normalize_text("Üç.", "tr") == normalize_text("3", "tr") == normalize_text("üç", "tr") == "3".
    """
    text = lower(unicodedata.normalize("NFC", text), language)
    numbers = NUMBER_WORDS.get(language, {})
    words = (_strip_punctuation(word) for word in text.split())
    return " ".join(numbers.get(word, word) for word in words if word)


# --- tokenizer fertility ------------------------------------------------------------------------------------

def tokenizer_fertility(tokenizer: Any, texts_by_language: Mapping[str, Sequence[str]]) -> dict[str, dict[str, float]]:
    """Per language: words (whitespace-separated), tokens (no special tokens), characters, and
    tokens_per_word (the fertility) and chars_per_token. Each text is tokenised on its own."""
    result: dict[str, dict[str, float]] = {}
    for language, texts in texts_by_language.items():
        words = sum(len(text.split()) for text in texts)
        tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
        chars = sum(len(text) for text in texts)
        if not words or not tokens:
            raise ValueError(f"language {language!r}: expected some words to measure fertility on, found none")
        result[language] = {
            "words": words, "tokens": tokens, "chars": chars,
            "tokens_per_word": tokens / words, "chars_per_token": chars / tokens,
        }
    return result


def text_budget(fertility: Mapping[str, Mapping[str, float]], context_tokens: int, image_tokens: int) -> dict[str, int]:
    """Per language, how many words fit in the `context_tokens - image_tokens` tokens left for text:
    floor(left / tokens_per_word), from `tokenizer_fertility`'s result."""
    left = context_tokens - image_tokens
    if left < 0:
        raise ValueError(f"the image tokens ({image_tokens}) do not fit in a context of {context_tokens} tokens")
    return {language: math.floor(left / stats["tokens_per_word"]) for language, stats in fertility.items()}


# --- caption retrieval --------------------------------------------------------------------------------------

def _caption_text(sample: Sample) -> str:
    return next(m["content"] for m in sample.messages if m["role"] == "assistant")


def _encode_captions(processor: Any, samples: Sequence[Sample]) -> list[EncodedSample]:
    encoder = SampleEncoder(processor, template="plain")
    encoded = []
    for sample in samples:
        if len(sample.images) != 1:
            raise ValueError(f"caption retrieval needs one image per sample, sample {sample.id!r} has "
                             f"{len(sample.images)}")
        # Re-wrapped as Sample.caption, so any one-image sample with an assistant turn works.
        one = encoder.encode(Sample.caption(sample.images[0], _caption_text(sample), id=sample.id))
        assert one is not None  # policy "error": failures raise
        encoded.append(one)
    return encoded


def row_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[rows] mean log-likelihood of each row's labelled tokens (labels != -100, shifted left by one as in the
    causal-LM loss): -(sum of token NLL) / (labelled tokens)."""
    targets = labels[:, 1:]
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    mask = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@torch.no_grad()
def caption_scores(model: Any, processor: Any, samples: Sequence[Sample], batch_size: int = 16) -> torch.Tensor:
    """[N, N] scores: entry [i, j] is the mean log-likelihood of sample j's caption given sample i's image.

    With the plain template a pair's tokens depend only on its caption and its pixels only on its image, so
    each sample is encoded once (`SampleEncoder(template="plain")`) and pair (i, j) is caption j's ids and
    labels with image i's pixels: the same inputs as encoding Sample.caption(image_i, caption_j). N * N rows,
    run `batch_size` at a time.
    """
    return _score_pairs(model, processor, _encode_captions(processor, samples), batch_size)


def _score_pairs(model: Any, processor: Any, encoded: Sequence[EncodedSample], batch_size: int) -> torch.Tensor:
    if getattr(processor, "high_resolution", None) is not None:
        raise ValueError(
            "caption retrieval pairs one sample's caption ids with another sample's pixels, which needs every image "
            f"to take the same positions (resolution mode 'fixed'); found mode {processor.config.resolution.mode!r}"
        )
    n = len(encoded)
    pairs = [(i, j) for i in range(n) for j in range(n)]
    pad_id = processor.tokenizer.pad_token_id
    pad_id = processor.tokenizer.eos_token_id if pad_id is None else pad_id
    scores = torch.empty(n * n)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            rows = [EncodedSample(encoded[j].input_ids, encoded[j].labels, encoded[i].pixel_values,
                                  strategy=encoded[j].strategy) for i, j in chunk]
            batch = {k: v.to(model.device) for k, v in collate(rows, pad_id).items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits
            scores[start:start + len(chunk)] = row_log_likelihood(logits, labels).cpu()
    finally:
        model.train(was_training)
    return scores.view(n, n)


def _hits(scores: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    """Fraction of rows whose best relevant column ranks in the top k. Ties with irrelevant columns count
    against (a model that scores everything alike gets no credit); relevant duplicates all count as right."""
    best = scores.masked_fill(~relevant, -math.inf).max(-1, keepdim=True).values
    rank = ((scores >= best) & ~relevant).sum(-1)
    return float((rank < k).float().mean())


def retrieval_recall(scores: torch.Tensor, ks: Iterable[int] = (1, 5),
                     same_caption: torch.Tensor | None = None,
                     same_image: torch.Tensor | None = None) -> dict[str, float]:
    """Recall@k both ways from [N, N] scores (rows images, columns captions, true pairs on the diagonal).

    i2t@k: for each image, is its caption among the k best-scored captions; t2i@k: for each caption, is its
    image among the k best-scored images. same_caption / same_image ([N, N] bool, default the identity) mark
    duplicates that count as right too (two scenes with the same caption text). chance@k is k / N, clipped at 1.
    """
    n = scores.shape[0]
    identity = torch.eye(n, dtype=torch.bool)
    same_caption = identity if same_caption is None else same_caption | identity
    same_image = identity if same_image is None else same_image | identity
    result: dict[str, float] = {"n": n}
    for k in ks:
        result[f"i2t@{k}"] = _hits(scores, same_caption, k)
        result[f"t2i@{k}"] = _hits(scores.T, same_image, k)
        result[f"chance@{k}"] = min(1.0, k / n)
    return result


def caption_retrieval(model: Any, processor: Any, samples: Sequence[Sample], ks: Iterable[int] = (1, 5),
                      batch_size: int = 16) -> dict[str, float]:
    """Image↔text retrieval by caption likelihood over N caption samples (one image and one caption each):
    {"i2t@k", "t2i@k", "chance@k" for k in ks, "n"}; see `caption_scores` and `retrieval_recall`.

    N * N forward passes: keep N small (20-40). One language at a time: filter by meta["language"] first
    (`cross_lingual_split`). Captions with identical text, and identical images, count as equally right.
    """
    if not samples:
        raise ValueError("caption_retrieval needs at least one caption sample, found none")
    encoded = _encode_captions(processor, samples)
    scores = _score_pairs(model, processor, encoded, batch_size)
    n = len(encoded)
    same_caption = torch.tensor([[torch.equal(encoded[i].input_ids, encoded[j].input_ids) for j in range(n)]
                                 for i in range(n)])
    same_image = torch.tensor([[torch.equal(encoded[i].pixel_values, encoded[j].pixel_values) for j in range(n)]
                               for i in range(n)])
    return retrieval_recall(scores, ks, same_caption, same_image)


# --- cross-lingual splits -----------------------------------------------------------------------------------

def cross_lingual_split(samples: Iterable[Sample], train_language: str,
                        test_language: str | None = None) -> tuple[list[Sample], list[Sample]]:
    """(train, test): train holds the samples with meta["language"] == train_language, test those with
    test_language, or every other language when it is None."""
    samples = list(samples)
    train = [s for s in samples if s.meta.get("language") == train_language]
    if test_language is None:
        test = [s for s in samples if s.meta.get("language") != train_language]
    else:
        test = [s for s in samples if s.meta.get("language") == test_language]
    return train, test


__all__ = [
    "NUMBER_WORDS", "caption_retrieval", "caption_scores", "cross_lingual_split", "lower", "normalize_text",
    "retrieval_recall", "row_log_likelihood", "text_budget", "tokenizer_fertility",
]
