"""The vision tower: a pretrained Hugging Face image encoder and the choice of which features leave it.

One registry (`VISION_BACKBONES`) says, per encoder family, which HF class loads it, whether its sequence
starts with a CLS token and where its final LayerNorm lives. Dispatch is on the checkpoint's `model_type`,
never on substrings of a model name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    Blip2VisionModel,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionModel,
    ViTModel,
)

from kopru.config import VisionTowerConfig
from kopru.paths import check_exists


@dataclass(frozen=True)
class VisionBackbone:
    # The HF class, or "module:Class" for an adapter defined elsewhere (imported on first use: no import cycle).
    model_class: type[PreTrainedModel] | str
    has_cls: bool
    final_norm: str | None  # attribute path of the encoder's last LayerNorm (None: it has none to apply)
    # Composite checkpoints (CLIPModel, SiglipModel, Blip2) keep the vision side in a sub-config.
    load_kwargs: tuple[tuple[str, object], ...] = ()
    # The encoder config's attribute giving the width of one feature layer.
    width: str = "hidden_size"
    # Whether the HF class takes `interpolate_pos_encoding=True` (2-D bicubic interpolation of its position
    # embeddings), so that one encoder sees images of any size (anyres tiles are native; dynamic sizes are not).
    interpolates: bool = True
    # Pixel normalisation of the family, used when a checkpoint ships no preprocessor_config.json.
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def load_class(self) -> type[PreTrainedModel]:
        if isinstance(self.model_class, str):
            module, _, name = self.model_class.partition(":")
            return getattr(importlib.import_module(module), name)
        return self.model_class


_CLIP_PIXELS = {"image_mean": (0.48145466, 0.4578275, 0.40821073), "image_std": (0.26862954, 0.26130258, 0.27577711)}

VISION_BACKBONES: dict[str, VisionBackbone] = {
    "clip_vision_model": VisionBackbone(CLIPVisionModel, has_cls=True, final_norm="post_layernorm", **_CLIP_PIXELS),
    "siglip_vision_model": VisionBackbone(SiglipVisionModel, has_cls=False, final_norm="post_layernorm"),
    "vit": VisionBackbone(ViTModel, has_cls=True, final_norm="layernorm", load_kwargs=(("add_pooling_layer", False),)),
    "blip_2_vision_model": VisionBackbone(Blip2VisionModel, has_cls=True, final_norm="post_layernorm", **_CLIP_PIXELS),
    # Llama-3.2-Vision's tiled encoder (resolution mode "tiled"; "fixed" runs one tile per image); features = last
    # + intermediate layers, per tile.
    "mllama_vision_model": VisionBackbone("kopru.convert.mllama:MllamaTiledVisionModel", has_cls=True,
                                          final_norm=None, width="vision_output_dim", interpolates=False,
                                          **_CLIP_PIXELS),
}


def vision_config_of(config: PretrainedConfig) -> PretrainedConfig:
    """The vision half of a composite config (CLIP, SigLIP, BLIP-2), or the config itself."""
    if config.model_type in VISION_BACKBONES:
        return config
    sub = getattr(config, "vision_config", None)
    if sub is not None and sub.model_type in VISION_BACKBONES:
        return sub
    raise ValueError(
        f"expected a vision encoder of type {sorted(VISION_BACKBONES)}, found model_type {config.model_type!r}"
    )


def load_vision_encoder(name_or_path: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load the encoder of a local directory or hub id, safetensors only."""
    check_exists(name_or_path, "vision encoder")
    try:
        config = vision_config_of(AutoConfig.from_pretrained(name_or_path))
    except OSError as error:
        raise FileNotFoundError(
            f"expected a Hugging Face vision encoder (config.json) at {name_or_path!r}: {error}"
        ) from None
    backbone = VISION_BACKBONES[config.model_type]
    return backbone.load_class().from_pretrained(
        name_or_path, config=config, use_safetensors=True, dtype=dtype, **dict(backbone.load_kwargs)
    )


def drops_cls(has_cls: bool, config: VisionTowerConfig) -> bool:
    """Whether the tower drops the encoder's first token: `config.drop_cls`, by default exactly when the encoder
    has a CLS token (LLaVA's "default" feature selection)."""
    return has_cls if config.drop_cls is None else config.drop_cls


def keeps_cls(encoder_config: PretrainedConfig, config: VisionTowerConfig) -> bool:
    """Whether a CLS token reaches the connector: the encoder has one and the tower keeps it. The one CLS rule;
    `kopru.geometry`'s plans count from it."""
    has_cls = VISION_BACKBONES[vision_config_of(encoder_config).model_type].has_cls
    return has_cls and not drops_cls(has_cls, config)


