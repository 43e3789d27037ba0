"""Conformance of every connector: each registered strategy and its main variants must produce as many image
vectors as `kopru.geometry.image_positions` counts, pass gradients to every trainable parameter, round-trip through
safetensors exactly, keep bf16 as bf16, and train in stage 1 exactly the modules the recipe names."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import CONNECTORS, CROSS_ATTENTION, IMAGE_SIZE, LLM_LAYERS, PATCH_SIZE, QFORMER, open_gates
from transformers import BloomConfig, BloomForCausalLM

from kopru import KopruConfig, KopruForConditionalGeneration, ResolutionConfig
from kopru.connectors import CrossAttentionConfig, available_strategies
from kopru.geometry import image_positions
from kopru.lesson.tiny import tiny_tokenizer
from kopru.training.recipes import apply_recipe

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
        open_gates(model, 0.5)  # at 0 (the start) no gradient reaches the blocks' own weights
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
    apply_recipe(model, "instruct")  # connector and (unless cross_attention) the LLM; the encoder as configured
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
    grid = IMAGE_SIZE // PATCH_SIZE
    with torch.no_grad():
        features = model.reduction(model.vision(batch["pixel_values"]), grid, grid)
        expected = model.connector(features)
        out = copy.deepcopy(model.connector).to(torch.bfloat16)(features.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    # The same function at bf16's precision (8 bits of mantissa), not merely some bf16 tensor.
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory) -> Path:
    """BloomModel.forward takes **kwargs but calls each block with a fixed argument list: the image context
    never reaches the decoder layers' pre-hooks (MptModel does the same)."""
    path = tmp_path_factory.mktemp("bloom")
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=64, n_layer=LLM_LAYERS, n_head=4,
                                 bos_token_id=0, eos_token_id=1, pad_token_id=2)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cross_attention_refuses_llm_that_drops_kwargs(vision_dirs, bloom_dir, make_image) -> None:
    torch.manual_seed(0)
    config = KopruConfig(vision=str(vision_dirs["clip"]), llm=str(bloom_dir), strategy="cross_attention",
                         connector=CONNECTORS["cross_attention"])
    model, processor = KopruForConditionalGeneration.from_backbones(config)
    batch = processor("<image> describe it", [make_image(0)], padding_side="left")
    with torch.no_grad(), pytest.raises(RuntimeError, match="gated cross-attention block"):
        model(**batch)
    with pytest.raises(RuntimeError, match="gated cross-attention block"):
        model.generate(**batch, max_new_tokens=2)


def test_cross_attention_on_llama_runs_its_blocks(build, make_image) -> None:
    model, processor = build("cross_attention")
    batch = processor("<image> describe it", [make_image(0)], padding_side="left")
    with torch.no_grad():
        model(**batch)
    assert model.generate(**batch, max_new_tokens=2, eos_token_id=[]).shape == (1, 2)


def test_cross_attention_without_any_block_is_refused(build) -> None:
    with pytest.raises(ValueError, match=rf"every_n_layers=8 on an LLM with {LLM_LAYERS} layers"):
        build("cross_attention", connector=CrossAttentionConfig(every_n_layers=8))
    with pytest.raises(ValueError, match=rf"layers=\[\].*{LLM_LAYERS} layers"):
        build("cross_attention", connector=CrossAttentionConfig(layers=[]))


def test_deepcopy_cross_attention_runs_its_own_blocks(build, make_image) -> None:
    """Before: the copy's layer hooks ran the original connector's blocks."""
    model, processor = build("cross_attention")
    open_gates(model, 1.0)
    twin = copy.deepcopy(model)
    open_gates(twin, 0.0)
    batch = processor("<image> what colour is the shape", [make_image(0)])
    text_only = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        plain = twin.llm(**text_only).logits
        torch.testing.assert_close(twin(**batch).logits, plain)
        original = model(**batch).logits
        assert not torch.allclose(original, plain, atol=1e-4)
        torch.testing.assert_close(model.llm(**text_only).logits, plain)  # same base LLM underneath
