"""Pixels in: load, orient and convert images safely, then resize, crop or pad and normalise them as the
vision encoder's own config says (Pillow + NumPy + torch only).

`load_image` is the one way a file, encoded bytes or a PIL image becomes an RGB image:

- a pixel limit (`MAX_IMAGE_PIXELS`, 89,478,485 pixels = Pillow's own warning threshold; `max_pixels=` to
  change it) checked from the header, before any pixel is decoded, so a decompression bomb costs nothing;
- the EXIF orientation applied (a phone photo taken upright comes out upright, with width and height swapped
  where the tag says so);
- the whole image decoded at once, so a truncated file fails here with its name, not later in the model;
- every Pillow mode converted to 8-bit RGB correctly (`to_rgb`): transparency (RGBA, LA, PA, P with a
  transparent index) composited onto white, as HF's `convert_to_rgb` does (a bare `convert("RGB")` keeps
  whatever colour hides under transparent pixels, often black); 16-bit greyscale (I;16, I;16B, I) scaled by
  255/65535 (Pillow's `convert` clips every value above 255 to white); CMYK by Pillow's
  R = (255 - C)(255 - K) / 255; embedded ICC profiles are not applied (neither HF nor LLaVA does).
"""

from __future__ import annotations

import io
import json
import re
import struct
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

CONFIG_NAME = "preprocessor_config.json"
_RESAMPLE = {int(mode): mode for mode in Image.Resampling}  # PIL codes as HF configs store them

# Pillow warns above this many pixels and refuses above twice as many; the default limit is its warning
# threshold, so a refused image is always refused by us, with the numbers.
MAX_IMAGE_PIXELS = 89_478_485
WHITE = (255, 255, 255)
# Pillow's 16-bit greyscale modes; "I" (32-bit) is how Pillow < 10.1 opened 16-bit PNGs, so it is read as 16-bit.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_UNSUPPORTED_MODES = {"F": "32-bit float pixels, whose value range no file format fixes"}


def load_image(source: str | Path | bytes | bytearray | Image.Image, max_pixels: int = MAX_IMAGE_PIXELS,
               background: tuple[int, int, int] = WHITE, name: str | None = None) -> Image.Image:
    """A file path, encoded bytes or PIL image as a fully decoded RGB PIL image, oriented by its EXIF tag.

    Raises ValueError for: bytes that are not an image Pillow reads, a truncated or corrupt file, a 0-pixel image,
    more than `max_pixels` pixels (checked before decoding; `ImageTooLargeError`), an unsupported mode.
    FileNotFoundError for a missing path. Each message starts with `name` (default: the file's path, or the
    bytes' length) and never holds a Python object's repr: bytes are read through an in-memory stream, which
    Pillow's own messages would show as `<_io.BytesIO object at 0x...>`.
    """
    name = name or _describe_source(source)
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, max_pixels, name)
        return to_rgb(ImageOps.exif_transpose(source), background)
    if isinstance(source, bytes | bytearray):
        if not source:
            raise ValueError(f"{name}: expected encoded image bytes, found 0 bytes")
        stream = io.BytesIO(source)
    else:
        if not Path(source).is_file():
            raise FileNotFoundError(f"expected an image file at {source}, found nothing there")
        stream = source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides, below
            opened = Image.open(stream)
    except UnidentifiedImageError:
        raise ValueError(f"{name}: expected an image Pillow can read (PNG, JPEG, WebP, ...), found data it does "
                         f"not recognise as any image format") from None
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(
            f"{name}: over the pixel limit of {max_pixels:,} (Pillow refused it first: {_pillow_text(error, name)}; "
            f"raise PIL.Image.MAX_IMAGE_PIXELS as well as max_pixels to allow it)") from None
    except (OSError, SyntaxError, struct.error) as error:  # a header cut short or damaged
        raise ValueError(f"{name}: expected a complete image header, found it truncated or corrupt "
                         f"({_pillow_text(error, name)})") from None
    with opened:
        _check_size(opened.width, opened.height, max_pixels, name)
        try:
            opened.load()  # decode now: a truncated file must fail here, not inside the model
        except (OSError, SyntaxError, ValueError) as error:  # Pillow raises all three for damaged data
            raise ValueError(f"{name}: expected complete image data, found it truncated or corrupt "
                             f"({_pillow_text(error, name)})") from None
        return to_rgb(ImageOps.exif_transpose(opened), background)


class ImageTooLargeError(ValueError):
    """An image over the pixel limit (a decompression-bomb guard), refused before its pixels are decoded."""


# A Python object's default repr, e.g. "<_io.BytesIO object at 0x7f3a...>": meaningless to whoever sent the image.
_OBJECT_REPR = re.compile(r"<[A-Za-z_][\w.]* object at 0x[0-9a-fA-F]+>")


def scrub_object_reprs(text: str, name: str = "the image") -> str:
    """`text` with every default object repr replaced by `name`."""
    return _OBJECT_REPR.sub(name, text)


