"""kopru.alignment: Turkish normalisation, tokenizer fertility, caption-likelihood retrieval."""

from __future__ import annotations

import pytest
import torch

from kopru.alignment import (
    caption_retrieval,
    caption_scores,
    cross_lingual_split,
    normalize_text,
    retrieval_recall,
    text_budget,
    tokenizer_fertility,
)
from kopru.data.batching import collate
from kopru.data.encoding import SampleEncoder
from kopru.data.sample import Sample
from kopru.data.synthetic import shapes_dataset
from kopru.lesson.tiny import tiny_tokenizer

# --- normalisation ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("IŞIK", "ışık"),
    ("İSTANBUL", "istanbul"),
    ("I\u0307STANBUL", "istanbul"),  # İ spelled as I + combining dot above: NFC makes it one letter first
    ("ISPARTA'DA", "ısparta'da"),  # inner punctuation stays
    ("  Solda   kırmızı bir daire, sağda sarı bir üçgen var. ", "solda kırmızı 1 daire sağda sarı 1 üçgen var"),
    ("Üç.", "3"),
    ("üç", "3"),
    ("3.", "3"),
    ("«On»", "10"),
    ("sıfır", "0"),
])
def test_normalize_turkish(text: str, expected: str) -> None:
    assert normalize_text(text, "tr") == expected


def test_str_lower_gets_turkish_wrong() -> None:
    assert "IŞIK".lower() == "işik"  # the trap normalize_text avoids
    assert normalize_text("IŞIK", "tr") != "IŞIK".lower()


def test_normalize_english_and_number_equivalence() -> None:
    assert normalize_text("Three.", "en") == normalize_text("3", "en") == "3"
    assert normalize_text("INDIGO", "en") == "indigo"  # English I is dotted
    assert normalize_text("Two blue squares on the left!", "en") == "2 blue squares on the left"  # "on" is not 10
    assert normalize_text("Üç.", "tr") == normalize_text("3", "tr") == normalize_text("üç", "tr")
    assert normalize_text("...", "tr") == ""


# --- fertility ----------------------------------------------------------------------------------------------

def test_fertility_hand_count() -> None:
    # vocab_size 259 = 3 special tokens + the 256 byte symbols: no merges, so a token is a UTF-8 byte and the
    # count can be done by hand. ı, ş, ü, ç, ö, ğ are two bytes each.
    tokenizer = tiny_tokenizer(vocab_size=259)
    texts = {
        "tr": ["ışık yok", "üç"],  # ı ş ı k = 2+2+2+1 = 7, space 1, y o k = 3 → 11; ü ç → 4; 3 words, 15 tokens
        "en": ["no light", "three"],  # 8 + 5 = 13 tokens, 3 words
    }
    fertility = tokenizer_fertility(tokenizer, texts)
    assert fertility["tr"]["words"] == 3 and fertility["tr"]["tokens"] == 15 and fertility["tr"]["chars"] == 10
    assert fertility["tr"]["tokens_per_word"] == pytest.approx(5.0)
    assert fertility["tr"]["chars_per_token"] == pytest.approx(10 / 15)
    assert fertility["en"]["tokens"] == 13 and fertility["en"]["tokens_per_word"] == pytest.approx(13 / 3)
    assert fertility["en"]["chars_per_token"] == pytest.approx(1.0)

    budget = text_budget(fertility, context_tokens=64, image_tokens=14)  # 50 tokens left for text
    assert budget == {"tr": 10, "en": 11}  # floor(50 / 5), floor(50 / 4.33)
    with pytest.raises(ValueError, match="do not fit"):
        text_budget(fertility, context_tokens=8, image_tokens=16)


# --- retrieval metrics --------------------------------------------------------------------------------------

