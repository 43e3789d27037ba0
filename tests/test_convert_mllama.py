"""Converting HF Llama-3.2-Vision (Mllama) into Köprü's `cross_attention` strategy matches HF's logits.

The reference is a tiny random `MllamaForConditionalGeneration` (nothing downloaded) with every weight
randomised, the tanh gates included: with HF's zero gates the cross-attention blocks would contribute nothing
and the comparison would prove nothing. Images come first in each prompt so that every text row sees an image
(where HF and Köprü treat image-less rows differently; see kopru.convert.mllama).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, MllamaForConditionalGeneration
from vlm_checkpoints import MAX_TILES, tiny_mllama
from vlm_checkpoints import MLLAMA_IMAGE_SIZE as IMAGE_SIZE
from vlm_checkpoints import mllama_logit_diff as max_diff
from vlm_checkpoints import save_mllama_reference as save_reference

from kopru.convert import convert, load_reference
from kopru.convert import mllama as converter
from kopru.model import KopruForConditionalGeneration

ATOL = 1e-4


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    return save_reference(tiny_mllama([1, 4], 6), tmp_path_factory.mktemp("mllama"))


def test_block_positions():
    assert converter.block_positions([3, 8, 13, 18, 23, 28, 33, 38], 40) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert converter.block_positions([0, 2], 4) == [0, 1]
    with pytest.raises(ValueError, match="adjacent"):
        converter.block_positions([2, 3], 6)
    with pytest.raises(ValueError, match="at the end"):
        converter.block_positions([1, 5], 6)


@pytest.mark.parametrize(("cross_attention_layers", "num_layers"), [([1, 4], 6), ([3], 8), ([0, 2, 5], 8)])
@torch.no_grad()
def test_language_side_matches_hf(tmp_path, cross_attention_layers, num_layers):
    """The Llama + gated blocks against Mllama's text path, given the same (projected) image states."""
    reference = tiny_mllama(cross_attention_layers, num_layers, seed=num_layers)
    model, _ = converter.to_kopru(reference, str(save_reference(reference, tmp_path)))
    model.eval()
    assert isinstance(model.llm, LlamaForCausalLM)
    assert model.llm.config.num_hidden_layers == num_layers - len(cross_attention_layers)
    assert model.connector.positions == converter.block_positions(cross_attention_layers, num_layers)
    assert all(float(block.attn_gate.abs()) > 0.1 and float(block.mlp_gate.abs()) > 0.1
               for block in model.connector.blocks)

    config = reference.config
    image_id, tokens = config.image_token_id, reference.model.vision_model.num_patches
    batch, images, length = 2, 2, 9
    text = torch.randint(0, image_id, (batch, length))
    # Row 0: two consecutive images first; row 1: one image first, one inside the text.
    input_ids = torch.cat([torch.full((batch, 1), image_id), text], dim=1)
    input_ids[0, 1] = image_id
    input_ids[1, 5] = image_id
    images_seen = torch.cumsum(input_ids == image_id, dim=1)
    states = torch.randn(batch, images, MAX_TILES, tokens, 64)  # padding tiles random: masked out by HF
    sees = images_seen.unsqueeze(-1) > torch.arange(images)
    cross_attention_mask = torch.zeros(batch, input_ids.shape[1], images, MAX_TILES, dtype=torch.long)
    cross_attention_mask[..., 0] = sees.long()

    expected = reference(
        input_ids=input_ids, cross_attention_states=states.reshape(-1, tokens, 64),
        cross_attention_mask=cross_attention_mask,
    ).logits
    context = model.connector.build_context(states[:, :, 0].reshape(-1, tokens, 64), images_seen[:, -1])
    found = model.llm(input_ids=input_ids, kopru_image_context=context.for_positions(images_seen)).logits
    assert max_diff(expected, found) <= ATOL

    # The blocks matter: without the image context the logits differ.
    text_only = model.llm(input_ids=input_ids).logits
    assert max_diff(expected, text_only) > 1e-2
    # Text-only prompts: Mllama skips its cross-attention layers, Köprü runs the bare Llama.
    assert max_diff(reference(input_ids=text).logits, model.llm(input_ids=text).logits) <= ATOL


