"""anyres, dynamic resolution and token reduction: Köprü's counts against HF's processors, its pixels against
HF's image processors, its features against its own counts for all three strategies, and LLaVA-NeXT's logits.

Counting needs only the encoder's config, so the count tests use real sizes (CLIP-L/14 at 336 px); the model
tests use the tiny random backbones of conftest (32 px images, 8 px patches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import IMAGE_SIZE, PATCH_SIZE, STRATEGIES, counting_config, open_gates, random_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (
    CLIPVisionConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    SiglipVisionConfig,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from vlm_checkpoints import TINY_PINPOINTS, build_llava_next, llava_next_processor

from kopru import KopruConfig, KopruForConditionalGeneration, VisionTowerConfig
from kopru.config import ResolutionConfig
from kopru.connectors.reduction import AveragePool, PixelShuffle
from kopru.convert import convert
from kopru.geometry import image_positions
from kopru.high_resolution_processing import HighResolutionPreprocessor
from kopru.image_processing import ImagePreprocessor

CLIP_L_336 = CLIPVisionConfig(image_size=336, patch_size=14)
SIZES = st.integers(1, 2500)
SMALL_SIZES = st.integers(1, 120)


def _count_config(mode: str, strategy: str = "projection", **resolution) -> KopruConfig:
    """A config to count with (no weights are loaded): no markers, as HF's processors have none."""
    return counting_config(strategy, markers=False, resolution=ResolutionConfig(mode=mode, **resolution))


@contextlib.contextmanager
def gates_open(model, value: float = 1.0):
    """Cross-attention gates start at 0 (the image cannot reach the logits); open them for a test, then close."""
    open_gates(model, value)
    try:
        yield
    finally:
        open_gates(model, 0.0)


# --------------------------------------------------------------------------------------------- counts vs HF
@pytest.fixture(scope="module")
def llava_next_336() -> LlavaNextProcessor:
    return llava_next_processor(336, 14)


@pytest.mark.parametrize(("width", "height", "tokens"), [(672, 672, 2928), (640, 480, 2340), (336, 336, 1176),
                                                         (1920, 1080, 1948)])
def test_anyres_reference_values(width, height, tokens):
    assert image_positions(_count_config("anyres"), CLIP_L_336, width, height).placeholders == tokens


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=SIZES, height=SIZES)
def test_anyres_count_equals_llava_next_processor(llava_next_336, width, height):
    expected = llava_next_336._get_num_multimodal_tokens(image_sizes=[(height, width)]).num_image_tokens[0]
    assert image_positions(_count_config("anyres"), CLIP_L_336, width, height).placeholders == expected


@settings(max_examples=15, deadline=None)
@given(width=SMALL_SIZES, height=SMALL_SIZES)
def test_anyres_count_equals_llava_next_processor_on_real_images(width, height):
    """The whole HF processor run on an image (its own expansion of `<image>`), at the tiny encoder's size."""
    processor = llava_next_processor(IMAGE_SIZE, PATCH_SIZE, TINY_PINPOINTS)
    encoded = processor(text="a <image> b", images=[random_image(width, height)], return_tensors="pt")
    expected = int((encoded["input_ids"] == processor.image_token_id).sum())
    encoder = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    assert image_positions(_count_config("anyres"), encoder, width, height).placeholders == expected


@settings(max_examples=300, deadline=None)
@given(width=SIZES, height=SIZES, patch=st.sampled_from([8, 14, 16]), merge=st.integers(1, 3),
       min_side=st.integers(1, 120), extra=st.integers(0, 3_000_000))
def test_dynamic_count_equals_qwen2_vl_image_processor(width, height, patch, merge, min_side, extra):
    min_pixels = min_side * min_side
    max_pixels = min_pixels + extra
    if max(width, height) / min(width, height) > 200:
        return  # both refuse it; checked below
    hf = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=merge, min_pixels=min_pixels, max_pixels=max_pixels)
    expected = hf.get_number_of_image_patches(height, width, {}) // merge**2
    config = _count_config("dynamic", min_pixels=min_pixels, max_pixels=max_pixels,
                           reduction="none" if merge == 1 else "pixel_shuffle", reduction_factor=max(merge, 2))
    encoder = SiglipVisionConfig(image_size=4 * patch, patch_size=patch)
    assert image_positions(config, encoder, width, height).placeholders == expected


