"""Chat templates on converted checkpoints: Köprü renders and answers exactly as HF's processor + generate.

A tiny random LLaVA is saved the way the hub ships llava-1.5-hf: an HF LlavaProcessor with LLaVA-1.5's published
chat template (list content, nothing after an assistant turn) and a tokenizer that adds bos. It is converted
with `kopru convert`; `kopru chat`'s code path (ChatSession) and `kopru serve` (official openai client) must
build HF's prompt ids and pixels and give HF's greedy answer. A second copy carries a text-only template
(string content with "<image>"). Nothing is downloaded.
"""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from tokenizers import processors
from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor
from vlm_checkpoints import IMAGE_SIZE, LLAVA_15_TEMPLATE, PATCH, build_llava  # noqa: E402 (tests/ is on sys.path)

from kopru.chat import ChatSession, load_engine, user_message
from kopru.convert import convert
from kopru.generation import SamplingParams, format_chat
from kopru.lesson.tiny import tiny_tokenizer
from kopru.messages import ChatTemplate, MessageError, end_of_turn_ids, validate_messages

# A text-only (Vicuna-style) template: string content, "<image>" typed in it, "</s>" after each answer.
TEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + '</s>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QUESTION = "What is in the picture?"
NEW_TOKENS = 10


def picture() -> Image.Image:
    """Non-square, so a wrong resize / crop would show in the pixels."""
    image = Image.new("RGB", (48, 30), (240, 230, 200))
    ImageDraw.Draw(image).ellipse((6, 4, 30, 26), fill=(200, 30, 40))
    return image


def save_hf_checkpoint(path: Path, template: str) -> LlavaProcessor:
    """The tiny LLaVA's HF processor, saved beside it: tokenizer adding bos, CLIP image processor, template."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Llama's tokenizer puts <s> in front of every text; HF's processor relies on that for LLaVA-1.5's template,
    # which prints no bos itself.
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
                               patch_size=PATCH, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    processor.save_pretrained(path)
    image_processor.save_pretrained(path)  # preprocessor_config.json, which Köprü's image processor reads
    return processor


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """template name -> (HF source dir, converted Köprü dir)."""
    root = tmp_path_factory.mktemp("templates")
    build_llava(root / "llava15")
    save_hf_checkpoint(root / "llava15", LLAVA_15_TEMPLATE)
    shutil.copytree(root / "llava15", root / "text")
    save_hf_checkpoint(root / "text", TEXT_TEMPLATE)
    out = {}
    for name in ("llava15", "text"):
        convert("llava", root / name, root / f"{name}-kopru")
        out[name] = (root / name, root / f"{name}-kopru")
    return out


def hf_messages(name: str) -> list[dict]:
    if name == "llava15":
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return [{"role": "user", "content": f"<image>\n{QUESTION}"}]


def hf_reference(src: Path, name: str) -> tuple[dict, str]:
    """HF's own inputs (processor + its chat template) and its greedy answer."""
    processor = LlavaProcessor.from_pretrained(src)
    prompt = processor.apply_chat_template(hf_messages(name), add_generation_prompt=True)
    inputs = processor(images=[picture()], text=prompt, return_tensors="pt")
    model = LlavaForConditionalGeneration.from_pretrained(src).eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return {"prompt": prompt, **inputs}, answer


@pytest.mark.parametrize("name", ["llava15", "text"])
def test_chat_renders_and_answers_as_hf(checkpoints, name: str) -> None:
    src, dst = checkpoints[name]
    template = LLAVA_15_TEMPLATE if name == "llava15" else TEXT_TEMPLATE
    assert (dst / "llm" / "chat_template.jinja").read_text() == template  # the converted model carries it
    reference, hf_answer = hf_reference(src, name)

    engine = load_engine(str(dst), device="cpu")
    chat = ChatTemplate.of(engine.processor.tokenizer, engine.processor.config.image_token)
    assert chat.form == ("list" if name == "llava15" else "string")
    prompt, images = format_chat(engine.processor, [user_message(QUESTION, [picture()])])
    assert prompt == engine.processor.tokenizer.bos_token + reference["prompt"]  # HF's processor adds bos
    ours = engine.processor(prompt, [images], add_special_tokens=False)
    assert ours["input_ids"].tolist() == reference["input_ids"].tolist()
    # Köprü's own image processor, reading the checkpoint's preprocessor_config.json.
    torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"], atol=1e-5, rtol=0)

    out = io.StringIO()
    session = ChatSession(engine, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0))
    answer = session.ask(QUESTION, [picture()], out)
    assert answer.strip() == hf_answer.strip()
    assert out.getvalue().strip() == hf_answer.strip()


