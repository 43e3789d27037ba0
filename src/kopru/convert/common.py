"""Pieces every converter shares."""

from __future__ import annotations

from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kopru.config import KopruConfig
from kopru.image_processing import ImagePreprocessor
from kopru.messages import source_chat_template
from kopru.vision import VisionTower


def copy_language_model(llm: PreTrainedModel, base: nn.Module, lm_head: nn.Module) -> None:
    """Load a VLM's text decoder (`base`, an AutoModel) and its `lm_head` into a fresh causal LM."""
    llm.base_model.load_state_dict(base.state_dict())
    llm.get_output_embeddings().load_state_dict(lm_head.state_dict())


def load_tokenizer(src: str, config: KopruConfig) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"expected the checkpoint's tokenizer in {src}: {error}") from None
    found = tokenizer.convert_tokens_to_ids(config.image_token)
    if found != config.image_token_id:
        raise ValueError(
            f"tokenizer in {src} does not match the checkpoint: expected {config.image_token!r} -> "
            f"{config.image_token_id}, found {found}"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The processor's chat template (chat_template.jinja / legacy chat_template.json) is the one HF renders
    # prompts with, ahead of the tokenizer's own; it becomes the converted tokenizer's, saved beside it as
    # llm/chat_template.jinja, so chat, serve and training all render the conversation as HF does.
    shipped = source_chat_template(src)
    if shipped is not None:
        tokenizer.chat_template = shipped[0]
    return tokenizer


def image_preprocessor(src: str, vision: VisionTower) -> ImagePreprocessor:
    return ImagePreprocessor.for_encoder(src, vision)
