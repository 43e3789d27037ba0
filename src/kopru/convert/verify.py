"""`kopru convert --verify`: the user's path through HF and through Köprü, side by side.

Random pixel tensors and token ids cannot see a wrong resize, a wrong crop or a prompt rendered differently. The
check here draws a non-square picture, asks "What is shown?" as a chat message, and runs it

* through HF: `AutoProcessor.from_pretrained(src)`, its chat template (the processor's, else the tokenizer's;
  for a family whose checkpoints ship none, BLIP-2, the prompt HF users write: "Question: ... Answer:"),
  the processor's text + image call with special tokens as `apply_chat_template(tokenize=True)` decides them
  (`hf_adds_special_tokens`), and the HF model (`generate`, greedy);
* through Köprü: the converted model reloaded from `dst`, `format_chat` (kopru.messages) and Köprü's processor,
  and `GenerationEngine` (what `kopru chat` and `kopru serve` run).

It reports equal input ids, the max pixel difference (over what both layouts hold, see `compare_pixels`), the
max logit difference at the last prompt position, and whether the first `new_tokens` greedy tokens are the same.
The last position, not all: Mllama rows before the image get cross-attention output in HF and none in Köprü
(see kopru.convert.mllama), which no generated token depends on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from transformers import AutoProcessor

from kopru.generation import GenerationEngine, SamplingParams, format_chat
from kopru.model import KopruForConditionalGeneration

QUESTION = "What is shown?"
TOLERANCE = 1e-4  # float32 sums in another order; anything a preprocessing or prompt difference makes is larger
DEFAULT_SIZE = (200, 120)  # (width, height): non-square, neither side a multiple of any tile size in use


def verification_picture(width: int = DEFAULT_SIZE[0], height: int = DEFAULT_SIZE[1]) -> Image.Image:
    """A deterministic picture with a few coloured shapes (a resize or crop difference moves their edges)."""
    image = Image.new("RGB", (width, height), (235, 225, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.05, height * 0.1, width * 0.45, height * 0.8), fill=(200, 30, 40))
    draw.rectangle((width * 0.5, height * 0.2, width * 0.9, height * 0.6), fill=(30, 90, 200))
    draw.polygon([(width * 0.6, height * 0.95), (width * 0.95, height * 0.65), (width * 0.3, height * 0.7)],
                 fill=(40, 160, 60))
    draw.line((0, height - 1, width - 1, 0), fill=(20, 20, 20), width=max(1, height // 30))
    return image


class NoChatTemplate(ValueError):
    """The source has no chat template: HF has no chat prompt to compare Köprü's with."""


@dataclass
class Verification:
    """The figures of one check; `failure` names the first divergence (None: everything agreed)."""

    image_size: tuple[int, int]
    template: str
    input_ids_equal: bool
    pixels_compared: str
    max_pixel_diff: float
    max_logit_diff: float
    logits_compared: str
    new_tokens: int
    hf_tokens: list[int]
    kopru_tokens: list[int]
    tokens_equal: bool
    failure: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"image_size": list(self.image_size), "template": self.template,
                "input_ids_equal": self.input_ids_equal, "pixels_compared": self.pixels_compared,
                "max_pixel_diff": self.max_pixel_diff, "max_logit_diff": self.max_logit_diff,
                "logits_compared": self.logits_compared, "new_tokens": self.new_tokens,
                "hf_tokens": self.hf_tokens, "kopru_tokens": self.kopru_tokens, "tokens_equal": self.tokens_equal,
                "passed": self.failure is None, "failure": self.failure}


