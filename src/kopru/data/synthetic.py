"""Built-in, deterministic, bilingual (English + Turkish) vision-language tasks: nothing to download.

Two families, both returning in-memory `Sample`s with PIL images:

- `shapes_dataset`: scenes of 1-2 groups of identical shapes (circle, square, triangle) in red, blue, green or
  yellow, 1-4 shapes per group, each group in one region of a 3x3 grid (left, right, top, bottom, middle).
  Groups in one scene differ in shape, colour and region, so every question has exactly one answer:
  "How many circles are there?" → "three" / "Resimde kaç daire var?" → "üç", and the colour, where and
  is-there tasks; or captions ("Two blue squares on the left." / "Solda iki mavi kare var.").
- `digits_dataset`: two real handwritten digits (scikit-learn's 8x8 digits, upscaled) side by side;
  "Which digit is on the left?" / "Soldaki rakam hangisi?" → "7". The answer is the digit character in both
  languages: it is language-neutral, one token in most tokenizers, and leaves nothing to normalise.

Answers are single words, so accuracy is an exact match after `kopru.alignment.normalize_text`; `meta["choices"]` lists every
possible answer of the task in that language, so chance level is 1 / len(choices) (`chance_levels`).

The same (seed, split, image_size, ...) gives byte-identical images and identical text. "train" and "test" draw
from different random streams and can never share an image: a shapes scene belongs to the split picked by a hash
of its exact layout, and digits come from disjoint halves of scikit-learn's digits (even / odd index).
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from kopru.data import turkish
from kopru.data.sample import Sample

Language = Literal["en", "tr"]
Split = Literal["train", "test"]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "blue", "green", "yellow")
REGIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "middle")
MAX_COUNT = 4
LANGUAGES: tuple[str, ...] = ("en", "tr")
SPLITS: tuple[str, ...] = ("train", "test")
SHAPE_TASKS: tuple[str, ...] = ("shapes-count", "shapes-colour", "shapes-where", "shapes-exists")

# Saturated colours, drawn without anti-aliasing, so every pixel of a shape has exactly its colour
# (tests and evaluators can recover the scene from the pixels).
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "blue": (30, 70, 220), "green": (30, 160, 60), "yellow": (240, 200, 20),
}
BACKGROUND = (255, 255, 255)
# Region -> (row, column) in the 3x3 grid; the corners are left empty so "left" etc. are never ambiguous.
CELLS: dict[str, tuple[int, int]] = {"top": (0, 1), "left": (1, 0), "middle": (1, 1), "right": (1, 2), "bottom": (2, 1)}
MIN_IMAGE_SIZE = 32  # below this four shapes in one cell are 2-3 pixels wide

Box = tuple[int, int, int, int]  # x0, y0, x1, y1, inclusive


# --- scenes -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShapeGroup:
    """`count` identical shapes of one colour in one region; `boxes` are their square bounding boxes."""

    shape: str
    colour: str
    region: str
    count: int
    boxes: tuple[Box, ...]

    def describe(self) -> dict[str, Any]:
        """The group without pixel positions: what the questions are about (kept in `Sample.meta["scene"]`)."""
        return {"shape": self.shape, "colour": self.colour, "region": self.region, "count": self.count}


@dataclass(frozen=True)
class Scene:
    groups: tuple[ShapeGroup, ...]
    image_size: int

    def group(self, shape: str) -> ShapeGroup:
        """The group of `shape` (shapes are unique within a scene)."""
        return next(g for g in self.groups if g.shape == shape)

    def has(self, colour: str, shape: str) -> bool:
        return any(g.colour == colour and g.shape == shape for g in self.groups)

    def key(self) -> str:
        """The exact layout as text: two scenes with the same key render the same image."""
        return repr((self.image_size, [asdict(g) for g in self.groups]))

    def split(self) -> Split:
        """The split this exact layout belongs to; a stable hash, so train and test never share an image."""
        digest = hashlib.blake2b(self.key().encode(), digest_size=8).digest()
        return "train" if digest[0] % 2 == 0 else "test"

    def render(self) -> Image.Image:
        image = Image.new("RGB", (self.image_size, self.image_size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for group in self.groups:
            for box in group.boxes:
                _draw_shape(draw, group.shape, box, RGB[group.colour])
        return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":  # pointing up
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def cell_bounds(region: str, image_size: int) -> Box:
    """`region`'s cell of the 3x3 grid as a half-open pixel box; integer edges tile the image exactly (64 → 0, 21,
    43, 64)."""
    edges = [round(i * image_size / 3) for i in range(4)]
    row, col = CELLS[region]
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


def _slots(region: str, count: int, image_size: int, rng: random.Random) -> list[Box]:
    """Where the shapes of a group go: the whole cell for one shape, else `count` of its four quarters."""
    x0, y0, x1, y1 = cell_bounds(region, image_size)
    if count == 1:
        return [(x0, y0, x1, y1)]
    xm, ym = (x0 + x1) // 2, (y0 + y1) // 2
    quarters = [(x0, y0, xm, ym), (xm, y0, x1, ym), (x0, ym, xm, y1), (xm, ym, x1, y1)]
    return [quarters[i] for i in sorted(rng.sample(range(4), count))]


def _place(slot: Box, fill: float, rng: random.Random) -> Box:
    """A square box inside a (half-open) slot, `fill` of its width, jittered, at least 1 px from the slot's
    edges, so that shapes in neighbouring slots never touch (each stays one connected blob of pixels)."""
    x0, y0, x1, y1 = slot
    size = max(3, int(min(x1 - x0, y1 - y0) * fill))
    left = x0 + 1 + rng.randint(0, max(0, x1 - x0 - size - 2))
    top = y0 + 1 + rng.randint(0, max(0, y1 - y0 - size - 2))
    return left, top, left + size - 1, top + size - 1


def random_scene(rng: random.Random, image_size: int = 64, max_groups: int = 2) -> Scene:
    """1 to `max_groups` groups with distinct shapes, colours and regions, 1-`MAX_COUNT` shapes each."""
    num_groups = rng.randint(1, max_groups)
    shapes, colours, regions = (rng.sample(pool, num_groups) for pool in (SHAPES, COLOURS, REGIONS))
    groups = []
    for shape, colour, region in zip(shapes, colours, regions, strict=True):
        count = rng.randint(1, MAX_COUNT)
        fill = 0.75 if count == 1 else 0.8
        boxes = tuple(_place(slot, fill, rng) for slot in _slots(region, count, image_size, rng))
        groups.append(ShapeGroup(shape, colour, region, count, boxes))
    return Scene(tuple(groups), image_size)


def _scenes(rng: random.Random, num_scenes: int, image_size: int, split: Split, max_groups: int) -> Iterator[Scene]:
    # Rejection by layout hash: about every other candidate is kept; cheap, as nothing is rendered yet.
    made = 0
    while made < num_scenes:
        scene = random_scene(rng, image_size, max_groups)
        if scene.split() == split:
            made += 1
            yield scene


# --- English phrases (the Turkish ones are in kopru.data.turkish) ------------------------------------------

EN_NUMBERS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
EN_WHERE: dict[str, str] = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
    "middle": "in the middle",
}


def _en_noun_phrase(shape: str, count: int, colour: str) -> str:
    if count == 1:
        article = "an" if colour[0] in "aeiou" else "a"
        return f"{article} {colour} {shape}"
    return f"{EN_NUMBERS[count - 1]} {colour} {shape}s"


def _en_join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + f" and {phrases[-1]}"


def _en_caption(groups: Sequence[ShapeGroup], with_position: bool) -> str:
    phrases = [_en_noun_phrase(g.shape, g.count, g.colour) for g in groups]
    if with_position:
        text = _en_join([f"{p} {EN_WHERE[g.region]}" for g, p in zip(groups, phrases, strict=True)])
        return text[0].upper() + text[1:] + "."
    verb = "is" if groups[0].count == 1 else "are"  # agrees with the nearest noun phrase
    return f"There {verb} {_en_join(phrases)} in the picture."


def _en_subject(shape: str, count: int) -> tuple[str, str]:
    return ("is", f"the {shape}") if count == 1 else ("are", f"the {shape}s")


def _en_colour_question(shape: str, count: int) -> str:
    verb, subject = _en_subject(shape, count)
    return f"What colour {verb} {subject}?"


def _en_where_question(shape: str, count: int) -> str:
    verb, subject = _en_subject(shape, count)
    return f"Where {verb} {subject}?"


# --- both languages behind one interface --------------------------------------------------------------------

@dataclass(frozen=True)
class Phrasebook:
    """One language's sentences and answer words for the synthetic tasks."""

    caption: Callable[[Sequence[ShapeGroup], bool], str]
    count_question: Callable[[str], str]
    colour_question: Callable[[str, int], str]
    where_question: Callable[[str, int], str]
    exists_question: Callable[[str, str], str]
    digit_question: Callable[[str], str]
    number: Callable[[int], str]
    colour: Callable[[str], str]
    where: Callable[[str], str]
    yes_no: Callable[[bool], str]

    def choices(self, task: str) -> list[str]:
        """Every answer `task` can have in this language (the evaluator's chance level is 1 / len)."""
        if task == "shapes-count":
            return [self.number(n) for n in range(1, MAX_COUNT + 1)]
        if task == "shapes-colour":
            return [self.colour(c) for c in COLOURS]
        if task == "shapes-where":
            return [self.where(r) for r in REGIONS]
        if task == "shapes-exists":
            return [self.yes_no(True), self.yes_no(False)]
        if task in ("digits-left", "digits-right"):
            return DIGIT_CHOICES
        raise ValueError(f"no fixed answer set for task {task!r}")


