"""HF `LlavaNextForConditionalGeneration` (LLaVA-NeXT / LLaVA-1.6) -> Köprü `projection` with anyres resolution."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlavaNextForConditionalGeneration, PreTrainedModel

from kopru.config import ResolutionConfig
from kopru.convert.common import image_preprocessor, load_kopru_weights, load_tokenizer, rename
from kopru.convert.llava import llava_kopru_config
from kopru.convert.llava import weight_names as llava_weight_names
from kopru.geometry import image_positions
from kopru.model import KopruForConditionalGeneration
from kopru.processing import KopruProcessor
from kopru.vision import VisionTower

REFERENCE_CLASS = LlavaNextForConditionalGeneration


def weight_names(llm: PreTrainedModel) -> list[tuple[str, str]]:
    """LLaVA's names (kopru.convert.llava.weight_names) and the learned row separator."""
    return [*llava_weight_names(llm), ("model.image_newline", "connector.image_newline")]


def to_kopru(reference: LlavaNextForConditionalGeneration, src: str
             ) -> tuple[KopruForConditionalGeneration, KopruProcessor]:
    config = reference.config
    pinpoints = [list(p) for p in config.image_grid_pinpoints]
    kopru_config = llava_kopru_config(config, src, resolution=ResolutionConfig(mode="anyres", grid_pinpoints=pinpoints))
    vision = VisionTower(reference.model.vision_tower, kopru_config.vision)
    llm = AutoModelForCausalLM.from_config(config.text_config)
    model = KopruForConditionalGeneration(kopru_config, vision, llm)
    load_kopru_weights(model, rename(reference.state_dict(), weight_names(llm), to="kopru"))
    tokenizer = load_tokenizer(src, kopru_config)
    processor = KopruProcessor(tokenizer, image_preprocessor(src, vision), kopru_config, model.image_count,
                               encoder_config=vision.encoder.config)
    return model, processor


def random_inputs(reference: LlavaNextForConditionalGeneration, model: KopruForConditionalGeneration):
    """Two prompts, one image each (a wide and a tall one, so both unpad directions run), amid random text."""
    size = reference.config.vision_config.image_size
    sizes = torch.tensor([[size, 3 * size - 5], [2 * size + 7, size - 3]])  # (height, width)
    rows = []
    for height, width in sizes.tolist():
        per_image = image_positions(model.config, model.vision.encoder.config, width, height).placeholders
        text = torch.randint(0, min(reference.config.image_token_id, 1000), (12,))
        rows.append(torch.cat([text[:5], torch.full((per_image,), reference.config.image_token_id), text[5:]]))
    longest = max(len(row) for row in rows)
    input_ids = torch.stack([torch.cat([row.new_zeros(longest - len(row)), row]) for row in rows])  # left padded
    attention_mask = torch.stack([torch.cat([row.new_zeros(longest - len(row)), row.new_ones(len(row))])
                                  for row in rows])
    passes = max(model.plan(h, w).passes for h, w in sizes.tolist())
    pixel_values = torch.randn(2, passes, 3, size, size)
    inputs = {"input_ids": input_ids, "pixel_values": pixel_values, "image_sizes": sizes,
              "attention_mask": attention_mask}
    return inputs, inputs
