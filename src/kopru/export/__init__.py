"""Köprü models out: ordinary Hugging Face LLaVA, LLaVA-NeXT, BLIP-2 and Llama-3.2-Vision (Mllama) checkpoints.

The inverse of `kopru.convert`. Each target module provides

* `HF_CLASS`, the transformers class the checkpoint is for;
* `check(config, encoder_config, llm_config)`, which raises `ExportRefused` (one line: what does not fit the
  target and what would) from the configs alone, before any weight is read or anything written;
* `build(model, processor)` -> (the HF model holding the Köprü model's weights, the HF processor), the weights
  renamed through the same (HF name, Köprü name) tables `kopru convert` reads the other way.

`export()` ties them together: refusals first, then the checkpoint is written by the HF classes' own
`save_pretrained` into a temporary folder beside DST and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from kopru.config import KopruConfig
from kopru.export.verify import verify_export
from kopru.model import KopruForConditionalGeneration
from kopru.paths import atomic_directory

TARGETS = {"llava": "kopru.export.llava", "llava_next": "kopru.export.llava_next", "blip2": "kopru.export.blip2",
           "mllama": "kopru.export.mllama"}
CONFIG_FILE = "kopru_config.json"  # kopru.model.CONFIG_FILE, without importing the model for a refusal


class ExportRefused(ValueError):
    """The model (or the destination) does not fit: one line naming what does not fit and what would."""


def exporter(target: str):
    if target not in TARGETS:
        raise ValueError(f"unknown export target {target!r}; expected one of {sorted(TARGETS)}")
    return importlib.import_module(TARGETS[target])


def read_source(src: Path) -> tuple[KopruConfig, Any, Any]:
    """(Köprü config, encoder config, LLM config) of a saved whole Köprü model; anything else is refused."""
    if not src.is_dir():
        raise FileNotFoundError(f"expected a Köprü model directory at {src}, found "
                                f"{'a file' if src.exists() else 'nothing'}")
    if not (src / CONFIG_FILE).is_file():
        if (src / "config.json").is_file():
            found = json.loads((src / "config.json").read_text()).get("model_type")
            raise ExportRefused(f"{src} is a Hugging Face checkpoint (config.json, model_type {found!r}), not a "
                                f"Köprü model: expected {CONFIG_FILE}; there is nothing to export (`kopru convert` "
                                "brings one in)")
        raise ExportRefused(f"{src} is not a Köprü model: expected {CONFIG_FILE} (what save_pretrained and kopru "
                            f"train write), found {sorted(p.name for p in src.iterdir())[:8]}")
    config = KopruConfig.load(src / CONFIG_FILE)
    parts = {"vision": config.vision.name_or_path, "llm": config.llm}
    if any(not (src / name).is_dir() or path != name for name, path in parts.items()):
        raise ExportRefused(
            f"{src} is a connector-only checkpoint (stage 1: only {config.strategy} connector weights, the backbones "
            f"are {config.vision.name_or_path!r} and {config.llm!r}); export the full model: load it onto its "
            "backbones (KopruForConditionalGeneration.from_backbones, then load_connector) and save_pretrained it, "
            "or train stage 2 from it (kopru train --init-connector)"
        )
    return config, AutoConfig.from_pretrained(src / "vision"), AutoConfig.from_pretrained(src / "llm")


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    src, dst = src.resolve(), dst.resolve()
    if dst == src or src.is_relative_to(dst) or dst.is_relative_to(src):
        raise ExportRefused(f"the destination {dst} and the source {src} overlap; expected a folder outside the "
                            "Köprü model (writing there would replace or change the model being exported)")
    if dst.exists() and not dst.is_dir():
        raise ExportRefused(f"the destination {dst} is a file; expected a new or empty folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ExportRefused(f"the destination {dst} exists and is not empty; expected a new or empty folder "
                            "(--overwrite replaces it)")


def export(target: str, src: str | Path, dst: str | Path, verify: bool = False, overwrite: bool = False,
           new_tokens: int = 8) -> dict[str, Any]:
    """Write the Köprü model at `src` as an HF `target` checkpoint at `dst`; with `verify`, compare them on the
    user's path (kopru.export.verify). Refusals raise ExportRefused (a ValueError) before anything is written."""
    module = exporter(target)
    src, dst = Path(src), Path(dst)
    config, encoder_config, llm_config = read_source(src)
    check_destination(src, dst, overwrite)
    module.check(config, encoder_config, llm_config)

    report: dict[str, Any] = {"to": target, "src": str(src), "dst": str(dst), "hf_class": module.HF_CLASS.__name__,
                              "strategy": config.strategy, **_write(module, src, dst)}
    if verify:
        report["verify"] = verify_export(target, src, dst, new_tokens=new_tokens)
    return report


def _write(module, src: Path, dst: Path) -> dict[str, Any]:
    """Load, build and save; the models are released on return (verify reloads both sides from disk)."""

    model, processor = KopruForConditionalGeneration.from_pretrained(src)
    hf_model, hf_processor = module.build(model, processor)
    with atomic_directory(dst) as staging:
        hf_model.save_pretrained(staging)
        hf_processor.save_pretrained(staging)
    return {"parameters": sum(p.numel() for p in hf_model.parameters()),
            "files": sorted(p.name for p in dst.iterdir())}
