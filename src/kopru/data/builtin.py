"""The built-in data sets by name, for `kopru train --train-data builtin:NAME` (no download)."""

from __future__ import annotations

from kopru.data.sample import Sample
from kopru.data.synthetic import digits_dataset, shapes_dataset

BUILTIN = ("shapes", "digits", "all")


def builtin_dataset(name: str, size: int, split: str, seed: int = 0, languages: tuple[str, ...] = ("en", "tr"),
                    kind: str = "qa") -> list[Sample]:
    """`size` scenes (shapes) or images (digits); "all" splits `size` between the two tasks.

    `kind="caption"` (the align recipe) gives image-caption pairs; digits have questions only, so "all" uses
    shapes captions alone then.
    """
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in data set {name!r}; expected one of {list(BUILTIN)}")
    if name == "digits" and kind == "caption":
        raise ValueError("builtin:digits has questions only; the align recipe needs captions (use builtin:shapes)")
    if name == "shapes" or (name == "all" and kind == "caption"):
        return shapes_dataset(size, seed=seed, languages=languages, kind=kind, split=split)
    if name == "digits":
        return digits_dataset(size, seed=seed, languages=languages, split=split)
    return (shapes_dataset(size - size // 2, seed=seed, languages=languages, kind=kind, split=split)
            + digits_dataset(size // 2, seed=seed, languages=languages, split=split))
