"""Real checkpoints in: HF LLaVA, LLaVA-NeXT, BLIP-2 and Llama-3.2-Vision (Mllama) turned into Köprü models.

Each converter module provides `REFERENCE_CLASS` (the HF class it reads), `to_kopru(reference, src)` (a
Köprü model + processor with the same weights) and `random_inputs(reference, model)` (inputs on which both
are run to verify the conversion); a family whose checkpoints ship no chat template also gives `PROMPT_FORMAT`,
the prompt HF users write for it (`--verify` prompts HF with it). Their mappings of weight names are (HF name,
Köprü name) tables (`kopru.convert.common.rename`) that `kopru.export` reads the other way. `convert()` ties
them together.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from kopru.convert.verify import NoChatTemplate, verification_picture, verify_user_path
from kopru.model import KopruForConditionalGeneration
from kopru.paths import check_exists

CONVERTERS = {"llava": "kopru.convert.llava", "llava_next": "kopru.convert.llava_next", "blip2": "kopru.convert.blip2",
              "mllama": "kopru.convert.mllama"}


def converter(kind: str):
    if kind not in CONVERTERS:
        raise ValueError(f"unknown source format {kind!r}; expected one of {sorted(CONVERTERS)}")
    return importlib.import_module(CONVERTERS[kind])


def convert(kind: str, src: str | Path, dst: str | Path | None, verify: bool = False, seed: int = 0) -> dict[str, Any]:
    """Convert the HF checkpoint at `src` into a Köprü model at `dst` (None: in memory only)."""
    module = converter(kind)
    check_exists(str(src), "source checkpoint")
    reference = load_reference(kind, str(src))
    model, processor = module.to_kopru(reference, str(src))
    copy_stop_ids(reference, model)
    report: dict[str, Any] = {"from": kind, "src": str(src), "strategy": model.config.strategy,
                              "image_positions": model.image_count.llm_positions}
    if dst is not None:
        model.save_pretrained(dst, processor)
        report["dst"] = str(dst)
        # Verify what was written, reloaded from disk: it shares no module with the source model.
        model, _ = KopruForConditionalGeneration.from_pretrained(dst, dtype=next(model.llm.parameters()).dtype)
    if verify:
        report["max_abs_diff"] = max_abs_logit_diff(module, reference, model, seed)
        if dst is not None:
            report["user_path"] = user_path_report(reference, str(src), dst,
                                                   prompt_format=getattr(module, "PROMPT_FORMAT", None))
    return report


# The user's path is checked on a wide and a tall picture: resize, crop, tiling and unpadding act on both axes.
VERIFY_SIZES = ((200, 120), (96, 160))


def user_path_report(reference, src: str, dst: str | Path, sizes=VERIFY_SIZES,
                     prompt_format: str | None = None) -> dict[str, Any]:
    """`kopru.convert.verify` on each size: {"passed", "failure" (the first divergence), "checks": [...]}; a
    source without a chat template and without a family `prompt_format` has no HF prompt to compare with and is
    reported as skipped."""

    checks = []
    for width, height in sizes:
        try:
            checks.append(verify_user_path(reference, src, dst, verification_picture(width, height),
                                           prompt_format=prompt_format).as_dict())
        except NoChatTemplate as error:
            return {"passed": None, "skipped": str(error), "checks": []}
    failure = next((c["failure"] for c in checks if c["failure"] is not None), None)
    if failure is not None:
        failed = next(c for c in checks if c["failure"] is not None)
        failure = f"{failed['image_size'][0]}x{failed['image_size'][1]} image: {failure}"
    return {"passed": failure is None, "failure": failure, "checks": checks}


def copy_stop_ids(reference, model: KopruForConditionalGeneration) -> None:
    """The source's generation_config eos ids (Llama 3.2 Vision stops on <|eot_id|> and <|eom_id|> as well as
    <|end_of_text|>) onto the converted LLM, whose config was rebuilt from the text config and knows only one."""
    eos = getattr(reference.generation_config, "eos_token_id", None)
    if eos is not None:
        model.llm.generation_config.eos_token_id = eos


def load_reference(kind: str, src: str):
    """The source model in its HF class, safetensors only; a checkpoint of another type is refused up front
    (HF would build the class anyway and leave most weights random)."""
    reference_class = converter(kind).REFERENCE_CLASS
    expected = reference_class.config_class.model_type
    try:
        found = AutoConfig.from_pretrained(src).model_type
    except OSError as error:
        raise FileNotFoundError(f"expected a {expected} checkpoint (config.json) at {src!r}: {error}") from None
    if found != expected:
        raise ValueError(f"--from {kind} expects a checkpoint of model_type {expected!r}, found {found!r} at {src!r}")
    return reference_class.from_pretrained(src, use_safetensors=True)


@torch.no_grad()
def max_abs_logit_diff(module, reference, model, seed: int = 0) -> float:
    """Largest |logit difference| between the source model and its conversion on the same random inputs."""
    torch.manual_seed(seed)
    reference.eval()
    model.eval()
    reference_inputs, kopru_inputs = module.random_inputs(reference, model)
    expected = reference(**reference_inputs).logits.float()
    found = model(**kopru_inputs).logits.float()
    vocab = min(expected.shape[-1], found.shape[-1])
    return float((expected[..., :vocab] - found[..., :vocab]).abs().max())
