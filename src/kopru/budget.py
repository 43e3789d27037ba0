"""Token budget planner: what an image costs in the LLM's context window and KV cache, before anything runs.

For a named preset (a published model's real configuration) or a Köprü model directory / config, and one or
more image sizes, per image:

- LLM positions (for `cross_attention`: the text positions, and the cross-attention K/V length separately);
- its share of the context window and the positions left for text;
- the KV-cache bytes those positions cost at a dtype and batch size:
  positions x layers x 2 (K and V) x kv_heads x head_dim x dtype bytes x batch, where for cross-attention the
  text positions count in the self-attention layers and the image's K/V in the cross-attention layers only;
- with a tokenizer (Köprü model directories), a sample sentence's tokens in English and Turkish and how many
  words of each language fit in what is left.

`plan_largest_resolution` finds the largest image of a given aspect ratio whose positions stay within a limit;
`check_fits` refuses a prompt that cannot fit (text + image positions + new tokens > context), with the numbers.

The image-size arithmetic itself lives in `kopru.geometry` (LLaVA-NeXT anyres, Qwen2-VL smart_resize,
Llama-3.2-Vision tiles, Köprü's own models' plans and positions); this module only composes it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer

from kopru.alignment import text_budget, tokenizer_fertility
from kopru.config import CONFIG_FILE, KopruConfig
from kopru.dtypes import dtype_bytes
from kopru.geometry import (
    QWEN2_VL_MAX_PIXELS,
    QWEN2_VL_MIN_PIXELS,
    anyres_layout,
    cached_cross_attention_kv,
    image_positions,
    optimal_tiled_canvas,
    plan_image,
    smart_resize,
)
from kopru.image_processing import MAX_IMAGE_PIXELS, load_image
from kopru.llm import attention_geometry, context_window, kv_cache_bytes
from kopru.presets import PRESETS, Preset, hf_config, preset_names

# --------------------------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class LLMShape:
    """What the KV cache and the context window of a model's language side look like."""

    layers: int  # self-attention layers: every LLM position holds K/V in each
    kv_heads: int
    head_dim: int
    context_window: int  # max positions (max_position_embeddings)
    cross_attention_layers: int = 0  # layers whose K/V hold the image instead (cross_attention strategy)
    cross_kv_heads: int = 0
    cross_head_dim: int = 0

    def kv_bytes(self, positions: int, cross_attention_kv: int, bytes_per_element: float, batch: int) -> int:
        """Bytes of K and V for `positions` text-side positions plus `cross_attention_kv` image K/V positions."""
        return round(kv_cache_bytes(positions, self.layers, self.kv_heads, self.head_dim, bytes_per_element, batch)
                     + kv_cache_bytes(cross_attention_kv, self.cross_attention_layers, self.cross_kv_heads,
                                      self.cross_head_dim, bytes_per_element, batch))


@dataclass(frozen=True)
class ImagePositions:
    """What one image becomes."""

    tokens: int  # positions in the LLM's context window (what the image placeholder expands to)
    cross_attention_kv: int = 0  # K/V positions holding the image in the cross-attention layers
    cross_attention_kv_cached: int | None = None  # what the cache allocates (HF Mllama pads to 4 tiles); None: same
    encoder_input: tuple[int, int] | None = None  # (width, height) the encoder sees, where it depends on the image
    layout: str = ""  # how the count arises, for people

    @property
    def cached_kv(self) -> int:
        return self.cross_attention_kv if self.cross_attention_kv_cached is None else self.cross_attention_kv_cached


ImageRule = Callable[[int, int], ImagePositions]  # (width, height) -> positions


@dataclass
class BudgetModel:
    """A model as the planner sees it: its LLM's shape and its rule for image positions."""

    name: str
    description: str
    strategy: str  # projection / qformer / cross_attention
    resolution: str  # fixed / anyres / dynamic / tiles
    llm: LLMShape
    image_rule: ImageRule = field(repr=False)
    tokenizer: Any = field(default=None, repr=False)

    def image_positions(self, width: int, height: int, max_pixels: int = MAX_IMAGE_PIXELS) -> ImagePositions:
        check_image_size(width, height, max_pixels)
        return self.image_rule(width, height)