@pytest.mark.parametrize(("width", "height", "tokens"), [(224, 224, 64), (672, 672, 576), (1920, 1080, 1222)])
def test_dynamic_reference_values(width, height, tokens):
    config = _count_config("dynamic", reduction="pixel_shuffle", reduction_factor=2)
    assert image_positions(config, CLIPVisionConfig(image_size=224, patch_size=14), width, height).placeholders == tokens


def test_extreme_aspect_ratio_is_refused_with_its_numbers():
    with pytest.raises(ValueError, match="aspect ratio of at most 200"):
        image_positions(_count_config("dynamic"), CLIP_L_336, 2010, 10)


def test_counts_per_strategy_and_reduction():
    """Hand-computed: a 640x480 image on CLIP-L/336 picks the 2x2 grid (672x672) -> 5 views of 24x24 patches."""
    encoder = CLIP_L_336
    assert image_positions(_count_config("anyres", "qformer"), encoder, 640, 480).placeholders == 5 * 32
    xattn = image_positions(_count_config("anyres", "cross_attention"), encoder, 640, 480)
    assert (xattn.placeholders, xattn.cross_attention_kv) == (1, 5 * 576)
    # 2x2 pooling: 12x12 per view; unpadded 24 rows of 24 (was 48 x 36 of 48 -> 36 rows): 144 + 18 * 24 + 18.
    pooled = image_positions(_count_config("anyres", reduction="avg_pool"), encoder, 640, 480).placeholders
    assert pooled == 144 + 18 * 24 + 18
    assert image_positions(_count_config("fixed", reduction="pixel_shuffle"), encoder, 640, 480).placeholders == 144
    assert image_positions(_count_config("fixed"), encoder, 640, 480).placeholders == 576


# ------------------------------------------------------------------------------------------ pixels vs HF
@settings(max_examples=20, deadline=None)
@given(width=SMALL_SIZES, height=SMALL_SIZES, seed=st.integers(0, 100))
def test_anyres_pixels_equal_llava_next_image_processor(width, height, seed):
    image = random_image(width, height, seed)
    hf = llava_next_processor(IMAGE_SIZE, PATCH_SIZE, TINY_PINPOINTS).image_processor
    expected = hf(images=[image], return_tensors="pt")
    config = _count_config("anyres")
    base = ImagePreprocessor(size=IMAGE_SIZE, image_mean=tuple(hf.image_mean), image_std=tuple(hf.image_std))
    ours = HighResolutionPreprocessor(base, config, CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE))(
        [image])
    torch.testing.assert_close(ours["image_sizes"], expected["image_sizes"])
    torch.testing.assert_close(ours["pixel_values"], expected["pixel_values"].float(), atol=1e-5, rtol=0)


