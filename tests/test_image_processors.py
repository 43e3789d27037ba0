"""Image-processor settings read from every layout HF uses give HF's own pixels, exactly.

Each case saves a real HF image processor (transformers 5's PIL backend: the one `AutoImageProcessor` loads
without torchvision), reads it with Köprü and compares pixel values over non-square and square images. The
reference is always `AutoImageProcessor.from_pretrained` of the same directory (or, for transformers-4 int
sizes it reads differently, of the same settings in dict form: see HFProcessorDefaults.int_size_is_square).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, picture, random_image
from PIL import Image
from transformers import AutoImageProcessor
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from kopru.config import VisionTowerConfig
from kopru.image_processing import (
    CONFIG_NAME,
    HF_IMAGE_PROCESSORS,
    PROCESSOR_CONFIG_NAME,
    ImagePreprocessor,
    ImageProcessorSettingsError,
)
from kopru.vision import VisionTower

SIZES = [(200, 120), (90, 300), (333, 333)]  # (width, height)
# Square images Mllama fits on one tile (of 32; up to 4 tiles: HF picks the canvas that upscales least, 1x1):
# its multi-tile canvas is the Mllama conversion's, not compared here.
MLLAMA_ONE_TILE = [(20, 20), (32, 32)]
MEAN, STD = [0.3, 0.45, 0.6], [0.2, 0.25, 0.3]  # no family's defaults: proves they are read, not assumed

# name -> (HF class, settings) as a checkpoint of that family would have them (small sizes for speed).
CASES = {
    "clip": (CLIPImageProcessorPil, {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}}),
    "clip_fast_name": (CLIPImageProcessorPil, {"size": {"shortest_edge": 32}, "crop_size": {"height": 32,
                                                                                            "width": 32}}),
    "siglip": (SiglipImageProcessorPil, {"size": {"height": 32, "width": 32}}),
    "blip": (BlipImageProcessorPil, {"size": {"height": 48, "width": 48}, "image_mean": MEAN, "image_std": STD}),
    "vit": (ViTImageProcessorPil, {"size": {"height": 32, "width": 32}}),  # bilinear by default
    "vit_nearest_no_rescale": (ViTImageProcessorPil, {"size": {"height": 32, "width": 32}, "resample": 0,
                                                      "do_rescale": False, "image_mean": [100, 110, 120],
                                                      "image_std": [50, 60, 70]}),
    "llava_next": (LlavaNextImageProcessorPil, {"size": {"shortest_edge": 32}, "crop_size": {"height": 32,
                                                                                             "width": 32}}),
    "mllama": (MllamaImageProcessorPil, {"size": {"height": 32, "width": 32}, "image_mean": MEAN,
                                         "image_std": STD, "max_image_tiles": 4}),
}


def hf_pixels(processor, images: list[Image.Image]) -> torch.Tensor:
    """[images, 3, H, W] from any of the cases; LLaVA-NeXT: its base view (pass 0); Mllama: tile 0."""
    if type(processor).__name__.startswith("Mllama"):  # a list is one sample's images; one image per sample here
        images = [[image] for image in images]
    out = processor(images=images, return_tensors="pt")["pixel_values"]
    if out.dim() == 5:  # LLaVA-NeXT: [images, passes, 3, H, W]
        return out[:, 0]
    if out.dim() == 6:  # Mllama: [batch, images, tiles, 3, H, W]
        return out[:, 0, 0]
    return out


def save(case: str, directory: Path, layout: str) -> Path:
    """The case's HF processor saved as an image processor alone (preprocessor_config.json) or, as
    transformers 5 saves a whole processor, nested in processor_config.json."""
    cls, settings = CASES[case]
    processor = cls(**settings)
    directory.mkdir(parents=True, exist_ok=True)
    data = processor.to_dict()
    if case == "clip_fast_name":
        data["image_processor_type"] = "CLIPImageProcessorFast"  # transformers 4's torchvision processor
    if layout == "preprocessor_config":
        (directory / CONFIG_NAME).write_text(json.dumps(data))
    else:
        (directory / PROCESSOR_CONFIG_NAME).write_text(json.dumps({"image_processor": data,
                                                                   "processor_class": "SomeProcessor"}))
    return directory


def max_diff(ours: ImagePreprocessor, hf, images: list[Image.Image]) -> float:
    expected, found = hf_pixels(hf, images), ours(images)
    assert found.shape == expected.shape and found.dtype == expected.dtype == torch.float32
    return float((found - expected).abs().max())


@pytest.mark.parametrize("layout", ["preprocessor_config", "processor_config"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_pixels_equal_hf_bit_for_bit(case: str, layout: str, tmp_path: Path) -> None:
    """Same Pillow resize of the same uint8 image, and HF's own float64-rescale/float32-normalise arithmetic:
    max difference 0 for every processor (Mllama: one square image = one tile; its canvas is not compared)."""
    directory = save(case, tmp_path / "proc", layout)
    hf = AutoImageProcessor.from_pretrained(directory)
    ours = ImagePreprocessor.from_pretrained(directory)
    sizes = MLLAMA_ONE_TILE if case == "mllama" else SIZES
    assert max_diff(ours, hf, [picture(w, h, seed) for seed, (w, h) in enumerate(sizes)]) == 0.0
    assert ours.processor_type == type(hf).__name__.removesuffix("Pil")


def test_processor_config_takes_precedence_as_in_hf(tmp_path: Path) -> None:
    """Both files present: HF reads processor_config.json's entry first; so does Köprü."""
    save("vit", tmp_path, "processor_config")
    (tmp_path / CONFIG_NAME).write_text(json.dumps(SiglipImageProcessorPil(size={"height": 48, "width": 48}
                                                                           ).to_dict()))
    hf, ours = AutoImageProcessor.from_pretrained(tmp_path), ImagePreprocessor.from_pretrained(tmp_path)
    assert type(hf).__name__ == "ViTImageProcessorPil" and ours.processor_type == "ViTImageProcessor"
    assert max_diff(ours, hf, [picture(w, h) for w, h in SIZES]) == 0.0