PHRASEBOOKS: dict[str, Phrasebook] = {
    "en": Phrasebook(
        caption=_en_caption,
        count_question=lambda shape: f"How many {shape}s are there?",
        colour_question=_en_colour_question,
        where_question=_en_where_question,
        exists_question=lambda colour, shape: f"Is there {_en_noun_phrase(shape, 1, colour)}?",
        digit_question=lambda side: f"Which digit is on the {side}?",
        number=lambda n: EN_NUMBERS[n - 1],
        colour=lambda colour: colour,
        where=lambda region: region,
        yes_no=lambda answer: "yes" if answer else "no",
    ),
    "tr": Phrasebook(
        caption=turkish.caption,
        count_question=turkish.count_question,
        colour_question=turkish.colour_question,
        where_question=turkish.where_question,
        exists_question=turkish.exists_question,
        digit_question=turkish.digit_question,
        number=turkish.number_word,
        colour=turkish.COLOURS.__getitem__,
        where=turkish.where_word,
        yes_no=turkish.yes_no,
    ),
}


def chance_levels(samples: Sequence[Sample]) -> dict[str, float]:
    """Expected accuracy of guessing uniformly among `meta["choices"]`, per task (mean over its samples)."""
    totals: dict[str, list[float]] = {}
    for sample in samples:
        if "choices" in sample.meta:
            totals.setdefault(sample.meta["task"], []).append(1 / len(sample.meta["choices"]))
    return {task: sum(values) / len(values) for task, values in totals.items()}


