"""The chat template an exported checkpoint carries: HF's processor renders with it what `kopru chat` renders.

HF processors hand the template list content (`[{"type": "image"}, {"type": "text", ...}]`), then tokenise the
rendered text with the tokenizer's special tokens and expand each image token themselves. Köprü renders a
conversation through `kopru.messages` (the model's template in the content form it expects, or the fallback),
puts the bos in front when the tokenizer would add one, tokenises without special tokens and expands each image
to `[image_start] + image positions + [image_end]`. The bos needs nothing: HF's `apply_chat_template` tokenises
with special tokens exactly when the rendered prompt does not start with the bos (`hf_adds_special_tokens`), which
gives the one bos Köprü's rendering holds. The exported template bridges the rest:

* a template that prints its own image token for an image part ("list" form, LLaVA's) is kept as it is;
* a template over string content ("string" form: base LLMs, Köprü's fallback) gets a prelude that turns list
  content into the string Köprü makes of it (`kopru.messages.as_string_content`: image parts as the image token,
  parts joined by a newline where neither side has whitespace);
* image markers, which HF's processors do not write, are printed by the template around the image token;
* for BLIP-2, whose processor puts the query tokens in front of the whole prompt, image parts print nothing.
"""

from __future__ import annotations

import json

from kopru.data.formats import IMAGE_PLACEHOLDER
from kopru.messages import ChatTemplate, fallback_chat_template


def _literal(text: str) -> str:
    return json.dumps(text)  # a JSON string is a Jinja string literal


def _string_content_prelude(image_text: str | None) -> str:
    """Jinja that rebinds `messages` to string content as `kopru.messages.as_string_content` makes it, each image
    written as `image_text` (None: image parts left out and typed placeholders removed, BLIP-2)."""
    placeholder = _literal(IMAGE_PLACEHOLDER)
    image = _literal("" if image_text is None else image_text)
    take_image = "false" if image_text is None else "true"
    return (
        "{%- set converted = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
        "{%- else -%}{%- set joined = namespace(text='') -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' or " + take_image + " -%}"
        "{%- set piece = part['text'] if part['type'] == 'text' else " + placeholder + " -%}"
        "{%- if joined.text and piece and not joined.text[-1].isspace() and not piece[0].isspace() -%}"
        "{%- set joined.text = joined.text + '\\n' -%}{%- endif -%}"
        "{%- set joined.text = joined.text + piece -%}"
        "{%- endif -%}"
        "{%- endfor -%}{%- set text = joined.text -%}{%- endif -%}"
        "{%- set converted.messages = converted.messages + [{'role': message['role'], 'content': text | replace("
        + placeholder + ", " + image + ")}] -%}"
        "{%- endfor -%}{%- set messages = converted.messages -%}"
    )


def _list_content_without_images() -> str:
    """Jinja that drops image parts from list content (BLIP-2 with a template that prints its own image token)."""
    return (
        "{%- set converted = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
        "{%- else -%}{%- set content = message['content'] | selectattr('type', 'equalto', 'text') | list -%}"
        "{%- endif -%}"
        "{%- set converted.messages = converted.messages + [{'role': message['role'], 'content': content}] -%}"
        "{%- endfor -%}{%- set messages = converted.messages -%}"
    )


def check_special_tokens(tokenizer) -> None:
    """HF tokenises a rendered prompt with the tokenizer's special tokens unless it starts with the bos
    (`hf_adds_special_tokens`), Köprü without them (its rendering holds the bos where the tokenizer would add one):
    the two agree when the tokenizer adds at most a bos in front. One that adds more (an eos) is refused."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    expected = [[*plain], [tokenizer.bos_token_id, *plain]]
    if special not in expected:
        raise ValueError(f"the tokenizer adds special tokens other than a leading bos ({special} for the ids "
                         f"{plain}): HF's processor would add them to every prompt, which Köprü's does not")


def exported_chat_template(processor, images_in_text: bool = True) -> str:
    """The template for the exported checkpoint of the Köprü model whose `KopruProcessor` is `processor` (module
    docstring). `images_in_text=False`: image parts print nothing (BLIP-2's processor places the images itself)."""
    config, tokenizer = processor.config, processor.tokenizer
    check_special_tokens(tokenizer)
    marked = config.image_token
    if config.uses_markers:
        marked = config.image_start_token + config.image_token + config.image_end_token
    chat = ChatTemplate.of(tokenizer, config.image_token)
    if chat is None:
        body = fallback_chat_template(tokenizer.bos_token or "", tokenizer.eos_token or "")
        form = "string"
    else:
        body = chat.template
        # A template that renders no image (form raises) can still render text: BLIP-2 drops the images.
        form = chat.form if images_in_text else chat.text_form
    prelude, replace = "", None
    if form == "string":
        prelude = _string_content_prelude(marked if images_in_text else None)
    elif not images_in_text:
        prelude = _list_content_without_images()
    elif marked != config.image_token:
        replace = (config.image_token, marked)  # the template prints the image token: mark it where it stands
    if replace is None:
        return prelude + body
    # The whole rendering captured, then the image token marked where it stands.
    marking = f"{{%- set rendered = rendered | replace({_literal(replace[0])}, {_literal(replace[1])}) -%}}"
    return f"{prelude}{{%- set rendered %}}{body}{{% endset -%}}{marking}{{{{- rendered -}}}}"
