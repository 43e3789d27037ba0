"""The lesson's claims at the scale they are about, for `kopru compare`.

- Structure (trainable parameters, image positions, FLOPs and KV-cache memory per image) at the lesson's own
  configuration, CLIP-L/336 + Vicuna-7B, from `kopru explain`'s arithmetic on the meta device (its presets
  `projection-clip-l-vicuna-7b`, `qformer-clip-l-vicuna-7b`, `cross-attention-clip-l-vicuna-7b`).
- Speed (time to first token and decode tokens/s against image positions) on a model where the LLM dominates:
  random weights in CLIP-B/14-336's and Qwen2-0.5B's shapes on a CPU (576 patches, as CLIP-L/336 gives), the
  lesson's CLIP-L/336 + Vicuna-7B in bfloat16 on a GPU. The three strategies share one encoder and one LLM
  (a cross-attention connector's blocks only run when a call carries its image context), and their
  measurements take turns, so that a machine getting busier slows all three alike.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from kopru.config import KopruConfig, VisionTowerConfig
from kopru.explain import explain
from kopru.lesson.tiny import tiny_tokenizer
from kopru.model import KopruForConditionalGeneration
from kopru.presets import CLIP_L_336, PRESETS, VICUNA_7B
from kopru.processing import add_image_tokens
from kopru.vision import VISION_BACKBONES, VisionTower

STRATEGIES: tuple[str, ...] = ("projection", "qformer", "cross_attention")
# kopru explain's presets of the lesson's three strategies over CLIP-L/336 + Vicuna-7B.
LESSON_PRESETS: dict[str, str] = {"projection": "projection-clip-l-vicuna-7b", "qformer": "qformer-clip-l-vicuna-7b",
                                  "cross_attention": "cross-attention-clip-l-vicuna-7b"}


def lesson_structure(dtype: str = "bfloat16") -> dict[str, dict[str, Any]]:
    """Per strategy, `kopru explain`'s figures for its lesson preset: trainable parameters in stage 1 (align:
    what the lesson's table counts) and in single-stage training, LLM positions and cross-attention K/V per
    image, forward FLOPs per image, and the KV cache one image takes (its LLM positions' share of the cache,
    plus the cross-attention K/V) at `dtype`, batch 1."""
    found = {}
    for strategy, name in LESSON_PRESETS.items():
        e = explain(preset=name, dtype=dtype)
        per_position = e.memory["kv_cache"] / e.image.context  # the cache is linear in the positions it holds
        found[strategy] = {
            "preset": name, "description": e.description, "trainable_align": e.trainable("align"),
            "trainable_single_stage": e.trainable("single-stage"), "total_params": e.total_params,
            "llm_positions": e.image.llm_positions, "cross_attention_kv": e.image.cross_attention_kv,
            "flops_per_image": e.flops["per_image"],
            "kv_bytes_per_image": per_position * e.image.llm_positions + e.memory["cross_attention_kv"],
            "dtype": dtype,
        }
    return found


# --- speed ----------------------------------------------------------------------------------------------------

CLIP_B_14_336 = {  # CLIP ViT-B/16's width and depth with CLIP-L/336's patch grid: 24 x 24 = 576 patches
    "model_type": "clip_vision_model", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu",
}
QWEN2_0_5B = {  # Qwen/Qwen2-0.5B's config.json (shapes only: the weights are random)
    "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "rope_parameters": {"rope_type": "default",
                                                                          "rope_theta": 1000000.0},
}
TINY_VISION = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
TINY_LLM = {"model_type": "llama", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 256}


def _lesson_connector(strategy: str) -> dict[str, Any]:
    return dict(PRESETS[LESSON_PRESETS[strategy]].connector)


@dataclass(frozen=True)
class SpeedSetup:
    """One speed measurement: the backbones' HF configs, each strategy's connector, the prompt and repeats."""

    name: str
    description: str
    vision: dict[str, Any]
    llm: dict[str, Any]
    connectors: dict[str, dict[str, Any]] = field(default_factory=lambda: {s: _lesson_connector(s)
                                                                          for s in STRATEGIES})
    dtype: str = "float32"
    text_tokens: int = 16  # the question after the image
    new_tokens: int = 4  # per timed call: the prefill gives the first, the decode steps the rest
    repeats: int = 3


SPEED_SETUPS: dict[str, SpeedSetup] = {s.name: s for s in [
    SpeedSetup("cpu-0.5b", "random weights shaped as CLIP-B/16 at 336 px with 14-px patches (576 patches) + "
               "Qwen2-0.5B, the lesson's connectors (Linear; BLIP-2-sized Q-Former, 32 queries; gated "
               "cross-attention before every 4th layer), float32", CLIP_B_14_336, QWEN2_0_5B),
    SpeedSetup("gpu-7b", "random weights shaped as the lesson's CLIP-L/336 + Vicuna-7B and connectors, bfloat16",
               CLIP_L_336, VICUNA_7B, dtype="bfloat16", new_tokens=16),
    SpeedSetup("tiny", "tiny random backbones (tests)", TINY_VISION, TINY_LLM,
               connectors={"projection": {"kind": "linear"},
                           "qformer": {"num_queries": 4, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                       "intermediate_size": 64},
                           "cross_attention": {"every_n_layers": 2}},
               text_tokens=4, new_tokens=3, repeats=3),
]}


def default_speed_setup() -> str:
    """The lesson's 7B on a GPU, the 0.5B-shaped model on a CPU."""
    return "gpu-7b" if torch.cuda.is_available() else "cpu-0.5b"


