"""Conformance of every connector: each registered strategy and its main variants must produce as many image
vectors as `kopru.tokens.image_positions` counts, pass gradients to every trainable parameter, round-trip through
safetensors exactly, keep bf16 as bf16, and train in stage 1 exactly the modules the recipe names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CROSS_ATTENTION, QFORMER

from kopru import ResolutionConfig
from kopru.connectors import available_strategies
from kopru.recipes import apply_recipe
from kopru.tokens import image_positions

RESAMPLER = {"num_latents": 6, "depth": 1, "num_heads": 2, "head_dim": 8, "ff_mult": 2}
# id -> (strategy, connector settings, other KopruConfig settings)
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "projection-linear": ("projection", {"kind": "linear"}, {}),
    "projection-mlp": ("projection", {"kind": "mlp", "depth": 2}, {}),
    "projection-pixel-shuffle": ("projection", {"kind": "mlp", "depth": 2},
                                 {"resolution": ResolutionConfig(reduction="pixel_shuffle", reduction_factor=2)}),
    "qformer": ("qformer", QFORMER, {}),
    "cross-attention": ("cross_attention", CROSS_ATTENTION, {}),
    "cross-attention-resampler": ("cross_attention", {**CROSS_ATTENTION, "resampler": RESAMPLER}, {}),
}
PROMPT = "<image> what colour is the shape"


def test_every_registered_strategy_has_a_variant_here():
    assert {strategy for strategy, _, _ in VARIANTS.values()} == set(available_strategies())


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, build, make_image):
    strategy, connector, config = VARIANTS[request.param]
    model, processor = build(strategy, connector=connector, **config)
    if strategy == "cross_attention":
        # The gates start at 0, where nothing reaches the blocks' own weights; open them so the path is tested.
        with torch.no_grad():
            for block in model.connector.blocks:
                block.attn_gate.fill_(0.5)
                block.mlp_gate.fill_(0.5)
    batch = processor([PROMPT, "<image> is there a circle"], [make_image(0), make_image(1)], padding_side="left",
                      return_labels=True)
    return request.param, model, processor, batch


def test_output_length_is_the_counted_one(variant, make_image):
    _, model, _, batch = variant
    width, height = make_image(0).size
    count = image_positions(model.config, model.vision.encoder.config, width, height)
    with torch.no_grad():
        out = model.encode_images(batch["pixel_values"])
    length = out.shape[1]
    if model.connector.splices_into_text:
        assert (length, count.cross_attention_kv) == (count.placeholders, 0)
        assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 2 * count.placeholders
    else:
        assert (length, count.placeholders) == (count.cross_attention_kv, 1)
    assert out.shape == (2, length, model.llm.config.hidden_size)


def _backward(model, batch) -> None:
    model.zero_grad(set_to_none=True)
    model.train()
    try:
        model(**batch).loss.backward()
    finally:
        model.eval()


def _with_gradient(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}


def test_gradients_reach_every_trainable_parameter(variant):
    _, model, _, batch = variant
    model.freeze_for_stage2()  # connector and (unless cross_attention) the LLM; the encoder as configured
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {name for name in trainable if name.startswith("connector.")} == {
        f"connector.{name}" for name, _ in model.connector.named_parameters()}
    try:
        _backward(model, batch)
        assert _with_gradient(model) == trainable
    finally:
        model.zero_grad(set_to_none=True)


def test_stage1_trains_exactly_the_recipes_modules(variant):
    _, model, _, batch = variant
    apply_recipe(model, "align")
    stage1 = {id(p) for module in model.connector.stage1_modules() for p in module.parameters()}
    expected = {name for name, p in model.named_parameters() if id(p) in stage1}
    assert expected and {name for name, p in model.named_parameters() if p.requires_grad} == expected
    try:
        _backward(model, batch)
        assert _with_gradient(model) == expected
        assert all(p.grad is None for name, p in model.named_parameters() if name not in expected)
    finally:
        model.zero_grad(set_to_none=True)


def test_save_and_load_give_identical_outputs(variant, build, tmp_path):
    name, model, _, batch = variant
    model.save_connector(tmp_path / "connector")
    files = sorted(p.name for p in Path(tmp_path / "connector").iterdir())
    assert files == ["connector.safetensors", "kopru_config.json"]
    strategy, connector, config = VARIANTS[name]
    other, _ = build(strategy, connector=connector, seed=1, **config)  # another random connector
    with torch.no_grad():
        before = other(**batch).logits
        expected = model(**batch).logits
        assert not torch.equal(before, expected)
        other.load_connector(tmp_path / "connector")
        torch.testing.assert_close(other(**batch).logits, expected, rtol=0, atol=0)


def test_bf16_in_gives_bf16_out(variant):
    _, model, _, batch = variant
    with torch.no_grad():
        features = model.reduction(model.vision(batch["pixel_values"]), 4, 4).to(torch.bfloat16)
        connector = model.connector
        connector.to(torch.bfloat16)
        try:
            out = connector(features)
        finally:
            connector.to(torch.float32)
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
