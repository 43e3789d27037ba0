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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.utils import cached_file

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
    except (OSError, SyntaxError, struct.error, ValueError) as error:  # a header cut short or damaged (PPM: ValueError)
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


# ------------------------------------------------------------------------------------ HF image-processor settings
# An image processor saved alone (and every checkpoint saved before transformers 5) writes
# preprocessor_config.json; transformers 5 saves a whole processor (LlavaProcessor, Blip2Processor, ...) as one
# processor_config.json with the image processor's settings under "image_processor" and no preprocessor_config.json.
PROCESSOR_CONFIG_NAME = "processor_config.json"
PROCESSOR_CONFIG_KEY = "image_processor"

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class HFProcessorDefaults:
    """What one HF image processor class uses for a key its config leaves out (the class attributes of
    transformers 5's `*ImageProcessorPil`, checked against them in tests/test_image_processors.py)."""

    size: dict[str, int]
    crop_size: dict[str, int] | None
    do_center_crop: bool
    resample: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    # HF's `default_to_square` for this class: whether an int `size` (as transformers-4 files hold it) means
    # height = width = size, or the shortest edge (CLIP, SigLIP, LLaVA-NeXT).
    int_size_is_square: bool


HF_IMAGE_PROCESSORS: dict[str, HFProcessorDefaults] = {
    "CLIPImageProcessor": HFProcessorDefaults({"shortest_edge": 224}, {"height": 224, "width": 224}, True, 3,
                                              _CLIP_MEAN, _CLIP_STD, int_size_is_square=False),
    "SiglipImageProcessor": HFProcessorDefaults({"height": 224, "width": 224}, None, False, 3, _HALF, _HALF,
                                                int_size_is_square=False),
    "BlipImageProcessor": HFProcessorDefaults({"height": 384, "width": 384}, None, False, 3, _CLIP_MEAN, _CLIP_STD,
                                              int_size_is_square=True),
    "ViTImageProcessor": HFProcessorDefaults({"height": 224, "width": 224}, None, False, 2, _HALF, _HALF,
                                             int_size_is_square=True),
    # LLaVA-NeXT: these settings are its base view's and each tile's; the anyres tiling is kopru.geometry's.
    "LlavaNextImageProcessor": HFProcessorDefaults({"shortest_edge": 224}, {"height": 224, "width": 224}, True, 3,
                                                   _CLIP_MEAN, _CLIP_STD, int_size_is_square=False),
    # Llama-3.2-Vision: these settings are one tile's; the tiled canvas is kopru.geometry.tiles' (pixels: kopru.high_resolution_processing).
    "MllamaImageProcessor": HFProcessorDefaults({"height": 224, "width": 224}, None, False, 2, _HALF, _HALF,
                                                int_size_is_square=True),
}
# Names older checkpoints give the same classes (transformers < 4.27 "feature extractors").
_TYPE_ALIASES = {"CLIPFeatureExtractor": "CLIPImageProcessor", "ViTFeatureExtractor": "ViTImageProcessor"}
# HF picks the class from config.json's model_type when the settings name none (AutoImageProcessor's mapping).
_TYPE_OF_MODEL = {
    "clip": "CLIPImageProcessor", "clip_vision_model": "CLIPImageProcessor", "llava": "CLIPImageProcessor",
    "siglip": "SiglipImageProcessor", "siglip_vision_model": "SiglipImageProcessor", "vit": "ViTImageProcessor",
    "blip-2": "BlipImageProcessor", "blip_2_vision_model": "BlipImageProcessor",
    "llava_next": "LlavaNextImageProcessor", "mllama": "MllamaImageProcessor",
    "mllama_vision_model": "MllamaImageProcessor",
}
# Keys that change pixels in HF's generic pipeline and that `ImagePreprocessor.from_hf_settings` reads; the rest
# (processor_class, image_grid_pinpoints, max_image_tiles, ...) are kept verbatim and saved back.
_READ_KEYS = frozenset({
    "image_processor_type", "feature_extractor_type", "do_resize", "size", "resample", "do_center_crop",
    "crop_size", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb",
    "do_pad", "pad_size", "image_aspect_ratio",
})


class ImageProcessorSettingsError(ValueError):
    """Image-processor settings Köprü cannot reproduce exactly, or none where they were expected."""


