"""The vision tower against the Hugging Face encoder run directly: feature selection, CLS handling, final
norm, freezing, and the errors for wrong checkpoints or settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import NUM_PATCHES, VISION_HIDDEN, VISION_LAYERS
from transformers import (
    CLIPVisionModel,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)

from kopru import VisionTowerConfig
from kopru.vision import VisionTower, vision_token_count

HF_CLASSES = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel, "vit": ViTModel}
FINAL_NORM = {"clip": "post_layernorm", "siglip": "post_layernorm", "vit": "layernorm"}
HAS_CLS = {"clip": True, "siglip": False, "vit": True}


def hf_encoder(kind: str, path: Path) -> PreTrainedModel:
    kwargs = {"add_pooling_layer": False} if kind == "vit" else {}
    return HF_CLASSES[kind].from_pretrained(path, **kwargs).eval()


def hf_hidden_states(kind: str, path: Path, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return hf_encoder(kind, path)(pixel_values=pixels, output_hidden_states=True).hidden_states


def tower(path: Path, **config) -> VisionTower:
    return VisionTower.from_config(VisionTowerConfig(str(path), **config)).eval()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["clip", "siglip", "vit"])
@pytest.mark.parametrize("feature_layer", [-2, -1, 0, [-3, -1]])
def test_features_are_the_encoders_hidden_states(vision_dirs, pixels, kind, feature_layer) -> None:
    with torch.no_grad():
        hidden_states = hf_hidden_states(kind, vision_dirs[kind], pixels)
        vision = tower(vision_dirs[kind], feature_layer=feature_layer)
        features = vision(pixels)
    assert len(hidden_states) == VISION_LAYERS + 1
    layers = feature_layer if isinstance(feature_layer, list) else [feature_layer]
    expected = torch.cat([hidden_states[layer] for layer in layers], dim=-1)
    if HAS_CLS[kind]:
        expected = expected[:, 1:]  # the CLS token is dropped
    assert features.shape == (2, NUM_PATCHES, VISION_HIDDEN * len(layers))
    assert (vision.num_tokens, vision.hidden_size) == features.shape[1:]
    torch.testing.assert_close(features, expected, rtol=0, atol=0)


def test_siglip_keeps_its_first_patch(vision_dirs, pixels) -> None:
    """SigLIP has no CLS token: nothing is dropped, position 0 is the first patch."""
    with torch.no_grad():
        hidden_states = hf_hidden_states("siglip", vision_dirs["siglip"], pixels)
        features = tower(vision_dirs["siglip"])(pixels)
    assert hidden_states[-2].shape[1] == NUM_PATCHES == features.shape[1]
    torch.testing.assert_close(features[:, 0], hidden_states[-2][:, 0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_drop_cls_false_keeps_the_cls_token(vision_dirs, pixels, kind) -> None:
    with torch.no_grad():
        hidden_states = hf_hidden_states(kind, vision_dirs[kind], pixels)
        vision = tower(vision_dirs[kind], drop_cls=False)
        features = vision(pixels)
    assert features.shape[1] == NUM_PATCHES + 1 == vision.num_tokens
    torch.testing.assert_close(features, hidden_states[-2], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["clip", "siglip", "vit"])
@pytest.mark.parametrize("feature_layer", [-2, -1])
def test_final_norm_applies_the_encoders_last_layernorm(vision_dirs, pixels, kind, feature_layer) -> None:
    encoder = hf_encoder(kind, vision_dirs[kind])
    with torch.no_grad():
        output = encoder(pixel_values=pixels, output_hidden_states=True)
        features = tower(vision_dirs[kind], feature_layer=feature_layer, final_norm=True)(pixels)
        expected = encoder.get_submodule(FINAL_NORM[kind])(output.hidden_states[feature_layer])
    start = 1 if HAS_CLS[kind] else 0
    torch.testing.assert_close(features, expected[:, start:], rtol=0, atol=0)
    if feature_layer == -1 and kind in ("siglip", "vit"):
        # These encoders' own last_hidden_state is the normed last layer.
        torch.testing.assert_close(features, output.last_hidden_state[:, start:])


def test_final_norm_changes_the_features(vision_dirs, pixels) -> None:
    with torch.no_grad():
        plain = tower(vision_dirs["clip"], feature_layer=-1)(pixels)
        normed = tower(vision_dirs["clip"], feature_layer=-1, final_norm=True)(pixels)
    assert not torch.allclose(plain, normed)
    # A LayerNorm with its initial weight 1 / bias 0 leaves every token with mean 0 and variance 1.
    torch.testing.assert_close(normed.mean(-1), torch.zeros(normed.shape[:2]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["clip", "siglip", "vit"])
def test_frozen_by_default(vision_dirs, pixels, kind) -> None:
    vision = tower(vision_dirs[kind])
    assert not any(param.requires_grad for param in vision.encoder.parameters())
    with torch.enable_grad():
        features = vision(pixels.clone().requires_grad_(True))
    assert features.grad_fn is None
    assert not features.requires_grad


def test_trainable_tower_gets_gradients(vision_dirs, pixels) -> None:
    vision = tower(vision_dirs["clip"], feature_layer=-1, trainable=True)
    assert all(param.requires_grad for param in vision.encoder.parameters())
    features = vision(pixels)
    assert features.grad_fn is not None
    features.square().sum().backward()
    without_grad = {name for name, param in vision.encoder.named_parameters() if param.grad is None}
    # The post LayerNorm only feeds the pooled output, which the tower does not use.
    assert without_grad == {"post_layernorm.weight", "post_layernorm.bias"}
    assert vision.encoder.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert vision.encoder.encoder.layers[-1].mlp.fc2.weight.grad.abs().sum() > 0


def test_nonexistent_path_is_file_not_found(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        VisionTower.from_config(VisionTowerConfig(str(tmp_path / "no-such-encoder")))


def test_llm_directory_is_rejected_naming_its_model_type(llm_dirs) -> None:
    with pytest.raises(ValueError, match="found model_type 'llama'"):
        VisionTower.from_config(VisionTowerConfig(str(llm_dirs["llama"])))


@pytest.mark.parametrize("feature_layer", [VISION_LAYERS + 1, -(VISION_LAYERS + 2), [-1, VISION_LAYERS + 1]])
def test_feature_layer_out_of_range(vision_dirs, feature_layer) -> None:
    with pytest.raises(ValueError, match="outside the encoder's hidden states"):
        tower(vision_dirs["clip"], feature_layer=feature_layer)


@pytest.mark.parametrize("feature_layer", [VISION_LAYERS, -(VISION_LAYERS + 1)])
def test_feature_layer_range_ends_are_accepted(vision_dirs, feature_layer) -> None:
    assert tower(vision_dirs["clip"], feature_layer=feature_layer).feature_layers == [feature_layer]


def test_drop_cls_on_siglip_is_rejected(vision_dirs) -> None:
    with pytest.raises(ValueError, match="no CLS token"):
        tower(vision_dirs["siglip"], drop_cls=True)


def test_final_norm_with_several_layers_is_rejected(vision_dirs) -> None:
    with pytest.raises(ValueError, match="final_norm"):
        tower(vision_dirs["clip"], feature_layer=[-3, -1], final_norm=True)


def test_cls_is_dropped_only_where_the_encoder_has_one():
    tower = VisionTowerConfig("unused")
    assert vision_token_count(SiglipVisionConfig(image_size=224, patch_size=14), tower) == 256
    assert vision_token_count(ViTConfig(image_size=224, patch_size=16), tower) == 196
    keep = VisionTowerConfig("unused", drop_cls=False)
    assert vision_token_count(ViTConfig(image_size=224, patch_size=16), keep) == 197
