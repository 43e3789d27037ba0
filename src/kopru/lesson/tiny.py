"""Tiny random backbones saved in Hugging Face format, so the demo and the tests load them through exactly the
code path a real checkpoint takes. Nothing is downloaded; the tokenizer is a byte-level BPE trained here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)

from kopru.backbones import default_backbones
from kopru.config import KopruConfig, VisionTowerConfig
from kopru.image_processing import ImagePreprocessor
from kopru.model import KopruForConditionalGeneration

CORPUS = [
    "a red circle on the left of a blue square",
    "there are two green triangles in the picture",
    "what colour is the shape in the middle?",
    "how many squares are there? three.",
    "resimde iki mavi kare var.",
    "solda kırmızı bir daire, sağda sarı bir üçgen var.",
    "ortadaki şekil ne renk? yeşil.",
    "The quick brown fox jumps over the lazy dog. Describe the image in one sentence.",
]


def tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained on a few English and Turkish sentences."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    # unk_token names an existing id: AutoTokenizer loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer, which
    # otherwise appends "<|endoftext|>" as its default unk and outgrows the LLM's embedding table.
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="</s>")


def _vision(kind: str, image_size: int, patch_size: int, hidden: int, layers: int):
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                  image_size=image_size, patch_size=patch_size)
    if kind == "clip":
        return CLIPVisionModel(CLIPVisionConfig(**common, projection_dim=hidden))
    if kind == "siglip":
        return SiglipVisionModel(SiglipVisionConfig(**common))
    if kind == "vit":
        return ViTModel(ViTConfig(**common), add_pooling_layer=False)
    raise ValueError(f"unknown tiny vision kind {kind!r}; expected clip, siglip or vit")


def _llm(kind: str, vocab_size: int, hidden: int, layers: int, tie: bool):
    if kind == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1,
            pad_token_id=2))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1,
            pad_token_id=2))
    if kind == "gpt2":  # GPT-2 always ties its input and output embeddings
        return GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=1024, bos_token_id=0,
            eos_token_id=1, pad_token_id=2))
    raise ValueError(f"unknown tiny LLM kind {kind!r}; expected llama, qwen2 or gpt2")


_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_TINY_PIXELS = {"clip": (*_CLIP, "CLIPImageProcessor"), "siglip": ((0.5,) * 3, (0.5,) * 3, "SiglipImageProcessor"),
                "vit": ((0.5,) * 3, (0.5,) * 3, "ViTImageProcessor")}


def save_tiny_vision(path: str | Path, kind: str = "clip", image_size: int = 32, patch_size: int = 8,
                     hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A tiny random encoder of `kind`, with the image-processor settings a real checkpoint ships (HF's
    preprocessor_config.json: squash to `image_size`, bicubic, the family's mean/std), since Köprü refuses an
    encoder without any rather than guessing them."""
    torch.manual_seed(seed)
    _vision(kind, image_size, patch_size, hidden, layers).save_pretrained(path)
    mean, std, processor_type = _TINY_PIXELS[kind]
    ImagePreprocessor(size=image_size, image_mean=mean, image_std=std, processor_type=processor_type
                      ).save_pretrained(path)
    return Path(path)


def save_tiny_llm(path: str | Path, kind: str = "llama", hidden: int = 64, layers: int = 4, tie: bool = False,
                  seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    _llm(kind, len(tokenizer), hidden, layers, tie).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def save_tiny_served_model(root: str | Path, seed: int = 0) -> Path:
    """A small Köprü model to serve in tests, benchmarks and the soak script, saved as root/model: the shipped
    pretrained tiny vision encoder, a random tiny Llama (`save_tiny_llm`, in root/llm) and a random projection
    connector. A random LLM seldom ends its answer early, so answers run to max_tokens: long enough to be streamed
    in many pieces and cut off mid-stream, and to tell one request's answer from another's."""

    root = Path(root)
    llm = save_tiny_llm(root / "llm", "llama", seed=seed)
    torch.manual_seed(seed)
    config = KopruConfig(vision=VisionTowerConfig(str(default_backbones()["vision"])), llm=str(llm),
                         strategy="projection")
    model, processor = KopruForConditionalGeneration.from_backbones(config)
    model.save_pretrained(root / "model", processor)
    return root / "model"