# ----------------------------------------------------------------------------------------- image-size rules

def fixed_rule(tokens: int, encoder_size: int) -> ImageRule:
    """Every image resized to the encoder's square input: the same positions whatever its size."""
    def rule(width: int, height: int) -> ImagePositions:
        return ImagePositions(tokens, encoder_input=(encoder_size, encoder_size),
                              layout=f"resized to {encoder_size}x{encoder_size}")
    return rule


def anyres_rule(tile_size: int = 336, patches_per_side: int = 24) -> ImageRule:
    """LLaVA-NeXT anyres (`kopru.geometry.anyres_layout`)."""
    def rule(width: int, height: int) -> ImagePositions:
        layout = anyres_layout(height, width, tile_size=tile_size, patches_per_side=patches_per_side)
        rows, columns = layout.grid
        # A very thin image keeps no patch row (or column) once the padding is removed: HF's processor and model
        # then agree on the base view plus newlines only, and so does this count.
        thin = " (too thin for the tiled view: only the base view carries the image)" if not rows * columns else ""
        best_height, best_width = layout.best_resolution
        tile_rows, tile_columns = layout.tiles
        return ImagePositions(
            layout.tokens, encoder_input=(best_width, best_height),
            layout=f"base {layout.base_tokens} + grid {rows}x{columns} + {rows} newlines "
                   f"({tile_rows}x{tile_columns} tiles of {tile_size} px){thin}",
        )
    return rule


def dynamic_rule(patch_size: int = 14, merge_size: int = 2, min_pixels: int = QWEN2_VL_MIN_PIXELS,
                 max_pixels: int = QWEN2_VL_MAX_PIXELS, markers: int = 0) -> ImageRule:
    """Qwen2-VL dynamic resolution (`kopru.geometry.smart_resize`, aspect ratio at most 200); `markers`
    positions around the merged patches."""
    factor = patch_size * merge_size

    def rule(width: int, height: int) -> ImagePositions:
        new_height, new_width = smart_resize(height, width, factor, min_pixels, max_pixels)
        rows, columns = new_height // factor, new_width // factor
        around = f" + {markers} markers" if markers else ""
        return ImagePositions(rows * columns + markers, encoder_input=(new_width, new_height),
                              layout=f"resized to {new_width}x{new_height}, {rows}x{columns} merged patches{around}")
    return rule


def mllama_canvas(height: int, width: int, max_tiles: int = 4, tile_size: int = 560) -> tuple[int, int]:
    """Llama-3.2-Vision's tile grid (rows, columns): HF `get_optimal_tiled_canvas`, computed once in
    `kopru.geometry.tiles` (the processor and the model use the same function)."""
    canvas_height, canvas_width = optimal_tiled_canvas(height, width, max_tiles, tile_size)
    return canvas_height // tile_size, canvas_width // tile_size


