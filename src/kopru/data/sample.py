"""One training / evaluation example, whatever file format it came from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

Role = Literal["system", "user", "assistant"]


@dataclass
class Sample:
    """A conversation in OpenAI chat form plus its images.

    `messages`: [{"role": "system" | "user" | "assistant", "content": str}, ...]. Each image is referred to by
    one "<image>" placeholder in the contents, in order; `images` holds PIL images or paths (opened lazily).
    Loss is taken on assistant turns only.
    """

    messages: list[dict[str, str]]
    images: list[Image.Image | str | Path] = field(default_factory=list)
    id: str | None = None
    # Free-form facts for evaluation (task, language, answer, ...); never fed to the model.
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def caption(cls, image: Image.Image | str | Path, caption: str, **kwargs: Any) -> Sample:
        """An image-caption pair as a one-turn conversation (the `align` recipe renders it with a plain template)."""
        return cls(messages=[{"role": "user", "content": "<image>"}, {"role": "assistant", "content": caption}],
                   images=[image], **kwargs)


def samples_fingerprint(samples: list[Sample]) -> str:
    """sha256 over the samples in order: ids, messages, and each image as its path, its encoded bytes or its
    pixels. A resume compares it to refuse other data. Image files are identified by path, not read: hashing a
    million images would take longer than the check is worth."""
    digest, pixels_seen = hashlib.sha256(), {}
    for sample in samples:
        images = []
        for image in sample.images:
            if isinstance(image, Image.Image):
                # The built-in tasks share one picture between a scene's questions: hash it once.
                key = id(image)
                if key not in pixels_seen:
                    pixels_seen[key] = f"{image.mode}:{image.size}:{hashlib.sha256(image.tobytes()).hexdigest()}"
                images.append(pixels_seen[key])
            elif isinstance(image, bytes):
                images.append("bytes:" + hashlib.sha256(image).hexdigest())
            else:
                images.append("path:" + str(image))
        # ensure_ascii: any string, even one with a lone surrogate, has one UTF-8 form to hash
        record = json.dumps([sample.id, sample.messages, images], sort_keys=True, ensure_ascii=True, default=str)
        digest.update(record.encode("ascii") + b"\n")
    return digest.hexdigest()