# transformers-4 files written by hand: feature-extractor names, int sizes, the Fast class name.
V4_FILES = {
    "clip": {"feature_extractor_type": "CLIPFeatureExtractor", "do_resize": True, "size": 40,
             "do_center_crop": True, "crop_size": 32, "resample": 3, "do_normalize": True,
             "image_mean": MEAN, "image_std": STD},
    "vit": {"feature_extractor_type": "ViTFeatureExtractor", "do_resize": True, "size": 32, "resample": 2,
            "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
    "blip_fast": {"image_processor_type": "BlipImageProcessorFast", "size": 48, "do_convert_rgb": True},
    "siglip_fast": {"image_processor_type": "SiglipImageProcessorFast", "size": {"height": 32, "width": 32},
                    "resample": 2},
}


@pytest.mark.parametrize("case", sorted(V4_FILES))
def test_transformers4_files(case: str, tmp_path: Path) -> None:
    """An int size means a square for ViT and BLIP (HF's default_to_square) and a shortest edge for CLIP."""
    (tmp_path / CONFIG_NAME).write_text(json.dumps(V4_FILES[case]))
    ours, hf = ImagePreprocessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)
    assert max_diff(ours, hf, [picture(w, h, seed) for seed, (w, h) in enumerate(SIZES)]) == 0.0


def test_hf_defaults_table_matches_hf_classes() -> None:
    """A key a config leaves out takes the HF class's default: Köprü's table must be those defaults."""
    classes = {"CLIPImageProcessor": CLIPImageProcessorPil, "SiglipImageProcessor": SiglipImageProcessorPil,
               "BlipImageProcessor": BlipImageProcessorPil, "ViTImageProcessor": ViTImageProcessorPil,
               "LlavaNextImageProcessor": LlavaNextImageProcessorPil, "MllamaImageProcessor": MllamaImageProcessorPil}
    assert set(classes) == set(HF_IMAGE_PROCESSORS)
    for name, cls in classes.items():
        ours, hf = HF_IMAGE_PROCESSORS[name], cls().to_dict()
        assert ours.size == hf["size"], name
        assert ours.int_size_is_square == cls.default_to_square, name
        assert ours.crop_size == hf.get("crop_size"), name
        assert ours.do_center_crop == bool(hf.get("do_center_crop")), name
        assert ours.resample == int(hf["resample"]), name
        assert ours.image_mean == pytest.approx(hf["image_mean"]) and ours.image_std == pytest.approx(hf["image_std"])