# --- the shapes dataset -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Questions:
    """What one scene is asked, decided once so that every language asks the same thing."""

    count_shape: str
    colour_shape: str
    where_shape: str
    exists: tuple[str, str, bool]  # colour, shape, answer
    caption_with_position: bool


def _exists_query(scene: Scene, rng: random.Random) -> tuple[str, str, bool]:
    """Half "yes" (a group present), half "no" with a near miss: the right colour on another shape or the right
    shape in another colour, so "no" cannot be told from the shape or colour alone."""
    if rng.random() < 0.5:
        group = rng.choice(scene.groups)
        return group.colour, group.shape, True
    colours = {g.colour for g in scene.groups}
    shapes = {g.shape for g in scene.groups}
    near_misses = [(c, s) for c in COLOURS for s in SHAPES
                   if not scene.has(c, s) and (c in colours or s in shapes)]
    colour, shape = rng.choice(near_misses)
    return colour, shape, False


def _plan(scene: Scene, rng: random.Random) -> _Questions:
    shapes = [g.shape for g in scene.groups]
    return _Questions(
        count_shape=rng.choice(shapes), colour_shape=rng.choice(shapes), where_shape=rng.choice(shapes),
        exists=_exists_query(scene, rng), caption_with_position=rng.random() < 0.5,
    )


