"""Token budget planner: the acceptance numbers through the CLI, counts against HF's own processors, KV-cache
bytes by hand, the largest-resolution planning property, refusals with their numbers and bad input."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import (
    CROSS_ATTENTION,
    EXPLAINED_IMAGE,
    IMAGE_SIZE,
    LLM_LAYERS,
    NUM_PATCHES,
    QFORMER,
    budget_json,
    run_cli,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoConfig, LlavaNextImageProcessorPil
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.mllama.image_processing_pil_mllama import get_optimal_tiled_canvas
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from kopru import KopruConfig, VisionTowerConfig, count_image_tokens
from kopru.budget import (
    SAMPLE_TEXTS,
    ContextOverflowError,
    aspect_size,
    available_presets,
    check_fits,
    check_generation_fits,
    check_prompt_fits,
    load_budget_model,
    load_kopru_model,
    load_preset,
    mllama_canvas,
    parse_image_size,
    plan_budget,
    plan_largest_resolution,
)
from kopru.cli import build_parser
from kopru.lesson.tiny import tiny_tokenizer
from kopru.presets import PRESETS

# --------------------------------------------------------------------------------------------- acceptance

def test_acceptance_numbers_through_the_cli() -> None:
    llava_next = budget_json("--preset", "llava-next-7b", "--image", "672x672")
    assert [(e["width"], e["height"], e["tokens"]) for e in llava_next["images"]] == [(672, 672, 2928)]
    qwen = budget_json("--preset", "qwen2-vl-7b", "--image", "1920x1080")
    # 1222 image pads (HF's count) + <|vision_start|> and <|vision_end|>, which hold context positions too
    assert [(e["width"], e["height"], e["tokens"]) for e in qwen["images"]] == [(1920, 1080, 1224)]
    assert qwen["images"][0]["encoder_input"] == [1316, 728]  # REFERENCE: 1080x1920 (h x w) -> 728x1316


def test_json_structure_for_several_images() -> None:
    result = budget_json("--preset", "llava-next-7b", "--image", "640x480", "--image", "336x336", "--image", "1920x1080",
                         "--dtype", "float16", "--batch", "2", exit_code=1)  # 1: they do not fit together
    assert isinstance(result["images"], list) and len(result["images"]) == 3
    for entry in result["images"]:
        assert {"width", "height", "tokens", "context_share", "tokens_left_for_text", "kv_cache_bytes"} <= set(entry)
        assert all(isinstance(entry[key], int) for key in ("width", "height", "tokens"))
        assert entry["tokens_left_for_text"] == 4096 - entry["tokens"]
        assert entry["context_share"] == pytest.approx(entry["tokens"] / 4096)
    assert [e["tokens"] for e in result["images"]] == [2340, 1176, 1948]  # REFERENCE check values
    assert result["tokens"] == 2340 + 1176 + 1948
    assert result["tokens_left_for_text"] == 4096 - result["tokens"]
    assert (result["context_window"], result["dtype"], result["batch"]) == (4096, "float16", 2)
    assert result["kv_cache_bytes"] == sum(e["kv_cache_bytes"] for e in result["images"])
    assert result["fits"] is False and "5,464 image positions" in result["refusal"]  # 3 images overflow 4096


def test_presets_listed() -> None:
    # One table for both commands: budget's presets are explain's, under the same names.
    assert available_presets() == sorted(PRESETS)
    assert {"blip-2-opt-2.7b", "llama-3.2-11b-vision", "llava-1.5-7b", "llava-next-7b", "qwen2-vl-7b"} <= set(PRESETS)
    choices = {name: next(action.choices for action in parser._actions if "--preset" in action.option_strings)
               for name, parser in build_parser()._subparsers._group_actions[0].choices.items()
               if name in ("explain", "budget")}
    assert choices["explain"] == choices["budget"] == sorted(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_budget_presets_equal_explains_arithmetic(name, explained_preset) -> None:
    """Every budget preset's numbers are what `kopru explain` computes for the same architecture: the image's
    LLM positions and cached cross-attention K/V (at a non-square size, where anyres / dynamic / tiles differ),
    the context window, and the KV-cache bytes of a full context and of the image's K/V."""
    model = load_preset(name)
    explained = explained_preset(name)  # at EXPLAINED_IMAGE
    positions = model.image_positions(*EXPLAINED_IMAGE)
    assert (positions.tokens, positions.cached_kv) == (explained.image.llm_positions,
                                                       explained.image.cross_attention_kv)
    assert model.llm.context_window == explained.image.context
    assert model.llm.kv_bytes(explained.image.context, 0, 2, 1) == explained.memory["kv_cache"]  # bfloat16
    assert model.llm.kv_bytes(0, positions.cached_kv, 2, 1) == explained.memory["cross_attention_kv"]
    assert (model.strategy, model.description) == (explained.strategy, explained.description)