def test_empty_settings_take_the_class_defaults(tmp_path: Path) -> None:
    """{"image_processor_type": "BlipImageProcessor"} alone: 384x384, bicubic, CLIP mean/std, as HF."""
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"image_processor_type": "BlipImageProcessor"}))
    ours, hf = ImagePreprocessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)
    assert ours.size == 384
    assert max_diff(ours, hf, [picture(200, 120)]) == 0.0


# ------------------------------------------------------------------------------------------------ refusals
REFUSED = {
    "resample": ({"image_processor_type": "SiglipImageProcessor", "resample": "bicubic"}, "PIL resampling code",
                 '"bicubic"'),
    "size": ({"image_processor_type": "SiglipImageProcessor", "size": {"height": 32, "width": 48}}, "square size",
             '{"height": 32, "width": 48}'),
    "do_resize": ({"image_processor_type": "ViTImageProcessor", "do_resize": False}, "true", "false"),
    "image_processor_type": ({"image_processor_type": "Qwen2VLImageProcessor"}, "CLIPImageProcessor",
                             '"Qwen2VLImageProcessor"'),
    # SigLIP's int size is a shortest edge (HF: default_to_square False) and it does not crop: HF keeps the aspect
    # ratio, so a 200x120 image would come out 53x32.
    "do_center_crop": ({"image_processor_type": "SiglipImageProcessor", "size": 32}, "keeps the aspect ratio",
                       "false"),
    "crop_size": ({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
                   "crop_size": {"height": 40, "width": 40}}, "at most the shortest edge 32", '{"height": 40, "width": 40}'),
}


@pytest.mark.parametrize("setting", sorted(REFUSED))
def test_unreproducible_setting_is_refused_by_name(setting: str, tmp_path: Path) -> None:
    data, expected, found = REFUSED[setting]
    (tmp_path / PROCESSOR_CONFIG_NAME).write_text(json.dumps({"image_processor": data}))
    with pytest.raises(ImageProcessorSettingsError) as error:
        ImagePreprocessor.from_pretrained(tmp_path)
    message = str(error.value)
    assert str(tmp_path / PROCESSOR_CONFIG_NAME) in message and f"setting {setting!r}" in message
    assert f"expected {expected}" in message or expected in message.split("expected", 1)[1].split("found")[0]
    assert f"found {found}" in message