@settings(max_examples=20, deadline=None)
@given(width=SMALL_SIZES, height=SMALL_SIZES, merge=st.integers(1, 2), seed=st.integers(0, 100))
def test_dynamic_pixels_equal_qwen2_vl_and_pixel_shuffle_groups_its_merge(width, height, merge, seed):
    """Our resized image equals Qwen2-VL's (its patches put back in place), and our k x k pixel shuffle of the
    raster-order patches equals the groups of k^2 consecutive patches its merger concatenates."""
    if max(width, height) / min(width, height) > 200:
        return
    image, patch = random_image(width, height, seed), PATCH_SIZE
    hf = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=merge, min_pixels=16 * 16, max_pixels=96 * 96)
    expected = hf(images=[image], return_tensors="pt")
    _, grid_h, grid_w = expected["image_grid_thw"][0].tolist()
    config = _count_config("dynamic", min_pixels=16 * 16, max_pixels=96 * 96,
                           reduction="none" if merge == 1 else "pixel_shuffle", reduction_factor=2)
    base = ImagePreprocessor(image_mean=tuple(hf.image_mean), image_std=tuple(hf.image_std))
    ours = HighResolutionPreprocessor(base, config, SiglipVisionConfig(image_size=32, patch_size=patch))([image])
    pixels = ours["pixel_values"][0]
    assert tuple(pixels.shape[-2:]) == (grid_h * patch, grid_w * patch)
    # HF's flat patches: (gh/m, gw/m, m, m, C, T, p, p); T repeats the frame.
    flat = expected["pixel_values"].view(grid_h // merge, grid_w // merge, merge, merge, 3, 2, patch, patch)
    restored = flat[:, :, :, :, :, 0].permute(4, 0, 2, 5, 1, 3, 6).reshape(3, grid_h * patch, grid_w * patch)
    torch.testing.assert_close(pixels, restored, atol=1e-5, rtol=0)
    if merge > 1:
        raster = pixels.view(3, grid_h, patch, grid_w, patch).permute(1, 3, 0, 2, 4).reshape(1, grid_h * grid_w, -1)
        merged = PixelShuffle(merge)(raster, grid_h, grid_w)[0]
        qwen_groups = flat[:, :, :, :, :, 0].reshape(-1, merge * merge * 3 * patch * patch)
        torch.testing.assert_close(merged, qwen_groups, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- reduction
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 4), columns=st.integers(1, 4), k=st.integers(1, 3), dim=st.integers(1, 5))
def test_pixel_shuffle_folds_each_block_and_is_invertible(rows, columns, k, dim):
    features = torch.randn(2, rows * k * columns * k, dim)
    folded = PixelShuffle(k)(features, rows * k, columns * k)
    assert folded.shape == (2, rows * columns, k * k * dim)
    grid = features.view(2, rows * k, columns * k, dim)
    for i in range(rows):
        for j in range(columns):
            for a in range(k):
                for b in range(k):
                    block = folded[:, i * columns + j, (a * k + b) * dim:(a * k + b + 1) * dim]
                    torch.testing.assert_close(block, grid[:, i * k + a, j * k + b])
    # Inverse arrangement: every input vector appears exactly once.
    unfolded = folded.view(2, rows, columns, k, k, dim).permute(0, 1, 3, 2, 4, 5).reshape(2, -1, dim)
    torch.testing.assert_close(unfolded, features)
    pooled = AveragePool(k)(features, rows * k, columns * k)
    torch.testing.assert_close(pooled, folded.view(2, rows * columns, k * k, dim).mean(2))


def test_reduction_needs_a_divisible_grid():
    with pytest.raises(ValueError, match="divisible by 3"):
        PixelShuffle(3)(torch.zeros(1, 16, 2), 4, 4)


# ----------------------------------------------------------------------------------------------- config
def test_resolution_config_round_trips_and_old_configs_load(tmp_path: Path):
    config = _count_config("anyres", grid_pinpoints=[[32, 64], [64, 64]], reduction="avg_pool", reduction_factor=2)
    config.save(tmp_path / "c.json")
    loaded = KopruConfig.load(tmp_path / "c.json")
    assert loaded.resolution == config.resolution and isinstance(loaded.resolution, ResolutionConfig)
    data = json.loads((tmp_path / "c.json").read_text())
    del data["resolution"]  # saved before resolution existed
    assert KopruConfig.from_dict(data).resolution == ResolutionConfig()


@pytest.mark.parametrize(("fields", "message"), [
    ({"mode": "tiles"}, "mode must be one of"),
    ({"reduction": "max_pool"}, "reduction must be one of"),
    ({"reduction_factor": 0}, "reduction_factor must be an integer >= 1"),
    ({"grid_pinpoints": [[32]]}, "grid_pinpoints must be"),
    ({"min_pixels": 100, "max_pixels": 10}, "min_pixels must not exceed max_pixels"),
    ({"resolution_mode": "anyres"}, "has no field"),
])
def test_bad_resolution_config(fields, message):
    with pytest.raises(ValueError, match=message):
        KopruConfig.from_dict({"vision": "v", "llm": "l", "resolution": fields})


def test_pinpoints_must_be_whole_tiles_and_cls_must_go():
    encoder = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    with pytest.raises(ValueError, match=r"multiples of the encoder's image size 32, found \[\[40, 64\]\]"):
        image_positions(_count_config("anyres", grid_pinpoints=[[40, 64]]), encoder, 50, 50)
    keeps_cls = dataclasses.replace(_count_config("anyres"), vision=VisionTowerConfig("v", drop_cls=False))
    with pytest.raises(ValueError, match="anyres with the projection strategy .* CLS token is kept"):
        image_positions(keeps_cls, encoder, 50, 50)
    # Connectors that read each view on its own take the CLS token along: 5 views of 16 patches + CLS.
    keeps_cls_qformer = dataclasses.replace(keeps_cls, strategy="cross_attention", connector=None)
    assert image_positions(keeps_cls_qformer, encoder, 50, 50).cross_attention_kv == 5 * 17
    with pytest.raises(ValueError, match="must divide the encoder's 4 patches per side"):
        image_positions(_count_config("fixed", reduction="pixel_shuffle", reduction_factor=3), encoder, 50, 50)