# ----------------------------------------------------------------------------------- counts against HF

def hf_llava_next_processor() -> LlavaNextProcessor:
    # HF LLaVA-NeXT's own count: CLIP-L/336 (patch 14, CLS dropped by the "default" feature strategy).
    return LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(), tokenizer=tiny_tokenizer(),
                              patch_size=14, vision_feature_select_strategy="default")


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 3000))
def test_presets_equal_hf_processors(width, height) -> None:
    """llava-next = HF LlavaNextProcessor._get_number_of_features; qwen2-vl = HF smart_resize's grid;
    llama-3.2-vision tiles = HF get_optimal_tiled_canvas."""
    processor = _HF_LLAVA_NEXT
    assert load_preset("llava-next-7b").image_positions(width, height).tokens == processor._get_number_of_features(
        height, width, 336, 336)
    qwen = load_preset("qwen2-vl-7b")
    if max(width, height) / min(width, height) <= 200:
        new_height, new_width = hf_smart_resize(height, width, factor=28, min_pixels=56 * 56,
                                                max_pixels=28 * 28 * 1280)
        assert qwen.image_positions(width, height).tokens == (new_height // 28) * (new_width // 28) + 2  # markers
    canvas = get_optimal_tiled_canvas(height, width, 4, 560)
    assert mllama_canvas(height, width) == (canvas[0] // 560, canvas[1] // 560)
    tiles = (canvas[0] // 560) * (canvas[1] // 560)
    positions = load_preset("llama-3.2-11b-vision").image_positions(width, height)
    assert (positions.tokens, positions.cross_attention_kv, positions.cached_kv) == (1, tiles * 1601, 4 * 1601)


_HF_LLAVA_NEXT = hf_llava_next_processor()


def test_fixed_presets_ignore_the_size() -> None:
    for width, height in ((1, 1), (640, 480), (4000, 30)):
        assert load_preset("llava-1.5-7b").image_positions(width, height).tokens == 576
        assert load_preset("blip-2-opt-2.7b").image_positions(width, height).tokens == 32


# ------------------------------------------------------------------------------------------- KV cache

def test_kv_cache_bytes_by_hand() -> None:
    # LLaVA-1.5-7B: 576 positions x 32 layers x (K, V) x 32 heads x 128 dims x 2 bytes.
    llava = plan_budget(load_preset("llava-1.5-7b"), [(640, 480)], "bfloat16", 1).images[0]
    assert llava.kv_cache_bytes == 576 * 32 * 2 * 32 * 128 * 2 == 301_989_888
    # float32, batch 4: 2 x 4 times as much.
    assert plan_budget(load_preset("llava-1.5-7b"), [(640, 480)], "float32", 4).images[0].kv_cache_bytes == 8 * 301_989_888
    # Qwen2-VL-7B, 1224 positions (1222 + 2 markers) x 28 layers x 2 x 4 KV heads x 128 x 2 bytes.
    qwen = plan_budget(load_preset("qwen2-vl-7b"), [(1920, 1080)], "bf16", 1).images[0]
    assert qwen.kv_cache_bytes == 1224 * 28 * 2 * 4 * 128 * 2 == 70_189_056
    # Llama-3.2-11B-Vision: 1 text position in the 32 self-attention layers, plus the image's 4 x 1601 K/V in the
    # 8 cross-attention layers (HF pads every image to 4 tiles, so even a 1-tile image caches 6404).
    for size in ((1920, 1080), (300, 300)):
        mllama = plan_budget(load_preset("llama-3.2-11b-vision"), [size], "bfloat16", 1).images[0]
        assert mllama.kv_cache_bytes == 1 * 32 * 2 * 8 * 128 * 2 + 6404 * 8 * 2 * 8 * 128 * 2 == 209_977_344
    small = plan_budget(load_preset("llama-3.2-11b-vision"), [(300, 300)]).images[0]
    assert (small.tokens, small.cross_attention_kv, small.cross_attention_kv_cached) == (1, 1601, 6404)


# ------------------------------------------------------------------------------------------- planning

def tokens_of(preset: str, width: int, height: int) -> int | None:
    """Positions by an independent route (HF's functions), None where the model refuses the size."""
    if preset == "qwen2-vl-7b":
        if max(width, height) / min(width, height) > 200:
            return None
        new_height, new_width = hf_smart_resize(height, width, 28, 56 * 56, 28 * 28 * 1280)
        return (new_height // 28) * (new_width // 28) + 2  # <|vision_start|>, <|vision_end|>
    return _HF_LLAVA_NEXT._get_number_of_features(height, width, 336, 336)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["qwen2-vl-7b", "llava-next-7b"]), st.integers(16, 2000), st.integers(16, 2000),
       st.integers(1, 3000))
def test_planned_size_fits_and_one_step_larger_does_not(preset, width, height, max_tokens) -> None:
    max_pixels = 1_000_000  # keeps the scan short; the property holds for any limit
    model = load_preset(preset)
    try:
        plan = plan_largest_resolution(model, width, height, max_tokens, max_pixels=max_pixels)
    except ValueError as error:
        # Nothing fits: then no size of this shape is within the limit.
        assert "no " in str(error) and "fits in" in str(error)
        long = max(width, height)
        sizes = [aspect_size(side, width, height) for side in range(1, min(long, 400))]
        assert all((tokens_of(preset, *size) or max_tokens + 1) > max_tokens for size in sizes)
        return
    assert plan.tokens == tokens_of(preset, plan.width, plan.height) <= max_tokens
    assert plan.width * plan.height <= max_pixels
    long_side = max(plan.width, plan.height)
    assert (plan.width, plan.height) == aspect_size(long_side, width, height)  # the shape is kept
    bigger = aspect_size(long_side + 1, width, height)
    if plan.unbounded:
        assert bigger[0] * bigger[1] > max_pixels
    else:
        found = tokens_of(preset, *bigger)
        assert found is None or found > max_tokens


def test_planning_examples_and_context_share() -> None:
    qwen = load_preset("qwen2-vl-7b")
    plan = plan_largest_resolution(qwen, 1920, 1080, 500)
    assert plan.tokens <= 500 < qwen.image_positions(*aspect_size(plan.width + 1, 1920, 1080)).tokens
    assert not plan.unbounded
    # Fixed-size and saturating models: everything fits, up to the pixel limit.
    assert plan_largest_resolution(load_preset("llava-1.5-7b"), 640, 480, 1000).unbounded
    assert plan_largest_resolution(load_preset("llava-next-7b"), 640, 480, 3000).unbounded
    result = budget_json("--preset", "llava-next-7b", "--image", "640x480", "--max-context-share", "0.5")
    planned = result["images"][0]["planned"]
    assert planned["max_tokens"] == 2048 and planned["tokens"] <= 2048
    assert (planned["width"], planned["height"]) == (448, 336)
    with pytest.raises(ValueError, match=r"blip-2-opt-2.7b: no 640x480-shaped image fits in 31 positions; the fewest "
                                         r"positions any size takes is 32"):
        plan_largest_resolution(load_preset("blip-2-opt-2.7b"), 640, 480, 31)


# -------------------------------------------------------------------------------------------- refusal

def test_check_fits_refuses_with_the_numbers() -> None:
    assert check_fits(4096, 100, [2928], 1000) == 68
    with pytest.raises(ContextOverflowError,
                       match=r"llava-next-7b's context window of 4,096 positions: 100 text tokens \+ 2,928 image "
                             r"positions \(1 image\(s\): 2,928\) \+ 1,100 new tokens = 4,128, 32 over"):
        check_fits(4096, 100, [2928], 1100, "llava-next-7b")
    assert check_prompt_fits(load_preset("qwen2-vl-7b"), 1000, [(1920, 1080)] * 2, 512) == 32768 - 1000 - 2448 - 512
    with pytest.raises(ValueError, match="non-negative"):
        check_fits(4096, -1)


def test_cli_refuses_a_prompt_that_cannot_fit() -> None:
    code, out, _ = run_cli("--preset", "blip-2-opt-2.7b", "--image", "640x480", "--prompt-tokens", "2000",
                           "--max-new-tokens", "100")
    assert code == 1
    assert ("does not fit: the prompt does not fit blip-2-opt-2.7b's context window of 2,048 positions: 2,000 text tokens + "
            "32 image positions (1 image(s): 32) + 100 new tokens = 2,132, 84 over") in out
    code, out, _ = run_cli("--preset", "blip-2-opt-2.7b", "--image", "640x480", "--prompt-tokens", "1900",
                           "--max-new-tokens", "100")
    assert code == 0 and "does not fit" not in out


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize(("args", "message"), [
    (["--preset", "qwen2-vl-7b", "--image", "640"], "expected an image size WIDTHxHEIGHT such as 640x480"),
    (["--preset", "qwen2-vl-7b", "--image", "640x"], "found '640x'"),
    (["--preset", "qwen2-vl-7b", "--image=-5x3"], "found '-5x3'"),
    (["--preset", "qwen2-vl-7b", "--image", "1.5x2"], "found '1.5x2'"),
    (["--preset", "qwen2-vl-7b", "--image", "0x480"], "at least 1x1 pixels, found 0x480"),
    (["--preset", "qwen2-vl-7b", "--image", "100000x100000"],
     "100000x100000 = 10,000,000,000 pixels is over the limit of 89,478,485"),
    (["--preset", "qwen2-vl-7b", "--image", "1x300"], "aspect ratio of at most 200, found 300.0"),
    (["--preset", "qwen2-vl-7b", "--image", "640x480", "--max-context-share", "1.5"], r"context share in \(0, 1\]"),
    (["--preset", "llava-1.5-7b", "--image", "640x480", "--batch", "0"], "batch of at least 1"),
    (["--model", "/nonexistent/model", "--image", "640x480"], "expected a Köprü model directory"),
])
def test_bad_input_is_a_clear_error(args, message) -> None:
    code, out, err = run_cli(*args)
    assert code == 2 and out == ""
    assert err.startswith("kopru budget: error: ")
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert re.search(message, err), err


def test_image_files_as_input(tmp_path) -> None:
    photo = tmp_path / "photo.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 640 x 480, shown rotated: 480 x 640
    Image.new("RGB", (640, 480)).save(photo, exif=exif)
    assert parse_image_size(str(photo)) == (480, 640)
    result = budget_json("--preset", "qwen2-vl-7b", "--image", str(photo))
    assert (result["images"][0]["width"], result["images"][0]["height"]) == (480, 640)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code, _, err = run_cli("--preset", "qwen2-vl-7b", "--image", str(broken))
    assert code == 2 and f"image file {broken}" in err and "truncated or corrupt" in err


# -------------------------------------------------------------------------------------------- Köprü models

@pytest.mark.parametrize("strategy", ["projection", "cross_attention"])
def test_kopru_config_counts_kv_and_text(vision_dirs, llm_dirs, tmp_path, strategy) -> None:
    config = KopruConfig(vision=VisionTowerConfig(str(vision_dirs["clip"])), llm=str(llm_dirs["llama"]),
                         strategy=strategy, connector=CROSS_ATTENTION if strategy == "cross_attention" else None)
    config.save(tmp_path / "kopru_config.json")
    result = budget_json("--model", str(tmp_path / "kopru_config.json"), "--image", "640x480", "--dtype", "float32")
    entry = result["images"][0]
    count = count_image_tokens(config, NUM_PATCHES)
    assert entry["tokens"] == count.llm_positions and entry["cross_attention_kv"] == count.cross_attention_kv
    assert entry["encoder_input"] == [IMAGE_SIZE, IMAGE_SIZE]
    llm = AutoConfig.from_pretrained(llm_dirs["llama"])
    assert result["context_window"] == llm.max_position_embeddings
    head_dim = llm.hidden_size // llm.num_attention_heads
    expected = entry["tokens"] * LLM_LAYERS * 2 * llm.num_key_value_heads * head_dim * 4
    if strategy == "cross_attention":
        blocks = LLM_LAYERS // CROSS_ATTENTION["every_n_layers"]  # blocks before layers 1 and 3
        expected += NUM_PATCHES * blocks * 2 * llm.num_key_value_heads * head_dim * 4
    assert entry["kv_cache_bytes"] == expected
    # The LLM's tokenizer counts the English and Turkish sample texts.
    tokenizer = tiny_tokenizer()
    for language in ("en", "tr"):
        stats = result["text"][language]
        assert stats["tokens"] == len(tokenizer(SAMPLE_TEXTS[language], add_special_tokens=False)["input_ids"])
        assert stats["words_that_fit"] == int(result["tokens_left_for_text"] // stats["tokens_per_word"])
    code, out, _ = run_cli("--model", str(tmp_path), "--image", "640x480", "--text-tr", "Merhaba dünya")
    assert code == 0 and "text (tr): " in out and " for 2 words" in out


def test_saved_kopru_model_directory(build, tmp_path) -> None:
    model, processor = build("qformer")
    model.save_pretrained(tmp_path / "saved", processor)
    planned = load_kopru_model(tmp_path / "saved")
    assert planned.strategy == "qformer" and planned.tokenizer is not None
    assert load_budget_model(tmp_path / "saved").strategy == "qformer"  # a path: the model; a name: the preset
    assert load_budget_model("qwen2-vl-7b").name == "qwen2-vl-7b"
    with pytest.raises(ValueError, match=r"unknown budget preset 'qwen3'; expected one of \['blip-2-opt-2.7b'"):
        load_budget_model("qwen3")
    # Whatever the picture's size, a fixed-resolution Q-Former gives its queries, between two markers.
    assert planned.image_positions(1920, 1080).tokens == QFORMER["num_queries"] + 2



@torch.no_grad()
def test_converted_mllama_counts_the_cross_attention_kv_its_cache_holds(tmp_path) -> None:
    """`kopru convert --from mllama` sets rows_without_image "attend_all": transformers' Mllama, and the conversion,
    then keep all max_num_tiles tiles of an image in the cross-attention K/V, padding tiles included. `kopru budget
    --model` reports that figure beside the real tiles' and counts its bytes; both are measured here from the
    caches of real forward passes (HF's DynamicCache, Köprü's image K/V and self-attention cache)."""
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    from vlm_checkpoints import PICTURE_SEED, tiny_mllama
    from vlm_checkpoints import mllama_tokenizer as tokenizer_with_image_token
    from vlm_checkpoints import save_mllama_reference as save_reference

    from kopru.connectors.cross_attention import CONTEXT_KWARG
    from kopru.convert import convert
    from kopru.convert.mllama import IMAGE_TOKEN
    from kopru.model import KopruForConditionalGeneration

    reference = tiny_mllama([1, 4], 6, seed=PICTURE_SEED).eval()
    src = save_reference(reference, tmp_path / "hf")
    convert("mllama", src, tmp_path / "kopru")
    image = Image.new("RGB", (200, 90), (200, 30, 30))  # 3 of the 4 tiles
    entry = budget_json("--model", str(tmp_path / "kopru"), "--image", "200x90", "--dtype", "float32")["images"][0]

    hf_processor = MllamaProcessor(MllamaImageProcessorPil.from_pretrained(src), tokenizer_with_image_token()[0])
    hf_inputs = hf_processor(images=[[image]], text=[f"{IMAGE_TOKEN}describe"], return_tensors="pt")
    hf_cache = reference(**hf_inputs, use_cache=True).past_key_values
    hf_lengths = {hf_cache.layers[i].keys.shape[-2] for i in reference.config.text_config.cross_attention_layers}
    max_tiles, real_tiles = hf_inputs["aspect_ratio_mask"].shape[-1], int(hf_inputs["aspect_ratio_mask"].sum())
    assert real_tiles == 3 and hf_lengths == {entry["cross_attention_kv_cached"]}
    assert entry["cross_attention_kv"] == entry["cross_attention_kv_cached"] // max_tiles * real_tiles

    model, processor = KopruForConditionalGeneration.from_pretrained(tmp_path / "kopru")
    inputs = processor(f"{IMAGE_TOKEN}describe", [image], add_special_tokens=False)
    _, extra = model.eval().prepare_inputs(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"])
    image_kv = extra[CONTEXT_KWARG].keys_values
    assert {keys.shape[2] for keys, _ in image_kv} == {entry["cross_attention_kv_cached"]}
    cache = model(**inputs, use_cache=True).past_key_values
    length = inputs["input_ids"].shape[1]
    per_position = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) // length
    image_bytes = sum(keys.nbytes + values.nbytes for keys, values in image_kv)
    assert entry["kv_cache_bytes"] == entry["tokens"] * per_position + image_bytes


# --------------------------------------------------------------------------------- refusal in generation

@pytest.mark.parametrize("strategy", ["projection", "cross_attention"])
def test_generation_refuses_an_overlong_request_before_the_model_runs(build, make_image, strategy) -> None:
    model, processor = build(strategy)
    batch = processor("describe <image>", make_image(0))
    context = model.llm.config.max_position_embeddings
    length = batch["input_ids"].shape[1]
    image = count_image_tokens(model.config, NUM_PATCHES).llm_positions  # 18 spliced, or 1 + 2 markers

    def must_not_run(*args, **kwargs):
        raise AssertionError("the model ran")

    model.prepare_inputs = must_not_run
    too_many = context - length + 1
    with pytest.raises(ContextOverflowError, match=(
            rf"context window of {context:,} positions: {length - image} text tokens \+ {image} image positions "
            rf"\(1 image\(s\): {image}\) \+ {too_many:,} new tokens = {context + 1:,}, 1 over")):
        model.generate(**batch, max_new_tokens=too_many)
    check_generation_fits(model, batch["input_ids"], batch["attention_mask"], context - length)  # exactly full
    # Left padding does not count: a short row beside a long one is measured by its own tokens.
    padded = processor(["describe <image>", "a much longer prompt about <image> and more words"],
                       [[make_image(0)], [make_image(1)]], padding_side="left")
    longest = int(padded["attention_mask"].sum(-1).max())
    check_generation_fits(model, padded["input_ids"], padded["attention_mask"], context - longest)
    with pytest.raises(ContextOverflowError, match=r", 1 over"):
        check_generation_fits(model, padded["input_ids"], padded["attention_mask"], context - longest + 1)


def test_pixel_limit_is_configurable() -> None:
    code, _, err = run_cli("--preset", "qwen2-vl-7b", "--image", "12000x9000")
    assert code == 2 and "12000x9000 = 108,000,000 pixels is over the limit of 89,478,485" in err
    result = budget_json("--preset", "qwen2-vl-7b", "--image", "12000x9000", "--max-image-pixels", "200000000")
    assert result["images"][0]["tokens"] == 1232  # smart_resize to 1148x840 (max 1280 tokens), + 2 markers
    assert result["images"][0]["encoder_input"] == [1148, 840]


@pytest.mark.parametrize(("strategy", "resolution"), [("projection", {"mode": "anyres", "grid_pinpoints": [[32, 64],
                                                                                                        [64, 32]]}),
                                                       ("qformer", {"mode": "dynamic"}),
                                                       ("cross_attention", {"mode": "dynamic"})])
def test_high_resolution_model_plans_what_its_processor_expands(build, tmp_path, strategy, resolution) -> None:
    """The planner counts a saved anyres / dynamic model's image as the model itself produces it: the vectors its
    encoder + connector output for that image (measured, not counted), and what its processor expands."""
    from kopru.config import ResolutionConfig

    model, processor = build(strategy, resolution=ResolutionConfig(**resolution))
    model.save_pretrained(tmp_path / "saved", processor)
    planned = load_kopru_model(tmp_path / "saved")
    assert planned.resolution == resolution["mode"]
    lengths = set()
    for width, height in [(40, 30), (23, 61), (64, 64)]:
        batch = processor(["<image>"], [Image.new("RGB", (width, height))], add_special_tokens=False)
        with torch.no_grad():
            (features,) = model.encode_image_list(batch["pixel_values"], batch.get("image_sizes"))
        produced = features.shape[0]
        lengths.add(produced)
        entry = planned.image_positions(width, height)
        if strategy == "cross_attention":  # one placeholder + 2 markers in the text, the vectors as K/V
            assert (entry.tokens, entry.cross_attention_kv) == (3, produced), (width, height)
        else:
            assert (entry.tokens, entry.cross_attention_kv) == (produced + 2, 0), (width, height)
        ids = batch["input_ids"][0]
        assert int(torch.isin(ids, model._image_ids).sum()) == entry.tokens  # what the LLM is given
    # The sizes are planned apart, not one fixed count (the Q-Former's queries are one count whatever the size).
    assert (len(lengths) == 1) == (strategy == "qformer"), lengths