@pytest.mark.parametrize("images_per_sample", [1, 2])
@torch.no_grad()
def test_end_to_end_from_pixels_and_reloaded(reference_dir, tmp_path, images_per_sample):
    reference = load_reference("mllama", str(reference_dir)).eval()
    model, processor = converter.to_kopru(reference, str(reference_dir))
    model.eval()
    assert model.vision.num_tokens == reference.model.vision_model.num_patches
    assert model.image_count.llm_positions == 1
    assert model.config.resolution.mode == "tiled"
    torch.manual_seed(1)
    reference_inputs, kopru_inputs = converter.random_inputs(reference, model, images_per_sample)
    expected = reference(**reference_inputs).logits
    assert max_diff(expected, model(**kopru_inputs).logits) <= ATOL
    other_pixels = dict(kopru_inputs, pixel_values=torch.randn_like(kopru_inputs["pixel_values"]))
    assert max_diff(expected, model(**other_pixels).logits) > 1e-2  # the pixels do reach the logits

    model.save_pretrained(tmp_path / "kopru", processor)
    reloaded, reloaded_processor = KopruForConditionalGeneration.from_pretrained(tmp_path / "kopru")
    reloaded.eval()
    assert type(reloaded.vision.encoder) is converter.MllamaTiledVisionModel
    assert reloaded_processor.config.image_token_id == reference.config.image_token_id
    assert max_diff(expected, reloaded(**kopru_inputs).logits) <= ATOL


def test_convert_verifies(reference_dir, tmp_path):
    report = convert("mllama", reference_dir, tmp_path / "out", verify=True)
    assert report["strategy"] == "cross_attention"
    assert report["image_positions"] == 1
    assert report["max_abs_diff"] <= ATOL
    assert (tmp_path / "out" / "connector.safetensors").is_file()


