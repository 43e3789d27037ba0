"""How each family is explained: its meta model's components, stage shapes, image positions, FLOPs and KV cache.

One function per `Preset.architecture` (`ARCHITECTURES`): Köprü's own models (any strategy, resolution mode and
reduction) and the three HF reference families Köprü does not build itself (LLaVA-NeXT, Llama-3.2-Vision,
Qwen2-VL). Each ends in `_finish`, which adds up FLOPs and memory the same way for all."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from kopru.config import KopruConfig
from kopru.connectors.cross_attention import CONTEXT_KWARG, ImageContext
from kopru.dtypes import canonical_dtype, dtype_bytes
from kopru.explain.flops import FlopTracer, SequenceCost, dense_flops
from kopru.explain.parameters import (
    build_kopru_meta,
    build_reference,
    components_of,
    connector_groups,
    linear_shape,
    llm_groups,
    lora_params,
    params_of,
    partition,
    recipe_trainable,
    roles_trained,
)
from kopru.explain.report import LORA_RANK, Component, Explanation, ImageBudget, Stage
from kopru.geometry import (
    ImagePlan,
    anyres_layout,
    cached_cross_attention_kv,
    connector_tokens,
    image_positions,
    optimal_tiled_canvas,
    plan_image,
    smart_resize,
)
from kopru.llm import attention_geometry, context_window, kv_cache_bytes
from kopru.presets import Preset


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


def _memory(text_config: PretrainedConfig, context: int, settings: Settings, self_layers: int,
            cross_layers: int = 0, cross_positions: int = 0) -> dict[str, float]:
    """The KV cache of a full context in the self-attention layers, and the images' K/V (`cross_positions` per
    sequence) in the cross-attention layers."""
    return {"kv_cache": _kv_bytes(self_layers, text_config, context, settings),
            "cross_attention_kv": _kv_bytes(cross_layers, text_config, cross_positions, settings)
            if cross_positions else 0.0}


def _image_size(target: Target, settings: Settings, size: int | None) -> tuple[int, int]:
    """(width, height) the figures are for: --image, else the preset's default, else the encoder's `size` square."""
    chosen = settings.image or target.default_image or ((size, size) if size else None)
    if chosen is None:
        raise ValueError(f"{target.name}: expected an image size (--image WIDTHxHEIGHT); the encoder has no base size")
    return chosen


def _reference_components(target: Target, settings: Settings, groups,
                          lora_modules: list[nn.Module] | None) -> list[Component]:
    """Components of an HF reference model: what each recipe trains, by the roles `kopru.training.recipes` trains in
    a Köprü model of the same strategy; LoRA on every Linear of `lora_modules` (None: the strategy has no LoRA)."""
    lora = None if lora_modules is None else lora_params(lora_modules, set(), settings.lora_rank)
    return components_of(groups, None, roles_trained(target.strategy), lora, settings.lora_rank)

def _shape(*dims: int) -> list[int]:
    return [int(d) for d in dims]


def _explain_kopru(target: Target, settings: Settings) -> Explanation:
    config, vision_config, llm_config = target.kopru, target.vision, target.text
    tracer = FlopTracer(settings.flops)
    model = build_kopru_meta(config, vision_config, llm_config)
    vision, connector, llm = model.vision, model.connector, model.llm
    groups = partition(model, [("vision encoder", "vision", params_of(vision.encoder)), *connector_groups(model),
                                *llm_groups(llm)])
    trains, adapters = recipe_trainable(model, settings.lora_rank)
    components = components_of(groups, trains, None, adapters, settings.lora_rank)

    context = _context(target, settings)
    size = vision_config.image_size
    width, height = _image_size(target, settings, size)
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
    memory = _memory(llm_config, context, settings, llm_config.num_hidden_layers,
                     len(getattr(connector, "blocks", [])), kv_positions)
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
    groups = partition(model, [
        ("vision encoder (CLIP-L/336)", "vision", params_of(inner.vision_tower)),
        (f"projector (Linear {linear_shape(inner.multi_modal_projector.linear_1)}, GELU, Linear "
         f"{linear_shape(inner.multi_modal_projector.linear_2)})", "connector", params_of(inner.multi_modal_projector)),
        ("image_newline (one learned vector per grid row)", "connector", [inner.image_newline]),
        *_llm_groups_reference(inner.language_model, model.lm_head),
    ])
    components = _reference_components(target, settings, groups, [inner.language_model])

    width, height = _image_size(target, settings, size)
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
    memory = _memory(text_config, context, settings, text_config.num_hidden_layers)
    notes = ["explained from the HF reference model LlavaNextForConditionalGeneration on the meta device (a Köprü "
             "projection model with resolution mode 'anyres' converts from it with the same parameters)"]
    return _finish(target, settings, model, "HF LlavaNextForConditionalGeneration", stages, components, budget,
                   vision_flops, connector_flops, llm_cost, memory, notes)


def _llm_groups_reference(language_model: nn.Module, lm_head: nn.Module, skip: Iterable[int] = (),
                          name: str = "LLM") -> list[tuple[str, str, list[nn.Parameter]]]:
    skip = set(skip)
    layers = [layer for i, layer in enumerate(language_model.layers) if i not in skip]
    return [
        (f"{name} input embeddings", "llm", params_of(language_model.embed_tokens)),
        (f"{name} decoder layers x{len(layers)}", "llm", [p for layer in layers for p in layer.parameters()]),
        (f"{name} output head", "llm", params_of(lm_head)),
        (f"{name} final norm / rotary", "llm", params_of(language_model)),
    ]


# --- Llama-3.2-Vision (HF reference) -----------------------------------------------------------------------


def _explain_mllama(target: Target, settings: Settings) -> Explanation:
    preset, tracer = target.preset, FlopTracer(settings.flops)
    model = build_reference(preset)
    inner, vision_config, text_config = model.model, model.config.vision_config, model.config.text_config
    cross_layers = list(text_config.cross_attention_layers)
    cross = [inner.language_model.layers[i] for i in cross_layers]
    visual = inner.vision_model
    groups = partition(model, [
        ("vision encoder: patch + gated position/tile embeddings", "vision",
         params_of(visual.patch_embedding) + [visual.class_embedding] + params_of(visual.gated_positional_embedding)
         + params_of(visual.pre_tile_positional_embedding) + params_of(visual.post_tile_positional_embedding)
         + params_of(visual.layernorm_pre)),
        (f"vision encoder: local layers x{len(visual.transformer.layers)}", "vision", params_of(visual.transformer)),
        (f"vision encoder: gated global layers x{len(visual.global_transformer.layers)}", "vision",
         params_of(visual.global_transformer) + params_of(visual.layernorm_post)),
        (f"projector (Linear {linear_shape(inner.multi_modal_projector)})", "connector",
         params_of(inner.multi_modal_projector)),
        (f"cross-attention layers x{len(cross)} (layers {cross_layers})", "connector",
         [p for layer in cross for p in layer.parameters()]),
        *_llm_groups_reference(inner.language_model, model.lm_head, skip=cross_layers),
    ])
    components = _reference_components(target, settings, groups, None)  # cross_attention: no LoRA

    size, patch, max_tiles = vision_config.image_size, vision_config.patch_size, vision_config.max_num_tiles
    width, height = _image_size(target, settings, size)
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
    memory = _memory(text_config, context, settings, self_layers, len(cross), settings.images_per_sample * kv_length)
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
    groups = partition(model, [
        (f"vision encoder (patch embed + {len(visual.blocks)} blocks)", "vision",
         params_of(visual.patch_embed) + params_of(visual.blocks)),
        (f"patch merger (LayerNorm, 2x2 concat, MLP {vision_config.embed_dim * 4}->{vision_config.hidden_size})",
         "connector", params_of(visual.merger)),
        *_llm_groups_reference(inner.language_model, model.lm_head),
    ])
    components = _reference_components(target, settings, groups, [inner.language_model])

    patch, merge, temporal = vision_config.patch_size, vision_config.spatial_merge_size, vision_config.temporal_patch_size
    width, height = _image_size(target, settings, None)
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
    vision_flops = tracer.enabled * (dense_flops([visual.patch_embed, visual.blocks], patches)
                                     + 4.0 * len(visual.blocks) * patches**2 * embed)
    connector_flops = tracer.enabled * dense_flops([visual.merger], tokens)

    def run_text(length: int) -> None:
        positions = torch.zeros(3, 1, length, dtype=torch.long, device="meta")
        model.lm_head(inner.language_model(inputs_embeds=torch.empty(1, length, dim, device="meta"),
                                           position_ids=positions).last_hidden_state)

    cost = tracer.fit(run_text)
    memory = _memory(text_config, context, settings, text_config.num_hidden_layers)
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
