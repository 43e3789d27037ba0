"""Pieces every exporter shares: the HF model from renamed weights, configs, processor parts, stop tokens."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoImageProcessor, GenerationConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from kopru.convert.common import WeightNames, kopru_weights, rename
from kopru.export import ExportRefused
from kopru.image_processing import CONFIG_NAME, ImagePreprocessor
from kopru.messages import end_of_turn_ids
from kopru.model import KopruForConditionalGeneration
from kopru.processing import KopruProcessor

if TYPE_CHECKING:
    from transformers import PretrainedConfig
    from transformers.image_processing_utils import BaseImageProcessor


# Keys of a saved backbone config that are bookkeeping (HF writes them afresh) or, as the dtype, said once at the top.
_NOT_VALUES = ("architectures", "_name_or_path", "transformers_version", "dtype")


def config_values(config: PretrainedConfig) -> dict[str, Any]:
    """A backbone's HF config as the dict an HF VLM config takes for its sub-config."""
    values = config.to_dict()
    for key in _NOT_VALUES:
        values.pop(key, None)
    return values


def hf_model(hf_class: type[PreTrainedModel], config: PretrainedConfig,
             state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """`hf_class` built from `config` as a user builds one (so that `save_pretrained` writes the names transformers
    writes for it, which for LLaVA are still the hub's older ones), holding exactly `state`: every name and shape
    is checked first (a missing, extra or misshapen weight is an error naming it, never left random)."""
    text = getattr(config, "text_config", None)
    try:
        with no_init_weights():  # no random init of weights about to be replaced
            model = hf_class(config)
        model.tie_weights()  # as loading would: LLaVA, for one, ties `embed_tokens` by that name
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ExportRefused(f"transformers' {hf_class.__name__} cannot be built around this model (its LLM is "
                            f"{getattr(text, 'model_type', '?')!r}): {type(error).__name__}: {error}") from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{name}: {hf_class.__name__} expects {expected[name]}, the Köprü model has {tuple(state[name].shape)}"
             for name in sorted(set(expected) & set(state)) if tuple(state[name].shape) != expected[name]]
    if missing or unexpected or wrong:
        raise RuntimeError(f"the renamed weights do not fit {hf_class.__name__}: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}, shape mismatches {wrong[:5]}")
    model.load_state_dict({name: t.detach() for name, t in state.items()}, strict=True, assign=True)
    model.tie_weights()  # assign=True gave tied weights separate parameters
    model.config.dtype = next(iter(state.values())).dtype
    return model.eval()


def hf_state(model: KopruForConditionalGeneration, names: WeightNames) -> dict[str, torch.Tensor]:
    """The Köprü model's weights under HF's names (its family's (HF, Köprü) table read right to left)."""
    return rename(kopru_weights(model), names, to="hf")


def hf_image_processor(settings: dict) -> BaseImageProcessor:
    """The HF image processor these settings (HF's format, `ImagePreprocessor.to_hf_settings`) describe, as
    `AutoImageProcessor` reads them from a checkpoint."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / CONFIG_NAME).write_text(json.dumps(settings))
        return AutoImageProcessor.from_pretrained(folder)


def image_settings(preprocessor: ImagePreprocessor) -> dict:
    """HF settings giving Köprü's pixels for a fixed-size encoder. LLaVA-1.5's "pad" mode (image_aspect_ratio),
    which HF's CLIP processor ignores, becomes LlavaImageProcessor's do_pad: the same square, the same fill."""
    settings = preprocessor.to_hf_settings()
    if preprocessor.mode == "pad":
        settings.pop("image_aspect_ratio")
        settings.update(image_processor_type="LlavaImageProcessor", do_pad=True)
    return settings


def stop_ids(model: KopruForConditionalGeneration, processor: KopruProcessor) -> list[int]:
    """What Köprü's generation stops on: the LLM's eos ids and the chat template's end-of-turn token."""
    ids: list[int] = []
    for value in (model.llm.generation_config.eos_token_id, model.llm.config.eos_token_id,
                  end_of_turn_ids(processor)):
        for token in [value] if isinstance(value, int) else list(value or []):
            if token not in ids:
                ids.append(token)
    return ids


def generation_config(model: KopruForConditionalGeneration, processor: KopruProcessor) -> GenerationConfig:
    """Greedy by default, stopping where `kopru chat` stops (HF's generate stops on eos_token_id only)."""
    config = copy.deepcopy(model.llm.generation_config)  # the LLM's own defaults (sampling settings included)
    stops = stop_ids(model, processor)
    config.eos_token_id = stops[0] if len(stops) == 1 else stops
    config.pad_token_id = processor.tokenizer.pad_token_id
    config.bos_token_id = processor.tokenizer.bos_token_id
    return config


def refuse_unless(condition: bool, message: str) -> None:
    if not condition:
        raise ExportRefused(message)
