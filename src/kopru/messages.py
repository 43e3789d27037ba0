"""One chat-message format for every way into a model: `kopru chat`, `kopru serve`, `format_chat` and training.

A conversation is a list of OpenAI-style messages::

    {"role": "system" | "user" | "assistant", "content": str | [part, ...]}

    part: {"type": "text", "text": str}
        | {"type": "image", "image": <PIL image, path or bytes>}         (Köprü / HF style; the image is optional)
        | {"type": "image_url", "image_url": {"url": str} | str}         (OpenAI style)

An image is either a part or, where the caller allows it (`text_placeholders=True`: the chat CLI, training
data), an "<image>" typed in text. `validate_messages` is the only validator: it returns the messages in one
canonical form (string content kept as it is, parts reduced to {"type": "text", "text"} and
{"type": "image", "image"}) or raises `MessageError`, which names the offending field (`param`).

Rendering (`ChatTemplate`): HF VLM checkpoints ship templates that iterate over list content
(`message['content'] | selectattr('type', 'equalto', 'image')`) and print their own image token; text-only
templates print `message['content']` as a string. Which one a template is, is found from what it renders
(a probe conversation rendered both ways: whichever prints the model's image token once), not from its name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kopru.data.formats import IMAGE_PLACEHOLDER, lone_surrogate

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
Form = Literal["list", "string"]
Message = dict[str, Any]
# (image source, 1-based image number in the conversation, where) -> the decoded image. Serve decodes URLs.
ImageResolver = Callable[[Any, int, str], Any]

Span = tuple[int, int]  # [start, end) character offsets of labelled text
# Köprü's fallback chat template, for tokenizers without one (base LLMs); bos and eos are the tokenizer's own:
#     {bos}System: {system}\n
#     User: {user}\n
#     Assistant: {answer}{eos}\n
FALLBACK_HEADS = {"system": "System:", "user": "User:", "assistant": "Assistant:"}

_PROBE_TEXT = "Köprü probe"
_PROBE_ANSWER = "Köprü probe answer"


class MessageError(ValueError):
    """A malformed message; `param` is where (e.g. "messages[0].content[1]"), as an OpenAI error names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class UnencodableTextError(MessageError):
    """Text without a UTF-8 form (a lone surrogate): no tokenizer can encode it."""


# ============================================================================================= validation
def validate_messages(messages: Any, *, text_placeholders: bool = True, resolve_image: ImageResolver | None = None,
                      where: str = "messages") -> list[Message]:
    """The canonical form of `messages` (see the module docstring); raises `MessageError`.

    `text_placeholders`: "<image>" typed in text stands for an image (its image is given separately, in order).
    Off for the server, where a client cannot attach an image to text, so a typed "<image>" is refused.
    `resolve_image`: called on each image part's source (a URL for image_url parts); its result is stored.
    """
    if not isinstance(messages, list) or not messages:
        raise MessageError(f"expected '{where}' as a non-empty list of {{'role', 'content'}} objects, found "
                           f"{_show(messages)}", where)
    canonical, images = [], 0
    for index, message in enumerate(messages):
        at = f"{where}[{index}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise MessageError(f"{at}: expected an object with 'role' and 'content', found {_show(message)}", at)
        if message["role"] not in ROLES:
            raise MessageError(f"{at}.role: expected 'system', 'user' or 'assistant', found {message['role']!r}",
                               f"{at}.role")
        content = message["content"]
        if content is None:  # OpenAI allows a null assistant content (tool calls); it renders as nothing
            content = ""
        if isinstance(content, str):
            _check_text(content, text_placeholders, f"{at}.content")
            images += content.count(IMAGE_PLACEHOLDER)
            canonical.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise MessageError(f"{at}.content: expected a string or a list of parts, found "
                               f"{type(content).__name__}", f"{at}.content")
        parts = []
        for number, part in enumerate(content):
            part_at = f"{at}.content[{number}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                _check_text(part["text"], text_placeholders, f"{part_at}.text")
                images += part["text"].count(IMAGE_PLACEHOLDER)
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image", "image_url"):
                images += 1
                source = _image_source(part, part_at)
                if resolve_image is not None:
                    source = resolve_image(source, images, part_at)
                parts.append({"type": "image", "image": source})
            else:
                raise MessageError(
                    f"{part_at}: expected {{'type': 'text', 'text': str}}, {{'type': 'image', 'image': ...}} or "
                    f"{{'type': 'image_url', 'image_url': {{'url': str}}}}, found {_show(part)}", part_at)
        canonical.append({"role": message["role"], "content": parts})
    return canonical


