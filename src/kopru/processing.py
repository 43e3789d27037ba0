"""Text + images in, model inputs out. The processor counts image positions; the model checks them."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from kopru.config import KopruConfig
from kopru.geometry import ImageTokenCount, image_positions
from kopru.high_resolution_processing import HighResolutionPreprocessor
from kopru.image_processing import ImagePreprocessor


def add_image_tokens(tokenizer: PreTrainedTokenizerBase, config: KopruConfig) -> int:
    """Register the image placeholder (and markers) as special tokens; write their ids into `config`.

    Returns the vocabulary size the LLM's embeddings must have afterwards.
    """
    wanted = [config.image_token]
    if config.uses_markers:
        wanted += [config.image_start_token, config.image_end_token]
    missing = [token for token in wanted if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    config.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
    if config.uses_markers:
        config.image_start_token_id = tokenizer.convert_tokens_to_ids(config.image_start_token)
        config.image_end_token_id = tokenizer.convert_tokens_to_ids(config.image_end_token)
    if tokenizer.pad_token is None:
        # GPT-2 and Llama ship without one; batching needs some id, and the attention mask hides it.
        tokenizer.pad_token = tokenizer.eos_token
    return len(tokenizer)


class KopruProcessor:
    """Expands each image placeholder to the counted positions, tokenises, and preprocesses the pixels."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: ImagePreprocessor,
        config: KopruConfig,
        image_count: ImageTokenCount,
        encoder_config: PretrainedConfig | None = None,
    ) -> None:
        """`encoder_config` (the vision encoder's HF config) is needed for resolution modes anyres and dynamic,
        where every image is counted from its own size."""
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.image_count = image_count
        self.encoder_config = encoder_config
        self.high_resolution = None
        if config.resolution.mode != "fixed":
            if encoder_config is None:
                raise ValueError(f"resolution mode {config.resolution.mode!r} counts each image from its size and "
                                 "needs the vision encoder's config (encoder_config); found none")
            self.high_resolution = HighResolutionPreprocessor(image_processor, config, encoder_config)
        if config.image_token_id is None or tokenizer.convert_tokens_to_ids(config.image_token) != config.image_token_id:
            raise ValueError(
                f"tokenizer does not match the model: expected {config.image_token!r} to have id "
                f"{config.image_token_id}, found {tokenizer.convert_tokens_to_ids(config.image_token)}"
            )
        start = config.image_start_token if config.uses_markers else ""
        end = config.image_end_token if config.uses_markers else ""
        self._expanded = start + config.image_token * image_count.placeholders + end

    def expand(self, text: str, counts: list[ImageTokenCount] | None = None) -> str:
        """Each placeholder replaced by its image's positions: `counts` one per placeholder in order (anyres,
        dynamic), or the fixed count for all."""
        if counts is None:
            if self.high_resolution is not None:
                raise ValueError(f"resolution mode {self.config.resolution.mode!r} counts each image from its size; "
                                 "expected one count per placeholder, found none")
            return text.replace(self.config.image_token, self._expanded)
        pieces = text.split(self.config.image_token)
        if len(pieces) - 1 != len(counts):
            raise ValueError(f"the text holds {len(pieces) - 1} {self.config.image_token!r} placeholder(s) but "
                             f"{len(counts)} image count(s) were given")
        start = self.config.image_start_token if self.config.uses_markers else ""
        end = self.config.image_end_token if self.config.uses_markers else ""
        out = [pieces[0]]
        for count, piece in zip(counts, pieces[1:], strict=True):
            out += [start, self.config.image_token * count.placeholders, end, piece]
        return "".join(out)

    def count(self, image: Image.Image) -> ImageTokenCount:
        """Positions this image takes, from its size (`kopru.geometry.image_positions`)."""
        if self.high_resolution is None:
            return self.image_count
        return image_positions(self.config, self.encoder_config, image.width, image.height)

    def __call__(
        self,
        text: str | list[str],
        images: list[Image.Image] | list[list[Image.Image]] | None = None,
        padding_side: str = "right",
        return_labels: bool = False,
        add_special_tokens: bool = True,
    ) -> dict[str, torch.Tensor]:
        """`images` in order of appearance: a flat list for the batch, or one list per text.

        Right padding for training, `padding_side="left"` for generation.
        """
        texts = [text] if isinstance(text, str) else list(text)
        flat = self._images_in_order(texts, images)
        if self.high_resolution is None:
            expanded = [self.expand(t) for t in texts]
        else:
            counts = [self.count(image) for image in flat]
            expanded, start = [], 0
            for t in texts:
                used = t.count(self.config.image_token)
                expanded.append(self.expand(t, counts[start:start + used]))
                start += used
        encoded = self.tokenizer(expanded, return_tensors="pt", padding=True,
                                 padding_side=padding_side, add_special_tokens=add_special_tokens)
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if flat and self.high_resolution is not None:
            batch.update(self.high_resolution(flat))  # pixel_values and image_sizes
        elif flat:
            batch["pixel_values"] = self.image_processor(flat)
        if return_labels:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            batch["labels"] = labels
        return batch

    def _images_in_order(self, texts: list[str], images) -> list[Image.Image]:
        """All images in order of appearance; with one list per text, each list must match its text."""
        token = self.config.image_token
        if images is None:
            images = []
        elif isinstance(images, Image.Image):
            images = [images]
        if images and all(isinstance(item, list | tuple) for item in images):
            if len(images) != len(texts):
                raise ValueError(f"expected one list of images per text ({len(texts)}), found {len(images)} lists")
            for index, (text, per_text) in enumerate(zip(texts, images, strict=True)):
                if text.count(token) != len(per_text):
                    raise ValueError(
                        f"text {index} holds {text.count(token)} {token!r} placeholder(s) but {len(per_text)} "
                        "image(s) were given for it"
                    )
            return [image for per_text in images for image in per_text]
        placeholders = sum(t.count(token) for t in texts)
        if placeholders != len(images):
            raise ValueError(
                f"the text holds {placeholders} {token!r} placeholder(s) but {len(images)} image(s) were given; "
                "expected one image per placeholder"
            )
        return list(images)

    def decode(self, token_ids: torch.Tensor | list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, token_ids: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, llm_dir: str | Path, vision_dir: str | Path) -> None:
        self.tokenizer.save_pretrained(llm_dir)
        self.image_processor.save_pretrained(vision_dir)

    @classmethod
    def from_dirs(
        cls, llm_dir: str | Path, vision_dir: str | Path, config: KopruConfig, image_count: ImageTokenCount,
        image_size: int, encoder_config: PretrainedConfig | None = None,
    ) -> KopruProcessor:
        tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # A saved model always holds its image-processor settings: no size fallback (`image_size` is unused).
        model_type = None if encoder_config is None else encoder_config.model_type
        return cls(tokenizer, ImagePreprocessor.from_pretrained(vision_dir, model_type=model_type), config, image_count,
                   encoder_config=encoder_config)
