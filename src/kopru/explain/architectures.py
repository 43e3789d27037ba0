"""`kopru explain`: the architecture mathematics of a vision-language model, for its real configuration.

For a Köprü config, a saved Köprü model directory or a named preset (published HF configs written out below;
nothing is downloaded) it reports:

- the data flow from pixels to logits, stage by stage, with tensor shapes;
- each component's total parameters and what trains in each recipe (align / instruct / single-stage / LoRA,
  the rules of `kopru.recipes` applied to the model);
- forward FLOPs per image and per text token;
- the image's positions in the LLM context (and its cross-attention key/value length);
- weight and KV-cache memory at a dtype, batch and context length.

Every model is built on the `meta` device: parameters have shapes and no storage, so a 90B preset is explained
in seconds on a laptop. Presets whose architecture Köprü builds itself (LLaVA-1.5, BLIP-2, the three
strategies over one encoder + LLM) are explained from the Köprü model; LLaVA-NeXT (anyres newline embedding),
Llama-3.2-Vision (tiled encoder with gated positional embeddings, cross-attention layers inside the text stack)
and Qwen2-VL (windowless ViT with 2x2 merger, M-RoPE) from the HF reference model itself (the report says
which). The tests check that each preset's parameter counts equal the HF reference class built from the same
configs, and that the stage shapes equal those of a real forward pass of a tiny model.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over forward passes on meta tensors: matrix
multiplications, convolutions and attention (2 per multiply-add); element-wise work, norms and softmax are not
counted. The Qwen2-VL encoder cannot run on meta tensors (its attention splits on data-dependent lengths); its
FLOPs are computed as 2 x weights x tokens for the matmuls plus 4 x tokens^2 x width per layer for attention.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from kopru.config import CONFIG_FILE, KopruConfig, VisionTowerConfig
from kopru.connectors.cross_attention import CONTEXT_KWARG, ImageContext
from kopru.dtypes import canonical_dtype, dtype_bytes
from kopru.high_resolution import ImagePlan, plan_image
from kopru.llm import attention_geometry, context_window, decoder_layers, kv_cache_bytes
from kopru.presets import PRESETS, Preset, get_preset, hf_config, reference_config

__all__ = [  # the preset table's names are re-exported: they were first published here
    "FORMATS", "PRESETS", "RECIPES", "Explanation", "Preset", "Settings", "build_kopru_meta", "build_reference",
    "count_flops", "draw_diagram", "explain", "get_preset", "hf_config", "human", "human_bytes", "list_presets",
    "reference_config", "summary_table",
]
from kopru.resolution import anyres_layout, smart_resize
from kopru.tiling import optimal_tiled_canvas
from kopru.tokens import cached_cross_attention_kv, connector_tokens, image_positions
from kopru.vision import VISION_BACKBONES, VisionTower

RECIPES: tuple[str, ...] = ("align", "instruct", "single-stage", "lora")
FORMATS: tuple[str, ...] = ("text", "markdown", "json")
LORA_RANK, LORA_ALPHA = 128, 256  # LLaVA-1.5's LoRA recipe

def build_reference(preset: Preset) -> nn.Module:
    """`preset`'s HF reference model on the meta device (no storage, no download)."""
    model_class = getattr(transformers, preset.reference)
    with torch.device("meta"):
        return model_class(reference_config(preset))


# ------------------------------------------------------------------------------------------------------------
# Report structure


@dataclass
class Stage:
    name: str
    shape: list[int]
    note: str = ""


@dataclass
class Component:
    name: str
    role: str  # "vision", "connector" or "llm"
    params: int
    trainable: dict[str, int | None]  # recipe -> trainable parameters (None: the recipe does not apply)


@dataclass
class ImageBudget:
    image_size: tuple[int, int]  # (width, height) the figures are for
    vision_tokens: int  # encoder tokens per image that reach the connector
    llm_positions: int  # positions one image occupies in the LLM context
    placeholders: int
    markers: int
    cross_attention_kv: int  # key/value positions per image behind cross-attention (0: spliced)
    context: int
    note: str = ""

    @property
    def context_share(self) -> float:
        return self.llm_positions / self.context


@dataclass
class Explanation:
    name: str
    description: str
    source: str
    strategy: str
    built_from: str
    dtype: str
    batch: int
    images_per_sample: int
    text_tokens: int
    stages: list[Stage]
    components: list[Component]
    image: ImageBudget
    flops: dict[str, float]
    memory: dict[str, float]
    notes: list[str]

    @property
    def total_params(self) -> int:
        return sum(c.params for c in self.components if c.role != "adapter")

    def trainable(self, recipe: str) -> int | None:
        values = [c.trainable.get(recipe) for c in self.components]
        return None if any(v is None for v in values) else sum(values)

    def component(self, role: str) -> int:
        return sum(c.params for c in self.components if c.role == role)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image"]["context_share"] = self.image.context_share
        data["total_params"] = self.total_params
        data["params_by_role"] = {role: self.component(role) for role in ("vision", "connector", "llm")}
        data["trainable"] = {recipe: self.trainable(recipe) for recipe in RECIPES}
        return data

    def format(self, fmt: str) -> str:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=1, ensure_ascii=False)
        return _render(self, markdown=fmt == "markdown")


# ------------------------------------------------------------------------------------------------------------
# Building on the meta device


def _config_value(config: PretrainedConfig, name: str, purpose: str, *fallbacks: str) -> Any:
    """A config field a figure needs; a clear error naming it when the config lacks it."""
    for key in (name, *fallbacks):
        value = getattr(config, key, None)
        if value is not None:
            return value
    names = " or ".join(repr(k) for k in (name, *fallbacks))
    raise ValueError(f"the {config.model_type!r} config has no {names} field, which {purpose} needs")


def _vision_encoder_class(vision_config: PretrainedConfig):
    if vision_config.model_type not in VISION_BACKBONES:
        raise ValueError(f"expected a vision encoder of type {sorted(VISION_BACKBONES)}, found "
                         f"{vision_config.model_type!r}")
    backbone = VISION_BACKBONES[vision_config.model_type]
    return functools.partial(backbone.load_class(), **dict(backbone.load_kwargs))


def build_kopru_meta(config: KopruConfig, vision_config: PretrainedConfig, llm_config: PretrainedConfig):
    """A KopruForConditionalGeneration on the meta device from the encoder's and the LLM's configs."""
    from kopru.model import KopruForConditionalGeneration

    if config.image_token_id is None:  # no tokenizer here: any id names the placeholder (only shapes matter)
        vocab = llm_config.vocab_size
        config = dataclasses.replace(config, image_token_id=vocab - 1,
                                     image_start_token_id=vocab - 2 if config.uses_markers else None,
                                     image_end_token_id=vocab - 3 if config.uses_markers else None)
    for name in ("image_size", "patch_size"):
        _config_value(vision_config, name, "the vision token count")
    with torch.device("meta"):
        encoder = _vision_encoder_class(vision_config)(vision_config)
        llm = AutoModelForCausalLM.from_config(llm_config)
        return KopruForConditionalGeneration(config, VisionTower(encoder, config.vision), llm)