def hf_prompt(processor, src: str, prompt_format: str | None = None) -> tuple[str, str]:
    """(prompt, where it came from) as an HF user writes it: the processor's chat template, else the tokenizer's;
    a checkpoint with neither is prompted with its family's `prompt_format` (BLIP-2's "Question: {question}
    Answer:", the image tokens added by HF's processor) or, without one, has no HF prompt to compare `kopru
    chat`'s with (`NoChatTemplate`)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    tokenizer = getattr(processor, "tokenizer", processor)
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True), "the processor's chat template"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), \
            "the tokenizer's chat template"
    if prompt_format is not None:
        return prompt_format.format(question=QUESTION), f"the family's prompt {prompt_format!r} (no chat template)"
    raise NoChatTemplate(
        f"expected a chat template in {src} (chat_template.jinja, chat_template.json or tokenizer_config.json's "
        "chat_template), found none: HF has no chat prompt to compare `kopru chat` with. Add the template the "
        "model was trained with"
    )


def hf_adds_special_tokens(prompt: str, tokenizer) -> bool:
    """Whether HF's processor tokenises a rendered chat prompt with the tokenizer's special tokens: transformers'
    `apply_chat_template(tokenize=True)` does so exactly when the prompt does not start with the bos (a template
    that prints the bos gets no second one from a tokenizer that adds it)."""
    return not (tokenizer.bos_token is not None and prompt.startswith(tokenizer.bos_token))


def compare_pixels(hf: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> tuple[float, str, str | None]:
    """(max |difference|, what was compared, a divergence or None), across the families' layouts:
    fixed size [images, 3, H, W]; LLaVA-NeXT patches [images, patches, 3, H, W] + image_sizes (HF pads the
    patch axis of a batch, one image here); Mllama tiles (HF [batch, images, max_tiles, 3, H, W] + aspect-ratio
    ids and masks, Köprü [images, max_tiles, 3, H, W] + the images' sizes)."""
    expected, found = hf["pixel_values"].float(), ours["pixel_values"].float()
    expected = expected.reshape(-1, *expected.shape[-3:])
    found = found.reshape(-1, *found.shape[-3:])
    if expected.shape != found.shape:
        return float("inf"), "pixel_values", (f"pixel layouts differ: HF {tuple(hf['pixel_values'].shape)}, "
                                               f"Köprü {tuple(ours['pixel_values'].shape)}")
    diff = float((expected - found).abs().max())
    what = f"pixel_values ({found.shape[0]} x {tuple(found.shape[1:])})"
    failure = None if diff <= TOLERANCE else f"pixel values differ by up to {diff:.3g} (tolerance {TOLERANCE})"
    if "image_sizes" in hf and "image_sizes" in ours:
        what += ", image_sizes"
        if hf["image_sizes"].tolist() != ours["image_sizes"].tolist() and failure is None:
            failure = f"image sizes differ: HF {hf['image_sizes'].tolist()}, Köprü {ours['image_sizes'].tolist()}"
    for key in ("aspect_ratio_ids", "aspect_ratio_mask"):
        if key in hf and key in ours:
            what += f", {key}"
            if not torch.equal(hf[key], ours[key]) and failure is None:
                failure = f"{key} differ: HF {hf[key].tolist()}, Köprü {ours[key].tolist()}"
    return diff, what, failure


def first_difference(expected: list[int], found: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(expected, found, strict=False)) if a != b),
                min(len(expected), len(found)))


@dataclass
class UserPath:
    """One side's figures on the user's path, as `compare_user_paths` compares them."""

    input_ids: list[int]
    pixels: dict[str, torch.Tensor]  # pixel_values (+ image_sizes, aspect-ratio ids and masks) in HF's layout
    last_logits: torch.Tensor  # [vocab] at the last prompt position
    tokens: list[int]  # the greedy answer's tokens, its stop token not included


def answer_tokens(new_tokens: list[int], eos_token_id: int | list[int] | None) -> list[int]:
    """HF's generated ids up to the first stop id, which `generate` keeps and Köprü's engine does not count as
    part of the answer (Completion.token_ids)."""
    stops = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    return next((new_tokens[:at] for at, token in enumerate(new_tokens) if token in stops), new_tokens)


def chat_messages(image: Image.Image | None, question: str = QUESTION) -> list[dict]:
    """The verification's one user turn: the image (if any) then the question."""
    parts = [] if image is None else [{"type": "image", "image": image}]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


@torch.no_grad()
def kopru_user_path(model, processor, image: Image.Image, new_tokens: int, hf_keys=(), image_first: bool = False
                    ) -> UserPath:
    """What `kopru chat` does with the chat question on `image`: `format_chat`, Köprü's processor, the model's
    last-position logits and `GenerationEngine`'s greedy tokens. `hf_keys`: the keys HF's processor returned,
    so that Mllama's tiles are laid out as HF's. `image_first`: the image in front of the whole rendered prompt
    (BLIP-2's processor puts its query tokens there) instead of where the message has it."""

    model.eval()
    if image_first:
        text, _ = format_chat(processor, chat_messages(None))
        prompt, images = processor.config.image_token + text, [image]
    else:
        prompt, images = format_chat(processor, chat_messages(image))
    ours = processor(prompt, [images], add_special_tokens=False)
    comparable = {k: v for k, v in ours.items() if k not in ("input_ids", "attention_mask")}
    tiled = getattr(processor.high_resolution, "tiled", None) if processor.high_resolution else None
    if tiled is not None and "aspect_ratio_ids" in hf_keys:  # Mllama: Köprü's ids and masks in HF's layout
        comparable.update({k: v for k, v in tiled.hf_inputs([images]).items() if k.startswith("aspect_ratio")})
        comparable.pop("image_sizes", None)  # Köprü's are the images' sizes; HF's layout carries none
    logits = model(**ours).logits[0, -1].float()
    engine = GenerationEngine(model, processor)
    completion = engine.complete([prompt], [images], SamplingParams(max_new_tokens=new_tokens, temperature=0.0))[0]
    return UserPath(ours["input_ids"][0].tolist(), comparable, logits, list(completion.token_ids))


