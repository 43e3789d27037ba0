"""Entry points: what to explain (a preset, a Köprü config or a saved model directory), `explain` itself, and the
one-row-per-preset summary."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from kopru.config import CONFIG_FILE, KopruConfig
from kopru.explain.architectures import ARCHITECTURES, Settings, Target
from kopru.explain.report import LORA_RANK, Explanation, count_cell, human, human_bytes, table_lines
from kopru.presets import PRESETS, Preset, get_preset, hf_config
from kopru.processing import add_image_tokens
from kopru.vision import VISION_BACKBONES


def preset_target(preset: Preset) -> Target:
    return Target(preset.name, preset.description, preset.source, preset.architecture, preset.strategy,
                  hf_config(preset.vision), hf_config(preset.text), preset.kopru_config(), preset, preset.default_image)


def config_target(config: KopruConfig, base: Path | None = None, name: str | None = None) -> Target:
    """A Köprü config whose backbones are local HF directories (or hub ids, if online): their config.json
    files are read, no weights."""
    def resolve(path: str) -> str:
        candidate = base / path if base is not None else None
        return str(candidate) if candidate is not None and candidate.exists() else path

    vision_path, llm_path = resolve(config.vision.name_or_path), resolve(config.llm)
    vision_config = _read_config(vision_path, "vision encoder")
    if vision_config.model_type not in VISION_BACKBONES:
        sub = getattr(vision_config, "vision_config", None)
        if sub is None or sub.model_type not in VISION_BACKBONES:
            raise ValueError(f"expected a vision encoder of type {sorted(VISION_BACKBONES)} at {vision_path!r}, "
                             f"found model_type {vision_config.model_type!r}")
        vision_config = sub
    llm_config = _read_config(llm_path, "LLM")
    vocab = _vocab_with_image_tokens(llm_path, config)
    if vocab is not None and vocab > llm_config.vocab_size:  # from_backbones grows the table by these rows
        llm_config.vocab_size = vocab
    return Target(name or f"{config.strategy} over {config.vision.name_or_path} + {config.llm}",
                  f"Köprü {config.strategy} model", f"{vision_path} + {llm_path}", "kopru", config.strategy,
                  vision_config, llm_config, config)


def _read_config(path: str, what: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"expected the {what}'s config.json at {path!r}: {error}") from None


def _vocab_with_image_tokens(llm_path: str, config: KopruConfig) -> int | None:
    """The vocabulary after `add_image_tokens`, when the tokenizer is on disk (the LLM gains rows for them)."""
    if not (Path(llm_path) / "tokenizer_config.json").is_file():
        return None

    return add_image_tokens(AutoTokenizer.from_pretrained(llm_path), dataclasses.replace(config))


def model_dir_target(path: str | Path) -> Target:
    """A saved Köprü model directory: its kopru_config.json and the backbones' config.json files."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"expected a Köprü model directory at {path}, found none")
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"expected {CONFIG_FILE} in the model directory {path}, found "
                                f"{sorted(p.name for p in path.iterdir())[:10] or 'an empty directory'}")
    config = KopruConfig.load(path / CONFIG_FILE)
    return config_target(config, base=path, name=path.name)


def explain(preset: str | Preset | None = None, config: KopruConfig | str | Path | None = None,
            model_dir: str | Path | None = None, settings: Settings | None = None, **options: Any) -> Explanation:
    """Explain one model: a `preset` (a name from PRESETS or a Preset of your own), a Köprü `config` (object or
    JSON file) or a saved `model_dir`.

    `options` are `Settings` fields (dtype, batch, context, image=(width, height), images_per_sample,
    text_tokens, lora_rank).
    """
    given = [x for x in (preset, config, model_dir) if x is not None]
    if len(given) != 1:
        raise ValueError(f"expected exactly one of preset, config or model_dir, found {len(given)}")
    settings = dataclasses.replace(settings or Settings(), **options)
    if preset is not None:
        target = preset_target(preset if isinstance(preset, Preset) else get_preset(preset))
    elif model_dir is not None:
        target = model_dir_target(model_dir)
    elif isinstance(config, KopruConfig):
        target = config_target(config)
    else:
        config_path = Path(config)
        target = config_target(KopruConfig.load(config_path), base=config_path.parent)
    return ARCHITECTURES[target.architecture](target, settings)



def summary_table(names: Iterable[str] | None = None, **options: Any) -> str:
    """One markdown row per preset: counts per recipe, image positions, FLOPs per image, weights."""
    header = ["preset", "built from", "total params", "trainable: align", "trainable: instruct",
              f"trainable: LoRA r={options.get('lora_rank', LORA_RANK)}", "LLM positions / image",
              "cross-attn K/V / image", "FLOPs / image", f"weights {options.get('dtype', 'bfloat16')}"]
    rows = []
    for name in names or PRESETS:
        e = explain(preset=name, **options)
        rows.append([name, e.built_from, f"{e.total_params:,}", count_cell(e.trainable("align")),
                     count_cell(e.trainable("instruct")), count_cell(e.trainable("lora")), f"{e.image.llm_positions:,}",
                     f"{e.image.cross_attention_kv:,}", human(e.flops["per_image"]) if e.flops else "n/a",
                     human_bytes(e.memory["weights"])])
    return "\n".join(table_lines(header, rows, markdown=True)) + "\n"


def list_presets() -> str:
    return "\n".join(f"{p.name:34s} {p.description}" for p in PRESETS.values())
