"""The processor: placeholders against images, what it accepts as images."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_SIZE

from kopru import KopruConfig
from kopru.processing import KopruProcessor


def test_processor_checks_images_per_text(build, make_image) -> None:
    model, processor = build("projection")
    with pytest.raises(ValueError, match=r"text 0 holds 2 '<image>' placeholder\(s\) but 1 image"):
        processor(["<image> and <image>", "no image"], [[make_image(0)], [make_image(1)]])
    # A single PIL image, not in a list, for one placeholder.
    batch = processor("describe <image>", make_image(0))
    assert batch["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_processor_placeholder_and_image_count_mismatch(build, make_image) -> None:
    _, processor = build("projection")
    with pytest.raises(ValueError, match=r"2 '<image>' placeholder\(s\) but 1 image\(s\)"):
        processor("<image> and <image>", [make_image(0)])


def test_a_tokenizer_with_another_image_token_id_is_refused(build):
    model, processor = build("projection")
    config = model.config
    other = KopruConfig(**{**config.__dict__, "image_token_id": config.image_token_id + 1})
    with pytest.raises(ValueError, match=rf"expected '<image>' to have id {config.image_token_id + 1}, found "
                                          rf"{config.image_token_id}"):
        KopruProcessor(processor.tokenizer, processor.image_processor, other, model.image_count)