def _check_text(text: str, placeholders: bool, at: str) -> None:
    if (problem := lone_surrogate(text)) is not None:
        raise UnencodableTextError(f"{at}: expected text encodable as UTF-8, found {problem}", at)
    if not placeholders and IMAGE_PLACEHOLDER in text:
        raise MessageError(f"{at}: found {IMAGE_PLACEHOLDER!r} typed in the text; expected images as image_url "
                           "parts (the text cannot carry one)", at)


def _image_source(part: dict, at: str) -> Any:
    if part["type"] == "image_url":
        spec = part.get("image_url")
        if spec is None and part.get("image") is not None:  # already decoded by the caller
            return part["image"]
        if spec is not None and not isinstance(spec, dict | str):  # an image object in place of the URL
            return spec
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str):
            raise MessageError(f"{at}.image_url: expected {{'url': <string>}}, found {_show(spec)}", f"{at}.image_url")
        return url
    # HF's own image blocks carry the image under "image", "url" or "path"; none at all is a bare placeholder.
    return next((part[key] for key in ("image", "url", "path") if part.get(key) is not None), None)


def _show(value: Any) -> str:
    if isinstance(value, str):  # a long text is cut before it is quoted, not after
        value = value[:80]
    try:
        return json.dumps(value)[:80]
    except (TypeError, ValueError):
        return f"{value!r:.80}"


def images_of(messages: list[Message]) -> list[Any]:
    """The images the parts carry, in order (placeholders typed in text carry none: their images come apart)."""
    return [part["image"] for message in messages if isinstance(message["content"], list)
            for part in message["content"] if part["type"] == "image" and part["image"] is not None]


def count_text_chars(messages: list[Message]) -> int:
    """Characters of text in canonical messages (string content and text parts): what a server bounds before
    anything is tokenized."""
    return sum(len(message["content"]) if isinstance(message["content"], str) else
               sum(len(part["text"]) for part in message["content"] if part["type"] == "text")
               for message in messages)


def count_images(messages: list[Message]) -> int:
    """Images the conversation refers to: image parts plus "<image>" typed in text."""
    total = 0
    for message in messages:
        content = message["content"]
        pieces = [content] if isinstance(content, str) else content
        for piece in pieces:
            if isinstance(piece, str):
                total += piece.count(IMAGE_PLACEHOLDER)
            elif piece["type"] == "text":
                total += piece["text"].count(IMAGE_PLACEHOLDER)
            else:
                total += 1
    return total


# =============================================================================================== two forms
def as_string_content(messages: list[Message], image_token: str) -> list[dict[str, str]]:
    """Text-only templates: each image as `image_token` in the text. Parts are joined with a newline where
    neither side already has whitespace ("<image>\\nWhat is this?"), so text typed around an image stays as typed."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            text = ""
            for part in content:
                piece = IMAGE_PLACEHOLDER if part["type"] == "image" else part["text"]
                if text and piece and not text[-1].isspace() and not piece[0].isspace():
                    text += "\n"
                text += piece
            content = text
        out.append({"role": message["role"], "content": content.replace(IMAGE_PLACEHOLDER, image_token)})
    return out


def as_list_content(messages: list[Message]) -> list[dict[str, Any]]:
    """Multimodal templates: content as [{"type": "image"}, {"type": "text", "text": ...}] in order, as HF's
    processors pass it (the image objects are left out: a template prints its own image token)."""
    out = []
    for message in messages:
        content = message["content"]
        parts: list[dict[str, Any]] = []
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if part["type"] == "image":
                parts.append({"type": "image"})
                continue
            pieces = part["text"].split(IMAGE_PLACEHOLDER)
            for number, piece in enumerate(pieces):
                if number:
                    parts.append({"type": "image"})
                    # "<image>\n" is the conventional separator in string form; list templates print their own.
                    piece = piece.removeprefix("\n")
                if piece:
                    parts.append({"type": "text", "text": piece})
        out.append({"role": message["role"], "content": parts})
    return out


# ============================================================================================== templates
def chat_template_file(tokenizer) -> str:
    """Where the tokenizer's template was read from, for error messages."""
    directory = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if (directory / name).is_file():
            return str(directory / name)
    return "the tokenizer's chat_template (in memory)"


