"""One training / evaluation example, whatever file format it came from."""

from __future__ import annotations

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