def test_retrieval_recall_on_hand_made_scores() -> None:
    perfect = torch.eye(4)
    assert retrieval_recall(perfect, ks=(1,)) == {"n": 4, "i2t@1": 1.0, "t2i@1": 1.0, "chance@1": 0.25}
    flat = retrieval_recall(torch.zeros(4, 4), ks=(1, 4))  # ties count against: no credit for a blind model
    assert flat["i2t@1"] == flat["t2i@1"] == 0.0 and flat["i2t@4"] == flat["t2i@4"] == 1.0
    # Image 0 prefers caption 1; caption 0 is still best matched by image 0 (column 0 max is row 0).
    scores = torch.tensor([[0.5, 0.9, 0.0], [0.1, 1.0, 0.0], [0.2, 0.0, 1.0]])
    recall = retrieval_recall(scores, ks=(1, 2))
    assert recall["i2t@1"] == pytest.approx(2 / 3) and recall["t2i@1"] == pytest.approx(1.0)
    assert recall["i2t@2"] == 1.0
    # Captions 0 and 1 are the same text: either one is right for image 0.
    same = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    assert retrieval_recall(scores, ks=(1,), same_caption=same)["i2t@1"] == 1.0


# --- retrieval on tiny models -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def captions() -> list[Sample]:
    return shapes_dataset(5, seed=3, languages=("tr",), kind="caption", image_size=32)


@pytest.mark.parametrize("strategy", ["projection", "qformer", "cross_attention"])
@pytest.mark.slow
def test_retrieval_untrained_model(build, captions: list[Sample], strategy: str) -> None:
    model, processor = build(strategy)
    n = len(captions)
    result = caption_retrieval(model, processor, captions, ks=(1, n), batch_size=7)
    assert result["n"] == n
    assert result[f"i2t@{n}"] == result[f"t2i@{n}"] == 1.0  # everything is in the top N
    assert all(0.0 <= result[key] <= 1.0 for key in ("i2t@1", "t2i@1"))
    assert result["chance@1"] == pytest.approx(1 / n)


@pytest.mark.slow
def test_scores_match_a_plain_forward_pass(build, captions: list[Sample]) -> None:
    model, processor = build("projection")
    scores = caption_scores(model, processor, captions, batch_size=4)  # padded batches across rows
    assert scores.shape == (len(captions), len(captions)) and torch.isfinite(scores).all()
    image, caption = 1, 3
    pair = Sample.caption(captions[image].images[0], captions[caption].messages[1]["content"])
    encoded = SampleEncoder(processor, template="plain").encode(pair)
    batch = collate([encoded], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss  # mean NLL over the caption + eos tokens
    assert scores[image, caption].item() == pytest.approx(-loss.item(), abs=1e-5)


@pytest.mark.slow
def test_identical_pairs_score_identically(build, captions: list[Sample]) -> None:
    model, processor = build("projection")
    samples = [captions[0], captions[1], captions[0]]  # a duplicated pair
    scores = caption_scores(model, processor, samples, batch_size=2)
    for i, j in [(0, 2), (2, 0), (2, 2)]:
        assert scores[i, j].item() == pytest.approx(scores[0, 0].item(), abs=1e-6)
    assert scores[2, 1].item() == pytest.approx(scores[0, 1].item(), abs=1e-6)
    assert torch.equal(scores, caption_scores(model, processor, samples, batch_size=2))  # deterministic
    result = caption_retrieval(model, processor, samples, ks=(1, 3))
    assert 0.0 <= result["i2t@1"] <= 1.0 and result["i2t@3"] == 1.0


# --- cross-lingual split ------------------------------------------------------------------------------------

def test_cross_lingual_split() -> None:
    samples = shapes_dataset(3, kind="caption", image_size=32)  # en and tr for each scene
    train, test = cross_lingual_split(samples, "en")
    assert len(train) == len(test) == 3
    assert {s.meta["language"] for s in train} == {"en"} and {s.meta["language"] for s in test} == {"tr"}
    assert cross_lingual_split(samples, "en", test_language="en")[1] == train