def test_no_settings_is_an_error_unless_a_default_is_passed(vision_dirs, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((vision_dirs["clip"] / name).read_bytes())
    tower = VisionTower.from_config(VisionTowerConfig(str(bare)))
    with pytest.raises(ImageProcessorSettingsError, match=rf"expected image-processor settings in {bare} "
                                                          rf"\({PROCESSOR_CONFIG_NAME}.*{CONFIG_NAME}\), found neither"):
        ImagePreprocessor.for_encoder(str(bare), tower)
    default = ImagePreprocessor.family_default(tower)
    chosen = ImagePreprocessor.for_encoder(str(bare), tower, default=default)
    assert chosen is default and chosen.size == 32
    assert chosen.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # CLIP's, asked for explicitly


# ------------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_settings_load_in_hf_with_the_same_pixels(case: str, tmp_path: Path) -> None:
    """Köprü saves HF's format: AutoImageProcessor on Köprü's save gives Köprü's (= the original HF) pixels."""
    ours = ImagePreprocessor.from_pretrained(save(case, tmp_path / "src", "processor_config"))
    ours.save_pretrained(tmp_path / "saved")
    hf = AutoImageProcessor.from_pretrained(tmp_path / "saved")
    again = ImagePreprocessor.from_pretrained(tmp_path / "saved")
    assert again == ours
    sizes = MLLAMA_ONE_TILE if case == "mllama" else SIZES
    assert max_diff(ours, hf, [picture(w, h, seed) for seed, (w, h) in enumerate(sizes)]) == 0.0
    if case == "mllama":
        assert hf.max_image_tiles == 4  # the settings Köprü does not use itself travel unchanged


def test_saved_model_vision_dir_loads_in_hf(build, tmp_path: Path) -> None:
    model, processor = build("projection")
    model.save_pretrained(tmp_path / "model", processor)
    hf = AutoImageProcessor.from_pretrained(tmp_path / "model" / "vision")
    _, reloaded = type(model).from_pretrained(tmp_path / "model")
    images = [picture(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    assert max_diff(processor.image_processor, hf, images) == 0.0
    assert max_diff(reloaded.image_processor, hf, images) == 0.0


def test_tile_normalisation_equals_hf_for_any_array() -> None:
    """`ImagePreprocessor.normalize` (one tile's or one canvas's rescale + normalise, exposed for Mllama's tiles)
    equals HF's `rescale` then `normalize` on the same uint8 pixels, including the zero padding."""
    from transformers.image_transforms import normalize, rescale

    settings = ImagePreprocessor(image_mean=tuple(MEAN), image_std=tuple(STD))
    pixels = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    pixels[:, 40:] = 0  # a padded canvas
    expected = normalize(rescale(pixels, 1 / 255), MEAN, STD).transpose(2, 0, 1)
    assert np.array_equal(settings.normalize(pixels).numpy(), expected)


@pytest.mark.parametrize("shortest_edge", [32, 40])  # 40: resize to 40, then crop 32 (as 256 -> 224 in CLIP)
def test_preprocessing_matches_hf_clip_image_processor(vision_dirs, tmp_path, shortest_edge) -> None:
    """A CLIP encoder dir with HF's preprocessor_config.json gives HF's pixel values.

    HF resizes the shortest side to `shortest_edge` and the long side to int(size * long / short) (truncated,
    as torchvision does), with Pillow bicubic on the uint8 image, then crops the centre ((orig - crop) // 2),
    rescales (float64 * 1/255 -> float32) and normalises. The same Pillow resize on the same uint8 pixels
    leaves only float rounding (~1e-7) in rescale/normalise, hence atol 1e-5. The sizes include ones where
    rounding the long side instead of truncating it would pick another size (40x62: 49.6, 33x100: 96.97,
    45x64: 45.5, 100x30: 106.7) and odd crop margins (50x41 -> 32x39).
    """
    vision_dir = tmp_path / "clip"
    shutil.copytree(vision_dirs["clip"], vision_dir)
    CLIPImageProcessorPil(size={"shortest_edge": shortest_edge},
                          crop_size={"height": 32, "width": 32}).save_pretrained(vision_dir)
    tower = VisionTower.from_config(VisionTowerConfig(str(vision_dir)))
    ours = ImagePreprocessor.for_encoder(str(vision_dir), tower)
    hf = CLIPImageProcessorPil.from_pretrained(vision_dir)
    images = [random_image(w, h, seed) for seed, (h, w) in enumerate([(40, 48), (40, 62), (62, 40), (33, 100),
                                                               (45, 64), (100, 30), (50, 41), (17, 23)])]
    expected = hf(images, return_tensors="pt").pixel_values
    found = ours(images)
    assert found.shape == expected.shape == (len(images), 3, 32, 32)
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=0)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_tiny_encoders_ship_their_family_mean_std(vision_dirs) -> None:
    """Before: every encoder without a preprocessor_config.json got mean/std 0.5, wrong for CLIP. Now an encoder
    without settings is refused (tests/test_image_processors.py), and the tiny ones ship their family's."""
    for kind, mean, std in (("clip", CLIP_MEAN, CLIP_STD), ("siglip", (0.5,) * 3, (0.5,) * 3)):
        assert (vision_dirs[kind] / CONFIG_NAME).is_file()
        tower = VisionTower.from_config(VisionTowerConfig(str(vision_dirs[kind])))
        preprocessor = ImagePreprocessor.for_encoder(str(vision_dirs[kind]), tower)
        assert preprocessor.size == IMAGE_SIZE
        assert tuple(preprocessor.image_mean) == pytest.approx(mean)
        assert tuple(preprocessor.image_std) == pytest.approx(std)