def _qa(image: Image.Image, question: str, answer: str, sample_id: str, meta: dict[str, Any]) -> Sample:
    return Sample(
        messages=[{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer}],
        images=[image], id=sample_id, meta={**meta, "answer": answer},
    )


def _shape_questions(scene: Scene, plan: _Questions, book: Phrasebook) -> list[tuple[str, str, str, dict]]:
    """(task, question, answer, subject) for the four shape tasks in one language."""
    count_group = scene.group(plan.count_shape)
    colour_group = scene.group(plan.colour_shape)
    where_group = scene.group(plan.where_shape)
    colour, shape, present = plan.exists
    return [
        ("shapes-count", book.count_question(count_group.shape), book.number(count_group.count),
         {"shape": count_group.shape}),
        ("shapes-colour", book.colour_question(colour_group.shape, colour_group.count),
         book.colour(colour_group.colour), {"shape": colour_group.shape}),
        ("shapes-where", book.where_question(where_group.shape, where_group.count),
         book.where(where_group.region), {"shape": where_group.shape}),
        ("shapes-exists", book.exists_question(colour, shape), book.yes_no(present),
         {"shape": shape, "colour": colour}),
    ]


def _check(languages: Sequence[str], split: str, image_size: int) -> None:
    unknown = set(languages) - set(LANGUAGES)
    if unknown or not languages:
        raise ValueError(f"languages must be a non-empty subset of {LANGUAGES}, got {tuple(languages)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")


def shapes_dataset(
    num_scenes: int,
    seed: int = 0,
    languages: Sequence[str] = LANGUAGES,
    kind: Literal["qa", "caption"] = "qa",
    image_size: int = 64,
    split: Split = "train",
    max_groups: int = 2,
) -> list[Sample]:
    """Synthetic shape scenes with questions (kind="qa") or captions (kind="caption").

    qa: for every scene and language, one sample per task in `SHAPE_TASKS` (num_scenes * len(languages) * 4
    samples): a user turn "<image>\\n{question}" and an assistant turn "{answer}". meta: task, language, answer,
    choices, subject (what was asked about), scene (the groups: shape, colour, region, count), split.
    caption: one `Sample.caption` per scene and language; meta: task "shapes-caption", language, scene, split.
    The scenes (and their images) are the same for both kinds and any `languages`; the languages ask the same
    questions. Samples of one scene share one PIL image object.
    max_groups: 1 gives one group per scene (easiest); at most 3 (there are three shapes).
    """
    if kind not in ("qa", "caption"):
        raise ValueError(f"kind must be 'qa' or 'caption', got {kind!r}")
    if not 1 <= max_groups <= len(SHAPES):
        raise ValueError(f"max_groups must be 1-{len(SHAPES)}, got {max_groups}")
    _check(languages, split, image_size)
    rng = random.Random(f"kopru-shapes/{split}/{seed}")  # str seeds are hashed with SHA-512: stable everywhere
    samples: list[Sample] = []
    for index, scene in enumerate(_scenes(rng, num_scenes, image_size, split, max_groups)):
        plan = _plan(scene, rng)
        image = scene.render()
        base = {"scene": [g.describe() for g in scene.groups], "split": split}
        for language in languages:
            book = PHRASEBOOKS[language]
            prefix = f"shapes-{split}-{seed}-{index:05d}"
            if kind == "caption":
                text = book.caption(scene.groups, plan.caption_with_position)
                meta = {"task": "shapes-caption", "language": language, **base}
                samples.append(Sample.caption(image, text, id=f"{prefix}-caption-{language}", meta=meta))
                continue
            for task, question, answer, subject in _shape_questions(scene, plan, book):
                meta = {"task": task, "language": language, "choices": book.choices(task), "subject": subject,
                        **base}
                samples.append(_qa(image, question, answer, f"{prefix}-{task.removeprefix('shapes-')}-{language}",
                                   meta))
    return samples


