"""HF `Blip2ForConditionalGeneration` (decoder-only LLM: OPT, Llama, ...) -> Köprü `qformer` strategy.

BLIP-2 feeds the Q-Former the vision model's `last_hidden_state`: the last encoder layer, CLS token
included, after `post_layernorm`. The projected query outputs replace the `num_query_tokens` image-token
positions the HF processor writes into the text, which is exactly how Köprü splices them.

BLIP-2 checkpoints ship no chat template. HF's `Blip2Processor` puts the query tokens in front of the text as
the tokenizer encodes it, bos included (OPT's `</s>`): `<image> x 32, </s>, "Question: ... Answer:"`. A conversion
without a template of its own gets `chat_template`, which renders exactly that, so `kopru chat` and `kopru serve`
prompt the converted model as HF users prompt BLIP-2.
"""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, Blip2ForConditionalGeneration

from kopru.config import KopruConfig, VisionTowerConfig
from kopru.connectors.qformer import QFormerConfig, qformer_state_dict_from_hf, qformer_state_dict_to_hf
from kopru.convert.common import image_preprocessor, load_kopru_weights, load_tokenizer, rename
from kopru.model import KopruForConditionalGeneration
from kopru.processing import KopruProcessor
from kopru.vision import VisionTower

REFERENCE_CLASS = Blip2ForConditionalGeneration

# HF BLIP-2's weights and a Köprü qformer model's (kopru.convert.common.rename; read both ways). The Q-Former
# itself maps through kopru.connectors.qformer's tables, the queries HF keeps beside it included.
WEIGHT_NAMES = (
    ("vision_model.", "vision.encoder."),
    ("language_projection.", "connector.projection."),
    ("language_model.", "llm."),
)
QFORMER_PREFIXES = ("qformer.", "connector.qformer.")
QUERY_TOKENS = "query_tokens"  # HF keeps them beside the Q-Former; Köprü inside it (connector.qformer.query_tokens)


def kopru_weights_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Blip2ForConditionalGeneration state dict under Köprü's names (the Q-Former's text side left out)."""
    hf_prefix, prefix = QFORMER_PREFIXES
    qformer = {name: t for name, t in state.items() if name.startswith(hf_prefix)}
    rest = {name: t for name, t in state.items() if name not in qformer and name != QUERY_TOKENS}
    mapped = qformer_state_dict_from_hf(qformer, query_tokens=state[QUERY_TOKENS])
    return {**rename(rest, WEIGHT_NAMES, to="kopru"), **{prefix + name: t for name, t in mapped.items()}}


def hf_weights_from_kopru(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `kopru_weights_from_hf`: Köprü's names (kopru.convert.common.kopru_weights) -> HF BLIP-2's."""
    hf_prefix, prefix = QFORMER_PREFIXES
    qformer = {name[len(prefix):]: t for name, t in state.items() if name.startswith(prefix)}
    rest = {name: t for name, t in state.items() if not name.startswith(prefix)}
    mapped, query_tokens = qformer_state_dict_to_hf(qformer)
    return {**rename(rest, WEIGHT_NAMES, to="hf"), **{hf_prefix + name: t for name, t in mapped.items()},
            QUERY_TOKENS: query_tokens}


def to_kopru(reference: Blip2ForConditionalGeneration, src: str) -> tuple[KopruForConditionalGeneration, KopruProcessor]:
    config = reference.config
    if not config.use_decoder_only_language_model:
        raise ValueError(
            "expected a BLIP-2 checkpoint with a decoder-only language model (use_decoder_only_language_model=True), "
            f"found text model_type {config.text_config.model_type!r} (encoder-decoder LMs such as Flan-T5 "
            "have no Köprü strategy)"
        )
    if config.image_token_id is None:
        raise ValueError(
            f"expected config.image_token_id (image_token_index) in the BLIP-2 checkpoint at {src}, found None; "
            "older checkpoints that prepend the query outputs instead of filling image tokens are not supported"
        )
    qformer_config = config.qformer_config
    kopru_config = KopruConfig(
        vision=VisionTowerConfig(name_or_path=src, feature_layer=-1, drop_cls=False, final_norm=True),
        llm=src,
        strategy="qformer",
        connector=QFormerConfig(
            num_queries=config.num_query_tokens,
            hidden_size=qformer_config.hidden_size,
            num_layers=qformer_config.num_hidden_layers,
            num_heads=qformer_config.num_attention_heads,
            intermediate_size=qformer_config.intermediate_size,
            cross_attention_frequency=qformer_config.cross_attention_frequency,
            layer_norm_eps=qformer_config.layer_norm_eps,
            hidden_act=qformer_config.hidden_act,
        ),
        image_token="<image>",
        image_start_token=None,
        image_end_token=None,
        image_token_id=config.image_token_id,
    )
    vision = VisionTower(reference.vision_model, kopru_config.vision)
    llm = AutoModelForCausalLM.from_config(config.text_config)
    model = KopruForConditionalGeneration(kopru_config, vision, llm)
    load_kopru_weights(model, kopru_weights_from_hf(reference.state_dict()))
    tokenizer = load_tokenizer(src, kopru_config)
    if not tokenizer.chat_template:  # the checkpoint's own template, when it has one, wins (load_tokenizer)
        tokenizer.chat_template = chat_template(tokenizer, kopru_config.image_token)
    processor = KopruProcessor(tokenizer, image_preprocessor(src, vision), kopru_config, model.image_count)
    return model, processor