def vision_token_count(encoder_config: PretrainedConfig, config: VisionTowerConfig) -> int:
    """Tokens per image the connector receives, from the configs alone (no weights needed)."""
    encoder_config = vision_config_of(encoder_config)
    patches = (encoder_config.image_size // encoder_config.patch_size) ** 2
    return patches + int(keeps_cls(encoder_config, config))


class VisionTower(nn.Module):
    """Encoder + feature selection. Frozen and run without autograd unless `config.trainable`."""

    def __init__(self, encoder: PreTrainedModel, config: VisionTowerConfig) -> None:
        super().__init__()
        model_type = encoder.config.model_type
        if model_type not in VISION_BACKBONES:
            raise ValueError(f"expected a vision encoder of type {sorted(VISION_BACKBONES)}, found {model_type!r}")
        self.encoder = encoder
        self.config = config
        self.backbone = VISION_BACKBONES[model_type]
        num_layers = encoder.config.num_hidden_layers
        layers = config.feature_layer if isinstance(config.feature_layer, list) else [config.feature_layer]
        for layer in layers:
            if not -(num_layers + 1) <= layer <= num_layers:
                raise ValueError(
                    f"feature_layer {layer} is outside the encoder's hidden states "
                    f"(expected -{num_layers + 1}..{num_layers})"
                )
        if config.final_norm and len(layers) > 1:
            raise ValueError("final_norm applies to a single feature layer; found a list of layers")
        self.feature_layers = layers
        self.drop_cls = drops_cls(self.backbone.has_cls, config)
        if self.drop_cls and not self.backbone.has_cls:
            raise ValueError(f"drop_cls=True but a {model_type!r} encoder has no CLS token to drop")
        if config.final_norm and self.backbone.final_norm is None:
            raise ValueError(f"final_norm=True but a {model_type!r} encoder has no final LayerNorm to apply")
        self.final_norm = encoder.get_submodule(self.backbone.final_norm) if config.final_norm else None
        encoder.requires_grad_(config.trainable)

    @classmethod
    def from_config(cls, config: VisionTowerConfig, dtype: torch.dtype | None = None) -> VisionTower:
        return cls(load_vision_encoder(config.name_or_path, dtype=dtype), config)

    @property
    def hidden_size(self) -> int:
        """Width of the features handed to the connector."""
        return getattr(self.encoder.config, self.backbone.width) * len(self.feature_layers)

    @property
    def num_tokens(self) -> int:
        """Tokens per image the connector receives, at the encoder's native resolution."""
        return vision_token_count(self.encoder.config, self.config)

    @property
    def image_size(self) -> int:
        return self.encoder.config.image_size

    @property
    def patch_size(self) -> int:
        return self.encoder.config.patch_size

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor | None = None,
                aspect_ratio_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[images, 3, H, W] -> [images, tokens, hidden_size]

        H and W other than the encoder's native size (multiples of its patch size) interpolate its position
        embeddings; the native size runs the encoder exactly as trained.

        Tiled encoders (Mllama, resolution mode "tiled"): pixel_values [images, tiles, 3, S, S] with
        `aspect_ratio_ids` [images] and `aspect_ratio_mask` [images, tiles] -> [images * tiles, tokens,
        hidden_size], one row per tile (padding tiles included), so feature selection and CLS dropping act per tile.
        """
        dtype = next(self.encoder.parameters()).dtype
        height, width = pixel_values.shape[-2:]
        native = height == width == self.image_size
        kwargs = {}
        if aspect_ratio_ids is not None:
            if self.encoder.config.model_type != "mllama_vision_model":
                raise ValueError(f"aspect_ratio_ids are for a tiled (Mllama) encoder, found a "
                                 f"{self.encoder.config.model_type!r} encoder")
            kwargs = {"aspect_ratio_ids": aspect_ratio_ids, "aspect_ratio_mask": aspect_ratio_mask}
        if not native:
            if not self.backbone.interpolates:
                raise ValueError(
                    f"a {self.encoder.config.model_type!r} encoder sees only its native {self.image_size}x"
                    f"{self.image_size} pixels, found {width}x{height}; use resolution mode 'fixed' or 'anyres'"
                )
            if height % self.patch_size or width % self.patch_size:
                raise ValueError(
                    f"expected image sides that are multiples of the patch size {self.patch_size}, found {width}x{height}"
                )
            kwargs["interpolate_pos_encoding"] = True
        with torch.set_grad_enabled(self.config.trainable and torch.is_grad_enabled()):
            hidden_states = self.encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True,
                                         **kwargs).hidden_states
            features = torch.cat([hidden_states[layer] for layer in self.feature_layers], dim=-1)
            if self.final_norm is not None:
                features = self.final_norm(features)
            if self.drop_cls:
                features = features[:, 1:]
        return features