def test_serve_answers_as_hf(checkpoints) -> None:
    openai = pytest.importorskip("openai")
    from conftest import RunningServer

    from kopru.serve import load_server

    src, dst = checkpoints["llava15"]
    _, hf_answer = hf_reference(src, "llava15")
    buffer = io.BytesIO()
    picture().save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    server = RunningServer(load_server(dst, model_name="llava15", device="cpu"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="llava15", max_tokens=NEW_TOKENS, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": QUESTION}]}])
    finally:
        server.stop()
    assert reply.choices[0].message.content.strip() == hf_answer.strip()


# ------------------------------------------------------------------------------------- templates, unit level
def _tokenizer_with(*tokens: str):
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<image>", *tokens], special_tokens=True)
    return tokenizer


def test_end_of_turn_is_what_the_template_prints_after_an_answer() -> None:
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tokenizer = _tokenizer_with("<|im_start|>", "<|im_end|>")
    template = ChatTemplate(tokenizer, "<image>", chatml, "chatml.jinja")
    assert template.form == "string"
    assert template.end_of_turn_ids() == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    # LLaVA-1.5 prints only a space after an answer: nothing to stop on but eos.
    assert ChatTemplate(tokenizer, "<image>", LLAVA_15_TEMPLATE, "x").end_of_turn_ids() == []


def test_engine_stops_on_the_end_of_turn_token(checkpoints) -> None:
    engine = load_engine(str(checkpoints["text"][1]), device="cpu")
    assert end_of_turn_ids(engine.processor) == [engine.processor.tokenizer.eos_token_id]
    assert set(end_of_turn_ids(engine.processor)) <= set(engine.eos_ids)


def test_a_template_that_renders_no_image_is_named() -> None:
    blind = "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] | replace('<image>', '') }}{% endif %}\n{% endfor %}"
    template = ChatTemplate(_tokenizer_with(), "<image>", blind, "/models/x/llm/chat_template.jinja")
    with pytest.raises(ValueError, match=r"chat template in /models/x/llm/chat_template.jinja renders no image: "
                                         r"expected one '<image>' .* found 0 .* and 0 "):
        template.render([{"role": "user", "content": [{"type": "image", "image": None}]}], True)


def test_one_validator_names_the_bad_field() -> None:
    with pytest.raises(MessageError) as caught:
        validate_messages([{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "audio"}]}])
    assert caught.value.param == "messages[0].content[1]"
    with pytest.raises(MessageError, match="typed in the text"):
        validate_messages([{"role": "user", "content": "<image> hi"}], text_placeholders=False)
    canonical = validate_messages([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "u"}}, {"type": "text", "text": "hi"}]}])
    assert canonical == [{"role": "user", "content": [{"type": "image", "image": "u"}, {"type": "text", "text": "hi"}]}]


def test_second_turn_renders_as_hf(checkpoints) -> None:
    """The history (an answer as a text part) goes through the template as HF's processor renders it."""
    src, dst = checkpoints["llava15"]
    engine = load_engine(str(dst), device="cpu")
    session = ChatSession(engine, SamplingParams(max_new_tokens=3, temperature=0.0))
    first = session.ask(QUESTION, [picture()], io.StringIO())
    history = [*session.messages, user_message("And the colour?", [])]
    prompt, images = format_chat(engine.processor, history)
    hf = LlavaProcessor.from_pretrained(src).apply_chat_template(
        [*hf_messages("llava15"), {"role": "assistant", "content": [{"type": "text", "text": first}]},
         {"role": "user", "content": [{"type": "text", "text": "And the colour?"}]}], add_generation_prompt=True)
    assert prompt == engine.processor.tokenizer.bos_token + hf
    assert len(images) == 1


def test_a_template_with_nothing_after_an_answer_serves_but_does_not_train(checkpoints) -> None:
    """Ending no turn is a training problem (the model never learns to stop), not an inference one."""
    from kopru.data.encoding import SampleEncoder

    engine = load_engine(str(checkpoints["text"][1]), device="cpu")
    engine.processor.tokenizer.chat_template = TEXT_TEMPLATE.replace("'</s>'", "''")
    prompt, _ = format_chat(engine.processor, [{"role": "user", "content": "<image>\nhi"}])
    assert prompt.endswith("USER: <image>\nhi ASSISTANT:")
    answer = engine.complete([prompt], [[picture()]], SamplingParams(max_new_tokens=2, temperature=0.0))[0]
    assert answer.completion_tokens >= 1
    with pytest.raises(ValueError, match="puts nothing after an assistant message"):
        SampleEncoder(engine.processor)