def _config(fields: dict[str, Any]):
    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def _tokenizer(vocab_size: int) -> PreTrainedTokenizerBase:
    tokenizer = tiny_tokenizer()
    if len(tokenizer) + 3 > vocab_size:
        raise ValueError(f"the speed model's vocabulary ({vocab_size}) must hold the tokenizer's {len(tokenizer)} "
                         "tokens and the image tokens")
    return tokenizer


def build_speed_models(setup: SpeedSetup, device: torch.device | None = None) -> dict[str, Any]:
    """The three strategies over one randomly initialised encoder and LLM; returns {strategy: (model, batch)}
    where batch is one image and `text_tokens` of question, ready for `generate`."""

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, setup.dtype)
    torch.manual_seed(0)
    vision_config, llm_config = _config(setup.vision), _config(setup.llm)
    with torch.device(device):
        encoder = VISION_BACKBONES[vision_config.model_type].load_class()._from_config(vision_config, dtype=dtype)
        llm = AutoModelForCausalLM.from_config(llm_config, dtype=dtype)
    vision = VisionTower(encoder.eval(), VisionTowerConfig("random", feature_layer=-2))
    size = vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    question = torch.randint(3, 200, (setup.text_tokens,), generator=torch.Generator().manual_seed(1))
    built = {}
    for strategy in STRATEGIES:
        tokenizer = _tokenizer(llm_config.vocab_size)
        config = KopruConfig(vision=vision.config, llm="random", strategy=strategy,
                             connector=dict(setup.connectors[strategy]))
        add_image_tokens(tokenizer, config)
        model = KopruForConditionalGeneration(config, vision, llm).to(device).eval()
        count = model.image_count
        image = ([config.image_start_token_id] if config.uses_markers else []) + \
            [config.image_token_id] * count.placeholders + ([config.image_end_token_id] if config.uses_markers else [])
        ids = torch.tensor([[tokenizer.bos_token_id, *image, *question.tolist()]], device=device)
        built[strategy] = (model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels})
    return built


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure_speed(setup: SpeedSetup | str, device: torch.device | None = None) -> dict[str, Any]:
    """TTFT (ms) and decode tokens/s per strategy, batch 1, greedy, eos ignored. Each repeat makes one
    `new_tokens` call of every strategy in turn: TTFT runs to the end of the LLM's prefill, decode speed is the
    calls after it over their time. Reports every repeat, the median and the range."""
    setup = SPEED_SETUPS[setup] if isinstance(setup, str) else setup
    started = time.perf_counter()
    built = build_speed_models(setup, device)
    build_seconds = time.perf_counter() - started
    device = next(iter(built.values()))[0].device

    def timed(strategy: str, tokens: int) -> tuple[float, float]:
        """(TTFT in s, decode tokens/s) of one call: the LLM's calls are timed as they end (the first is the
        prefill), so that decode speed is not a difference of two noisy totals."""
        model, batch = built[strategy]
        ends: list[float] = []

        def mark(*_: Any) -> None:
            _synchronize(device)
            ends.append(time.perf_counter())

        handle = model.llm.register_forward_hook(mark)
        try:
            _synchronize(device)
            start = time.perf_counter()
            model.generate(**batch, max_new_tokens=tokens, eos_token_id=[])
        finally:
            handle.remove()
        return ends[0] - start, (len(ends) - 1) / max(ends[-1] - ends[0], 1e-9)

    for strategy in STRATEGIES:  # warm-up: first calls allocate and pick kernels
        timed(strategy, 2)
    ttft: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    decode: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    for _ in range(setup.repeats):
        for strategy in STRATEGIES:
            first, rate = timed(strategy, setup.new_tokens)
            ttft[strategy].append(1000 * first)
            decode[strategy].append(rate)
    strategies = {}
    for strategy in STRATEGIES:
        model = built[strategy][0]
        strategies[strategy] = {
            "llm_positions": model.image_count.llm_positions,
            "cross_attention_kv": model.image_count.cross_attention_kv,
            "ttft_ms": _summary(ttft[strategy]), "decode_tokens_per_s": _summary(decode[strategy]),
        }
    return {"setup": asdict(setup), "device": str(device), "threads": torch.get_num_threads(),
            "build_seconds": build_seconds, "seconds": time.perf_counter() - started, "strategies": strategies}


def _summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}