def _partition(model: nn.Module, groups: Iterable[tuple[str, str, Iterable[nn.Parameter]]]
               ) -> list[tuple[str, str, list[nn.Parameter]]]:
    """Each parameter in the first group that holds it; groups left empty (a tied head) are dropped."""
    seen: set[int] = set()
    result = []
    for name, role, params in groups:
        mine = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in mine)
        if mine:
            result.append((name, role, mine))
    rest = [p for p in model.parameters() if id(p) not in seen]
    if rest:
        raise RuntimeError(f"{sum(p.numel() for p in rest)} parameters fall in no component")
    return result


def _params(module: nn.Module | None) -> list[nn.Parameter]:
    return [] if module is None else list(module.parameters())


def _linear_shape(layer: nn.Linear) -> str:
    return f"{layer.in_features}->{layer.out_features}"


def _projection_groups(connector) -> list[tuple[str, str, list[nn.Parameter]]]:
    linears = [m for m in connector.modules() if isinstance(m, nn.Linear)]
    text = ", GELU, ".join(f"Linear {_linear_shape(m)}" for m in linears)
    return [(f"projector ({text})", "connector", _params(connector))]


def _qformer_groups(connector) -> list[tuple[str, str, list[nn.Parameter]]]:
    config = connector.qformer.config
    return [
        (f"Q-Former ({config.num_queries} queries x {config.hidden_size}, {config.num_layers} layers, "
         f"cross-attention every {config.cross_attention_frequency})", "connector", _params(connector.qformer)),
        (f"Q-Former -> LLM (Linear {_linear_shape(connector.projection)})", "connector",
         _params(connector.projection)),
    ]


def _cross_attention_groups(connector) -> list[tuple[str, str, list[nn.Parameter]]]:
    groups = []
    if connector.resampler is not None:
        groups.append((f"Perceiver resampler ({len(connector.resampler.layers)} layers, "
                       f"{connector.resampler.latents.shape[0]} latents)", "connector", _params(connector.resampler)))
    groups.append((f"image projection (Linear {_linear_shape(connector.projection)})", "connector",
                   _params(connector.projection)))
    groups.append((f"gated cross-attention blocks x{len(connector.blocks)} (before layers {connector.positions})",
                   "connector", _params(connector.blocks)))
    return groups


# How each strategy's connector splits into named components (a strategy missing here is one component).
CONNECTOR_COMPONENTS: dict[str, Callable[[nn.Module], list[tuple[str, str, list[nn.Parameter]]]]] = {
    "projection": _projection_groups,
    "qformer": _qformer_groups,
    "cross_attention": _cross_attention_groups,
}


def _connector_groups(model) -> list[tuple[str, str, list[nn.Parameter]]]:
    describe = CONNECTOR_COMPONENTS.get(model.config.strategy)
    if describe is None:
        return [(f"connector ({model.config.strategy})", "connector", _params(model.connector))]
    return describe(model.connector)


def _llm_groups(llm: nn.Module, prefix: str = "LLM") -> list[tuple[str, str, list[nn.Parameter]]]:
    layers = decoder_layers(llm)
    return [
        (f"{prefix} input embeddings", "llm", _params(llm.get_input_embeddings())),
        (f"{prefix} decoder layers x{len(layers)}", "llm", _params(layers)),
        (f"{prefix} output head", "llm", _params(llm.get_output_embeddings())),
        (f"{prefix} final norm / positions", "llm", _params(llm)),
    ]


def _recipe_trainable(model, lora_rank: int) -> tuple[dict[str, dict[int, bool]], int | None]:
    """Per recipe, which parameters train (by id), applying `kopru.recipes.apply_recipe` to the meta model;
    and the LoRA adapters' parameter count (None where the strategy refuses LoRA)."""
    from kopru.recipes import LoraSettings, apply_recipe

    trains: dict[str, dict[int, bool]] = {}
    for recipe in ("align", "instruct", "single-stage"):
        apply_recipe(model, recipe)
        trains[recipe] = {id(p): p.requires_grad for p in model.parameters()}
    if not model.connector.splices_into_text:
        return trains, None
    with torch.device("meta"), warnings.catch_warnings():  # peft's call of a deprecated transformers helper
        warnings.simplefilter("ignore", FutureWarning)
        apply_recipe(model, "instruct", LoraSettings(r=lora_rank, alpha=2 * lora_rank, dropout=0.0))
    trains["lora"] = {id(p): p.requires_grad for p in model.parameters()}
    adapters = sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" in n)
    model.llm = model.llm.unload()  # peft injects the adapters in place: take them out again
    model.requires_grad_(False)
    return trains, adapters


@functools.cache
def _roles_trained(strategy: str) -> dict[str, frozenset[str]]:
    """For a strategy, the roles (vision / connector / llm) each recipe trains: `kopru.recipes` applied to a tiny
    meta Köprü model of that strategy, so reference presets follow exactly the rules Köprü models do."""
    vision = hf_config({"model_type": "clip_vision_model", "hidden_size": 8, "intermediate_size": 16,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 8, "patch_size": 4})
    llm = hf_config({"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
                     "num_hidden_layers": 4, "num_attention_heads": 2})
    connector = {"qformer": {"num_queries": 2, "hidden_size": 8, "num_layers": 1, "num_heads": 2,
                             "intermediate_size": 16}}.get(strategy)
    model = build_kopru_meta(KopruConfig(VisionTowerConfig("tiny"), "tiny", strategy, connector), vision, llm)
    trains, _ = _recipe_trainable(model, lora_rank=2)
    parts = {"vision": model.vision, "connector": model.connector, "llm": model.llm}
    # The base parameters only: with LoRA, the adapters are counted apart (see _lora_params).
    return {recipe: frozenset(role for role, module in parts.items()
                              if any(trains[recipe][id(p)] for p in module.parameters()))
            for recipe in trains}


def _lora_params(modules: Iterable[nn.Module], exclude: set[int], rank: int) -> int:
    """Parameters LoRA adds to every nn.Linear (peft's "all-linear": all but the output head): r x (in + out)."""
    return sum(rank * (m.in_features + m.out_features) for module in modules for m in module.modules()
               if isinstance(m, nn.Linear) and id(m) not in exclude)


