"""The built-in synthetic tasks: correct Turkish, answers true to the pixels, determinism, disjoint splits."""

from __future__ import annotations

import re
import time
from collections import Counter

import numpy as np
import pytest

from kopru.data import turkish
from kopru.data.sample import Sample
from kopru.data.synthetic import (
    CELLS,
    COLOURS,
    PHRASEBOOKS,
    RGB,
    SHAPE_TASKS,
    ShapeGroup,
    chance_levels,
    digit_indices,
    digits_dataset,
    load_digits,
    render_digits,
    shapes_dataset,
)

ndimage = pytest.importorskip("scipy.ndimage")  # scipy comes with scikit-learn

NUM_SCENES = 300


@pytest.fixture(scope="module")
def qa() -> list[Sample]:
    return shapes_dataset(NUM_SCENES, seed=0)


@pytest.fixture(scope="module")
def captions() -> list[Sample]:
    return shapes_dataset(NUM_SCENES, seed=0, kind="caption")


@pytest.fixture(scope="module")
def digits() -> list[Sample]:
    return digits_dataset(200, seed=0)


def texts(samples: list[Sample], language: str) -> list[str]:
    """Every message (question, answer, caption) of one language, without the image placeholder."""
    return [m["content"].replace("<image>", "").strip()
            for s in samples if s.meta["language"] == language for m in s.messages]


# --- Turkish grammar helpers --------------------------------------------------------------------------------

@pytest.mark.parametrize(("word", "expected"), [
    ("sol", "solda"), ("sağ", "sağda"), ("üst", "üstte"), ("alt", "altta"), ("orta", "ortada"),
    ("köşe", "köşede"), ("kitap", "kitapta"), ("ev", "evde"), ("ağaç", "ağaçta"), ("saat", "saatte"),
])
def test_locative(word: str, expected: str) -> None:
    assert turkish.locative(word) == expected


def test_suffix_helpers() -> None:
    assert turkish.locative("İstanbul", proper=True) == "İstanbul'da"
    assert turkish.locative("Işık", proper=True) == "Işık'ta"
    assert [turkish.plural(w) for w in ("kare", "daire", "üçgen", "kitap")] == [
        "kareler", "daireler", "üçgenler", "kitaplar"]
    assert [turkish.question_particle(w) for w in ("var", "yeşil", "yok", "üçgen", "gül")] == [
        "mı", "mi", "mu", "mi", "mü"]
    with pytest.raises(ValueError):
        turkish.last_vowel("TRT")


def test_turkish_casing() -> None:
    assert turkish.tr_lower("IĞDIR") == "ığdır"
    assert turkish.tr_upper("istanbul") == "İSTANBUL"
    assert turkish.tr_capitalize("ırmak") == "Irmak" and turkish.tr_capitalize("izmir") == "İzmir"
    # Why the helpers exist: Python's own casing is wrong for Turkish.
    assert "IĞDIR".lower() != "ığdır" and "istanbul".upper() != "İSTANBUL"


def test_numbers_and_noun_phrases() -> None:
    assert [turkish.number_word(n) for n in range(1, 11)] == [
        "bir", "iki", "üç", "dört", "beş", "altı", "yedi", "sekiz", "dokuz", "on"]
    with pytest.raises(ValueError):
        turkish.number_word(0)
    assert turkish.noun_phrase("kare", 2, "mavi") == "iki mavi kare"
    assert turkish.noun_phrase("daire", 1, "kırmızı") == "kırmızı bir daire"


def test_caption_builders() -> None:
    squares = ShapeGroup("square", "blue", "left", 2, boxes=())
    circle = ShapeGroup("circle", "red", "top", 1, boxes=())
    assert turkish.caption([squares], with_position=False) == "Resimde iki mavi kare var."
    assert turkish.caption([squares], with_position=True) == "Solda iki mavi kare var."
    assert turkish.caption([circle], with_position=True) == "Üstte kırmızı bir daire var."
    assert turkish.caption([squares, circle], with_position=True) == "Solda iki mavi kare, üstte kırmızı bir daire var."
    assert PHRASEBOOKS["en"].caption([squares], True) == "Two blue squares on the left."
    assert PHRASEBOOKS["en"].caption([circle, squares], False) == (
        "There is a red circle and two blue squares in the picture.")


# --- Turkish rules on the generated text --------------------------------------------------------------------

def test_generated_locatives(qa: list[Sample], digits: list[Sample]) -> None:
    words = Counter(w for t in texts(qa, "tr") + texts(digits, "tr") for w in re.findall(r"\w+", turkish.tr_lower(t)))
    for good in ("solda", "sağda", "üstte", "altta", "ortada", "soldaki", "sağdaki"):
        assert words[good] > 0, good
    for stem in ("sol", "sağ", "üst", "alt", "orta"):
        for suffix in ("da", "de", "ta", "te"):
            form = stem + suffix
            if form != turkish.locative(stem):
                assert not any(w.startswith(form) for w in words), form


