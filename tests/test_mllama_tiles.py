"""Llama-3.2-Vision multi-tile images against HF: pixels, logits and greedy generation.

The reference is the tiny random `MllamaForConditionalGeneration` of vlm_checkpoints (16 px tiles, up to 4 of
them, HF's 8 aspect ratios, every gate non-zero) with HF's `MllamaImageProcessorPil` config saved beside it, so
HF's processor and Köprü's read the same settings. (HF's torchvision `MllamaImageProcessor` needs torchvision,
which is not installed here; its resize is not the PIL one, which is the image-processing work's business.)
Image sizes are chosen so that the batch mixes 1, 2, 3 and 4 tiles, wide, tall and square.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image
from transformers import MllamaProcessor, MllamaVisionConfig
from transformers.models.mllama.image_processing_pil_mllama import (
    MllamaImageProcessorPil,
    get_optimal_tiled_canvas,
)
from vlm_checkpoints import MAX_TILES, PICTURE_SEED, tiny_mllama
from vlm_checkpoints import MLLAMA_IMAGE_SIZE as IMAGE_SIZE
from vlm_checkpoints import mllama_logit_diff as max_diff
from vlm_checkpoints import mllama_tokenizer as tokenizer_with_image_token
from vlm_checkpoints import save_mllama_reference as save_reference

from kopru.config import KopruConfig, ResolutionConfig, VisionTowerConfig
from kopru.convert import load_reference
from kopru.convert import mllama as converter
from kopru.generation import GenerationEngine, SamplingParams
from kopru.geometry import (
    image_positions,
    optimal_tiled_canvas,
    plan_image,
    size_fit_to_canvas,
    supported_aspect_ratios,
    tile_layout,
)
from kopru.model import KopruForConditionalGeneration

ATOL = 1e-5
IMAGE = converter.IMAGE_TOKEN
# (width, height) -> tiles at 16 px, up to 4: wide 1x3 (downscaled), tall 3x1, small square 1x1 (upscaled),
# large square 2x2, very wide strip 1x4, 1x2, 1x3 (upscaled).
SIZES = {"wide": (200, 90), "tall": (90, 250), "square": (12, 12), "four": (64, 64), "strip": (70, 9),
         "two": (30, 16), "three": (45, 16)}


IMAGES = {name: random_image(*size, seed) for seed, (name, size) in enumerate(SIZES.items())}
TILES = {name: tile_layout(image.height, image.width, IMAGE_SIZE, MAX_TILES).num_tiles for name, image in IMAGES.items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """HF model + HF processor, and the Köprü conversion of the same directory."""
    path = save_reference(tiny_mllama([1, 4], 6, seed=PICTURE_SEED), tmp_path_factory.mktemp("mllama_tiles"))
    MllamaImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=MAX_TILES
                            ).save_pretrained(path)
    reference = load_reference("mllama", str(path)).eval()
    hf_processor = MllamaProcessor(MllamaImageProcessorPil.from_pretrained(path), tokenizer_with_image_token()[0])
    model, processor = converter.to_kopru(reference, str(path))
    return reference, hf_processor, model.eval(), processor, path


def hf_inputs(hf_processor, texts: list[str], images: list[list[Image.Image]], padding_side: str = "right"):
    hf_processor.tokenizer.padding_side = padding_side
    return hf_processor(images=images, text=texts, return_tensors="pt", padding=True)


def kopru_pixels(inputs, images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
    """HF's own pixel_values, Köprü's layout: the real images flattened, with their original sizes."""
    real = [(row, column) for row, per_text in enumerate(images) for column in range(len(per_text))]
    pixels = torch.stack([inputs["pixel_values"][row, column] for row, column in real])
    sizes = torch.tensor([[image.height, image.width] for per_text in images for image in per_text])
    return {"pixel_values": pixels, "image_sizes": sizes}


# --------------------------------------------------------------------------------------------- arithmetic
def test_canvas_and_resize_equal_hf_over_many_sizes():
    from transformers.models.mllama.image_processing_pil_mllama import (
        get_all_supported_aspect_ratios,
        get_image_size_fit_to_canvas,
    )

    rng = np.random.default_rng(0)
    for max_tiles in (1, 2, 4, 6):
        assert list(supported_aspect_ratios(max_tiles)) == get_all_supported_aspect_ratios(max_tiles)
    for height, width, tile, max_tiles in zip(rng.integers(1, 3000, 2000), rng.integers(1, 3000, 2000),
                                              rng.choice([16, 224, 560], 2000), rng.integers(1, 7, 2000),
                                              strict=True):
        height, width, tile, max_tiles = int(height), int(width), int(tile), int(max_tiles)
        canvas = tuple(int(v) for v in get_optimal_tiled_canvas(height, width, max_tiles, tile))
        assert optimal_tiled_canvas(height, width, max_tiles, tile) == canvas
        assert size_fit_to_canvas(height, width, *canvas, tile) == tuple(
            int(v) for v in get_image_size_fit_to_canvas(height, width, *canvas, tile))


def test_positions_follow_the_tiles_used():
    """`kopru budget` and the processor count 1601 K/V per tile actually used (560 px, patch 14, CLS kept)."""
    encoder = MllamaVisionConfig(image_size=560, patch_size=14, max_num_tiles=4)
    config = KopruConfig(vision=VisionTowerConfig("unused", feature_layer=-1, drop_cls=False), llm="unused",
                         strategy="cross_attention", resolution=ResolutionConfig(mode="tiled"),
                         image_token=IMAGE, image_start_token=None, image_end_token=None)
    seen = set()
    for width, height in [(560, 560), (1120, 560), (560, 1680), (1120, 1120), (300, 200), (4000, 900), (90, 2500)]:
        rows, columns = (int(v) // 560 for v in get_optimal_tiled_canvas(height, width, 4, 560))
        count = image_positions(config, encoder, width, height)
        assert count.llm_positions == 1
        assert count.cross_attention_kv == rows * columns * 1601
        assert plan_image(config, encoder, height, width).passes == rows * columns
        seen.add(rows * columns)
    assert seen == {1, 2, 3, 4}
    # Köprü's own default drops each tile's CLS: 1600 per tile.
    dropped = KopruConfig(vision=VisionTowerConfig("unused"), llm="unused", strategy="cross_attention",
                          resolution=ResolutionConfig(mode="tiled"))
    assert image_positions(dropped, encoder, 1120, 1120).cross_attention_kv == 4 * 1600


# ------------------------------------------------------------------------------------------------- pixels
@pytest.mark.parametrize("names", [["wide", "tall"], ["square", "four", "strip"], ["two", "three"]])
def test_pixels_ids_and_masks_equal_hf_processor(setup, names):
    _, hf_processor, model, processor, _ = setup
    images = [IMAGES[name] for name in names]
    expected = hf_processor.image_processor([images], return_tensors="pt")
    found = processor(IMAGE * len(images) + "look", images=images)
    tiles = [tile_layout(image.height, image.width, IMAGE_SIZE, MAX_TILES).num_tiles for image in images]
    assert tiles == expected["num_tiles"][0]
    assert float((found["pixel_values"] - expected["pixel_values"][0]).abs().max()) == 0.0
    assert found["image_sizes"].tolist() == [[image.height, image.width] for image in images]
    batch = processor.high_resolution.tiled.hf_inputs([images])
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(batch[key], expected[key]), key


def test_batch_of_two_prompts_equals_hf_processor(setup):
    _, hf_processor, _, processor, _ = setup
    images = [[IMAGES["wide"], IMAGES["four"]], [IMAGES["square"]]]
    expected = hf_processor.image_processor(images, return_tensors="pt")
    found = processor.high_resolution.tiled.hf_inputs(images)
    assert expected["num_tiles"] == [[TILES["wide"], 4], [1]]
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(found[key], expected[key]), key
    assert expected["aspect_ratio_ids"][1].tolist() == [1, 0]  # the second prompt's padding image is id 0


# ------------------------------------------------------------------------------------------------- logits
LOGIT_CASES = {
    "wide and tall, one per prompt": ([f"{IMAGE}what is in the wide one", f"{IMAGE}and the tall"],
                                      [["wide"], ["tall"]]),
    "square and four tiles": ([f"{IMAGE}small", f"{IMAGE}four tiles here please"], [["square"], ["four"]]),
    "two images of different tile counts": ([f"{IMAGE}{IMAGE}compare the two", f"{IMAGE}{IMAGE}again"],
                                            [["strip", "square"], ["two", "three"]]),
}


@pytest.mark.parametrize("case", list(LOGIT_CASES))
@torch.no_grad()
def test_logits_equal_hf_with_hf_processor_inputs(setup, case):
    reference, hf_processor, model, processor, _ = setup
    texts, names = LOGIT_CASES[case]
    images = [[IMAGES[name] for name in row] for row in names]
    inputs = hf_inputs(hf_processor, texts, images)
    expected = reference(**inputs).logits
    pixels = kopru_pixels(inputs, images)
    found = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **pixels).logits
    rows = inputs["attention_mask"].bool()  # padding positions are nobody's business
    diff = max_diff(expected[rows], found[rows])
    print(f"{case}: max |logit diff| {diff:.2e}")
    assert diff <= ATOL
    # Köprü's own processor gives the same pixels, so the same logits.
    own = processor(texts, images=images)
    assert torch.equal(own["pixel_values"], pixels["pixel_values"])
    # The extra tiles matter: tile 0 alone (the old single-tile conversion's view) changes the logits.
    single = dict(pixels, pixel_values=pixels["pixel_values"].clone())
    single["pixel_values"][:, 1:] = 0
    assert max(plan.passes for plan in model._plans(**pixels)) > 1
    changed = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **single).logits
    assert max_diff(expected[rows], changed[rows]) > 1e-3


# --------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def test_greedy_generation_equals_hf_generate(setup):
    """Left-padded batch, two prompts whose images have different tile counts (3 + 4 vs 1 + 2)."""
    assert [TILES[name] for name in ("wide", "four", "square", "two")] == [3, 4, 1, 2]
    reference, hf_processor, model, processor, _ = setup
    texts = [f"{IMAGE}{IMAGE}describe both pictures", f"{IMAGE}{IMAGE}hi"]
    images = [[IMAGES["wide"], IMAGES["four"]], [IMAGES["square"], IMAGES["two"]]]
    inputs = hf_inputs(hf_processor, texts, images, padding_side="left")
    assert bool((inputs["attention_mask"] == 0).any())  # the batch really is padded
    new = 8
    expected = reference.generate(**inputs, max_new_tokens=new, do_sample=False, eos_token_id=None,
                                  pad_token_id=2)[:, inputs["input_ids"].shape[1]:]
    pixels = kopru_pixels(inputs, images)
    engine = GenerationEngine(model, processor, max_batch_size=2)
    steps = engine.stream_token_ids(inputs["input_ids"], inputs["attention_mask"], pixels["pixel_values"],
                                    [SamplingParams(max_new_tokens=new)] * 2, image_sizes=pixels["image_sizes"])
    found = torch.tensor([tokens for tokens, _ in zip(steps, range(new), strict=False)]).T
    assert found.tolist() == expected.tolist()
    # The simple reference loop agrees too.
    simple = model.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=new, eos_token_id=[],
                            **pixels)
    assert simple.tolist() == expected.tolist()


@torch.no_grad()
def test_engine_complete_from_text_and_images_equals_hf(setup):
    """The serving path: prompt text + PIL images through Köprü's processor and engine, one row per prompt."""
    reference, hf_processor, model, processor, _ = setup
    engine = GenerationEngine(model, processor, max_batch_size=2)
    for text, names in [(f"{IMAGE}what is this", ["tall"]), (f"{IMAGE}{IMAGE}two", ["three", "four"])]:
        images = [IMAGES[name] for name in names]
        inputs = hf_inputs(hf_processor, [text], [images])
        prompt = processor.tokenizer.decode(inputs["input_ids"][0])  # HF's prompt, bos placed as HF places it
        expected = reference.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                      pad_token_id=2)[0, inputs["input_ids"].shape[1]:].tolist()
        own = processor(prompt, images=images, add_special_tokens=False)
        assert own["input_ids"].tolist() == inputs["input_ids"].tolist()
        [completion] = engine.complete([prompt], [images], SamplingParams(max_new_tokens=6, ignore_eos=True))
        assert completion.token_ids == expected