def _pillow_text(error: BaseException, name: str) -> str:
    """Pillow's exception as 'Type: message', any stream repr in it replaced by the source's name."""
    return f"{type(error).__name__}: {scrub_object_reprs(str(error), name)}"


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see the module docstring for each mode's rule)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _UNSUPPORTED_MODES:
        raise ValueError(f"expected an 8- or 16-bit image, found Pillow mode {mode!r} "
                         f"({_UNSUPPORTED_MODES[mode]}); convert it to 8-bit yourself")
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        grey = np.rint(np.clip(values, 0, 65535) * (255 / 65535)).astype(np.uint8)  # 65535 -> 255, 257 k -> k
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
    if "A" in image.getbands() or "a" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (*background, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `expand2square`: the image centred on a square of its longer side, filled with `background`
    (offset (long - short) // 2, so an odd margin puts the extra pixel after the image)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _check_size(width: int, height: int, max_pixels: int, name: str) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"{name}: expected an image of at least 1x1 pixels, found {width}x{height} (width x height)")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,} "
            f"(a decompression-bomb guard; pass a larger max_pixels if the image is trusted)"
        )


def _describe_source(source: object) -> str:
    if isinstance(source, bytes | bytearray):
        return f"image bytes ({len(source):,} bytes)"
    if isinstance(source, Image.Image):
        return f"PIL image ({source.mode}, {source.width}x{source.height})"
    if isinstance(source, str | Path):
        return f"image file {source}"
    raise TypeError(f"expected an image path, bytes or PIL.Image.Image, found {type(source).__name__}")


@dataclass
class ImagePreprocessor:
    size: int = 224  # the output is size x size
    # "resize": squash to size x size; "crop": shortest side to `shortest_edge`, then a centre crop of size x size
    # (CLIP's processor); "pad": LLaVA-1.5's image_aspect_ratio="pad", the image centred on a square of its
    # longer side filled with the mean colour (int(mean * 255), as LLaVA computes it), then as "crop".
    mode: Literal["resize", "crop", "pad"] = "resize"
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
            fields = {k: data[k] for k in asdict(cls()) if k in data}
            for name in ("image_mean", "image_std"):  # JSON lists back to the tuples they were saved from
                if name in fields:
                    fields[name] = tuple(fields[name])
            return cls(**fields)
        crop = data.get("do_center_crop", False)
        size, resize = data.get("crop_size") if crop else None, data.get("size") or {}
        if isinstance(resize, dict):
            edge = resize.get("shortest_edge")
            resize = resize.get("height") or edge or default_size
        if isinstance(size, dict):
            size = size.get("height")
        # LLaVA-1.5 keeps its aspect mode in the model config; a preprocessor config may carry it too.
        pad = data.get("image_aspect_ratio") == "pad"
        return cls(
            size=int(size or resize),
            mode="pad" if pad else "crop" if crop else "resize",
            shortest_edge=int(resize) if crop else None,
            image_mean=tuple(data.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(data.get("image_std", (0.5, 0.5, 0.5))),
            resample=int(data.get("resample", 3)),
        )

    def save_pretrained(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def __call__(self, images: list[Image.Image | str | Path | bytes]) -> torch.Tensor:
        """A list of PIL images (or image files / encoded bytes, read by `load_image`) -> float tensor
        [images, 3, size, size]."""
        if not images:
            return torch.empty(0, 3, self.size, self.size)
        return torch.stack([self._one(image) for image in images])

    @property
    def pad_colour(self) -> tuple[int, int, int]:
        """LLaVA's fill for "pad": tuple(int(x * 255) for x in image_mean), truncated as LLaVA truncates it."""
        return tuple(int(mean * 255) for mean in self.image_mean)

    def _one(self, image: Image.Image | str | Path | bytes) -> torch.Tensor:
        if isinstance(image, str | Path | bytes | bytearray):
            image = load_image(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, an image file or image bytes, found {type(image).__name__}")
        if image.width < 1 or image.height < 1:
            raise ValueError(f"expected an image of at least 1x1 pixels, found {image.width}x{image.height}")
        if self.mode not in ("resize", "crop", "pad"):
            raise ValueError(f"expected mode 'resize', 'crop' or 'pad', found {self.mode!r}")
        image = to_rgb(image)
        resample = _RESAMPLE.get(self.resample, Image.Resampling.BICUBIC)
        if self.mode == "pad":
            side = max(image.size)
            self._check_intermediate(image, side, side, "padded to a square")
            image = expand_to_square(image, self.pad_colour)
        if self.mode in ("crop", "pad"):
            # Shortest side to size, the long side truncated as HF's (and torchvision's) resize computes it.
            edge = self.shortest_edge or self.size
            short, long = sorted((image.width, image.height))
            new_long = int(edge * long / short)
            width, height = (edge, new_long) if image.width <= image.height else (new_long, edge)
            self._check_intermediate(image, width, height, "resized before the centre crop")
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


    @staticmethod
    def _check_intermediate(image: Image.Image, width: int, height: int, step: str) -> None:
        """A 1 x N image would grow to N x N (pad) or edge x edge*N (crop) pixels before shrinking: refuse it
        with the numbers instead of running out of memory inside Pillow."""
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(
                f"a {image.width}x{image.height} image would be {step} at {width}x{height} = {width * height:,} "
                f"pixels, over the limit of {MAX_IMAGE_PIXELS:,}; its aspect ratio "
                f"{max(image.size) / min(image.size):.0f}:1 is too extreme for this mode (use mode='resize' or "
                f"crop the image first)"
            )


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