def test_no_plural_after_numeral(qa: list[Sample], captions: list[Sample]) -> None:
    number = "|".join(turkish.NUMBERS)
    colour = "|".join(turkish.COLOURS.values())
    # A number word, optionally a colour word, then the noun: the noun must be singular.
    pattern = re.compile(rf"\b(?:{number})\s+(?:(?:{colour})\s+)?(\w+)")
    nouns = [m.group(1) for t in texts(qa, "tr") + texts(captions, "tr") for m in pattern.finditer(t)]
    assert nouns, "no counted nouns found"
    assert not [n for n in nouns if n.endswith(("lar", "ler"))]
    assert set(nouns) <= {"daire", "kare", "üçgen"}


def test_caption_for_the_right_scene() -> None:
    samples = shapes_dataset(400, seed=0, kind="caption", languages=("tr",), max_groups=1)
    for s in samples:
        (group,) = s.meta["scene"]
        caption = s.messages[1]["content"]
        if (group["shape"], group["colour"], group["count"]) == ("square", "blue", 2):
            located = turkish.tr_capitalize(turkish.where_word(group["region"]))
            assert caption in ("Resimde iki mavi kare var.", f"{located} iki mavi kare var.")
        else:
            assert "iki mavi kare" not in caption
    assert "Resimde iki mavi kare var." in {s.messages[1]["content"] for s in samples}


# --- determinism and splits ---------------------------------------------------------------------------------

def _fingerprint(samples: list[Sample]) -> list[tuple]:
    return [(s.id, s.images[0].tobytes(), tuple(m["content"] for m in s.messages)) for s in samples]


def test_deterministic() -> None:
    assert _fingerprint(shapes_dataset(30, seed=5)) == _fingerprint(shapes_dataset(30, seed=5))
    assert _fingerprint(digits_dataset(30, seed=5)) == _fingerprint(digits_dataset(30, seed=5))
    a, b = shapes_dataset(30, seed=5), shapes_dataset(30, seed=6)
    assert [s.images[0].tobytes() for s in a] != [s.images[0].tobytes() for s in b]
    assert [s.meta["label"] for s in digits_dataset(30, seed=5)] != [s.meta["label"] for s in digits_dataset(30, seed=6)]


def test_same_scenes_for_every_kind_and_language(qa: list[Sample], captions: list[Sample]) -> None:
    qa_images = [s.images[0].tobytes() for s in qa[::8]]
    assert qa_images == [s.images[0].tobytes() for s in captions[::2]]
    english = shapes_dataset(NUM_SCENES, seed=0, languages=("en",))
    assert qa_images == [s.images[0].tobytes() for s in english[::4]]


def test_splits_disjoint() -> None:
    train = {s.images[0].tobytes() for s in shapes_dataset(500, seed=0, kind="caption", languages=("en",))}
    test = {s.images[0].tobytes() for s in shapes_dataset(500, seed=0, kind="caption", languages=("en",),
                                                          split="test")}
    assert len(train) > 400 and len(test) > 400 and not train & test
    # Digits: never the same source image (even indices train, odd test).
    assert not set(digit_indices("train")) & set(digit_indices("test"))
    for split in ("train", "test"):
        used = {s.meta[k] for s in digits_dataset(300, seed=0, split=split) for k in ("left_index", "right_index")}
        assert used <= set(digit_indices(split))


# --- answers are true to the pixels -------------------------------------------------------------------------

def _shape_of(mask: np.ndarray) -> str:
    # Fraction of the bounding box filled: square 1, circle ~pi/4, triangle ~1/2.
    fill = mask.mean()
    return "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"