def _components(groups, trains: dict[str, dict[int, bool]] | None, roles: dict[str, frozenset[str]] | None,
                lora_adapters: int | None, lora_rank: int) -> list[Component]:
    components = []
    for name, role, params in groups:
        trainable: dict[str, int | None] = {}
        for recipe in RECIPES:
            if recipe == "lora" and lora_adapters is None:
                trainable[recipe] = None
            elif trains is not None:
                trainable[recipe] = sum(p.numel() for p in params if trains[recipe][id(p)])
            else:
                trainable[recipe] = sum(p.numel() for p in params) if role in roles[recipe] else 0
        components.append(Component(name, role, sum(p.numel() for p in params), trainable))
    if lora_adapters is not None:
        trainable = {recipe: 0 for recipe in RECIPES} | {"lora": lora_adapters}
        components.append(Component(f"LoRA adapters (r={lora_rank}, every LLM Linear but the head; lora only)",
                                    "adapter", lora_adapters, trainable))
    return components


# ------------------------------------------------------------------------------------------------------------
# FLOPs


def count_flops(run: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


@dataclass(frozen=True)
class SequenceCost:
    """Forward FLOPs of the LLM over L positions: fixed + per_position x L + attention x L^2 (full, not causal:
    FlopCounterMode counts what SDPA is asked to compute)."""

    fixed: float
    per_position: float
    attention: float

    @classmethod
    def fit(cls, run: Callable[[int], Any], lengths: tuple[int, int, int] = (8, 16, 24)) -> SequenceCost:
        """Exact for any forward whose FLOPs are quadratic in the length; one-token calls are left out because
        some models take another attention path for them."""
        x1, x2, x3 = lengths
        step = x2 - x1
        if x3 - x2 != step:
            raise ValueError(f"expected equally spaced lengths, found {lengths}")
        f1, f2, f3 = (count_flops(functools.partial(run, length)) for length in lengths)
        attention = (f3 - 2 * f2 + f1) / (2 * step**2)
        per_position = (f2 - f1) / step - attention * (x1 + x2)
        return cls(f1 - per_position * x1 - attention * x1**2, per_position, attention)

    def per_token(self, context: int) -> float:
        """One more token attending to `context` positions."""
        return self.per_position + self.attention * context


@dataclass(frozen=True)
class FlopTracer:
    """count / fit, or zeros when FLOPs are not wanted (Settings.flops=False)."""

    enabled: bool = True

    def count(self, run: Callable[[], Any]) -> float:
        return float(count_flops(run)) if self.enabled else 0.0

    def fit(self, run: Callable[[int], Any]) -> SequenceCost:
        return SequenceCost.fit(run) if self.enabled else SequenceCost(0.0, 0.0, 0.0)


def _dense_flops(modules: Iterable[nn.Module], tokens: int) -> float:
    """2 x weights x tokens over the Linear / Conv layers of `modules` (each runs once per token)."""
    weights = sum(m.weight.numel() for module in modules for m in module.modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)))
    return 2.0 * weights * tokens


# ------------------------------------------------------------------------------------------------------------
# Architectures: how each family is built, which components it has, its stages, image budget, FLOPs, KV cache.


