"""Chat formatting for generation: chat messages to a prompt and its images."""

from __future__ import annotations

from PIL import Image

from kopru.messages import images_of, render_prompt, validate_messages


def format_chat(processor, messages: list[dict], template: str = "chat") -> tuple[str, list[Image.Image]]:
    """Chat messages (`kopru.messages`: OpenAI-style, content a string or text / image parts) -> (the prompt
    with one image token per image, the images the parts carry, in order).

    "<image>" typed in string content is a placeholder whose image the caller passes itself. The prompt is
    rendered by `kopru.messages.render_prompt`: the tokenizer's chat template in the content form it expects,
    else Köprü's fallback template, with the generation prompt added; no training-only checks are run.
    """

    canonical = validate_messages(messages)
    return render_prompt(processor, canonical, template), images_of(canonical)