# ------------------------------------------------------------------------------------------------- errors
def test_bad_tiled_inputs_are_refused_with_expected_and_found(setup):
    _, _, model, processor, _ = setup
    inputs = processor(f"{IMAGE}hello", images=[IMAGES["wide"]])
    too_many = torch.cat([inputs["pixel_values"], inputs["pixel_values"][:, :1]], dim=1)  # 5 tiles, max 4
    with pytest.raises(ValueError, match=r"expects pixel_values \[images, 4 tiles, 3, 16, 16\], found \[1, 5, 3"):
        model(input_ids=inputs["input_ids"], pixel_values=too_many, image_sizes=inputs["image_sizes"])
    with pytest.raises(ValueError, match="needs image_sizes"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    two = processor(f"{IMAGE}{IMAGE}hello", images=[IMAGES["wide"], IMAGES["tall"]])
    with pytest.raises(ValueError, match=r"text holds 2 placeholder.*the 1 image"):
        model(input_ids=two["input_ids"], **{k: v[:1] for k, v in two.items() if k in ("pixel_values", "image_sizes")})
    encoder = model.vision.encoder
    with pytest.raises(ValueError, match=r"aspect_ratio_ids in 1\.\.8 .*found \[9\]"):
        encoder(inputs["pixel_values"], aspect_ratio_ids=torch.tensor([9]),
                aspect_ratio_mask=torch.ones(1, 4, dtype=torch.long))


def test_tiled_mode_needs_a_matching_tiled_encoder():
    from transformers import CLIPVisionConfig

    config = KopruConfig(vision=VisionTowerConfig("unused"), llm="unused", strategy="cross_attention",
                         resolution=ResolutionConfig(mode="tiled"))
    with pytest.raises(ValueError, match="tile position embeddings.*found 'clip_vision_model'"):
        plan_image(config, CLIPVisionConfig(), 100, 100)
    odd = MllamaVisionConfig(image_size=16, patch_size=4, max_num_tiles=2, supported_aspect_ratios=[[1, 2], [1, 1]])
    with pytest.raises(ValueError, match=r"expected.*\[\[1, 1\], \[1, 2\], \[2, 1\]\]; found \[\[1, 2\], \[1, 1\]\]"):
        plan_image(config, odd, 100, 100)


def test_reload_keeps_tiling(setup, tmp_path: Path):
    reference, hf_processor, model, processor, _ = setup
    model.save_pretrained(tmp_path / "kopru", processor)
    reloaded, reloaded_processor = KopruForConditionalGeneration.from_pretrained(tmp_path / "kopru")
    texts, images = [f"{IMAGE}wide"], [[IMAGES["wide"]]]
    inputs = hf_inputs(hf_processor, texts, images)
    own = reloaded_processor(texts, images=images)
    assert torch.equal(own["pixel_values"], kopru_pixels(inputs, images)["pixel_values"])
    with torch.no_grad():
        found = reloaded(input_ids=inputs["input_ids"], **kopru_pixels(inputs, images)).logits
        assert max_diff(reference(**inputs).logits, found) <= ATOL


# ------------------------------------------------------------------------------ Köprü's own cross_attention
@torch.no_grad()
def test_kopru_cross_attention_model_on_an_mllama_encoder(tmp_path: Path, llm_dirs):
    """A new Köprü cross_attention model (not a conversion) on a tiled Mllama encoder: each image's K/V are its
    own tiles' patches (CLS dropped by Köprü's default), equal to HF's encoder on HF's processor inputs; the count
    the processor, model and budget use follows the tiles; the engine generates as the reference loop does."""
    from transformers import MllamaVisionModel

    from kopru.budget import load_kopru_model

    vision_config = MllamaVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4, intermediate_size=64,
        vision_output_dim=96, image_size=IMAGE_SIZE, patch_size=4, max_num_tiles=MAX_TILES,
        intermediate_layers_indices=[0, 1],
    )
    torch.manual_seed(0)
    encoder = MllamaVisionModel(vision_config).eval()
    for name, param in encoder.named_parameters():  # gates away from 0, so tile embeddings matter
        if "gate" in name:
            param.data.uniform_(0.5, 1.5)
    encoder.save_pretrained(tmp_path / "vision")
    # The encoder's own image-processor settings beside it, as a user saves them (Köprü reads them, no fallback).
    MllamaImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=MAX_TILES
                            ).save_pretrained(tmp_path / "vision")
    config = KopruConfig(vision=VisionTowerConfig(str(tmp_path / "vision"), feature_layer=-1),
                         llm=str(llm_dirs["llama"]), strategy="cross_attention",
                         resolution=ResolutionConfig(mode="tiled"))
    model, processor = KopruForConditionalGeneration.from_backbones(config)
    for block in model.connector.blocks:
        block.attn_gate.data.fill_(1.0)
        block.mlp_gate.data.fill_(1.0)
    images = [IMAGES["tall"], IMAGES["square"], IMAGES["four"]]
    counts = [processor.count(image).cross_attention_kv for image in images]
    assert counts == [TILES["tall"] * 16, 16, 16 * 4]  # 4x4 patches per tile, CLS dropped

    inputs = processor([f"{config.image_token}{config.image_token}two", f"{config.image_token}one"],
                       images=[images[:2], images[2:]], padding_side="left")
    features = model.encode_image_list(inputs["pixel_values"], inputs["image_sizes"])
    assert [f.shape[0] for f in features] == counts
    hf = MllamaImageProcessorPil.from_pretrained(tmp_path / "vision")
    hf_inputs = hf([images], return_tensors="pt")
    hf_inputs.pop("num_tiles")
    states = encoder(**hf_inputs).last_hidden_state[0]  # [images, tiles, patches + 1, dim]
    for index, image_features in enumerate(features):
        tiles = TILES[["tall", "square", "four"][index]]
        expected = model.connector(states[index, :tiles, 1:]).flatten(0, 1)
        assert float((expected - image_features).abs().max()) <= ATOL

    engine = GenerationEngine(model, processor, max_batch_size=2)
    steps = engine.stream_token_ids(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                    [SamplingParams(max_new_tokens=6)] * 2, image_sizes=inputs["image_sizes"])
    found = torch.tensor([tokens for tokens, _ in zip(steps, range(6), strict=False)]).T
    simple = model.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=6, eos_token_id=[],
                            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    assert found.tolist() == simple.tolist()

    model.save_pretrained(tmp_path / "kopru", processor)
    budget = load_kopru_model(tmp_path / "kopru")
    assert [budget.image_positions(image.width, image.height).cross_attention_kv for image in images] == counts