def source_chat_template(src: str | Path) -> tuple[str, str] | None:
    """The chat template an HF checkpoint directory ships for its processor, as HF's AutoProcessor reads it:
    chat_template.jinja (transformers 5) before the legacy chat_template.json. (template, file) or None;
    the tokenizer's own template (tokenizer_config.json) is the tokenizer's business."""
    src = Path(src)
    if (src / "chat_template.jinja").is_file():
        return (src / "chat_template.jinja").read_text(encoding="utf-8"), str(src / "chat_template.jinja")
    if (src / "chat_template.json").is_file():
        data = json.loads((src / "chat_template.json").read_text(encoding="utf-8"))
        template = data.get("chat_template") if isinstance(data, dict) else None
        if not isinstance(template, str):
            raise ValueError(f"{src / 'chat_template.json'}: expected {{'chat_template': <string>}}, found "
                             f"{_show(data)}")
        return template, str(src / "chat_template.json")
    return None


@dataclass
class ChatTemplate:
    """A tokenizer's Jinja chat template, rendered in the content form it expects (see the module docstring)."""

    tokenizer: Any
    image_token: str
    template: str
    file: str

    @classmethod
    def of(cls, tokenizer, image_token: str) -> ChatTemplate | None:
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: HF uses "default"
            template = template.get("default")
        if not template:
            return None
        return cls(tokenizer, image_token, template, chat_template_file(tokenizer))

    def __post_init__(self) -> None:
        self._form: Form | None = None
        self._text_only_form: Form | None = None
        self._bos_printed: bool | None = None
        self._bos_added: bool | None = None

    # ------------------------------------------------------------------------------------------------ render
    def render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        """The conversation as text, with the tokenizer's bos in front when the tokenizer would add one and the
        template does not print it (HF's processor tokenises the rendered prompt with special tokens then). A
        template that prints the bos anywhere places it itself: BLIP-2's puts the image's query tokens before it."""
        form = self.form if count_images(messages) else self._text_form()
        text = self._render(messages, form, add_generation_prompt)
        bos = self.tokenizer.bos_token
        if bos and self._adds_bos and not text.startswith(bos) and not self._prints_bos:
            text = bos + text
        return text

    def _render(self, messages: list[Message], form: Form, add_generation_prompt: bool) -> str:
        content = as_list_content(messages) if form == "list" else as_string_content(messages, self.image_token)
        return self.tokenizer.apply_chat_template(content, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    @property
    def _adds_bos(self) -> bool:
        """Whether the tokenizer puts its bos in front of text; asked once: two tokenizer calls on every render
        made encoding a built-in training sample take 0.60 ms instead of 0.48 (one thread, idle)."""
        if self._bos_added is None:
            bos = self.tokenizer.bos_token_id
            with_special = self.tokenizer("a", add_special_tokens=True)["input_ids"]
            self._bos_added = bos is not None and with_special[:1] == [bos] and \
                self.tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]
        return self._bos_added

    @property
    def _prints_bos(self) -> bool:
        """Whether the template prints the bos itself, found from a text-only probe (which holds no bos)."""
        if self._bos_printed is None:
            probe = [{"role": "user", "content": _PROBE_TEXT}]
            try:
                self._bos_printed = self.tokenizer.bos_token in self._render(probe, self._text_form(), True)
            except Exception:  # noqa: BLE001 - a template with demands of its own (a system turn, say)
                self._bos_printed = False
        return self._bos_printed

    # ------------------------------------------------------------------------------------------------- form
    @property
    def form(self) -> Form:
        """"list" or "string": whichever form makes the template print the image token for an image."""
        if self._form is None:
            probe = [{"role": "user", "content": [{"type": "image", "image": None},
                                                  {"type": "text", "text": _PROBE_TEXT}]}]
            found = {}
            for form in ("list", "string"):
                try:
                    found[form] = self._render(probe, form, True).count(self.image_token)
                except Exception as error:  # noqa: BLE001 - a template may raise anything (raise_exception)
                    found[form] = f"an error ({type(error).__name__}: {error})"
            chosen = next((form for form in ("list", "string") if found[form] == 1), None)
            if chosen is None:
                raise ValueError(
                    f"the chat template in {self.file} renders no image: expected one {self.image_token!r} for the "
                    f"image of a user message, found {found['list']} when the image is a {{'type': 'image'}} part "
                    f"of list content and {found['string']} when it is {self.image_token!r} in string content; "
                    "give the model a template that prints the image token for image parts"
                )
            self._form = chosen
        return self._form

    @property
    def text_form(self) -> Form:
        """The form a conversation without images is rendered in (see `_text_form`)."""
        return self._text_form()

    def _text_form(self) -> Form:
        """The form for a text-only conversation: the image probe's when the template renders images, else the
        one that prints the text (a list-content template prints nothing of a string, a string template prints
        a list's repr)."""
        if self._text_only_form is None:
            try:
                self._text_only_form = self.form
            except ValueError:
                self._text_only_form = "string"
                probe = [{"role": "user", "content": _PROBE_TEXT}]
                for form in ("list", "string"):
                    try:
                        text = self._render(probe, form, True)
                    except Exception:  # noqa: BLE001, S112 - a template may raise anything; try the other form
                        continue
                    if _PROBE_TEXT in text and "'type'" not in text:
                        self._text_only_form = form
                        break
        return self._text_only_form

    # -------------------------------------------------------------------------------------- end of turn
    def end_of_turn_ids(self) -> list[int]:
        """The special token the template prints right after an assistant message (`<|eot_id|>`, `<|im_end|>`,
        `</s>`), which generation must stop on; none when it prints nothing there (LLaVA-1.5) or plain text."""
        probe = [{"role": "user", "content": _PROBE_TEXT}, {"role": "assistant", "content": _PROBE_ANSWER}]
        try:
            text = self._render(probe, self._text_form(), False)
        except Exception:  # noqa: BLE001 - a template with demands of its own (a system turn, say)
            return []
        cut = text.rfind(_PROBE_ANSWER)
        tail = text[cut + len(_PROBE_ANSWER):].lstrip() if cut >= 0 else ""
        if not tail:
            return []
        first = self.tokenizer(tail, add_special_tokens=False)["input_ids"][:1]
        special = set(self.tokenizer.all_special_ids) | {
            index for index, token in self.tokenizer.added_tokens_decoder.items() if token.special}
        return [first[0]] if first and first[0] in special else []