# --- the digits dataset -------------------------------------------------------------------------------------

DIGIT_CHOICES: list[str] = [str(d) for d in range(10)]
SIDES: tuple[str, ...] = ("left", "right")


@functools.cache
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits: images (N, 8, 8) with ink 0-16, and targets (N,). Ships with
    scikit-learn, nothing is downloaded; imported lazily so `kopru.data` does not pay for scikit-learn."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits  # lazily: 0.7 s, digits task only
    except ImportError as error:
        raise ImportError("digits_dataset needs scikit-learn: pip install scikit-learn") from error
    digits = sklearn_load_digits()
    return digits.images, digits.target


def digit_indices(split: Split) -> list[int]:
    """The source images a split may use: even indices for "train", odd for "test" (never shared)."""
    images, _ = load_digits()
    return list(range(SPLITS.index(split), len(images), 2))


def render_digits(left: int, right: int, image_size: int = 64) -> Image.Image:
    """Two source digits side by side, dark ink on white, each upscaled (bilinear) to about half the width."""
    images, _ = load_digits()
    half = image_size // 2
    pad = max(1, image_size // 32)  # a small gap so the two digits never run into each other
    side = half - 2 * pad
    canvas = Image.new("L", (image_size, image_size), 255)
    for column, index in enumerate((left, right)):
        ink = (255 - images[index] * (255 / 16)).round().astype(np.uint8)
        digit = Image.fromarray(ink).resize((side, side), Image.Resampling.BILINEAR)
        canvas.paste(digit, (column * half + pad, (image_size - side) // 2))
    return canvas.convert("RGB")


def digits_dataset(
    num_samples: int,
    seed: int = 0,
    languages: Sequence[str] = LANGUAGES,
    image_size: int = 64,
    split: Split = "train",
) -> list[Sample]:
    """Two different handwritten digits side by side; asks for the left or the right one (chosen at random).

    num_samples images, each asked once per language (num_samples * len(languages) samples, same question in
    every language). The answer is the digit character ("7") in both languages. The two digits always differ,
    so the answer needs the position, not just recognition. meta: task "digits-left" | "digits-right", language,
    answer, choices ("0"-"9"), label, left_index / right_index (into scikit-learn's digits), left_label /
    right_label, split.
    """
    _check(languages, split, image_size)
    _, targets = load_digits()
    pool = digit_indices(split)
    rng = random.Random(f"kopru-digits/{split}/{seed}")
    samples: list[Sample] = []
    for index in range(num_samples):
        left = rng.choice(pool)
        right = rng.choice(pool)
        while targets[right] == targets[left]:
            right = rng.choice(pool)
        side = rng.choice(SIDES)
        label = int(targets[left if side == "left" else right])
        image = render_digits(left, right, image_size)
        meta = {"task": f"digits-{side}", "label": label, "left_index": left, "right_index": right,
                "left_label": int(targets[left]), "right_label": int(targets[right]), "split": split}
        for language in languages:
            book = PHRASEBOOKS[language]
            samples.append(_qa(image, book.digit_question(side), str(label),
                               f"digits-{split}-{seed}-{index:05d}-{side}-{language}",
                               {**meta, "language": language, "choices": book.choices(meta["task"])}))
    return samples
