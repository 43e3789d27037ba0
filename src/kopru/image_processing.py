"""Pixels in: resize, crop and normalise images as the vision encoder's own config says (Pillow + torch only)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

CONFIG_NAME = "preprocessor_config.json"
_RESAMPLE = {int(mode): mode for mode in Image.Resampling}  # PIL codes as HF configs store them


@dataclass
class ImagePreprocessor:
    size: int = 224  # the output is size x size
    # "resize": squash to size x size; "crop": shortest side to `shortest_edge`, then a centre crop of size x size
    # (CLIP's processor).
    mode: Literal["resize", "crop"] = "resize"
    shortest_edge: int | None = None  # None: size
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: int = 3  # PIL code; 3 = bicubic

    @classmethod
    def for_encoder(cls, name_or_path: str, vision) -> ImagePreprocessor:
        """The encoder checkpoint's own preprocessing (its `preprocessor_config.json`, local or from the hub
        cache); without one, its native size and its family's mean/std (see kopru.vision.VISION_BACKBONES)."""
        file = _find_config(name_or_path)
        if file is not None:
            return cls._from_file(file, vision.image_size)
        mean, std = vision.backbone.image_mean, vision.backbone.image_std
        return cls(size=vision.image_size, image_mean=mean, image_std=std)

    @classmethod
    def from_pretrained(cls, path: str | Path, default_size: int | None = None) -> ImagePreprocessor:
        """Read an HF `preprocessor_config.json` (CLIP, SigLIP, ViT, Köprü's own); fall back to `default_size`."""
        file = Path(path) / CONFIG_NAME
        if not file.is_file():
            if default_size is None:
                raise FileNotFoundError(f"expected {CONFIG_NAME} in {path}, found none and no default size given")
            return cls(size=default_size)
        return cls._from_file(file, default_size)

    @classmethod
    def _from_file(cls, file: Path, default_size: int | None) -> ImagePreprocessor:
        data = json.loads(file.read_text())
        if "mode" in data and "size" in data and isinstance(data["size"], int):  # our own format
            return cls(**{k: data[k] for k in asdict(cls()) if k in data})
        crop = data.get("do_center_crop", False)
        size, resize = data.get("crop_size") if crop else None, data.get("size") or {}
        if isinstance(resize, dict):
            edge = resize.get("shortest_edge")
            resize = resize.get("height") or edge or default_size
        if isinstance(size, dict):
            size = size.get("height")
        return cls(
            size=int(size or resize),
            mode="crop" if crop else "resize",
            shortest_edge=int(resize) if crop else None,
            image_mean=tuple(data.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(data.get("image_std", (0.5, 0.5, 0.5))),
            resample=int(data.get("resample", 3)),
        )

    def save_pretrained(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """A list of PIL images -> float tensor [images, 3, size, size]."""
        if not images:
            return torch.empty(0, 3, self.size, self.size)
        return torch.stack([self._one(image) for image in images])

    def _one(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, found {type(image).__name__}")
        if image.width < 1 or image.height < 1:
            raise ValueError(f"expected an image of at least 1x1 pixels, found {image.width}x{image.height}")
        image = image.convert("RGB")
        resample = _RESAMPLE.get(self.resample, Image.Resampling.BICUBIC)
        if self.mode == "crop":
            # Shortest side to size, the long side truncated as HF's (and torchvision's) resize computes it.
            edge = self.shortest_edge or self.size
            short, long = sorted((image.width, image.height))
            new_long = int(edge * long / short)
            width, height = (edge, new_long) if image.width <= image.height else (new_long, edge)
            image = image.resize((width, height), resample)
            left, top = (width - self.size) // 2, (height - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        else:
            image = image.resize((self.size, self.size), resample)
        return self.normalize(image)

    def normalize(self, image: Image.Image) -> torch.Tensor:
        """An RGB image at its final size, any shape -> float tensor [3, H, W] with the encoder's mean/std."""
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (pixels - mean) / std


def _find_config(name_or_path: str) -> Path | None:
    local = Path(name_or_path) / CONFIG_NAME
    if Path(name_or_path).is_dir():
        return local if local.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(name_or_path, CONFIG_NAME, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    return Path(found) if found else None
