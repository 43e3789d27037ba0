"""Pieces every converter shares."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kopru.config import KopruConfig
from kopru.image_processing import ImagePreprocessor
from kopru.messages import source_chat_template
from kopru.vision import VisionTower


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


# ----------------------------------------------------------------------------------------------- weight names
# Each family's mapping between its HF checkpoint's weight names and a Köprü model's is one table of
# (HF prefix, Köprü prefix) pairs, read left to right by `kopru convert` and right to left by `kopru export`. A
# prefix ending in "." covers every weight under it; any other is one weight's full name. Köprü names start with
# the part of the model they belong to, as `save_pretrained` writes them: "vision.encoder.", "llm.", "connector.".
WeightNames = Sequence[tuple[str, str]]
MODEL_PARTS = ("vision.encoder", "llm", "connector")


def rename(state: Mapping[str, torch.Tensor], names: WeightNames, to: Literal["kopru", "hf"],
           skip: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """`state` with every name's prefix replaced by its partner in `names` (the longest match wins). A name no pair
    covers raises KeyError naming it, unless `skip(name)` says it is to be left out."""
    source, target = (0, 1) if to == "kopru" else (1, 0)
    out = {}
    for name, tensor in state.items():
        matches = [pair for pair in names if name == pair[source]
                   or (pair[source].endswith(".") and name.startswith(pair[source]))]
        if not matches:
            if skip is not None and skip(name):
                continue
            side = "Köprü" if to == "hf" else "HF"
            raise KeyError(f"no {'HF' if to == 'hf' else 'Köprü'} name for the {side} weight {name!r}: expected a "
                           f"name under one of {sorted(pair[source] for pair in names)}")
        pair = max(matches, key=lambda pair: len(pair[source]))
        out[pair[target] + name[len(pair[source]):]] = tensor
    return out


def kopru_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A Köprü model's weights under the names `rename` maps: its encoder's, LLM's and connector's (what
    `save_pretrained` writes to vision/, llm/ and connector.safetensors; aliases such as the vision tower's
    `final_norm`, a module of the encoder, are not repeated)."""
    return {f"{part}.{name}": tensor for part in MODEL_PARTS
            for name, tensor in model.get_submodule(part).state_dict().items()}


def load_kopru_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load Köprü-named weights (`kopru_weights`' names) into the model's parts, each strictly: a missing or
    unexpected weight is an error, never left random."""
    for part in MODEL_PARTS:
        prefix = part + "."
        module = model.get_submodule(part)
        module.load_state_dict({name[len(prefix):]: t for name, t in state.items() if name.startswith(prefix)},
                               strict=True)
    unknown = sorted(name for name in state if not name.startswith(tuple(part + "." for part in MODEL_PARTS)))
    if unknown:
        raise KeyError(f"weights outside the model's parts {list(MODEL_PARTS)}: {unknown[:5]}")


def output_embeddings_name(llm: PreTrainedModel) -> str:
    """The attribute path of a causal LM's output head (`lm_head` for most, `embed_out` for GPT-NeoX)."""
    head = llm.get_output_embeddings()
    return next(name for name, module in llm.named_modules() if module is head)