def tiles_rule(tile_size: int = 560, patch_size: int = 14, max_tiles: int = 4) -> ImageRule:
    """Llama-3.2-Vision: one `<|image|>` text position; per tile (patches + CLS) K/V positions through
    cross-attention. HF pads every image to `max_tiles` tiles, masked, so the cache holds that many."""
    per_tile = (tile_size // patch_size) ** 2 + 1

    def rule(width: int, height: int) -> ImagePositions:
        rows, columns = mllama_canvas(height, width, max_tiles, tile_size)
        return ImagePositions(
            1, cross_attention_kv=rows * columns * per_tile, cross_attention_kv_cached=max_tiles * per_tile,
            encoder_input=(columns * tile_size, rows * tile_size),
            layout=f"{rows}x{columns} tiles of {tile_size} px, {per_tile} K/V each (cache padded to {max_tiles} tiles)",
        )
    return rule


# ------------------------------------------------------------------------------------------------- presets
# The presets are kopru.presets' table, the one `kopru explain` builds: each model here is derived from the same
# configs (the LLM's cache geometry and context window, the image rule), under the same name.


def _mllama_budget(vision: Any, text: Any) -> tuple[LLMShape, ImageRule]:
    # The text stack holds self-attention layers and, at `cross_attention_layers`, layers whose K/V hold the image.
    kv_heads, head_dim = attention_geometry(text)
    cross = len(text.cross_attention_layers)
    llm = LLMShape(text.num_hidden_layers - cross, kv_heads, head_dim, _window(text), cross, kv_heads, head_dim)
    return llm, tiles_rule(vision.image_size, vision.patch_size, vision.max_num_tiles)


def _llava_next_budget(vision: Any, text: Any) -> tuple[LLMShape, ImageRule]:
    return _plain_llm(text), anyres_rule(vision.image_size, vision.image_size // vision.patch_size)


def _qwen2_vl_budget(vision: Any, text: Any) -> tuple[LLMShape, ImageRule]:
    # <|vision_start|> and <|vision_end|> around the image pads hold positions too, as Köprü's markers do.
    return _plain_llm(text), dynamic_rule(vision.patch_size, vision.spatial_merge_size, markers=2)


# Presets built from an HF reference family (Preset.architecture): their resolution mode and how the budget
# reads their configs. Köprü-built presets go through the Köprü model's own counting (`_kopru_rule`).
REFERENCE_BUDGETS: dict[str, tuple[str, Callable[[Any, Any], tuple[LLMShape, ImageRule]]]] = {
    "llava_next": ("anyres", _llava_next_budget),
    "mllama": ("tiles", _mllama_budget),
    "qwen2_vl": ("dynamic", _qwen2_vl_budget),
}


def _window(text: Any) -> int:
    window = context_window(text)
    if not window:
        raise ValueError(f"the LLM config ({text.model_type}) names no max_position_embeddings / n_positions; "
                         f"expected a context window to plan against")
    return window


def _plain_llm(text: Any) -> LLMShape:
    kv_heads, head_dim = attention_geometry(text)
    return LLMShape(text.num_hidden_layers, kv_heads, head_dim, _window(text))


def preset_model(preset: Preset) -> BudgetModel:
    """The planner's view of a preset of `kopru.presets` (the table `kopru explain` uses)."""
    vision, text = hf_config(preset.vision), hf_config(preset.text)
    config = preset.kopru_config()
    if config is not None:
        llm, rule, resolution = _llm_shape(text, config), _kopru_rule(config, vision), config.resolution.mode
    elif preset.architecture in REFERENCE_BUDGETS:
        resolution, derive = REFERENCE_BUDGETS[preset.architecture]
        llm, rule = derive(vision, text)
    else:
        raise ValueError(f"preset {preset.name!r}: expected architecture 'kopru' or one of "
                         f"{sorted(REFERENCE_BUDGETS)}, found {preset.architecture!r}")
    return BudgetModel(preset.name, preset.description, preset.strategy, resolution, llm, rule)


def available_presets() -> list[str]:
    return preset_names()


def load_preset(name: str) -> BudgetModel:
    if name not in PRESETS:
        raise ValueError(f"unknown budget preset {name!r}; expected one of {available_presets()} or a Köprü model "
                         f"directory / kopru_config.json")
    return preset_model(PRESETS[name])


# ---------------------------------------------------------------------------------------- Köprü models

def load_kopru_model(path: str | Path) -> BudgetModel:
    """A Köprü model directory (with kopru_config.json) or a config file; its backbones' configs are read (no
    weights), relative paths resolved against the config's folder as `KopruForConditionalGeneration` does."""

    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"expected a Köprü model directory with {CONFIG_FILE} or a config file at {path}, "
                                f"found nothing there")
    config = KopruConfig.load(file)
    llm_path = _resolve(file.parent, config.llm)
    vision_path = _resolve(file.parent, config.vision.name_or_path)
    try:
        llm_config = AutoConfig.from_pretrained(llm_path).get_text_config()
        encoder_config = AutoConfig.from_pretrained(vision_path)
    except OSError as error:
        raise FileNotFoundError(f"{file}: expected the backbones' configs to be readable: {error}") from None
    llm = _llm_shape(llm_config, config)
    rule = _kopru_rule(config, encoder_config)
    return BudgetModel(str(path), f"Köprü {config.strategy} model ({file})", config.strategy,
                       config.resolution.mode, llm, rule,
                       tokenizer=_tokenizer_or_none(llm_path))


def _resolve(root: Path, name: str) -> str:
    candidate = root / name
    return str(candidate) if candidate.exists() else name


def _llm_shape(llm_config: Any, config: Any) -> LLMShape:
    heads = llm_config.num_attention_heads
    kv_heads, head_dim = attention_geometry(llm_config)
    context = _window(llm_config)
    layers = llm_config.num_hidden_layers
    if config.strategy != "cross_attention":
        return LLMShape(layers, kv_heads, head_dim, context)
    connector = config.connector
    cross_heads = connector.num_heads or heads
    cross_kv = connector.num_kv_heads or kv_heads
    blocks = len(connector.block_positions(layers))
    return LLMShape(layers, kv_heads, head_dim, context, blocks, cross_kv, llm_config.hidden_size // cross_heads)


def _kopru_rule(config: Any, encoder_config: Any) -> ImageRule:

    def rule(width: int, height: int) -> ImagePositions:
        # The model's own counting (resolution mode, reduction, strategy): what its processor will expand, and
        # the cross-attention K/V its cache holds (all max_tiles tiles of a converted Llama-3.2-Vision).
        count = image_positions(config, encoder_config, width, height)
        plan = plan_image(config, encoder_config, height, width)
        cached = cached_cross_attention_kv(config, plan)
        pass_height, pass_width = plan.pass_size
        layout = (f"{plan.passes} encoder pass(es) of {pass_width}x{pass_height}: {count.placeholders} "
                  f"placeholder(s) + {count.markers} markers")
        if cached != count.cross_attention_kv:
            layout += (f"; the cache holds all {plan.tiling.max_tiles} tiles' K/V, padding tiles included "
                       "(rows_without_image 'attend_all', as transformers' Mllama)")
        return ImagePositions(count.llm_positions, count.cross_attention_kv, cross_attention_kv_cached=cached,
                              encoder_input=(pass_width, pass_height), layout=layout)
    return rule


def _tokenizer_or_none(llm_path: str) -> Any:
    try:
        return AutoTokenizer.from_pretrained(llm_path)
    except (OSError, ValueError):  # no tokenizer files beside the LLM: the text counts are left out
        return None


def load_budget_model(name_or_path: str | Path) -> BudgetModel:
    """A preset name, or a Köprü model directory / config file."""
    if str(name_or_path) in PRESETS:
        return load_preset(str(name_or_path))
    if Path(name_or_path).exists():
        return load_kopru_model(name_or_path)
    return load_preset(str(name_or_path))  # the error lists the presets


# -------------------------------------------------------------------------------------------- image sizes

_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def check_image_size(width: int, height: int, max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
    """At least 1x1 and (unless `max_pixels` is None) at most `max_pixels` pixels."""
    if width < 1 or height < 1:
        raise ValueError(f"expected an image of at least 1x1 pixels, found {width}x{height} (width x height)")
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(f"{width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,} "
                         f"(the decompression-bomb guard of kopru.image_processing.load_image)")


def parse_image_size(text: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """`WIDTHxHEIGHT` (e.g. "640x480"; x, X or ×) or an image file (its size after EXIF orientation)."""
    match = _SIZE.match(text)
    if match:
        width, height = int(match.group(1)), int(match.group(2))
    elif Path(text).is_file():
        image = load_image(text, max_pixels=max_pixels)
        width, height = image.size
    else:
        raise ValueError(f"expected an image size WIDTHxHEIGHT such as 640x480, or an existing image file; "
                         f"found {text!r}")
    check_image_size(width, height, max_pixels)
    return width, height


# ------------------------------------------------------------------------------------------------ budgets

SAMPLE_TEXTS = {  # the same sentence; a Turkish word usually needs more tokens than an English one
    "en": "There is a red circle to the left of two blue squares. How many shapes are in the picture?",
    "tr": "İki mavi karenin solunda kırmızı bir daire var. Resimde kaç şekil var?",
}


@dataclass
class ImageBudget:
    width: int
    height: int
    tokens: int  # LLM positions
    cross_attention_kv: int
    cross_attention_kv_cached: int
    encoder_input: tuple[int, int] | None
    layout: str
    context_share: float  # tokens / context window
    tokens_left_for_text: int  # context window - tokens (this image alone)
    kv_cache_bytes: int  # K/V of the image's positions (and its cross-attention K/V) at dtype and batch
    planned: dict[str, Any] | None = None  # the largest resolution within --max-tokens, same aspect ratio


@dataclass
class Budget:
    model: str
    description: str
    strategy: str
    resolution: str
    context_window: int
    dtype: str
    batch: int
    images: list[ImageBudget]
    tokens: int  # all images together
    tokens_left_for_text: int
    kv_cache_bytes: int
    text: dict[str, dict[str, Any]] | None = None  # per language: sample tokens, tokens/word, words that fit
    # Whether the images, `prompt_tokens` of text and `max_new_tokens` fit the context; if not, why (numbers).
    fits: bool = True
    refusal: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def image_budget(model: BudgetModel, width: int, height: int, dtype: str = "bfloat16", batch: int = 1,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> ImageBudget:
    positions = model.image_positions(width, height, max_pixels)
    context = model.llm.context_window
    return ImageBudget(
        width, height, positions.tokens, positions.cross_attention_kv, positions.cached_kv, positions.encoder_input,
        positions.layout, positions.tokens / context, context - positions.tokens,
        model.llm.kv_bytes(positions.tokens, positions.cached_kv, dtype_bytes(dtype), batch),
    )


def plan_budget(model: BudgetModel, sizes: Sequence[tuple[int, int]], dtype: str = "bfloat16", batch: int = 1,
                texts: Mapping[str, str] | None = None, max_tokens: int | None = None, prompt_tokens: int = 0,
                max_new_tokens: int = 0, max_pixels: int = MAX_IMAGE_PIXELS) -> Budget:
    """The budget of `sizes` ((width, height) each) on `model`; with `max_tokens`, each image's largest
    same-aspect resolution within it as `planned`; `fits` / `refusal` from `check_fits` with `prompt_tokens`
    of text and `max_new_tokens`. Sizes over `max_pixels` are refused, as `load_image` would refuse them."""
    if batch < 1:
        raise ValueError(f"expected a batch of at least 1, found {batch}")
    if not sizes:
        raise ValueError("expected at least one image size")
    images = [image_budget(model, width, height, dtype, batch, max_pixels) for width, height in sizes]
    if max_tokens is not None:
        for image in images:
            plan = plan_largest_resolution(model, image.width, image.height, max_tokens, max_pixels)
            image.planned = dataclasses.asdict(plan)
    tokens = sum(image.tokens for image in images)
    context = model.llm.context_window
    text = None
    if model.tokenizer is not None:
        text = text_counts(model.tokenizer, texts or SAMPLE_TEXTS, max(context - tokens, 0))
    try:
        check_fits(context, prompt_tokens, [image.tokens for image in images], max_new_tokens, model.name)
        refusal = None
    except ContextOverflowError as error:
        refusal = str(error)
    return Budget(model.name, model.description, model.strategy, model.resolution, context, dtype, batch, images,
                  tokens, context - tokens, sum(image.kv_cache_bytes for image in images), text,
                  fits=refusal is None, refusal=refusal)


def text_counts(tokenizer: Any, texts: Mapping[str, str], tokens_left: int) -> dict[str, dict[str, Any]]:
    """Per language: the sample's tokens and words, tokens per word, and the words that fit in `tokens_left`
    (`kopru.alignment.tokenizer_fertility` / `text_budget`)."""

    fertility = tokenizer_fertility(tokenizer, {language: [text] for language, text in texts.items()})
    words = text_budget(fertility, tokens_left, 0)
    return {language: {"text": texts[language], "tokens": int(stats["tokens"]), "words": int(stats["words"]),
                       "tokens_per_word": stats["tokens_per_word"], "words_that_fit": words[language]}
            for language, stats in fertility.items()}


# ------------------------------------------------------------------------------------------------ planning

@dataclass(frozen=True)
class PlannedResolution:
    width: int
    height: int
    tokens: int
    max_tokens: int
    # True when even the largest image of this aspect ratio under the pixel limit fits: the model caps its
    # positions (a fixed encoder size, anyres pinpoints, Qwen2-VL's max_pixels) below max_tokens.
    unbounded: bool


def aspect_size(long_side: int, width: int, height: int) -> tuple[int, int]:
    """(width, height) with the longer side `long_side` and the aspect ratio of width x height (the short side
    rounded, at least 1)."""
    if width >= height:
        return long_side, max(1, round(long_side * height / width))
    return max(1, round(long_side * width / height)), long_side


def plan_largest_resolution(model: BudgetModel, width: int, height: int, max_tokens: int,
                            max_pixels: int = MAX_IMAGE_PIXELS) -> PlannedResolution:
    """The largest image with width x height's aspect ratio whose LLM positions are at most `max_tokens`.

    Sizes step by one pixel of the longer side, from the largest under `max_pixels` down, so the answer fits and
    the next step up does not (or it is the largest allowed: `unbounded`). Positions do not always grow with size
    (rounding to patches, anyres pinpoints), so this scans instead of bisecting. Sizes a model refuses (Qwen2-VL
    beyond aspect 200) count as not fitting.
    """
    check_image_size(width, height, max_pixels=None)  # only its shape matters here
    if max_tokens < 1:
        raise ValueError(f"expected max_tokens of at least 1, found {max_tokens}")
    if max_pixels < 1:
        raise ValueError(f"expected max_pixels of at least 1, found {max_pixels}")
    # The long side of the largest image under the pixel limit: estimated, then corrected both ways (the pixel
    # count of aspect_size grows with the long side, the rounded short side only roughly as the estimate says).
    largest = max(1, math.isqrt(int(max_pixels * max(width, height) / min(width, height))))
    while math.prod(aspect_size(largest + 1, width, height)) <= max_pixels:
        largest += 1
    while largest > 1 and math.prod(aspect_size(largest, width, height)) > max_pixels:
        largest -= 1
    smallest_seen: tuple[int, tuple[int, int]] | None = None
    for long_side in range(largest, 0, -1):
        size = aspect_size(long_side, width, height)
        try:
            tokens = model.image_rule(*size).tokens
        except ValueError:
            continue
        if tokens <= max_tokens:
            return PlannedResolution(*size, tokens, max_tokens, unbounded=long_side == largest)
        if smallest_seen is None or tokens < smallest_seen[0]:
            smallest_seen = (tokens, size)
    found = (f"the fewest positions any size takes is {smallest_seen[0]} (at {smallest_seen[1][0]}x"
             f"{smallest_seen[1][1]})" if smallest_seen else "the model accepts no size of this aspect ratio")
    raise ValueError(f"{model.name}: no {width}x{height}-shaped image fits in {max_tokens} positions; {found}")


def max_tokens_for_share(model: BudgetModel, share: float) -> int:
    if not 0 < share <= 1:
        raise ValueError(f"expected a context share in (0, 1], found {share}")
    return math.floor(share * model.llm.context_window)


# ------------------------------------------------------------------------------------------------- refusal

class ContextOverflowError(ValueError):
    """A prompt that cannot fit the context window; the message holds the numbers."""


def check_fits(context_window: int, text_tokens: int, image_tokens: Sequence[int] = (), max_new_tokens: int = 0,
               model: str = "the model") -> int:
    """Positions to spare after text + images + new tokens; raises ContextOverflowError when there are none."""
    if min(text_tokens, max_new_tokens, *image_tokens, 0) < 0:
        raise ValueError(f"expected non-negative counts, found text {text_tokens}, images {list(image_tokens)}, "
                         f"new tokens {max_new_tokens}")
    images = sum(image_tokens)
    needed = text_tokens + images + max_new_tokens
    if needed > context_window:
        per_image = ", ".join(f"{tokens:,}" for tokens in image_tokens)
        raise ContextOverflowError(
            f"the prompt does not fit {model}'s context window of {context_window:,} positions: {text_tokens:,} text "
            f"tokens + {images:,} image positions ({len(image_tokens)} image(s): {per_image or 'none'}) + "
            f"{max_new_tokens:,} new tokens = {needed:,}, {needed - context_window:,} over; use fewer or smaller "
            f"images, a shorter prompt or fewer new tokens"
        )
    return context_window - needed


def check_prompt_fits(model: BudgetModel, text_tokens: int, sizes: Sequence[tuple[int, int]],
                      max_new_tokens: int = 0) -> int:
    """`check_fits` for images of `sizes` on a planner model."""
    return check_fits(model.llm.context_window, text_tokens, [model.image_positions(*size).tokens for size in sizes],
                      max_new_tokens, model.name)


def check_generation_fits(model: Any, input_ids: Any, attention_mask: Any, max_new_tokens: int) -> None:
    """Refuse, before anything runs, a batch row whose prompt + `max_new_tokens` exceeds the LLM's context window
    (`max_position_embeddings`): `check_fits` with the row's text tokens and each image's positions (runs of
    image placeholder / marker ids in the expanded prompt). LLMs without a declared window are not checked."""
    context = context_window(model.llm.config)
    if not context:
        return
    config = model.config
    image_ids = [i for i in (config.image_token_id, config.image_start_token_id, config.image_end_token_id)
                 if i is not None]
    for row, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
        tokens = [token for token, keep in zip(row, mask, strict=True) if keep]
        if len(tokens) + max_new_tokens <= context:
            continue
        runs, previous = [], False
        for token in tokens:
            is_image = token in image_ids
            if is_image and not previous:
                runs.append(0)
            if is_image:
                runs[-1] += 1
            previous = is_image
        check_fits(context, len(tokens) - sum(runs), runs, max_new_tokens, f"the {config.strategy} model")


# ------------------------------------------------------------------------------------------------- output

def format_bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def format_budget(budget: Budget) -> str:
    """A human-readable table."""
    cross = budget.strategy == "cross_attention"
    lines = [f"{budget.model}: {budget.description}",
             f"context window {budget.context_window:,} positions; KV cache at {budget.dtype}, batch {budget.batch}", ""]
    header = ["image", "LLM positions", *(["cross-attn K/V (cached)"] if cross else []), "context share",
              "left for text", "KV cache", "encoder input"]
    rows = []
    for image in budget.images:
        encoder = f"{image.encoder_input[0]}x{image.encoder_input[1]}" if image.encoder_input else "-"
        rows.append([f"{image.width}x{image.height}", f"{image.tokens:,}",
                     *([f"{image.cross_attention_kv:,} ({image.cross_attention_kv_cached:,})"] if cross else []),
                     f"{image.context_share:.1%}", f"{image.tokens_left_for_text:,}", format_bytes(image.kv_cache_bytes),
                     encoder])
    if len(budget.images) > 1:
        rows.append(["all images", f"{budget.tokens:,}", *([""] if cross else []),
                     f"{budget.tokens / budget.context_window:.1%}", f"{budget.tokens_left_for_text:,}",
                     format_bytes(budget.kv_cache_bytes), ""])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    for image in budget.images:
        lines.append(f"  {image.width}x{image.height}: {image.layout}")
        if image.planned:
            plan = image.planned
            note = " (every size up to the pixel limit fits)" if plan["unbounded"] else ""
            lines.append(f"    largest within {plan['max_tokens']:,} positions: {plan['width']}x{plan['height']} -> "
                         f"{plan['tokens']:,} positions{note}")
    if budget.refusal:
        lines += ["", f"does not fit: {budget.refusal}"]
    if budget.text:
        lines.append("")
        for language, stats in budget.text.items():
            lines.append(f"text ({language}): {stats['tokens']} tokens for {stats['words']} words "
                         f"({stats['tokens_per_word']:.2f} per word); {stats['words_that_fit']:,} words fit in the "
                         f"{max(budget.tokens_left_for_text, 0):,} positions left")
    return "\n".join(lines)