@dataclass
class Settings:
    dtype: str = "bfloat16"
    batch: int = 1
    context: int | None = None  # None: the LLM's max_position_embeddings
    image: tuple[int, int] | None = None  # (width, height); None: the preset's default
    images_per_sample: int = 1
    text_tokens: int = 64
    lora_rank: int = LORA_RANK
    flops: bool = True  # False skips the FLOP tracing (the slowest part), e.g. when only counts are wanted

    def __post_init__(self) -> None:
        self.dtype = canonical_dtype(self.dtype)
        for name in ("batch", "images_per_sample", "text_tokens", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, found {getattr(self, name)}")
        if self.context is not None and self.context < 1:
            raise ValueError(f"context must be >= 1, found {self.context}")
        if self.image is not None and min(self.image) < 1:
            raise ValueError(f"image must be at least 1x1 pixels, found {self.image[0]}x{self.image[1]}")


@dataclass
class Target:
    """What is explained: a Köprü config (with its backbone configs) or a preset."""

    name: str
    description: str
    source: str
    architecture: str
    strategy: str
    vision: PretrainedConfig
    text: PretrainedConfig
    kopru: KopruConfig | None = None
    preset: Preset | None = None
    default_image: tuple[int, int] | None = None


def _context(target: Target, settings: Settings) -> int:
    if settings.context is not None:
        return settings.context
    window = context_window(target.text)
    if window is None:
        raise ValueError(f"the {target.text.model_type!r} config has no 'max_position_embeddings' or 'n_positions' "
                         "field, which the default context length needs (or pass --context)")
    return window


def _kv_bytes(layers: int, config: PretrainedConfig, positions: int, settings: Settings) -> float:
    kv_heads, head_dim = attention_geometry(config)
    return float(kv_cache_bytes(positions, layers, kv_heads, head_dim, dtype_bytes(settings.dtype), settings.batch))


def _shape(*dims: int) -> list[int]:
    return [int(d) for d in dims]


def _explain_kopru(target: Target, settings: Settings) -> Explanation:
    config, vision_config, llm_config = target.kopru, target.vision, target.text
    tracer = FlopTracer(settings.flops)
    model = build_kopru_meta(config, vision_config, llm_config)
    vision, connector, llm = model.vision, model.connector, model.llm
    groups = _partition(model, [("vision encoder", "vision", _params(vision.encoder)), *_connector_groups(model),
                                *_llm_groups(llm)])
    trains, adapters = _recipe_trainable(model, settings.lora_rank)
    components = _components(groups, trains, None, adapters, settings.lora_rank)

    context = _context(target, settings)
    size = vision_config.image_size
    width, height = settings.image or target.default_image or (size, size)
    plan = plan_image(config, vision_config, height, width)  # the processor's and the model's own plan
    count = image_positions(config, vision_config, width, height)
    features_out = connector_tokens(config, plan)  # connector vectors per image, all passes together
    selected = plan.tokens_per_pass if model.reduction.factor == 1 else \
        plan.grid[0] * plan.grid[1] * model.reduction.factor ** 2
    budget = ImageBudget((width, height), plan.passes * selected, count.llm_positions, count.placeholders,
                         count.markers, count.cross_attention_kv, context, note=_plan_note(config, plan, size))

    # Shapes, as the modules produce them (checked against a real forward pass in the tests).
    b, n = settings.batch * settings.images_per_sample, settings.batch
    # tiled (Llama-3.2-Vision): the encoder sees all max_tiles tiles of an image, the padding ones too
    encoder_passes = plan.tiling.max_tiles if plan.tiling is not None else plan.passes
    passes = b * encoder_passes
    cached_kv = cached_cross_attention_kv(config, plan)
    pass_height, pass_width = plan.pass_size
    patch = vision_config.patch_size
    encoder_tokens = (pass_height // patch) * (pass_width // patch) + int(vision.backbone.has_cls)
    dim, vocab = llm_config.hidden_size, llm.get_output_embeddings().out_features
    layers = vision.feature_layers
    encoder_width = getattr(vision.encoder.config, vision.backbone.width)
    text = settings.text_tokens
    sequence = text + settings.images_per_sample * count.llm_positions
    per_pass = (f"{encoder_passes} encoder passes per image" if encoder_passes > 1 else "one encoder pass per image")
    pixel_shape = (b, encoder_passes) if plan.tiling is not None else (passes,)
    stages = [
        Stage("pixels", _shape(*pixel_shape, 3, pass_height, pass_width), f"{b} image(s), {per_pass} of "
              f"{pass_width}x{pass_height}" + (f", {plan.passes} holding the image" if plan.tiling else "")),
        Stage("encoder hidden states", _shape(passes, encoder_tokens, encoder_width),
              f"{vision_config.model_type}: {encoder_tokens - int(vision.backbone.has_cls)} patches of "
              f"{patch}px" + (" + CLS" if vision.backbone.has_cls else "")
              + f", {vision_config.num_hidden_layers} layers"),
        Stage("selected features", _shape(passes, selected, vision.hidden_size),
              f"hidden state(s) {layers}" + (", CLS dropped" if vision.drop_cls else "")
              + (", final LayerNorm" if vision.final_norm is not None else "")),
    ]
    reduced = vision.hidden_size
    if model.reduction.factor > 1:
        reduced = model.reduction.output_dim(vision.hidden_size)
        factor = model.reduction.factor
        stages.append(Stage("reduced features", _shape(passes, plan.grid[0] * plan.grid[1], reduced),
                            f"{config.resolution.reduction} {factor}x{factor}"))
    if config.strategy == "qformer":
        q = config.connector
        stages.append(Stage("Q-Former queries", _shape(passes, q.num_queries, q.hidden_size),
                            f"{q.num_queries} learned queries, {q.num_layers} layers, cross-attention to "
                            f"{plan.tokens_per_pass} image tokens every {q.cross_attention_frequency} layer(s)"))
    if config.strategy == "cross_attention" and config.connector.resampler is not None:
        latents = connector.output_tokens(config.connector, plan.tokens_per_pass)
        stages.append(Stage("resampler latents", _shape(passes, latents, reduced), "Perceiver resampler"))
    if connector.splices_into_text:
        stages += [
            Stage("connector output", _shape(b, features_out, dim), "one LLM-width vector per image position"
                  + (", the encoder passes' outputs joined" if plan.passes > 1 else "")),
            Stage("LLM input embeddings", _shape(n, sequence, dim),
                  f"{text} text tokens + {settings.images_per_sample} x {count.llm_positions} image positions"
                  + (" (incl. 2 markers)" if count.markers else "")),
        ]
    else:
        block = connector.blocks[0]
        stages += [
            Stage("image states (cross-attention input)", _shape(b, features_out, dim), "Linear to the LLM width"),
            Stage("keys / values per block", _shape(n, block.num_kv_heads,
                                                    settings.images_per_sample * cached_kv, block.head_dim),
                  f"computed once per image, cached for decoding; {len(connector.blocks)} blocks"
                  + ("; padding tiles included (rows without an image attend to them)"
                     if cached_kv != features_out else "")),
            Stage("LLM input embeddings", _shape(n, sequence, dim),
                  f"{text} text tokens + {settings.images_per_sample} x {count.llm_positions} position(s) per image"),
        ]
    stages += [
        Stage("LLM hidden states", _shape(n, sequence, dim), f"{llm_config.num_hidden_layers} decoder layers"
              + (f", gated cross-attention before layers {connector.positions}"
                 if not connector.splices_into_text else "")),
        Stage("logits", _shape(n, sequence, vocab), "output head"),
    ]

    # FLOPs.
    pixels = torch.empty(1, 3, pass_height, pass_width, device="meta")
    vision_flops = encoder_passes * tracer.count(lambda: vision(pixels))
    features = torch.empty(1, plan.tokens_per_pass, reduced, device="meta")
    connector_passes = encoder_passes if cached_kv > features_out else plan.passes  # attend_all: every tile
    connector_flops = connector_passes * tracer.count(lambda: connector(features))
    if not connector.splices_into_text:
        states = torch.empty(1, features_out, dim, device="meta")
        connector_flops += tracer.count(lambda: [blk.keys_values(states) for blk in connector.blocks])

    image_context = None
    if not connector.splices_into_text:  # keys/values built outside the count: they are the connector's
        states = torch.empty(1, features_out, dim, device="meta")
        image_context = ImageContext([blk.keys_values(states) for blk in connector.blocks], torch.ones(1),
                                     features_out, connector.config.attend_to, connector.blocks)

    def run_llm(length: int) -> None:
        extra = {}
        if image_context is not None:
            extra[CONTEXT_KWARG] = image_context.for_positions(torch.ones(1, length, device="meta"))
        llm(inputs_embeds=torch.empty(1, length, dim, device="meta"), **extra)

    llm_cost = tracer.fit(run_llm)
    kv_positions = cached_kv * settings.images_per_sample  # what the cache holds
    memory = {"kv_cache": _kv_bytes(llm_config.num_hidden_layers, llm_config, context, settings),
              "cross_attention_kv": _kv_bytes(len(getattr(connector, "blocks", [])), llm_config, kv_positions,
                                              settings) if kv_positions else 0.0}
    notes = ["explained from the Köprü model (KopruForConditionalGeneration on the meta device)"]
    return _finish(target, settings, model, "Köprü model", stages, components, budget, vision_flops,
                   connector_flops, llm_cost, memory, notes)


def _plan_note(config: KopruConfig, plan: ImagePlan, size: int) -> str:
    mode = config.resolution.mode
    if mode == "fixed":
        return f"fixed resolution: every image is resized to {size}x{size}"
    if mode == "anyres":
        rows, columns = plan.layout.tiles
        return f"anyres: a {size}x{size} base view + {rows}x{columns} tiles of {size} px"
    if mode == "dynamic":
        return f"dynamic resolution: resized to {plan.pass_size[1]}x{plan.pass_size[0]} (smart_resize)"
    return f"tiled: {plan.passes} of {plan.tiling.max_tiles} tiles of {size} px hold the image"


def _finish(target: Target, settings: Settings, model: nn.Module, built_from: str, stages, components,
            budget: ImageBudget, vision_flops: float, connector_flops: float, llm_cost: SequenceCost,
            memory: dict[str, float], notes: list[str]) -> Explanation:
    positions = budget.llm_positions
    flops = {} if not settings.flops else {
        "vision_per_image": float(vision_flops),
        "connector_per_image": float(connector_flops),
        "llm_per_image": float(positions * llm_cost.per_position),
        "per_image": float(vision_flops + connector_flops + positions * llm_cost.per_position),
        "llm_per_text_token_dense": float(llm_cost.per_position),
        "llm_attention_per_token_per_context_position": float(llm_cost.attention),
        "per_text_token_at_context": float(llm_cost.per_token(budget.context)),
    }
    weights = sum(p.numel() for p in model.parameters()) * dtype_bytes(settings.dtype)
    memory = {"weights": float(weights), **memory}
    memory["total"] = float(sum(memory.values()))
    notes = notes + [
        "FLOPs: forward only, matmuls + convolutions + attention (2 per multiply-add), element-wise work not "
        "counted; per image = encoder + connector + the image's LLM positions (dense part); per text token at "
        f"context {budget.context} = dense part + attention to {budget.context} positions",
        f"memory: weights and KV cache at {settings.dtype}, batch {settings.batch}; activations not counted",
    ]
    return Explanation(target.name, target.description, target.source, target.strategy, built_from, settings.dtype,
                       settings.batch, settings.images_per_sample, settings.text_tokens, stages, components, budget,
                       flops, memory, notes)


# --- LLaVA-NeXT (HF reference): anyres tiles through the LLaVA-1.5 parts, plus the learned newline -------------


def _explain_llava_next(target: Target, settings: Settings) -> Explanation:
    preset, tracer = target.preset, FlopTracer(settings.flops)
    model = build_reference(preset)
    inner, vision_config, text_config = model.model, target.vision, target.text
    size, patch = vision_config.image_size, vision_config.patch_size
    per_side = size // patch
    groups = _partition(model, [
        ("vision encoder (CLIP-L/336)", "vision", _params(inner.vision_tower)),
        (f"projector (Linear {_linear_shape(inner.multi_modal_projector.linear_1)}, GELU, Linear "
         f"{_linear_shape(inner.multi_modal_projector.linear_2)})", "connector", _params(inner.multi_modal_projector)),
        ("image_newline (one learned vector per grid row)", "connector", [inner.image_newline]),
        *_llm_groups_reference(inner.language_model, model.lm_head),
    ])
    roles = _roles_trained(target.strategy)
    lora = _lora_params([inner.language_model], set(), settings.lora_rank)
    components = _components(groups, None, roles, lora, settings.lora_rank)

    width, height = settings.image or target.default_image or (size, size)
    layout = anyres_layout(height, width, tile_size=size, patches_per_side=per_side,
                           pinpoints=tuple(tuple(p) for p in model.config.image_grid_pinpoints))
    crops = 1 + layout.tiles[0] * layout.tiles[1]
    context = _context(target, settings)
    budget = ImageBudget((width, height), crops * per_side**2, layout.tokens, layout.tokens, 0, 0, context,
                         note=f"anyres: best grid {layout.best_resolution[1]}x{layout.best_resolution[0]} (w x h) "
                              f"= {layout.tiles[0]}x{layout.tiles[1]} tiles + 1 base view; unpadded grid "
                              f"{layout.grid[0]}x{layout.grid[1]} patches + {layout.grid[0]} newlines")
    dim, vocab = text_config.hidden_size, text_config.vocab_size
    b, n = settings.batch * settings.images_per_sample, settings.batch
    sequence = settings.text_tokens + settings.images_per_sample * layout.tokens
    stages = [
        Stage("pixels", _shape(b, crops, 3, size, size),
              f"base view + {layout.tiles[0]}x{layout.tiles[1]} tiles of {size}px"),
        Stage("encoder hidden states", _shape(b * crops, per_side**2 + 1, vision_config.hidden_size),
              f"{per_side**2} patches + CLS per crop"),
        Stage("selected features", _shape(b * crops, per_side**2, vision_config.hidden_size), "layer -2, CLS dropped"),
        Stage("projector output", _shape(b * crops, per_side**2, dim), "2-layer GELU MLP"),
        Stage("image tokens (base + unpadded grid + newlines)", _shape(b, layout.tokens, dim),
              f"{layout.base_tokens} + {layout.grid[0]}x{layout.grid[1]} + {layout.grid[0]}"),
        Stage("LLM input embeddings", _shape(n, sequence, dim),
              f"{settings.text_tokens} text tokens + {settings.images_per_sample} x {layout.tokens}"),
        Stage("LLM hidden states", _shape(n, sequence, dim), f"{text_config.num_hidden_layers} decoder layers"),
        Stage("logits", _shape(n, sequence, vocab), "output head"),
    ]
    pixels = torch.empty(1, 3, size, size, device="meta")
    vision_flops = crops * tracer.count(lambda: inner.vision_tower(pixel_values=pixels, output_hidden_states=True))
    features = torch.empty(crops, per_side**2, vision_config.hidden_size, device="meta")
    connector_flops = tracer.count(lambda: inner.multi_modal_projector(features))
    llm_cost = tracer.fit(lambda length: model.lm_head(inner.language_model(
        inputs_embeds=torch.empty(1, length, dim, device="meta")).last_hidden_state))
    memory = {"kv_cache": _kv_bytes(text_config.num_hidden_layers, text_config, context, settings),
              "cross_attention_kv": 0.0}
    notes = ["explained from the HF reference model LlavaNextForConditionalGeneration on the meta device (a Köprü "
             "projection model with resolution mode 'anyres' converts from it with the same parameters)"]
    return _finish(target, settings, model, "HF LlavaNextForConditionalGeneration", stages, components, budget,
                   vision_flops, connector_flops, llm_cost, memory, notes)


def _llm_groups_reference(language_model: nn.Module, lm_head: nn.Module, skip: Iterable[int] = (),
                          name: str = "LLM") -> list[tuple[str, str, list[nn.Parameter]]]:
    skip = set(skip)
    layers = [layer for i, layer in enumerate(language_model.layers) if i not in skip]
    return [
        (f"{name} input embeddings", "llm", _params(language_model.embed_tokens)),
        (f"{name} decoder layers x{len(layers)}", "llm", [p for layer in layers for p in layer.parameters()]),
        (f"{name} output head", "llm", _params(lm_head)),
        (f"{name} final norm / rotary", "llm", _params(language_model)),
    ]


# --- Llama-3.2-Vision (HF reference) -----------------------------------------------------------------------


def _explain_mllama(target: Target, settings: Settings) -> Explanation:
    preset, tracer = target.preset, FlopTracer(settings.flops)
    model = build_reference(preset)
    inner, vision_config, text_config = model.model, model.config.vision_config, model.config.text_config
    cross_layers = list(text_config.cross_attention_layers)
    cross = [inner.language_model.layers[i] for i in cross_layers]
    visual = inner.vision_model
    groups = _partition(model, [
        ("vision encoder: patch + gated position/tile embeddings", "vision",
         _params(visual.patch_embedding) + [visual.class_embedding] + _params(visual.gated_positional_embedding)
         + _params(visual.pre_tile_positional_embedding) + _params(visual.post_tile_positional_embedding)
         + _params(visual.layernorm_pre)),
        (f"vision encoder: local layers x{len(visual.transformer.layers)}", "vision", _params(visual.transformer)),
        (f"vision encoder: gated global layers x{len(visual.global_transformer.layers)}", "vision",
         _params(visual.global_transformer) + _params(visual.layernorm_post)),
        (f"projector (Linear {_linear_shape(inner.multi_modal_projector)})", "connector",
         _params(inner.multi_modal_projector)),
        (f"cross-attention layers x{len(cross)} (layers {cross_layers})", "connector",
         [p for layer in cross for p in layer.parameters()]),
        *_llm_groups_reference(inner.language_model, model.lm_head, skip=cross_layers),
    ])
    roles = _roles_trained(target.strategy)
    components = _components(groups, None, roles, None, settings.lora_rank)

    size, patch, max_tiles = vision_config.image_size, vision_config.patch_size, vision_config.max_num_tiles
    width, height = settings.image or target.default_image or (size, size)
    canvas_height, canvas_width = optimal_tiled_canvas(height, width, max_tiles, size)
    tiles = (canvas_height // size) * (canvas_width // size)
    per_tile = (size // patch) ** 2 + 1
    padded = per_tile + (8 - per_tile % 8) % 8
    kv_length = max_tiles * per_tile
    context = _context(target, settings)
    budget = ImageBudget((width, height), tiles * per_tile, 1, 1, 0, kv_length, context,
                         note=f"{tiles} of {max_tiles} tiles hold the image ({canvas_width}x{canvas_height} canvas); "
                              f"the encoder runs all {max_tiles} and the cross-attention cache holds "
                              f"{max_tiles} x {per_tile} positions, the empty tiles masked")
    dim, vocab = text_config.hidden_size, text_config.vocab_size
    b, n = settings.batch * settings.images_per_sample, settings.batch
    sequence = settings.text_tokens + settings.images_per_sample
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    stages = [
        Stage("pixels", _shape(n, settings.images_per_sample, max_tiles, 3, size, size),
              f"tiles of {size}px ({tiles} used for a {width}x{height} image)"),
        Stage("patch embeddings + CLS", _shape(b * max_tiles, per_tile, vision_config.hidden_size),
              f"{(size // patch) ** 2} patches of {patch}px + CLS, gated position and tile embeddings"),
        Stage("local encoder (each tile padded to a multiple of 8)",
              _shape(b, max_tiles * padded, vision_config.hidden_size),
              f"{vision_config.num_hidden_layers} layers over all tiles' patches together; layers "
              f"{list(vision_config.intermediate_layers_indices)} kept"),
        Stage("global encoder", _shape(b, max_tiles * padded, vision_config.hidden_size),
              f"{vision_config.num_global_layers} gated layers, tile position embeddings added"),
        Stage("vision features (final + 5 intermediate)", _shape(n, settings.images_per_sample, max_tiles, per_tile,
                                                                 vision_config.vision_output_dim), "padding removed"),
        Stage("cross-attention states", _shape(n, settings.images_per_sample * kv_length, dim), "Linear projector"),
        Stage("keys / values per cross-attention layer", _shape(n, kv_heads, settings.images_per_sample * kv_length,
                                                                dim // heads), "computed at prefill, cached"),
        Stage("LLM input embeddings", _shape(n, sequence, dim),
              f"{settings.text_tokens} text tokens + one <|image|> per image"),
        Stage("LLM hidden states", _shape(n, sequence, dim),
              f"{text_config.num_hidden_layers} layers, cross-attention at {cross_layers}"),
        Stage("logits", _shape(n, sequence, vocab), "output head"),
    ]
    vision_inputs = {"pixel_values": torch.empty(1, 1, max_tiles, 3, size, size, device="meta"),
                     "aspect_ratio_ids": torch.ones(1, 1, dtype=torch.long, device="meta"),
                     "aspect_ratio_mask": torch.ones(1, 1, max_tiles, dtype=torch.long, device="meta")}
    vision_flops = tracer.count(lambda: visual(**vision_inputs))
    features = torch.empty(1, kv_length, vision_config.vision_output_dim, device="meta")
    states = torch.empty(1, kv_length, dim, device="meta")
    connector_flops = tracer.count(lambda: inner.multi_modal_projector(features))
    connector_flops += tracer.count(lambda: [(layer.cross_attn.k_proj(states), layer.cross_attn.v_proj(states))
                                            for layer in cross])

    def run_text(length: int) -> None:
        hidden = inner.language_model(inputs_embeds=torch.empty(1, length, dim, device="meta"),
                                      cross_attention_states=states).last_hidden_state
        model.lm_head(hidden)

    cost = tracer.fit(run_text)  # `fixed` = the cross-attention K/V projections, counted with the connector
    self_layers = text_config.num_hidden_layers - len(cross)
    memory = {"kv_cache": _kv_bytes(self_layers, text_config, context, settings),
              "cross_attention_kv": _kv_bytes(len(cross), text_config, settings.images_per_sample * kv_length,
                                              settings)}
    notes = ["explained from the HF reference model MllamaForConditionalGeneration on the meta device: Köprü's "
             "conversion tiles images as HF does (K/V for the real tiles only) and keeps 8 extra lm_head rows (+8 x hidden parameters)"]
    return _finish(target, settings, model, "HF MllamaForConditionalGeneration", stages, components, budget,
                   vision_flops, connector_flops, cost, memory, notes)


# --- Qwen2-VL (HF reference) -------------------------------------------------------------------------------


def _explain_qwen2_vl(target: Target, settings: Settings) -> Explanation:
    preset, tracer = target.preset, FlopTracer(settings.flops)
    model = build_reference(preset)
    inner, vision_config, text_config = model.model, model.config.vision_config, model.config.text_config
    visual = inner.visual
    groups = _partition(model, [
        (f"vision encoder (patch embed + {len(visual.blocks)} blocks)", "vision",
         _params(visual.patch_embed) + _params(visual.blocks)),
        (f"patch merger (LayerNorm, 2x2 concat, MLP {vision_config.embed_dim * 4}->{vision_config.hidden_size})",
         "connector", _params(visual.merger)),
        *_llm_groups_reference(inner.language_model, model.lm_head),
    ])
    roles = _roles_trained(target.strategy)
    lora = _lora_params([inner.language_model], set(), settings.lora_rank)
    components = _components(groups, None, roles, lora, settings.lora_rank)

    patch, merge, temporal = vision_config.patch_size, vision_config.spatial_merge_size, vision_config.temporal_patch_size
    width, height = settings.image or target.default_image
    new_height, new_width = smart_resize(height, width, factor=patch * merge)
    patches = (new_height // patch) * (new_width // patch)
    tokens = patches // merge**2
    context = _context(target, settings)
    budget = ImageBudget((width, height), patches, tokens + 2, tokens, 2, 0, context,
                         note=f"dynamic resolution: smart_resize to {new_width}x{new_height}, {patches} patches, "
                              f"2x2 merge -> {tokens} tokens, + <|vision_start|> / <|vision_end|>")
    dim, vocab = text_config.hidden_size, text_config.vocab_size
    n = settings.batch
    b = n * settings.images_per_sample
    sequence = settings.text_tokens + settings.images_per_sample * budget.llm_positions
    embed = vision_config.embed_dim
    stages = [
        Stage("pixels", _shape(b, 3, new_height, new_width), f"{width}x{height} resized to {new_width}x{new_height}"),
        Stage("patches (flattened, image repeated in time)", _shape(b * patches, 3 * temporal * patch * patch),
              f"{new_height // patch}x{new_width // patch} patches of {temporal}x{patch}x{patch}"),
        Stage("encoder hidden states", _shape(b * patches, embed), f"{len(visual.blocks)} blocks, 2-D rotary"),
        Stage("merged 2x2 neighbours", _shape(b * tokens, embed * merge**2), "LayerNorm then concatenation"),
        Stage("merger output", _shape(b * tokens, dim), "MLP to the LLM width"),
        Stage("LLM input embeddings", _shape(n, sequence, dim),
              f"{settings.text_tokens} text tokens + {settings.images_per_sample} x ({tokens} + 2 markers)"),
        Stage("LLM hidden states", _shape(n, sequence, dim), f"{text_config.num_hidden_layers} layers, M-RoPE"),
        Stage("logits", _shape(n, sequence, vocab), "output head"),
    ]
    # The encoder's attention splits on data-dependent sequence lengths and cannot run on meta tensors: counted
    # as matmuls 2 x weights x tokens, attention 4 x tokens^2 x width per block.
    vision_flops = tracer.enabled * (_dense_flops([visual.patch_embed, visual.blocks], patches)
                                     + 4.0 * len(visual.blocks) * patches**2 * embed)
    connector_flops = tracer.enabled * _dense_flops([visual.merger], tokens)

    def run_text(length: int) -> None:
        positions = torch.zeros(3, 1, length, dtype=torch.long, device="meta")
        model.lm_head(inner.language_model(inputs_embeds=torch.empty(1, length, dim, device="meta"),
                                           position_ids=positions).last_hidden_state)

    cost = tracer.fit(run_text)
    memory = {"kv_cache": _kv_bytes(text_config.num_hidden_layers, text_config, context, settings),
              "cross_attention_kv": 0.0}
    notes = ["explained from the HF reference model Qwen2VLForConditionalGeneration on the meta device: Köprü has "
             "no Qwen2-VL encoder; its encoder FLOPs are computed, not traced"]
    return _finish(target, settings, model, "HF Qwen2VLForConditionalGeneration", stages, components, budget,
                   vision_flops, connector_flops, cost, memory, notes)


ARCHITECTURES: dict[str, Callable[[Target, Settings], Explanation]] = {
    "kopru": _explain_kopru,
    "llava_next": _explain_llava_next,
    "mllama": _explain_mllama,
    "qwen2_vl": _explain_qwen2_vl,
}


# ------------------------------------------------------------------------------------------------------------
# Entry points


def preset_target(preset: Preset) -> Target:
    return Target(preset.name, preset.description, preset.source, preset.architecture, preset.strategy,
                  hf_config(preset.vision), hf_config(preset.text), preset.kopru_config(), preset, preset.default_image)


def config_target(config: KopruConfig, base: Path | None = None, name: str | None = None) -> Target:
    """A Köprü config whose backbones are local HF directories (or hub ids, if online): their config.json
    files are read, no weights."""
    def resolve(path: str) -> str:
        candidate = base / path if base is not None else None
        return str(candidate) if candidate is not None and candidate.exists() else path

    vision_path, llm_path = resolve(config.vision.name_or_path), resolve(config.llm)
    vision_config = _read_config(vision_path, "vision encoder")
    if vision_config.model_type not in VISION_BACKBONES:
        sub = getattr(vision_config, "vision_config", None)
        if sub is None or sub.model_type not in VISION_BACKBONES:
            raise ValueError(f"expected a vision encoder of type {sorted(VISION_BACKBONES)} at {vision_path!r}, "
                             f"found model_type {vision_config.model_type!r}")
        vision_config = sub
    llm_config = _read_config(llm_path, "LLM")
    vocab = _vocab_with_image_tokens(llm_path, config)
    if vocab is not None and vocab > llm_config.vocab_size:  # from_backbones grows the table by these rows
        llm_config.vocab_size = vocab
    return Target(name or f"{config.strategy} over {config.vision.name_or_path} + {config.llm}",
                  f"Köprü {config.strategy} model", f"{vision_path} + {llm_path}", "kopru", config.strategy,
                  vision_config, llm_config, config)


def _read_config(path: str, what: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"expected the {what}'s config.json at {path!r}: {error}") from None


def _vocab_with_image_tokens(llm_path: str, config: KopruConfig) -> int | None:
    """The vocabulary after `add_image_tokens`, when the tokenizer is on disk (the LLM gains rows for them)."""
    if not (Path(llm_path) / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    from kopru.processing import add_image_tokens

    return add_image_tokens(AutoTokenizer.from_pretrained(llm_path), dataclasses.replace(config))


def model_dir_target(path: str | Path) -> Target:
    """A saved Köprü model directory: its kopru_config.json and the backbones' config.json files."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"expected a Köprü model directory at {path}, found none")
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"expected {CONFIG_FILE} in the model directory {path}, found "
                                f"{sorted(p.name for p in path.iterdir())[:10] or 'an empty directory'}")
    config = KopruConfig.load(path / CONFIG_FILE)
    return config_target(config, base=path, name=path.name)


def explain(preset: str | Preset | None = None, config: KopruConfig | str | Path | None = None,
            model_dir: str | Path | None = None, settings: Settings | None = None, **options: Any) -> Explanation:
    """Explain one model: a `preset` (a name from PRESETS or a Preset of your own), a Köprü `config` (object or
    JSON file) or a saved `model_dir`.

    `options` are `Settings` fields (dtype, batch, context, image=(width, height), images_per_sample,
    text_tokens, lora_rank).
    """
    given = [x for x in (preset, config, model_dir) if x is not None]
    if len(given) != 1:
        raise ValueError(f"expected exactly one of preset, config or model_dir, found {len(given)}")
    settings = dataclasses.replace(settings or Settings(), **options)
    if preset is not None:
        target = preset_target(preset if isinstance(preset, Preset) else get_preset(preset))
    elif model_dir is not None:
        target = model_dir_target(model_dir)
    elif isinstance(config, KopruConfig):
        target = config_target(config)
    else:
        config_path = Path(config)
        target = config_target(KopruConfig.load(config_path), base=config_path.parent)
    return ARCHITECTURES[target.architecture](target, settings)


# ------------------------------------------------------------------------------------------------------------
# Rendering


def human(value: float, unit: str = "") -> str:
    """1234567 -> '1.23 M' style, for FLOPs and bytes."""
    for threshold, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f} {suffix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def human_bytes(value: float) -> str:
    for threshold, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= threshold:
            return f"{value / threshold:.2f} {suffix}"
    return f"{value:.0f} B"


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return lines + ["| " + " | ".join(row) + " |" for row in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in rows]


def _count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def _render(e: Explanation, markdown: bool) -> str:
    h = (lambda text, level=2: f"{'#' * level} {text}") if markdown else (lambda text, level=2: f"\n{text}:")
    out = [f"# {e.name}" if markdown else e.name, "", e.description, f"configs: {e.source}",
           f"strategy: {e.strategy}; built from: {e.built_from} (meta device, nothing allocated)", ""]
    out.append(h("Data flow"))
    shape = (lambda s: "`[" + ", ".join(map(str, s)) + "]`") if markdown else (lambda s: str(s))
    out += _table(["stage", "shape", "note"], [[s.name, shape(s.shape), s.note] for s in e.stages], markdown)
    out += ["", h("Parameters")]
    rows = [[c.name, c.role, f"{c.params:,}", *(_count(c.trainable[r]) for r in RECIPES)] for c in e.components]
    rows.append(["total", "", f"{e.total_params:,}", *(_count(e.trainable(r)) for r in RECIPES)])
    out += _table(["component", "role", "params", *(f"trainable: {r}" for r in RECIPES)], rows, markdown)
    i = e.image
    out += ["", h("Image positions")]
    out += _table(["image", "encoder tokens", "LLM positions / image", "of which markers", "cross-attn K/V / image",
                   f"share of a {i.context:,} context"],
                  [[f"{i.image_size[0]}x{i.image_size[1]}", f"{i.vision_tokens:,}", f"{i.llm_positions:,}",
                    str(i.markers), f"{i.cross_attention_kv:,}", f"{100 * i.context_share:.2f}%"]], markdown)
    out += ["", i.note]
    f = e.flops
    out += ["", h("Forward FLOPs")]
    out += ["not computed (flops=False)"] if not f else _table(["quantity", "FLOPs"], [
        ["vision encoder per image", human(f["vision_per_image"])],
        ["connector per image", human(f["connector_per_image"])],
        ["LLM per image (its positions, dense)", human(f["llm_per_image"])],
        ["total per image", human(f["per_image"])],
        ["LLM per text token (dense)", human(f["llm_per_text_token_dense"])],
        [f"LLM per text token at context {i.context:,}", human(f["per_text_token_at_context"])],
    ], markdown)
    m = e.memory
    out += ["", h(f"Memory ({e.dtype}, batch {e.batch}, context {i.context:,})")]
    out += _table(["what", "bytes"], [
        ["weights", human_bytes(m["weights"])], ["KV cache (self-attention)", human_bytes(m["kv_cache"])],
        ["cross-attention K/V", human_bytes(m["cross_attention_kv"])], ["total", human_bytes(m["total"])],
    ], markdown)
    out += ["", h("Notes")] + [f"- {note}" for note in e.notes]
    return "\n".join(out) + "\n"


_ROLE_COLOURS = {"vision": "#cfe2f3", "connector": "#fce5cd", "llm": "#d9ead3"}


def _stage_role(stage: Stage) -> str:
    name = stage.name.lower()
    if name.startswith(("llm", "logits")):
        return "llm"
    if any(word in name for word in ("pixels", "patch", "encoder", "selected", "vision features")):
        return "vision"
    return "connector"


def draw_diagram(e: Explanation, path: str | Path) -> Path:
    """The data flow as a column of boxes, one per stage, shapes written on them (PNG or SVG by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise ValueError(f"expected a diagram path ending in .png or .svg, found {path.name!r}")
    count = len(e.stages)
    fig, ax = plt.subplots(figsize=(9, 1.05 * count + 1.4))
    ax.set_xlim(0, 10)
    ax.set_ylim(-0.6, count + 0.9)
    ax.axis("off")
    ax.text(5, count + 0.55, f"{e.name}: {e.strategy}", ha="center", fontsize=13, weight="bold")
    ax.text(5, count + 0.2, f"{e.total_params:,} parameters; {e.image.llm_positions:,} LLM position(s) per image"
            + (f", {e.image.cross_attention_kv:,} cross-attention K/V" if e.image.cross_attention_kv else ""),
            ha="center", fontsize=9)
    for index, stage in enumerate(e.stages):
        y = count - 1 - index
        role = _stage_role(stage)
        ax.add_patch(FancyBboxPatch((0.6, y - 0.36), 8.8, 0.72, boxstyle="round,pad=0.02",
                                    facecolor=_ROLE_COLOURS[role], edgecolor="#555555"))
        ax.text(0.8, y + 0.12, stage.name, fontsize=10, weight="bold", va="center")
        ax.text(9.2, y + 0.12, "[" + ", ".join(f"{d:,}" for d in stage.shape) + "]", fontsize=10, va="center",
                ha="right", family="monospace")
        ax.text(0.8, y - 0.18, stage.note[:110], fontsize=7.5, va="center", color="#333333")
        if index:
            ax.annotate("", xy=(5, y + 0.37), xytext=(5, y + 0.63), arrowprops={"arrowstyle": "->"})
    handles = [FancyBboxPatch((0, 0), 1, 1, facecolor=c, edgecolor="#555555") for c in _ROLE_COLOURS.values()]
    ax.legend(handles, ["vision encoder", "connector", "LLM"], loc="lower center", ncol=3, frameon=False,
              bbox_to_anchor=(0.5, -0.02), fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def summary_table(names: Iterable[str] | None = None, **options: Any) -> str:
    """One markdown row per preset: counts per recipe, image positions, FLOPs per image, weights."""
    header = ["preset", "built from", "total params", "trainable: align", "trainable: instruct",
              f"trainable: LoRA r={options.get('lora_rank', LORA_RANK)}", "LLM positions / image",
              "cross-attn K/V / image", "FLOPs / image", f"weights {options.get('dtype', 'bfloat16')}"]
    rows = []
    for name in names or PRESETS:
        e = explain(preset=name, **options)
        rows.append([name, e.built_from, f"{e.total_params:,}", _count(e.trainable("align")),
                     _count(e.trainable("instruct")), _count(e.trainable("lora")), f"{e.image.llm_positions:,}",
                     f"{e.image.cross_attention_kv:,}", human(e.flops["per_image"]) if e.flops else "n/a",
                     human_bytes(e.memory["weights"])])
    return "\n".join(_table(header, rows, markdown=True)) + "\n"


def list_presets() -> str:
    return "\n".join(f"{p.name:34s} {p.description}" for p in PRESETS.values())

