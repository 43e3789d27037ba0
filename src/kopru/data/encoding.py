"""Samples -> training inputs: token ids with every image expanded, labels on the answers only, and pixels.

Templates:

- "chat": the tokenizer's chat template (`tokenizer.apply_chat_template`) when it has one, otherwise the
  fallback (`kopru.messages.render_fallback`). Loss on the assistant turns, each with the end-of-turn / eos token that closes it, so the
  model learns to stop.
- "plain": the `align` recipe (LLaVA stage 1): bos + "<image>" per image + caption + eos, loss on caption + eos.
  User text other than the images is ignored; the sample must have exactly one assistant message.

With the fallback template the labelled text of a turn is " {answer}{eos}": the space after "Assistant:" belongs
to the answer, so a prompt ending in "Assistant:" (see `SampleEncoder.prompt`) is continued the way BPE
tokenisers split text.

How the labels are found (chat): the conversation is rendered to text once. For each assistant message,
rendering the messages before it with the generation prompt gives where its answer starts, and rendering
through it gives where its turn ends (trailing whitespace left out, the end-of-turn token kept). Both must be
prefixes of the full rendering; a template that rewrites earlier turns when later ones follow (one that drops
earlier reasoning, say) breaks that, and is refused with an error rather than given wrong labels. The text is
tokenised once with each "<image>" still a single special token; a token is labelled when any of its
characters lies in an answer span (offset mapping: BPE merges the space before a word into the word). Only
then is each image token id replaced by the processor's expansion ([start] + [image] * n + [end], exactly the
ids `KopruProcessor.expand` gives), labelled -100.

Nothing is truncated: a sample longer than `max_length` could lose part of an image's positions, so it is an
error or skipped ("too_long"). A sample whose labels are all -100 would train on nothing (LLaVA's silent
"tokenization mismatch" case) and is an error or skipped ("no_loss_tokens").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image

from kopru.data.formats import (
    IMAGE_PLACEHOLDER,
    MALFORMED,
    NO_LOSS_TOKENS,
    PLACEHOLDER_MISMATCH,
    TEMPLATE_ERROR,
    TOO_LONG,
    UNENCODABLE_TEXT,
    UNREADABLE_IMAGE,
    Policy,
    SampleError,
    SkipReport,
    check_policy,
    check_text,
    open_image,
)
from kopru.data.sample import Sample
from kopru.messages import (
    ChatTemplate,
    MessageError,
    Span,
    UnencodableTextError,
    as_string_content,
    count_images,
    render_fallback,
    render_prompt,
    validate_messages,
)
from kopru.processing import KopruProcessor

IGNORE_INDEX = -100
Template = Literal["chat", "plain"]

_UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)  # UnidentifiedImageError is an OSError


@dataclass
class EncodedSample:
    input_ids: torch.Tensor  # LongTensor [L], images expanded
    labels: torch.Tensor  # LongTensor [L], -100 except the answer tokens
    pixel_values: torch.Tensor  # [num_images, 3, H, W]; [0, 3, H, W] for a text-only sample
    id: str | None = None
    strategy: str = "projection"  # the model's strategy: packing is refused for cross_attention
    # anyres / dynamic resolution: [num_images, 2] original (height, width); pixel_values then hold each image's
    # views [num_images, views, 3, S, S] (anyres) or its resized pixels [num_images, 3, H, W] (dynamic).
    image_sizes: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_images(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def has_image(self) -> bool:
        return self.num_images > 0


class TemplateMismatchError(ValueError):
    """The chat template does not render a conversation as a prefix of its continuation."""


class SampleEncoder:
    """`Sample` -> `EncodedSample` with one template (see the module docstring); skips are counted in `report`."""

    def __init__(
        self,
        processor: KopruProcessor,
        template: Template = "chat",
        max_length: int | None = None,
        policy: Policy = "error",
        report: SkipReport | None = None,
    ) -> None:
        if template not in ("chat", "plain"):
            raise ValueError(f"template must be 'chat' or 'plain', found {template!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if not self.tokenizer.is_fast:
            raise ValueError(
                f"SampleEncoder needs a fast tokenizer (for its offset mapping), found {type(self.tokenizer).__name__}"
            )
        self.template = template
        self.max_length = max_length
        self.policy = check_policy(policy)
        self.report = report if report is not None else SkipReport()
        self.image_token = processor.config.image_token
        self.image_token_id = processor.config.image_token_id
        # The ids of one expanded image, from the processor's own text expansion: the two can never disagree.
        # anyres / dynamic resolution count each image from its size: its ids are made per image (`_image_ids`).
        self.image_ids = None if processor.high_resolution is not None else torch.tensor(
            self.tokenizer(processor.expand(self.image_token), add_special_tokens=False)["input_ids"]
        )
        self.chat_template = ChatTemplate.of(self.tokenizer, self.image_token) if template == "chat" else None
        self.uses_chat_template = self.chat_template is not None
        self._bos = self.tokenizer.bos_token or ""
        self._eos = self.tokenizer.eos_token or ""
        if not self.uses_chat_template and not self._eos:
            raise ValueError(f"the {template!r} template ends each answer with eos, but the tokenizer has no eos token")
        if self.uses_chat_template:
            # Training only: inference (`kopru.messages.render_prompt`) serves any template as it is.
            self._check_template_ends_turns()

    # ------------------------------------------------------------------------------------------------- public
    def encode(self, sample: Sample) -> EncodedSample | None:
        """The sample's training inputs; None when it is skipped (policy "skip", counted in `report`)."""
        try:
            return self._encode(sample)
        except SampleError as error:
            self.report.handle(error, self.policy)
            return None

    def encode_or_raise(self, sample: Sample) -> EncodedSample:
        """The sample's training inputs, or `SampleError` whatever the policy (for callers that count skips
        themselves, such as the trainer's dataset)."""
        return self._encode(sample)

    def encode_all(self, samples: Iterable[Sample]) -> list[EncodedSample]:
        return [encoded for encoded in map(self.encode, samples) if encoded is not None]

    def render(self, sample: Sample) -> tuple[str, list[Span]]:
        """The sample as text (images still one placeholder each) and the character spans that carry labels."""
        messages = self._messages(sample)
        if self.template == "plain":
            return self._render_plain(messages, len(sample.images), _name(sample))
        if self.uses_chat_template:
            return self._render_chat(messages, _name(sample))
        return render_fallback(as_string_content(messages, self.image_token), self._bos, self._eos)

    def prompt(self, messages: list[dict]) -> str:
        """The text to generate an answer from at inference, rendered as in training (`render_prompt`)."""
        return render_prompt(self.processor, validate_messages(messages), self.template)

    # ------------------------------------------------------------------------------------------------ encode
    def _encode(self, sample: Sample) -> EncodedSample:
        name = _name(sample)
        text, spans = self.render(sample)
        check_text(text, name)  # before the tokenizer, whose TypeError would name nothing
        input_ids, labels = self._tokenize(text, spans)
        found = int((input_ids == self.image_token_id).sum())
        if found != len(sample.images):
            raise SampleError(
                PLACEHOLDER_MISMATCH, f"{name}: expected {len(sample.images)} image token(s) after rendering, found "
                f"{found} (the template added or dropped text holding {self.image_token!r})"
            )
        images = [self._open(image, name) for image in sample.images]
        input_ids, labels = self._expand(input_ids, labels, [self._image_ids(image) for image in images])
        if self.max_length is not None and len(input_ids) > self.max_length:
            raise SampleError(
                TOO_LONG, f"{name}: expected at most max_length={self.max_length} tokens, found {len(input_ids)} "
                "after expanding its images (not truncated: that could cut through an image's positions)"
            )
        # Position 0 is never predicted (the loss shifts labels left), so it cannot carry the sample's loss.
        if not bool((labels[1:] != IGNORE_INDEX).any()):
            raise SampleError(
                NO_LOSS_TOKENS, f"{name}: expected at least one answer token to train on, found none labelled "
                f"(template {self.template!r}, roles {[m['role'] for m in sample.messages]})"
            )
        if self.processor.high_resolution is not None:
            pixels = self.processor.high_resolution(images)
            return EncodedSample(input_ids, labels, pixels["pixel_values"], sample.id, self.processor.config.strategy,
                                 image_sizes=pixels["image_sizes"])
        pixel_values = self.processor.image_processor(images)
        return EncodedSample(input_ids, labels, pixel_values, sample.id, self.processor.config.strategy)

    def _image_ids(self, image: Image.Image) -> torch.Tensor:
        """The ids this image expands to (the processor's own expansion of its count)."""
        if self.image_ids is not None:
            return self.image_ids
        text = self.processor.expand(self.image_token, [self.processor.count(image)])
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _messages(self, sample: Sample) -> list[dict]:
        """The sample's messages in the one chat format (`kopru.messages`); its images are `sample.images`, one
        per "<image>" typed in text or image part, in order."""
        name = _name(sample)
        try:
            messages = validate_messages(sample.messages)
        except UnencodableTextError as error:
            raise SampleError(UNENCODABLE_TEXT, f"{name}: {error}") from None
        except MessageError as error:
            raise SampleError(MALFORMED, f"{name}: {error}") from None
        found = count_images(messages)
        if found != len(sample.images):
            raise SampleError(
                PLACEHOLDER_MISMATCH, f"{name}: expected one {IMAGE_PLACEHOLDER!r} or image part per image "
                f"({len(sample.images)} image(s)), found {found}"
            )
        return messages

    def _tokenize(self, text: str, spans: list[Span]) -> tuple[torch.Tensor, torch.Tensor]:
        # The rendered text spells out bos / end-of-turn tokens itself, as apply_chat_template(tokenize=True) assumes.
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
        starts, ends = torch.tensor(encoded["offset_mapping"], dtype=torch.long).view(-1, 2).unbind(-1)
        labelled = torch.zeros_like(input_ids, dtype=torch.bool)
        for start, end in spans:
            labelled |= (starts < end) & (ends > start)
        labelled &= input_ids != self.image_token_id
        return input_ids, input_ids.masked_fill(~labelled, IGNORE_INDEX)

    def _expand(self, input_ids: torch.Tensor, labels: torch.Tensor, image_ids: list[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image token -> its image's expansion (`image_ids`, in order), labels -100 there."""
        ids_pieces, label_pieces, start = [], [], 0
        positions = (input_ids == self.image_token_id).nonzero().flatten().tolist()
        for position, ids in zip(positions, image_ids, strict=True):
            ids_pieces += [input_ids[start:position], ids]
            label_pieces += [labels[start:position], torch.full_like(ids, IGNORE_INDEX)]
            start = position + 1
        ids_pieces.append(input_ids[start:])
        label_pieces.append(labels[start:])
        return torch.cat(ids_pieces), torch.cat(label_pieces)

    def _open(self, image: Image.Image | str | bytes, name: str) -> Image.Image:
        try:
            return open_image(image)
        except _UNREADABLE as error:
            source = image if isinstance(image, str) else type(image).__name__
            raise SampleError(
                UNREADABLE_IMAGE, f"{name}: expected a readable image, found {source!s:.120} that PIL cannot read "
                f"({type(error).__name__}: {error})"
            ) from None

    # ---------------------------------------------------------------------------------------------- templates
    def _render_plain(self, messages: list[dict], num_images: int, name: str) -> tuple[str, list[Span]]:
        answers = [message["content"] for message in as_string_content(messages, self.image_token)
                   if message["role"] == "assistant"]
        if len(answers) != 1:
            raise SampleError(
                MALFORMED, f"{name}: the plain template expects one assistant message (the caption), found "
                f"{len(answers)}"
            )
        head = self._bos + self.image_token * num_images
        body = answers[0] + self._eos
        return head + body, [(len(head), len(head) + len(body))]

    def _apply_template(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.chat_template.render(messages, add_generation_prompt=generation_prompt)

    def _render_chat(self, messages: list[dict], name: str) -> tuple[str, list[Span]]:
        from jinja2 import TemplateError  # a transformers chat template is Jinja; only needed on this path

        try:
            full = self._apply_template(messages, generation_prompt=False)
            spans = []
            for index, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                before = self._apply_template(messages[:index], generation_prompt=True)
                through = self._apply_template(messages[: index + 1], generation_prompt=False)
                _check_prefix(before, full, f"the {index} message(s) before assistant message {index}", name)
                _check_prefix(through, full, f"the messages through assistant message {index}", name)
                spans.append((len(before), max(len(before), len(through.rstrip()))))
        except (TemplateError, ValueError) as error:  # ValueError: a template that renders no image
            if isinstance(error, TemplateMismatchError):
                raise
            raise SampleError(TEMPLATE_ERROR, f"{name}: the chat template refused this conversation: {error}") from None
        return full, spans

    def _check_template_ends_turns(self) -> None:
        """Refuse a chat template that puts nothing after an answer: the model could never learn to stop."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Köprü probe answer"}]
        try:
            text, spans = self._render_chat(probe, "the template probe")
        except SampleError:
            return  # a template with demands of its own (a system turn, say); samples are checked as they come
        answer = text[spans[0][0]:spans[0][1]]
        cut = answer.rfind(probe[1]["content"])
        if cut >= 0 and not answer[cut + len(probe[1]["content"]):].strip():
            raise ValueError(
                "the tokenizer's chat template puts nothing after an assistant message (no end-of-turn or eos "
                "token), so a model trained on it never learns to stop; give the tokenizer a template that ends "
                "assistant turns, or remove it to use the fallback template"
            )


def _check_prefix(prefix: str, full: str, what: str, name: str) -> None:
    if full.startswith(prefix):
        return
    at = next((i for i, (a, b) in enumerate(zip(prefix, full, strict=False)) if a != b), min(len(prefix), len(full)))
    raise TemplateMismatchError(
        f"{name}: the chat template renders {what} as text that is not a prefix of the whole conversation "
        f"(they differ at character {at}: {prefix[at:at + 40]!r} vs {full[at:at + 40]!r}), so the answers "
        "cannot be located for the labels; use a template whose earlier turns do not change when later ones "
        "follow, or template='plain'"
    )


def _name(sample: Sample) -> str:
    return f"sample {sample.id!r}" if sample.id is not None else "sample (no id)"


__all__ = ["IGNORE_INDEX", "EncodedSample", "SampleEncoder", "TemplateMismatchError"]
