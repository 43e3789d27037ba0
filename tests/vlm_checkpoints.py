"""Tiny random HF VLM checkpoints, for every test that needs one (conversion, export, chat templates, serving,
the user's path).

The builders (LLaVA, BLIP-2, LLaVA-NeXT, Mllama) make the reference models the
conversion tests compare against. `checkpoint` adds what a user's checkpoint also carries: the processor with the
family's published-style chat template, saved in one of two layouts:

* "transformers5": `processor.save_pretrained` -- processor_config.json (image-processor settings under
  "image_processor") and chat_template.jinja;
* "hub4": the older hub layout written by hand -- preprocessor_config.json with the image processor's settings
  (4.x class name, no "Pil"), processor_config.json with only the processor's own settings (BLIP-2: its
  num_query_tokens, as Salesforce's repos hold it), and the template in chat_template.json (LLaVA, LLaVA-NeXT) or
  in tokenizer_config.json's "chat_template" (Mllama).

BLIP-2 checkpoints ship no chat template: HF users prompt them with "Question: ... Answer:", and HF's
Blip2Processor puts the query tokens before the bos its (OPT) tokenizer adds, which the tiny tokenizer here adds too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    MllamaConfig,
    MllamaForConditionalGeneration,
    OPTConfig,
    PreTrainedModel,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

from kopru.convert import mllama as mllama_converter
from kopru.lesson.tiny import tiny_tokenizer

# ------------------------------------------------------------------------------ tiny random HF models
# The conversion tests' references (test_convert, test_high_resolution_processing, test_chat_templates, test_export, ...):
# every weight random, norms and biases included, so that a mapping that misses one shows.
IMAGE_SIZE, PATCH = 32, 8
NUM_QUERIES = 6
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # LLaVA-NeXT's five layouts at 32 px


def tokenizer_with_image_token():
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer, tokenizer.convert_tokens_to_ids("<image>")


def randomise(model: PreTrainedModel) -> None:
    """HF's init leaves norms at 1/0 and biases at 0; randomise everything so the weight mapping is fully tested."""
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(mean=1.0 if param.dim() == 1 else 0.0, std=0.2)


def save_reference(model: PreTrainedModel, tokenizer, path: Path, image_processor) -> Path:
    """The checkpoint as the hub holds one: weights, tokenizer and its image-processor settings (`image_processor`:
    an HF processor, saved as transformers 5 does, in processor_config.json; or a bare image processor, saved
    alone in preprocessor_config.json)."""
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def llava_image_processor() -> CLIPImageProcessorPil:
    """LLaVA-1.5's: shortest edge then a centre crop (40 -> 32, as 366 -> 336 would be), CLIP mean/std."""
    return CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def blip2_image_processor() -> BlipImageProcessorPil:
    """BLIP-2's: squash to the encoder's size, bicubic, CLIP mean/std."""
    return BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_llava(path: Path, tokenizer=None, **overrides) -> tuple[LlavaForConditionalGeneration, Path]:
    """`tokenizer`: one holding "<image>" (default: the tiny tokenizer with it added)."""
    torch.manual_seed(0)
    if tokenizer is None:
        tokenizer, image_id = tokenizer_with_image_token()
    else:
        image_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        ),
        image_token_id=image_id,
        vision_feature_layer=overrides.pop("vision_feature_layer", -2),
        # Positions per image (HF's default 576 is CLIP-L/336's); "full" keeps the CLS token.
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2 + int(overrides.get("vision_feature_select_strategy") == "full"),
        **overrides,
    )
    model = LlavaForConditionalGeneration(config)
    randomise(model)
    processor = LlavaProcessor(image_processor=llava_image_processor(), tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy=config.vision_feature_select_strategy)
    return model, save_reference(model, tokenizer, path, processor)


def blip2_config(text_config, image_id: int | None) -> Blip2Config:
    return Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=PATCH,
        ),
        qformer_config=Blip2QFormerConfig(
            hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            cross_attention_frequency=1,
        ),
        text_config=text_config,
        num_query_tokens=NUM_QUERIES,
        image_token_id=image_id,
    )


def build_blip2(path: Path, seed: int = 1) -> tuple[Blip2ForConditionalGeneration, Path]:
    torch.manual_seed(seed)
    tokenizer, image_id = tokenizer_with_image_token()
    text = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    model = Blip2ForConditionalGeneration(blip2_config(text, image_id))
    randomise(model)
    processor = Blip2Processor(image_processor=blip2_image_processor(), tokenizer=tokenizer,
                               num_query_tokens=NUM_QUERIES)
    return model, save_reference(model, tokenizer, path, processor)