def random_inputs(reference: Blip2ForConditionalGeneration, model: KopruForConditionalGeneration):
    """Two prompts, one image each, the `num_query_tokens` image positions in the middle of random text."""
    config = reference.config
    image_size = config.vision_config.image_size
    per_image = model.image_count.placeholders
    if per_image != config.num_query_tokens:
        raise ValueError(f"expected {config.num_query_tokens} image positions per image, found {per_image}")
    text_ids = torch.randint(0, min(config.text_config.vocab_size, 1000), (2, 12))
    text_ids[text_ids == config.image_token_id] = 0 if config.image_token_id != 0 else 1
    image = torch.full((2, per_image), config.image_token_id)
    input_ids = torch.cat([text_ids[:, :5], image, text_ids[:, 5:]], dim=1)
    pixel_values = torch.randn(2, 3, image_size, image_size)
    inputs = {"input_ids": input_ids, "pixel_values": pixel_values, "attention_mask": torch.ones_like(input_ids)}
    return inputs, inputs


# BLIP-2's visual-question prompt, as its model cards and LAVIS (Salesforce's own code) ask; `kopru convert
# --verify` prompts HF's processor with it (the checkpoints have no chat template to render one).
PROMPT_FORMAT = "Question: {question} Answer:"


def chat_template(tokenizer, image_token: str) -> str:
    """The chat template of a converted BLIP-2: one user question renders what HF's `Blip2Processor` gives for
    `PROMPT_FORMAT`'s text -- every image's `image_token` first (the processor expands each to the query
    tokens), then the special tokens this tokenizer puts in front of text (OPT's bos; none for GPT-2's
    tokenizer), then "Question: {text} Answer:". Later turns follow LAVIS's chained prompt ("Question: ...
    Answer: ... Question: ... Answer:"), each answer closed by eos so that a model trained on the template learns
    to stop; a system message is plain text in front. All images come first, wherever the messages hold them."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if start is None or full[start + len(plain):]:
        raise ValueError(
            f"expected a tokenizer that adds special tokens in front of the text only (as OPT's adds its bos), "
            f"found {tokenizer.convert_ids_to_tokens(full)} for 'a' ({tokenizer.convert_ids_to_tokens(plain)} "
            "without special tokens); BLIP-2's prompt with tokens after the text has no chat template here"
        )
    prefix = full[:start]
    if prefix == [tokenizer.bos_token_id]:
        special = "{{- bos_token -}}"
    else:
        special = "{{- " + json.dumps("".join(tokenizer.convert_ids_to_tokens(prefix))) + " -}}" if prefix else ""
    before, after = (json.dumps(piece) for piece in PROMPT_FORMAT.split("{question}"))
    return (
        "{#- BLIP-2 (kopru convert): the images' query tokens, the tokenizer's special tokens, then the text, as "
        "HF's Blip2Processor builds it -#}\n"
        "{%- for message in messages if message['content'] is not string -%}"
        "{%- for part in message['content'] if part['type'] == 'image' -%}" + json.dumps(image_token)[1:-1]
        + "{%- endfor -%}{%- endfor -%}\n"
        + special + "\n"
        "{%- for message in messages -%}\n"
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}\n"
        "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join('') -%}{%- endif -%}\n"
        "{%- if not loop.first -%}{{- ' ' -}}{%- endif -%}\n"
        "{%- if message['role'] == 'user' -%}{{- " + before + " + text + " + after + " -}}\n"
        "{%- elif message['role'] == 'assistant' -%}{{- text | trim + eos_token -}}\n"
        "{%- else -%}{{- text -}}{%- endif -%}\n"
        "{%- endfor -%}\n"
    )