# ---------------------------------------------------------------------- the model's features vs the counts
MODES = {
    "anyres": {"mode": "anyres"},
    "dynamic": {"mode": "dynamic", "min_pixels": 16 * 16, "max_pixels": 80 * 80, "reduction": "pixel_shuffle"},
    "anyres_pooled": {"mode": "anyres", "reduction": "avg_pool"},
}


@pytest.fixture(scope="module")
def models(build):
    return {(strategy, mode): build(strategy, resolution=resolution)
            for strategy in STRATEGIES for mode, resolution in MODES.items()}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("strategy", STRATEGIES)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.tuples(SMALL_SIZES, SMALL_SIZES), min_size=2, max_size=3))
@torch.no_grad()
def test_features_have_exactly_the_counted_length(models, strategy, mode, sizes):
    if any(max(w, h) / min(w, h) > 200 for w, h in sizes):
        return
    model, processor = models[(strategy, mode)]
    images = [random_image(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    counts = [image_positions(model.config, model.vision.encoder.config, w, h) for w, h in sizes]
    batch = processor(["first <image> then", " ".join("<image>" for _ in images[1:]) + " end"],
                      [images[:1], images[1:]])
    features = model.encode_image_list(batch["pixel_values"], batch["image_sizes"])
    assert [f.shape[0] for f in features] == [c.features for c in counts]
    placeholders = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert placeholders == [counts[0].placeholders, sum(c.placeholders for c in counts[1:])]
    logits = model(**batch).logits
    assert torch.isfinite(logits).all()


@torch.no_grad()
def test_per_image_placeholder_mismatch_names_the_image(models):
    model, processor = models[("projection", "anyres")]
    batch = processor("<image> and <image>", [random_image(70, 30), random_image(30, 70, 1)])
    row = batch["input_ids"][0].tolist()
    first, second = [i for i, token in enumerate(row) if token == model.config.image_start_token_id]
    # Move one placeholder from image 0 to image 1: the total still matches, the images do not.
    del row[first + 1]
    row.insert(second, model.config.image_token_id)
    ids = torch.tensor([row])
    with pytest.raises(ValueError, match="image 0 has .* placeholder position.*its features are"):
        model(input_ids=ids, pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    with pytest.raises(ValueError, match="needs image_sizes"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])


@torch.no_grad()
def test_anyres_qformer_reads_each_tile_on_its_own(models):
    model, processor = models[("qformer", "anyres")]
    image = random_image(90, 40)
    batch = processor("<image>", [image])
    views = batch["pixel_values"][0, :model.plan(40, 90).passes]
    expected = torch.cat([model.connector(model.vision(view[None]))[0] for view in views])
    torch.testing.assert_close(model.encode_image_list(batch["pixel_values"], batch["image_sizes"])[0], expected)


@torch.no_grad()
def test_ragged_cross_attention_context_equals_the_fixed_one_for_equal_lengths(models, make_image):
    """Two samples of one and two images, each image 16 states: the ragged layout (anyres, dynamic) and the
    fixed [images, N, dim] layout give the LLM the same thing."""
    model, processor = models[("cross_attention", "anyres")]
    batch = processor(["a <image> b", "<image> c <image> d"], [[make_image(0)], [make_image(1), make_image(2)]])
    states = torch.randn(3, 16, model.llm.config.hidden_size)
    is_image = batch["input_ids"] == model.config.image_token_id
    per_sample, seen = is_image.sum(1), is_image.cumsum(1)
    for attend_to in ("previous", "most_recent"):
        fixed, ragged = (dataclasses.replace(model.connector.build_context(layout, per_sample), attend_to=attend_to)
                         .for_positions(seen) for layout in (states, list(states)))
        with gates_open(model):
            expected, found = (model.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         kopru_image_context=context).logits for context in (fixed, ragged))
            torch.testing.assert_close(found, expected)
            closed = model.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            assert not torch.allclose(found, closed, atol=1e-3)  # the images do reach the logits


# ------------------------------------------------------------------------------- interpolated positions
@pytest.mark.parametrize("kind", ["clip", "siglip", "vit"])
@torch.no_grad()
def test_vision_tower_interpolates_position_embeddings(build, kind):
    model, _ = build("projection", vision=kind)
    tower = model.vision
    native = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    plain = tower.encoder(pixel_values=native, output_hidden_states=True).hidden_states[-2]
    interpolated = tower.encoder(pixel_values=native, output_hidden_states=True,
                                 interpolate_pos_encoding=True).hidden_states[-2]
    torch.testing.assert_close(interpolated, plain)  # at the native size interpolation changes nothing
    torch.testing.assert_close(tower(native), plain[:, 1:] if tower.drop_cls else plain)
    wide = torch.randn(1, 3, 24, 56)
    features = tower(wide)
    assert features.shape[1] == (24 // PATCH_SIZE) * (56 // PATCH_SIZE)
    expected = tower.encoder(pixel_values=wide, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-2]
    torch.testing.assert_close(features, expected[:, 1:] if tower.drop_cls else expected)
    # The interpolated table differs from the native one only through the position embeddings: the same
    # pixels at another size see other positions.
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        tower(torch.randn(1, 3, 20, 32))


# --------------------------------------------------------------------------------------- LLaVA-NeXT logits
@torch.no_grad()
def test_anyres_projection_logits_equal_llava_next(tmp_path: Path):
    """A random LLaVA-NeXT converted, saved and reloaded gives HF's logits on a wide and a tall image; its own
    processor expands placeholders exactly as the HF model needs them."""
    src = build_llava_next(tmp_path / "hf")
    report = convert("llava_next", src, tmp_path / "kopru", verify=True)
    assert report["max_abs_diff"] < 1e-4
    reference = LlavaNextForConditionalGeneration.from_pretrained(src).eval()
    model, processor = KopruForConditionalGeneration.from_pretrained(tmp_path / "kopru")
    hf_processor = llava_next_processor(IMAGE_SIZE, PATCH_SIZE, TINY_PINPOINTS)
    images = [random_image(77, 20), random_image(25, 90, 1)]
    texts = ["what is <image> here", "and <image>?"]
    ours = processor(texts, [[images[0]], [images[1]]])
    theirs = hf_processor(text=texts, images=images, return_tensors="pt", padding=True)
    torch.testing.assert_close(ours["input_ids"], theirs["input_ids"])
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"].float(), atol=1e-5, rtol=0)
    expected = reference(**theirs).logits
    found = model(**ours).logits
    torch.testing.assert_close(found[..., :expected.shape[-1]], expected, atol=1e-4, rtol=1e-4)
    # The newline embedding matters: changing it changes the logits.
    model.connector.image_newline.add_(1.0)
    assert not torch.allclose(model(**ours).logits[..., :expected.shape[-1]], expected, atol=1e-3)


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize(("strategy", "mode"), [("projection", "anyres"), ("projection", "dynamic"),
                                                ("qformer", "anyres_pooled"), ("cross_attention", "dynamic")])
@torch.no_grad()
def test_padded_training_batch_loss_is_the_mean_of_the_samples(models, strategy, mode, make_image):
    """Samples with images of different sizes in one batch (pixels zero padded across them) give the
    token-weighted mean of their losses alone: padding never reaches the features."""
    from kopru.data.batching import collate
    from kopru.data.encoding import IGNORE_INDEX, SampleEncoder
    from kopru.data.sample import Sample

    model, processor = models[(strategy, mode)]
    samples = [
        Sample([{"role": "user", "content": "<image>\nwhat colour?"}, {"role": "assistant", "content": "red"}],
               [random_image(90, 30)]),
        Sample([{"role": "user", "content": "how many?"}, {"role": "assistant", "content": "three."}]),
        Sample([{"role": "user", "content": "<image> and <image>?"}, {"role": "assistant", "content": "yeşil."}],
               [random_image(20, 70, 1), random_image(50, 50, 2)]),
    ]
    encoded = SampleEncoder(processor).encode_all(samples)
    for sample, source in zip(encoded, samples, strict=True):
        counted = sum(processor.count(image).llm_positions for image in source.images)
        assert int(torch.isin(sample.input_ids, model._image_ids).sum()) == counted
    batch = collate(encoded, processor.tokenizer.pad_token_id)
    assert batch["image_sizes"].tolist() == [[30, 90], [70, 20], [50, 50]]
    total, count = 0.0, 0
    for sample in encoded:
        tokens = int((sample.labels[1:] != IGNORE_INDEX).sum())
        pixels = sample.pixel_values if sample.num_images else None
        alone = model(sample.input_ids[None], pixel_values=pixels, image_sizes=sample.image_sizes if pixels is not None
                      else None, labels=sample.labels[None]).loss
        total, count = total + float(alone) * tokens, count + tokens
    torch.testing.assert_close(float(model(**batch).loss), total / count, rtol=1e-5, atol=1e-5)


def test_training_config_builds_a_high_resolution_model(vision_dirs, llm_dirs):
    from kopru.training import TrainConfig, build_model

    config = TrainConfig(vision=str(vision_dirs["siglip"]), llm=str(llm_dirs["qwen2"]),
                         resolution={"mode": "anyres", "reduction": "pixel_shuffle"})
    model, processor = build_model(config)
    assert model.config.resolution == ResolutionConfig(mode="anyres", reduction="pixel_shuffle")
    # SigLIP 32 px / 8 px patches: 4x4 -> 2x2 after the fold, 4x wider; a 64x64 image takes the 2x2 grid.
    assert model.connector.layers[0].in_features == 4 * model.vision.hidden_size
    assert processor.count(random_image(64, 64)).placeholders == 4 + 4 * 4 + 4
    loss = model(**processor("<image> hi", [random_image(64, 64)], return_labels=True)).loss
    loss.backward()
    assert model.connector.image_newline.grad is not None and model.connector.image_newline.grad.abs().sum() > 0


@torch.no_grad()
def test_dynamic_model_saves_reloads_and_refuses_a_connector_of_another_resolution(models, build, tmp_path):
    model, processor = models[("cross_attention", "dynamic")]
    batch = processor(["<image> hi", "a <image> b <image>"], [[random_image(90, 30)], [random_image(20, 70, 1), random_image(45, 45, 2)]])
    with gates_open(model, 0.5):
        expected = model(**batch).logits
        model.save_pretrained(tmp_path / "saved", processor)
    reloaded, reloaded_processor = KopruForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert reloaded.config.resolution == model.config.resolution
    again = reloaded_processor(["<image> hi", "a <image> b <image>"],
                               [[random_image(90, 30)], [random_image(20, 70, 1), random_image(45, 45, 2)]])
    torch.testing.assert_close(reloaded(**again).logits, expected)
    model.save_connector(tmp_path / "connector")
    fixed, _ = build("cross_attention")
    with pytest.raises(ValueError, match="trained with ResolutionConfig\\(mode='dynamic'"):
        fixed.load_connector(tmp_path / "connector")


@pytest.mark.parametrize("strategy", STRATEGIES)
@torch.no_grad()
def test_generate_takes_the_processors_image_sizes(models, strategy):
    """Greedy generation from a left-padded batch of two prompts equals generating each prompt alone."""
    model, processor = models[(strategy, "anyres")]
    texts, images = ["<image> what is", "a longer prompt: <image> and this?"], [[random_image(90, 30)], [random_image(25, 60, 1)]]
    batch = processor(texts, images, padding_side="left")
    together = model.generate(**batch, max_new_tokens=4, eos_token_id=[])
    for row, (text, image) in enumerate(zip(texts, images, strict=True)):
        alone = model.generate(**processor(text, image), max_new_tokens=4, eos_token_id=[])
        assert together[row].tolist() == alone[0].tolist()


def test_caption_retrieval_refuses_per_size_counts(models):
    from kopru.alignment import caption_retrieval
    from kopru.data.sample import Sample

    model, processor = models[("projection", "dynamic")]
    samples = [Sample([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "red"}],
                      [random_image(40, 30)])]
    with pytest.raises(ValueError, match="resolution mode 'fixed'\\); found mode 'dynamic'"):
        caption_retrieval(model, processor, samples)