def render_fallback(messages: list[dict[str, str]], bos: str, eos: str) -> tuple[str, list[Span]]:
    """Köprü's fallback chat template (FALLBACK_HEADS above) on string content; the labelled spans."""
    text, spans = bos, []
    for message in messages:
        text += FALLBACK_HEADS[message["role"]]
        if message["role"] == "assistant":
            body = " " + message["content"] + eos
            spans.append((len(text), len(text) + len(body)))
            text += body + "\n"
        else:
            text += " " + message["content"] + "\n"
    return text, spans


def fallback_chat_template(bos: str, eos: str) -> str:
    """`render_fallback` and the generation prompt (`FALLBACK_HEADS["assistant"]`) as a Jinja chat template over
    string content, with the tokenizer's `bos` and `eos` written in: what a checkpoint exported from a model
    without a template of its own carries (tests/test_export.py renders both and compares)."""
    heads = json.dumps(FALLBACK_HEADS)
    return (
        f"{{%- set heads = {heads} -%}}{{{{- {json.dumps(bos)} -}}}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] not in heads -%}{{- raise_exception('unknown role: ' + message['role']) -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        f"{{{{- heads['assistant'] + ' ' + message['content'] + {json.dumps(eos)} + '\\n' -}}}}"
        "{%- else -%}{{- heads[message['role']] + ' ' + message['content'] + '\\n' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- heads['assistant'] -}}{%- endif -%}"
    )


def render_prompt(processor, messages: list[Message], template: str = "chat") -> str:
    """The text to generate an answer from, with one `processor.config.image_token` per image: the tokenizer's
    chat template with the generation prompt when it has one, else Köprü's fallback; "plain" is the align
    recipe's bos + image tokens. Inference runs no training-only checks of the template."""
    image_token = processor.config.image_token
    tokenizer = processor.tokenizer
    if template == "plain":
        return (tokenizer.bos_token or "") + image_token * count_images(messages)
    if template != "chat":
        raise ValueError(f"expected template 'chat' or 'plain', found {template!r}")
    chat = ChatTemplate.of(tokenizer, image_token)
    if chat is not None:
        return chat.render(messages, add_generation_prompt=True)
    text, _ = render_fallback(as_string_content(messages, image_token), tokenizer.bos_token or "",
                              tokenizer.eos_token or "")
    return text + FALLBACK_HEADS["assistant"]


def end_of_turn_ids(processor) -> list[int]:
    """The chat template's end-of-turn token (see `ChatTemplate.end_of_turn_ids`); none without a template."""
    chat = ChatTemplate.of(processor.tokenizer, processor.config.image_token)
    return [] if chat is None else chat.end_of_turn_ids()


__all__ = [
    "ROLES",
    "ChatTemplate",
    "MessageError",
    "as_list_content",
    "as_string_content",
    "chat_template_file",
    "count_images",
    "count_text_chars",
    "end_of_turn_ids",
    "images_of",
    "render_prompt",
    "source_chat_template",
    "validate_messages",
]