def llava_next_processor(tile: int, patch: int, pinpoints=None) -> LlavaNextProcessor:
    kwargs = {} if pinpoints is None else {"image_grid_pinpoints": pinpoints}
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": tile},
                                                 crop_size={"height": tile, "width": tile}, **kwargs)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer_with_image_token()[0], patch_size=patch,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_llava_next(path: Path) -> Path:
    torch.manual_seed(0)
    tokenizer, image_id = tokenizer_with_image_token()
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
                                pad_token_id=2),
        image_token_id=image_id, image_grid_pinpoints=TINY_PINPOINTS, vision_feature_layer=-2,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,  # one view's positions (HF's default is CLIP-L/336's 576)
    )
    model = LlavaNextForConditionalGeneration(config)
    randomise(model)
    return save_reference(model, tokenizer, path, llava_next_processor(IMAGE_SIZE, PATCH, TINY_PINPOINTS))


# llava-hf/llava-1.5-7b-hf's chat_template.json, as the hub has it.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# Llama-3.2-Vision (Mllama), every weight random, the tanh gates well away from 0.
MLLAMA_IMAGE_SIZE, MLLAMA_PATCH, MAX_TILES = 16, 4, 4  # 16 patches + CLS = 17 tokens per tile (Mllama pads them to 24)
MLLAMA_VISION_HIDDEN, MLLAMA_INTERMEDIATE_LAYERS = 32, [0, 1]
# A seed whose tiny Mllama ([1, 4], 6 layers) answers the user's-path pictures differently from the first greedy
# token (seed 3 answered token 168 eight times for every picture, so a model ignoring the image passed).
PICTURE_SEED = 1


def mllama_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([mllama_converter.IMAGE_TOKEN], special_tokens=True)
    return tokenizer, tokenizer.convert_tokens_to_ids(mllama_converter.IMAGE_TOKEN)


def tiny_mllama(cross_attention_layers: list[int], num_layers: int, seed: int = 0):
    tokenizer, image_id = mllama_tokenizer()
    # As in Llama-3.2-Vision: <|image|> is the first id past the text vocabulary (an extra embedding row).
    assert image_id == len(tokenizer) - 1
    config = MllamaConfig(
        vision_config=dict(
            hidden_size=MLLAMA_VISION_HIDDEN, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
            intermediate_size=64, vision_output_dim=MLLAMA_VISION_HIDDEN * (1 + len(MLLAMA_INTERMEDIATE_LAYERS)),
            image_size=MLLAMA_IMAGE_SIZE, patch_size=MLLAMA_PATCH, max_num_tiles=MAX_TILES,
            intermediate_layers_indices=MLLAMA_INTERMEDIATE_LAYERS,  # default supported_aspect_ratios: HF's for 4 tiles
        ),
        text_config=dict(
            vocab_size=image_id, hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, cross_attention_layers=cross_attention_layers,
            rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        ),
        image_token_index=image_id,
    )
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():  # norms around 1, gates (tanh) well away from 0, everything else small and random
        for name, param in model.named_parameters():
            if "gate" in name and param.numel() == 1:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(mean=1.0 if param.dim() == 1 and "norm" in name else 0.0, std=0.2)
    return model


def save_mllama_reference(model: MllamaForConditionalGeneration, path: Path) -> Path:
    tokenizer, _ = mllama_tokenizer()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # Its image-processor settings, as a real checkpoint ships them (a conversion refuses a checkpoint without).
    MllamaImageProcessorPil(size={"height": MLLAMA_IMAGE_SIZE, "width": MLLAMA_IMAGE_SIZE}, max_image_tiles=MAX_TILES,
                            image_mean=[0.48145466, 0.4578275, 0.40821073],
                            image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(path)
    return path


def mllama_logit_diff(expected: torch.Tensor, found: torch.Tensor) -> float:
    vocab = expected.shape[-1]
    assert found.shape[-1] == vocab + mllama_converter.EXTRA_EMBEDDINGS
    return float((expected.float() - found[..., :vocab].float()).abs().max())


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
KINDS = ("llava", "llava_next", "blip2", "mllama")
LAYOUTS = ("transformers5", "hub4")


def build(kind: str, path: Path) -> Path:
    """The tiny random HF model of `kind` with its processor (and chat template) in transformers 5's layout."""
    if kind == "llava":
        _, path = build_llava(path)
        processor_class = "LlavaProcessor"
    elif kind == "llava_next":
        path = build_llava_next(path)
        processor_class = "LlavaNextProcessor"
    elif kind == "mllama":
        from transformers import MllamaProcessor

        path = save_mllama_reference(tiny_mllama([1, 4], 6, seed=PICTURE_SEED), path)
        (path / "preprocessor_config.json").unlink()  # the processor's file carries them
        image_processor = MllamaImageProcessorPil(size={"height": MLLAMA_IMAGE_SIZE, "width": MLLAMA_IMAGE_SIZE},
                                                  max_image_tiles=MAX_TILES,
                                                  image_mean=[0.48145466, 0.4578275, 0.40821073],
                                                  image_std=[0.26862954, 0.26130258, 0.27577711])
        MllamaProcessor(image_processor, mllama_tokenizer()[0]).save_pretrained(path)
        processor_class = "MllamaProcessor"
    elif kind == "blip2":
        from tokenizers.processors import TemplateProcessing
        from transformers import AutoTokenizer

        model, path = build_blip2(path, seed=0)
        # `randomise` draws every 1-D parameter around 1, biases included: such biases add one constant direction
        # at every position and the tiny BLIP-2 answered the same token for every picture. Around 0.1 (seed 0),
        # the two pictures of verify and of the chat test get different greedy answers.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.mul_(0.1)
        model.save_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)  # bos in front of the text, as OPT's tokenizer puts it
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
        assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
        tokenizer.save_pretrained(path)
        processor_class = "Blip2Processor"
    else:
        raise ValueError(f"unknown kind {kind!r}")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    assert type(processor).__name__ == processor_class
    if kind in TEMPLATES:
        processor.chat_template = TEMPLATES[kind]
    if kind in ("llava", "llava_next"):  # llava-hf's processors count CLIP's CLS (dropped by "default") as HF does
        processor.num_additional_image_tokens = 1
    processor.save_pretrained(path)
    assert (path / "chat_template.jinja").is_file() == (kind in TEMPLATES)
    assert not (path / "preprocessor_config.json").exists()
    return path