def compare_user_paths(hf: UserPath, ours: UserPath, image_size: tuple[int, int], template: str,
                       new_tokens: int) -> Verification:
    """Input ids, pixels, last-position logits and greedy tokens of both sides; `failure` names the first
    divergence."""
    expected_ids, found_ids = hf.input_ids, ours.input_ids
    ids_equal = expected_ids == found_ids
    failure = None
    if not ids_equal:
        at = first_difference(expected_ids, found_ids)
        show = lambda ids: ids[at] if at < len(ids) else "end of prompt"  # noqa: E731
        failure = (f"input ids differ at position {at}: HF {show(expected_ids)}, Köprü {show(found_ids)} "
                   f"(HF {len(expected_ids)} ids, Köprü {len(found_ids)})")
    pixel_diff, pixels_compared, pixel_failure = compare_pixels(hf.pixels, ours.pixels)
    failure = failure or pixel_failure
    vocab = min(hf.last_logits.shape[-1], ours.last_logits.shape[-1])  # Mllama: Köprü's 8 extra rows are never HF's
    logit_diff = float((hf.last_logits[:vocab] - ours.last_logits[:vocab]).abs().max()) if ids_equal \
        else float("nan")
    if failure is None and logit_diff > TOLERANCE:
        failure = f"last-position logits differ by up to {logit_diff:.3g} (tolerance {TOLERANCE})"
    # Both are the answer before its stop token (`answer_tokens`). HF stops on its generation_config's eos only,
    # Köprü also on the template's end-of-turn token: where HF goes on past one, the answers differ.
    tokens_equal = hf.tokens == ours.tokens
    if failure is None and not tokens_equal:
        at = first_difference(hf.tokens, ours.tokens)
        show = lambda ids: ids[at] if at < len(ids) else "stopped"  # noqa: E731
        failure = f"greedy tokens differ at new token {at}: HF {show(hf.tokens)}, Köprü {show(ours.tokens)}"
    return Verification(image_size=image_size, template=template, input_ids_equal=ids_equal,
                        pixels_compared=pixels_compared, max_pixel_diff=pixel_diff, max_logit_diff=logit_diff,
                        logits_compared="last prompt position", new_tokens=new_tokens, hf_tokens=hf.tokens,
                        kopru_tokens=ours.tokens, tokens_equal=tokens_equal, failure=failure)


@torch.no_grad()
def verify_user_path(reference, src: str, dst: str | Path, image: Image.Image | None = None,
                     new_tokens: int = 8, prompt_format: str | None = None) -> Verification:
    """Run the chat question on `image` through HF (`reference` loaded from `src`) and through the conversion
    saved at `dst`; see the module docstring. `prompt_format`: the HF prompt of a source without a chat template
    (the converter's `PROMPT_FORMAT`)."""

    image = verification_picture() if image is None else image
    processor = AutoProcessor.from_pretrained(src)
    prompt, template = hf_prompt(processor, src, prompt_format)
    try:
        hf_inputs = processor(images=[image], text=prompt, return_tensors="pt",
                              add_special_tokens=hf_adds_special_tokens(prompt, getattr(processor, "tokenizer",
                                                                                        processor)))
    except ValueError as error:  # e.g. a template that prints no image token for the image part
        raise ValueError(f"HF's processor (AutoProcessor from {src}) refuses the prompt {template} rendered for "
                         f"one image part, {prompt!r}: {error}") from None
    reference.eval()
    try:
        expected_logits = reference(**hf_inputs).logits[0, -1].float()
    except ValueError as error:  # the source's own processor settings do not fit its model
        raise ValueError(f"HF's own processor (AutoProcessor from {src}) and model disagree, so there is nothing "
                         f"to compare with: {error}") from None
    generated = reference.generate(**hf_inputs, max_new_tokens=new_tokens, do_sample=False)
    hf = UserPath(hf_inputs["input_ids"][0].tolist(), dict(hf_inputs), expected_logits,
                  answer_tokens(generated[0, hf_inputs["input_ids"].shape[1]:].tolist(),
                                reference.generation_config.eos_token_id))

    dtype = next(reference.parameters()).dtype
    model, kopru_processor = KopruForConditionalGeneration.from_pretrained(dst, dtype=dtype)
    ours = kopru_user_path(model, kopru_processor, image, new_tokens, hf_keys=set(hf_inputs))
    return compare_user_paths(hf, ours, image.size, template, new_tokens)