def find_image_processor_settings(name_or_path: str | Path) -> tuple[dict, str] | None:
    """The HF image-processor settings of a checkpoint (a local directory or a hub id in the local cache) and
    where they came from, e.g. ".../processor_config.json ['image_processor']"; None if it has none.

    Precedence as HF's `ImageProcessingMixin.get_image_processor_dict`: processor_config.json's
    "image_processor" entry first, then preprocessor_config.json.
    """
    nested = _locate(name_or_path, PROCESSOR_CONFIG_NAME)
    if nested is not None:
        data = _read_json(nested)
        if isinstance(data.get(PROCESSOR_CONFIG_KEY), dict):
            return data[PROCESSOR_CONFIG_KEY], f"{nested} [{PROCESSOR_CONFIG_KEY!r}]"
    flat = _locate(name_or_path, CONFIG_NAME)
    if flat is not None:
        return _read_json(flat), str(flat)
    return None


def _locate(name_or_path: str | Path, filename: str) -> Path | None:
    if Path(name_or_path).is_dir():
        local = Path(name_or_path) / filename
        return local if local.is_file() else None
    try:
        found = cached_file(str(name_or_path), filename, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    return Path(found) if found else None


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ImageProcessorSettingsError(f"{file}: expected JSON, found invalid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ImageProcessorSettingsError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def _missing_settings(name_or_path: str | Path) -> ImageProcessorSettingsError:
    return ImageProcessorSettingsError(
        f"expected image-processor settings in {name_or_path} ({PROCESSOR_CONFIG_NAME} with an "
        f"{PROCESSOR_CONFIG_KEY!r} entry, or {CONFIG_NAME}), found neither. Save the encoder's own, e.g. "
        f"`transformers.CLIPImageProcessor(size=..., crop_size=...).save_pretrained(dir)`; or pass an explicit "
        f"default (`ImagePreprocessor.family_default(vision)`: the native size squashed, the family's mean/std)"
    )


@dataclass
class ImagePreprocessor:
    """Resize, crop, rescale and normalise exactly as the HF image processor named by `processor_type` does
    (transformers 5's PIL backend, the one used without torchvision), pixel for pixel."""

    size: int = 224  # the output is size x size
    # "resize": squash to size x size; "crop": shortest side to `shortest_edge`, then a centre crop of size x size
    # (CLIP's processor); "pad": LLaVA-1.5's image_aspect_ratio="pad", the image centred on a square of its
    # longer side filled with the mean colour (int(mean * 255), as LLaVA computes it), then as "crop".
    mode: Literal["resize", "crop", "pad"] = "resize"
    shortest_edge: int | None = None  # None: size
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: int = 3  # PIL code; 3 = bicubic
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    processor_type: str = "CLIPImageProcessor"  # the HF class these settings are saved as (and were read from)
    # Settings of the HF class Köprü does not use itself (image_grid_pinpoints, max_image_tiles, ...), saved back
    # verbatim so that HF's own processor loaded from Köprü's save is the one the checkpoint had.
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------------ reading
    @classmethod
    def for_encoder(cls, name_or_path: str, vision, default: ImagePreprocessor | None = None) -> ImagePreprocessor:
        """The checkpoint's own image-processor settings (see `find_image_processor_settings`).

        Without any: `default` if the caller passed one, else ImageProcessorSettingsError naming where it looked.
        """
        return cls.from_pretrained(name_or_path, default, model_type=vision.encoder.config.model_type)

    @classmethod
    def family_default(cls, vision) -> ImagePreprocessor:
        """An explicit stand-in for an encoder saved without settings: squash to its native size, bicubic, its
        family's mean/std (kopru.vision.VISION_BACKBONES). Only what a caller asks for; never chosen silently."""
        return cls(size=vision.image_size, image_mean=tuple(vision.backbone.image_mean),
                   image_std=tuple(vision.backbone.image_std),
                   processor_type=_TYPE_OF_MODEL.get(vision.encoder.config.model_type, "CLIPImageProcessor"))

    @classmethod
    def from_pretrained(cls, path: str | Path, default: ImagePreprocessor | None = None,
                        model_type: str | None = None) -> ImagePreprocessor:
        """Read a directory's HF image-processor settings (either layout) or Köprü's own earlier format."""
        found = find_image_processor_settings(path)
        if found is None:
            if default is None:
                raise _missing_settings(path)
            return default
        data, source = found
        return cls.from_hf_settings(data, source, model_type=model_type)

    @classmethod
    def from_hf_settings(cls, data: dict, source: str = "the image-processor settings",
                         model_type: str | None = None) -> ImagePreprocessor:
        """HF image-processor settings (transformers 4 or 5 key names) -> the preprocessor that gives HF's pixels.

        Settings Köprü cannot reproduce raise ImageProcessorSettingsError naming `source`, the setting, what was
        expected and what was found. `model_type` (config.json's) picks the class when the settings name none.
        """
        if "mode" in data and isinstance(data.get("size"), int) and "image_processor_type" not in data:
            return cls._from_kopru_format(data)

        def refuse(setting: str, expected: str, found: object) -> ImageProcessorSettingsError:
            return ImageProcessorSettingsError(f"{source}: setting {setting!r}: expected {expected}, found "
                                               f"{json.dumps(found)}")

        name = data.get("image_processor_type") or data.get("feature_extractor_type")
        if name is None and model_type is not None:
            name = _TYPE_OF_MODEL.get(model_type)
        base = _TYPE_ALIASES.get(name, name)
        for suffix in ("Fast", "Pil"):  # transformers 4's torchvision processors / 5's PIL ones: same settings
            if isinstance(base, str) and base.endswith(suffix) and base[:-len(suffix)] in HF_IMAGE_PROCESSORS:
                base = base[:-len(suffix)]
        if base not in HF_IMAGE_PROCESSORS:
            raise refuse("image_processor_type", f"one of {sorted(HF_IMAGE_PROCESSORS)} (or its Fast/Pil variant)",
                         name)
        defaults = HF_IMAGE_PROCESSORS[base]

        def get(key: str, default: object) -> object:
            value = data.get(key)
            return default if value is None else value  # HF: a null setting takes the class default

        if get("do_resize", True) is not True:
            raise refuse("do_resize", "true (the encoder takes one fixed size)", data["do_resize"])
        resample = get("resample", defaults.resample)
        if isinstance(resample, bool) or not isinstance(resample, int) or resample not in _RESAMPLE:
            # A name such as "bicubic": HF's processors pass anything but a PIL code on as BILINEAR, whatever it says.
            raise refuse("resample", f"a PIL resampling code {sorted(_RESAMPLE)}", resample)
        size = get("size", defaults.size)
        if isinstance(size, int) and not isinstance(size, bool):
            size = {"height": size, "width": size} if defaults.int_size_is_square else {"shortest_edge": size}
        crop = get("do_center_crop", defaults.do_center_crop)
        crop_size = get("crop_size", defaults.crop_size)
        if isinstance(crop_size, int) and not isinstance(crop_size, bool):
            crop_size = {"height": crop_size, "width": crop_size}
        if not isinstance(size, dict) or set(size) - {"shortest_edge", "height", "width"} or not (
                set(size) == {"shortest_edge"} or set(size) == {"height", "width"}):
            raise refuse("size", 'an int, {"shortest_edge": n} or {"height": n, "width": n}', size)
        if "height" in size and size["height"] != size["width"]:
            raise refuse("size", "a square size (height = width: the encoder takes square images)", size)
        if crop and (not isinstance(crop_size, dict) or set(crop_size) != {"height", "width"}
                     or crop_size["height"] != crop_size["width"]):
            raise refuse("crop_size", 'a square {"height": n, "width": n} (or an int)', crop_size)
        if data.get("do_pad") and data.get("pad_size") is not None and base not in ("LlavaNextImageProcessor",
                                                                                     "MllamaImageProcessor"):
            raise refuse("pad_size", "none (every output is already one fixed size)", data["pad_size"])

        if base == "LlavaNextImageProcessor":
            # Its base view is the whole image squashed to shortest_edge x shortest_edge, then every view (base and
            # tiles) is resized to the shortest edge and centre-cropped: identity only when crop = shortest edge.
            edge = size.get("shortest_edge", size.get("height"))
            if crop and crop_size["height"] != edge:
                raise refuse("crop_size", f"equal to the shortest edge {edge} (LLaVA-NeXT would resize and crop "
                             "every tile again)", crop_size)
            size = {"height": edge, "width": edge}
            crop = False
        if "shortest_edge" in size:
            if not crop:
                raise refuse("do_center_crop", f"true with size {json.dumps(size)} (without a crop HF keeps the "
                             "aspect ratio: images of varying shape, which no fixed-size encoder here takes)", crop)
            if crop_size["height"] > size["shortest_edge"]:
                raise refuse("crop_size", f"at most the shortest edge {size['shortest_edge']} (HF pads a larger "
                             "crop with black)", crop_size)
            side, mode, edge = crop_size["height"], "crop", size["shortest_edge"]
        else:
            if crop and crop_size["height"] != size["height"]:
                raise refuse("crop_size", f"equal to size {size['height']} (a squash then a smaller crop is not "
                             "reproduced)", crop_size)
            side, mode, edge = size["height"], "resize", None
        if data.get("image_aspect_ratio") == "pad":  # LLaVA-1.5's own key (HF's processors ignore it)
            mode = "pad"
        mean = get("image_mean", defaults.image_mean)
        std = get("image_std", defaults.image_std)
        for key, value in (("image_mean", mean), ("image_std", std)):
            if isinstance(value, int | float) and not isinstance(value, bool):
                value = [value] * 3  # HF repeats a single number over the channels
            if not isinstance(value, list | tuple) or len(value) != 3:
                raise refuse(key, "3 numbers (one per RGB channel) or one number", value)
        mean = (mean,) * 3 if isinstance(mean, int | float) else mean
        std = (std,) * 3 if isinstance(std, int | float) else std
        # do_convert_rgb false is accepted: Köprü always converts to RGB, which for an RGB image is HF's pixels and
        # for any other mode is the only input a 3-channel encoder takes (HF would hand it 1, 2 or 4 channels).
        return cls(
            size=int(side), mode=mode, shortest_edge=None if edge is None else int(edge),
            image_mean=tuple(float(x) for x in mean), image_std=tuple(float(x) for x in std),
            resample=int(resample), do_rescale=bool(get("do_rescale", True)),
            rescale_factor=float(get("rescale_factor", 1 / 255)), do_normalize=bool(get("do_normalize", True)),
            processor_type=base, extra={k: v for k, v in data.items() if k not in _READ_KEYS},
        )

    @classmethod
    def _from_kopru_format(cls, data: dict) -> ImagePreprocessor:
        """Köprü's format before it saved HF's (its dataclass fields), read so earlier saved models still load."""
        fields = {k: data[k] for k in ("size", "mode", "shortest_edge", "image_mean", "image_std", "resample")
                  if k in data}
        for name in ("image_mean", "image_std"):  # JSON lists back to the tuples they were saved from
            if name in fields:
                fields[name] = tuple(fields[name])
        return cls(**fields)

    # ------------------------------------------------------------------------------------------------ writing
    def to_hf_settings(self) -> dict:
        """These settings in HF's format for `processor_type`, so `AutoImageProcessor.from_pretrained` rebuilds
        them (mode "pad" adds LLaVA's "image_aspect_ratio": "pad", which HF's processors ignore)."""
        crop = self.mode in ("crop", "pad")
        llava_next = self.processor_type == "LlavaNextImageProcessor"  # saved as LLaVA-NeXT checkpoints hold it
        settings = {
            **self.extra,
            "image_processor_type": self.processor_type,
            "do_resize": True,
            "size": {"shortest_edge": self.shortest_edge or self.size} if crop or llava_next else {
                "height": self.size, "width": self.size},
            "resample": self.resample,
            "do_center_crop": crop or llava_next,
            "crop_size": {"height": self.size, "width": self.size},
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
        }
        if self.mode == "pad":
            settings["image_aspect_ratio"] = "pad"
        return settings

    def save_pretrained(self, path: str | Path) -> None:
        """HF's `preprocessor_config.json` (an image processor saved alone)."""
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / CONFIG_NAME).write_text(json.dumps(self.to_hf_settings(), indent=2) + "\n")

    # ------------------------------------------------------------------------------------------------ pixels
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

    @property
    def resample_filter(self) -> Image.Resampling:
        """The Pillow filter of `resample` (HF resizes with Pillow on the uint8 image: so must every caller)."""
        if self.resample not in _RESAMPLE:
            raise ValueError(f"expected resample as a PIL code {sorted(_RESAMPLE)}, found {self.resample!r}")
        return _RESAMPLE[self.resample]

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
        resample = self.resample_filter
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

    def normalize(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """An RGB image (or uint8 array [H, W, 3]) at its final size, any shape -> float32 tensor [3, H, W],
        rescaled and normalised with HF's own arithmetic: uint8 -> float64 * rescale_factor -> float32, then
        (x - mean) / std in float32 (transformers.image_transforms.rescale / normalize), so it equals HF's bits.

        This is one tile's (or a whole padded canvas's) per-pixel step; it does not resize.
        """
        pixels = np.asarray(image)
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], found an array of shape {tuple(pixels.shape)}")
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            pixels = pixels.astype(np.float32)
        if self.do_normalize:
            pixels = (pixels - np.array(self.image_mean, dtype=np.float32)) / np.array(self.image_std,
                                                                                        dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

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
