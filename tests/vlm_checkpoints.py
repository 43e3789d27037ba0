"""Tiny HF VLM checkpoints saved as users find them on the hub, for the user's-path tests (test_verify_user_path).

The models come from the builders the conversion tests already have (test_convert, test_high_resolution,
test_convert_mllama); this module adds what a user's checkpoint also carries: the processor with the family's
published-style chat template, saved in one of two layouts:

* "transformers5": `processor.save_pretrained` -- processor_config.json (image-processor settings under
  "image_processor") and chat_template.jinja;
* "hub4": the older hub layout written by hand -- preprocessor_config.json with the image processor's settings
  (4.x class name, no "Pil"), processor_config.json with only the processor's own settings, and the template in
  chat_template.json (LLaVA, LLaVA-NeXT) or in tokenizer_config.json's "chat_template" (Mllama).
"""

from __future__ import annotations

import json
from pathlib import Path

# llava-hf/llava-1.5-7b-hf's template (as test_chat_templates has it).
from test_chat_templates import LLAVA_15_TEMPLATE

# llava-hf/llava-v1.6-vicuna-7b-hf style: a system text, "USER: " / "ASSISTANT: ", images first in each turn.
LLAVA_NEXT_VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Llama-3.2-Vision-Instruct's shape: headers, <|image|> where the image part is, <|eot_id|> after each turn.
MLLAMA_TEMPLATE = (
    "{{- bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|image|>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TEMPLATES = {"llava": LLAVA_15_TEMPLATE, "llava_next": LLAVA_NEXT_VICUNA_TEMPLATE, "mllama": MLLAMA_TEMPLATE}
LAYOUTS = ("transformers5", "hub4")


def build(kind: str, path: Path) -> Path:
    """The tiny random HF model of `kind` with its processor (and chat template) in transformers 5's layout."""
    if kind == "llava":
        from test_convert import build_llava

        _, path = build_llava(path)
        processor_class = "LlavaProcessor"
    elif kind == "llava_next":
        from test_high_resolution import build_llava_next

        path = build_llava_next(path)
        processor_class = "LlavaNextProcessor"
    elif kind == "mllama":
        from test_convert_mllama import (
            IMAGE_SIZE,
            MAX_TILES,
            save_reference,
            tiny_mllama,
            tokenizer_with_image_token,
        )
        from transformers import MllamaProcessor
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        path = save_reference(tiny_mllama([1, 4], 6, seed=3), path)
        (path / "preprocessor_config.json").unlink()  # the processor's file carries them
        image_processor = MllamaImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                  max_image_tiles=MAX_TILES,
                                                  image_mean=[0.48145466, 0.4578275, 0.40821073],
                                                  image_std=[0.26862954, 0.26130258, 0.27577711])
        MllamaProcessor(image_processor, tokenizer_with_image_token()[0]).save_pretrained(path)
        processor_class = "MllamaProcessor"
    else:
        raise ValueError(f"unknown kind {kind!r}")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    assert type(processor).__name__ == processor_class
    processor.chat_template = TEMPLATES[kind]
    if kind != "mllama":  # llava-hf's processors count CLIP's CLS (dropped by "default") as HF's model does
        processor.num_additional_image_tokens = 1
    processor.save_pretrained(path)
    assert (path / "chat_template.jinja").is_file() and not (path / "preprocessor_config.json").exists()
    return path


def to_hub4(path: Path, kind: str) -> Path:
    """Rewrite a transformers5 checkpoint directory in the older hub layout (see the module docstring)."""
    processor_config = json.loads((path / "processor_config.json").read_text())
    image = processor_config.pop("image_processor")
    image["image_processor_type"] = image["image_processor_type"].replace("Pil", "")
    image["processor_class"] = processor_config["processor_class"]
    (path / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (path / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    template = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").unlink()
    if kind == "mllama":  # meta-llama's repos carry it in tokenizer_config.json
        tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
        tokenizer_config["chat_template"] = template
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    else:
        (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return path


def checkpoint(kind: str, layout: str, path: Path) -> Path:
    path = build(kind, path)
    return to_hub4(path, kind) if layout == "hub4" else path


def hf_greedy_answer(src: Path, image, question: str, max_new_tokens: int = 8,
                     eos_ids: list[int] | None = None) -> tuple[str, list[int]]:
    """HF's own answer, the reference for the user's path: AutoProcessor, its chat template (the processor's, else
    the tokenizer's), special tokens as apply_chat_template(tokenize=True) adds them, greedy `generate` stopping on `eos_ids` (default: the checkpoint's own); (text, new ids),
    the text decoded without special tokens."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kopru.convert.verify import hf_adds_special_tokens

    processor = AutoProcessor.from_pretrained(src)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    template = processor.chat_template or processor.tokenizer.chat_template
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, chat_template=template)
    inputs = processor(images=[image], text=prompt, return_tensors="pt",
                       add_special_tokens=hf_adds_special_tokens(prompt, processor.tokenizer))
    model = AutoModelForImageTextToText.from_pretrained(src).eval()
    stop = {} if eos_ids is None else {"eos_token_id": eos_ids, "pad_token_id": eos_ids[0]}
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **stop)
    new = generated[0, inputs["input_ids"].shape[1]:].tolist()
    return processor.decode(new, skip_special_tokens=True), new