def test_processor_prompt_runs(reference_dir):
    """The converted processor and model accept a prompt with the `<|image|>` placeholder first."""
    from PIL import Image

    reference = load_reference("mllama", str(reference_dir))
    model, processor = converter.to_kopru(reference, str(reference_dir))
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    inputs = processor(converter.IMAGE_TOKEN + "what colour is the shape?", images=[image])
    assert int((inputs["input_ids"] == reference.config.image_token_id).sum()) == 1
    assert inputs["pixel_values"].shape == (1, MAX_TILES, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert inputs["image_sizes"].tolist() == [[30, 40]]
    new = model.eval().generate(**inputs, max_new_tokens=3)
    assert new.shape == (1, 3)


def text_first_inputs(reference: MllamaForConditionalGeneration, arrangements: list[tuple[int, int]], seed: int):
    """One sample whose prompt starts with text (as Llama-3.2-Vision's template: bos + header before <|image|>),
    its images (`arrangements`: tile rows x columns each) separated by text. HF's inputs (padding tiles zero,
    a cross-attention mask in which each row sees the real tiles of every image before it, the first rows none)
    and Köprü's."""
    from kopru.geometry import tile_layout
    from kopru.high_resolution_processing import aspect_ratio_inputs

    config = reference.config
    image_id, size, tiles = config.image_token_id, IMAGE_SIZE, MAX_TILES
    generator = torch.Generator().manual_seed(seed)
    pieces = [torch.randint(0, image_id, (4,), generator=generator)]
    for _ in arrangements:
        pieces += [torch.tensor([image_id]), torch.randint(0, image_id, (3,), generator=generator)]
    input_ids = torch.cat(pieces).unsqueeze(0)
    layouts = [tile_layout(rows * size, columns * size, size, tiles) for rows, columns in arrangements]
    ids, mask = aspect_ratio_inputs(layouts, tiles)
    count = len(arrangements)
    pixels = torch.randn(count, tiles, 3, size, size, generator=generator) * mask.view(count, tiles, 1, 1, 1)
    sees = torch.cumsum(input_ids == image_id, dim=1).unsqueeze(-1) > torch.arange(count)
    reference_inputs = {
        "input_ids": input_ids, "pixel_values": pixels.unsqueeze(0), "aspect_ratio_ids": ids.unsqueeze(0),
        "aspect_ratio_mask": mask.unsqueeze(0), "cross_attention_mask": sees.unsqueeze(-1).long() * mask.unsqueeze(0),
    }
    sizes = torch.tensor([list(layout.canvas) for layout in layouts])
    return reference_inputs, {"input_ids": input_ids, "pixel_values": pixels, "image_sizes": sizes}


@pytest.mark.parametrize("arrangements", [[(1, 2)], [(2, 2), (1, 1)], [(1, 3), (2, 1)]])
@torch.no_grad()
def test_rows_before_the_image_match_hf(reference_dir, arrangements):
    """Text before the first image: every row's logits equal HF's (rows_without_image "attend_all", the conversion's
    default), with 1 and 2 images of different tile counts; Meta's "zero" differs from HF there."""
    reference = load_reference("mllama", str(reference_dir)).eval()
    model, _ = converter.to_kopru(reference, str(reference_dir))
    model.eval()
    assert model.connector.config.rows_without_image == "attend_all"
    reference_inputs, kopru_inputs = text_first_inputs(reference, arrangements, seed=len(arrangements))
    expected = reference(**reference_inputs).logits
    assert max_diff(expected, model(**kopru_inputs).logits) <= ATOL  # all rows, the first 4 see no image

    model.connector.config.rows_without_image = "zero"  # Meta's reference: the first rows get no image signal
    zeroed = model(**kopru_inputs).logits
    assert max_diff(expected[:, :4], zeroed[:, :4]) > 1e-2


@torch.no_grad()
def test_engine_equals_the_reference_loop_with_text_before_the_image(reference_dir):
    """rows_without_image "attend_all" through the engine (image K/V once at prefill into static buffers) and through
    model.generate: the same logits at every step, on a batch whose prompts start with text."""
    from PIL import Image

    from kopru.generation import GenerationEngine, SamplingParams

    reference = load_reference("mllama", str(reference_dir))
    model, processor = converter.to_kopru(reference, str(reference_dir))
    model.eval()
    image = converter.IMAGE_TOKEN
    prompts = [f"describe {image} the shape", f"how many {image} and {image} colours?"]
    images = [[Image.new("RGB", (40, 30), (200, 30, 30))],
              [Image.new("RGB", (20, 50), (30, 200, 30)), Image.new("RGB", (16, 16), (30, 30, 200))]]
    batch = processor(prompts, images, padding_side="left", add_special_tokens=False)
    seen = []
    handle = model.llm.register_forward_hook(lambda _m, _a, out: seen.append(out.logits[:, -1].float().clone()))
    try:
        expected = model.generate(**batch, max_new_tokens=5, eos_token_id=[])
        steps = len(seen)
        engine = GenerationEngine(model, processor)
        completions = engine.complete(prompts, images, SamplingParams(max_new_tokens=5, ignore_eos=True))
    finally:
        handle.remove()
    assert [c.token_ids for c in completions] == expected.tolist()
    torch.testing.assert_close(torch.stack(seen[steps:2 * steps]), torch.stack(seen[:steps]), rtol=0, atol=1e-5)


def test_rows_without_image_setting_is_checked():
    from kopru.connectors.cross_attention import CrossAttentionConfig

    assert CrossAttentionConfig().rows_without_image == "zero"  # Meta's behaviour unless a model opts in
    with pytest.raises(ValueError, match="rows_without_image must be 'zero' or 'attend_all', found 'mean'"):
        CrossAttentionConfig(rows_without_image="mean")