def to_hub4(path: Path, kind: str) -> Path:
    """Rewrite a transformers5 checkpoint directory in the older hub layout (see the module docstring)."""
    processor_config = json.loads((path / "processor_config.json").read_text())
    image = processor_config.pop("image_processor")
    image["image_processor_type"] = image["image_processor_type"].replace("Pil", "")
    image["processor_class"] = processor_config["processor_class"]
    (path / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (path / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    if kind not in TEMPLATES:
        return path
    template = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").unlink()
    if kind == "mllama":  # meta-llama's repos carry it in tokenizer_config.json
        tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
        tokenizer_config["chat_template"] = template
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    else:
        (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return path


# Llama-3's chat format: headers, and <|eot_id|> (an added special token) closing every turn.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
END_OF_TURN = "<|eot_id|>"


def build_end_of_turn_llava(path: Path, question: str, image, stop_at: int = 2) -> tuple[Path, int]:
    """A tiny LLaVA (transformers 5's layout) whose tokenizer has Llama-3's header tokens and `<|eot_id|>` as added
    special tokens, its template closing every turn with `<|eot_id|>` and generation_config's eos listing it, as
    Llama-3 checkpoints do. (path, the `<|eot_id|>` id).

    A random model never picks `<|eot_id|>`, so its output row becomes 1.5 x the row of the token greedy decoding
    picks at new token `stop_at` for `question` about `image`: from there on (or earlier), `<|eot_id|>` wins."""
    import torch
    from transformers import AutoProcessor

    tokenizer, _ = tokenizer_with_image_token()
    tokenizer.add_tokens(["<|start_header_id|>", "<|end_header_id|>", END_OF_TURN], special_tokens=True)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    model, path = build_llava(path, tokenizer=tokenizer)
    processor = AutoProcessor.from_pretrained(path)
    processor.chat_template = LLAMA3_TEMPLATE
    processor.num_additional_image_tokens = 1
    processor.save_pretrained(path)
    model.generation_config.eos_token_id = [model.config.text_config.eos_token_id, end_of_turn]
    model.save_pretrained(path)  # generation_config.json with it
    _, ids = hf_greedy_answer(path, image, question, max_new_tokens=stop_at + 1)
    assert end_of_turn not in ids and ids[stop_at] not in ids[:stop_at], f"pick another stop_at: {ids}"
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[end_of_turn] = 1.5 * head[ids[stop_at]]
    model.save_pretrained(path)
    return path, end_of_turn


def checkpoint(kind: str, layout: str, path: Path) -> Path:
    path = build(kind, path)
    return to_hub4(path, kind) if layout == "hub4" else path


def hf_greedy_answer(src: Path, image, question: str, max_new_tokens: int = 8,
                     eos_ids: list[int] | None = None) -> tuple[str, list[int]]:
    """HF's own answer, the reference for the user's path: AutoProcessor, its chat template (the processor's, else
    the tokenizer's; BLIP-2, which has none, the prompt its model cards write), special tokens as
    apply_chat_template(tokenize=True) adds them, greedy `generate` stopping on `eos_ids` (default: the
    checkpoint's own); (text, new ids), the text decoded without special tokens."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kopru.convert.verify import hf_adds_special_tokens

    processor = AutoProcessor.from_pretrained(src)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    template = processor.chat_template or processor.tokenizer.chat_template
    if template is None:
        assert type(processor).__name__ == "Blip2Processor", f"{src} has no chat template"
        prompt = f"Question: {question} Answer:"  # Salesforce/blip2-opt-2.7b's model card
    else:
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, chat_template=template)
    inputs = processor(images=[image], text=prompt, return_tensors="pt",
                       add_special_tokens=hf_adds_special_tokens(prompt, processor.tokenizer))
    model = AutoModelForImageTextToText.from_pretrained(src).eval()
    stop = {} if eos_ids is None else {"eos_token_id": eos_ids, "pad_token_id": eos_ids[0]}
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **stop)
    new = generated[0, inputs["input_ids"].shape[1]:].tolist()
    return processor.decode(new, skip_special_tokens=True), new