def _region_of(center: tuple[float, float], size: int) -> str:
    row, col = int(center[0] * 3 // size), int(center[1] * 3 // size)
    return next(region for region, cell in CELLS.items() if cell == (row, col))


def read_scene(image) -> dict[tuple[str, str], tuple[str, int]]:
    """(colour, shape) -> (region, count), recovered from the pixels alone."""
    pixels = np.asarray(image)
    found = {}
    for colour in COLOURS:
        labels, count = ndimage.label((pixels == RGB[colour]).all(-1))
        if not count:
            continue
        boxes = ndimage.find_objects(labels)
        shapes = {_shape_of(labels[box] == i + 1) for i, box in enumerate(boxes)}
        regions = {_region_of(c, pixels.shape[0]) for c in ndimage.center_of_mass(labels > 0, labels, range(1, count + 1))}
        assert len(shapes) == 1 and len(regions) == 1, (colour, shapes, regions)  # one group per colour
        found[colour, shapes.pop()] = (regions.pop(), count)
    return found


@pytest.mark.parametrize("image_size", [pytest.param(64, marks=pytest.mark.slow), 32])  # 64 px: 4 s
def test_answers_match_pixels(image_size: int) -> None:
    samples = shapes_dataset(150, seed=1, image_size=image_size, max_groups=3)
    for sample in samples:
        book = PHRASEBOOKS[sample.meta["language"]]
        scene = read_scene(sample.images[0])
        assert scene == {(g["colour"], g["shape"]): (g["region"], g["count"]) for g in sample.meta["scene"]}
        by_shape = {shape: (colour, region, count) for (colour, shape), (region, count) in scene.items()}
        task, answer, subject = sample.meta["task"], sample.meta["answer"], sample.meta["subject"]
        assert sample.messages[1]["content"] == answer
        if task == "shapes-exists":
            expected = book.yes_no((subject["colour"], subject["shape"]) in scene)
        else:
            colour, region, count = by_shape[subject["shape"]]  # only shapes in the scene are asked about
            expected = {"shapes-count": book.number(count), "shapes-colour": book.colour(colour),
                        "shapes-where": book.where(region)}[task]
        assert answer == expected, sample.id


def test_questions_name_their_subject(qa: list[Sample]) -> None:
    for s in qa:
        if s.meta["language"] == "en":
            assert s.meta["subject"]["shape"] in s.messages[0]["content"]
        else:
            assert turkish.SHAPES[s.meta["subject"]["shape"]] in turkish.tr_lower(s.messages[0]["content"])


def test_digits_answers_match_targets(digits: list[Sample]) -> None:
    images, targets = load_digits()
    for s in digits:
        left, right = s.meta["left_index"], s.meta["right_index"]
        assert (s.meta["left_label"], s.meta["right_label"]) == (targets[left], targets[right])
        assert targets[left] != targets[right]
        side = s.meta["task"].removeprefix("digits-")
        assert s.meta["answer"] == s.messages[1]["content"] == str(targets[left if side == "left" else right])
        assert s.images[0].tobytes() == render_digits(left, right).tobytes()
    en = [s.messages[0]["content"] for s in digits if s.meta["language"] == "en"]
    tr = [s.messages[0]["content"] for s in digits if s.meta["language"] == "tr"]
    assert set(en) == {"<image>\nWhich digit is on the left?", "<image>\nWhich digit is on the right?"}
    assert set(tr) == {"<image>\nSoldaki rakam hangisi?", "<image>\nSağdaki rakam hangisi?"}
    # The pixels really are the source digits: each half, shrunk back to 8x8, matches its own digit.
    for s in digits[:20:2]:
        pixels = s.images[0].convert("L")
        for column, key in enumerate(("left_index", "right_index")):
            # render_digits' layout at 64 px: 2 px padding, 28 px digits, centred vertically.
            ink = -np.asarray(pixels.crop((32 * column + 2, 18, 32 * column + 30, 46)).resize((8, 8)), dtype=float)
            assert np.corrcoef(ink.ravel(), images[s.meta[key]].ravel())[0, 1] > 0.9


# --- evaluation metadata ------------------------------------------------------------------------------------

def test_chance_levels_and_choices(qa: list[Sample], digits: list[Sample]) -> None:
    assert chance_levels(qa + digits) == pytest.approx({
        "shapes-count": 1 / 4, "shapes-colour": 1 / 4, "shapes-where": 1 / 5, "shapes-exists": 1 / 2,
        "digits-left": 1 / 10, "digits-right": 1 / 10})
    for s in qa + digits:
        assert s.meta["answer"] in s.meta["choices"]
        assert len(set(s.meta["choices"])) == len(s.meta["choices"])
    assert Counter(s.meta["task"] for s in qa) == {task: NUM_SCENES * 2 for task in SHAPE_TASKS}
    assert PHRASEBOOKS["tr"].choices("shapes-where") == ["solda", "sağda", "üstte", "altta", "ortada"]
    # Answers are spread over their choices: no task can be solved by always giving one answer.
    for task in SHAPE_TASKS:
        answers = Counter(s.meta["answer"] for s in qa if s.meta["task"] == task and s.meta["language"] == "en")
        assert len(answers) == len(PHRASEBOOKS["en"].choices(task))
        assert max(answers.values()) / sum(answers.values()) < 0.6


def test_normalize_answer() -> None:
    from kopru.alignment import normalize_text as normalize_answer

    assert normalize_answer("  Solda. ", "tr") == "solda"
    assert normalize_answer("IŞIK", "tr") == "ışık"
    assert normalize_answer("Yes!", "en") == "yes"


def test_argument_checks() -> None:
    with pytest.raises(ValueError):
        shapes_dataset(1, languages=("de",))
    with pytest.raises(ValueError):
        shapes_dataset(1, kind="vqa")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        digits_dataset(1, split="val")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        shapes_dataset(1, image_size=16)


def test_fast() -> None:
    digits_dataset(1)  # scikit-learn import and loading are paid once
    start = time.perf_counter()
    assert len(shapes_dataset(1000, seed=2)) == 8000
    assert len(digits_dataset(1000, seed=2)) == 2000
    assert time.perf_counter() - start < 5  # typically ~0.2 s; generous for loaded CI machines
