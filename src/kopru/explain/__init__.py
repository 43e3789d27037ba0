"""`kopru explain`: the architecture mathematics of a vision-language model, for its real configuration.

For a Köprü config, a saved Köprü model directory or a named preset (`kopru.presets`: published HF configs
written out; nothing is downloaded) it reports:

- the data flow from pixels to logits, stage by stage, with tensor shapes;
- each component's total parameters and what trains in each recipe (align / instruct / single-stage / LoRA,
  the rules of `kopru.training.recipes` applied to the model);
- forward FLOPs per image and per text token;
- the image's positions in the LLM context (and its cross-attention key/value length);
- weight and KV-cache memory at a dtype, batch and context length.

Every model is built on the `meta` device: parameters have shapes and no storage, so a 90B preset is explained
in seconds on a laptop. Presets whose architecture Köprü builds itself (LLaVA-1.5, BLIP-2, the three
strategies over one encoder + LLM) are explained from the Köprü model; LLaVA-NeXT (anyres newline embedding),
Llama-3.2-Vision (tiled encoder with gated positional embeddings, cross-attention layers inside the text stack)
and Qwen2-VL (windowless ViT with 2x2 merger, M-RoPE) from the HF reference model itself (the report says
which). The tests check that each preset's parameter counts equal the HF reference class built from the same
configs, and that the stage shapes equal those of a real forward pass of a tiny model.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over forward passes on meta tensors: matrix
multiplications, convolutions and attention (2 per multiply-add); element-wise work, norms and softmax are not
counted. The Qwen2-VL encoder cannot run on meta tensors (its attention splits on data-dependent lengths); its
FLOPs are computed as 2 x weights x tokens for the matmuls plus 4 x tokens^2 x width per layer for attention.

By concern:

- `parameters`: meta models (Köprü's or an HF reference class), named components, trainable per recipe, LoRA;
- `flops`: FLOP counting and the LLM's cost against sequence length;
- `architectures`: one explainer per architecture family, `Settings`, `Target`;
- `report`: `Explanation` and its rendering (text, markdown, JSON);
- `diagram`: the data flow drawn (matplotlib);
- `api`: `explain` and its targets (preset, config, model directory), `summary_table`, `list_presets`.
"""

from kopru.explain.api import (
    config_target,
    explain,
    list_presets,
    model_dir_target,
    preset_target,
    summary_table,
)
from kopru.explain.architectures import ARCHITECTURES, Settings, Target
from kopru.explain.diagram import draw_diagram
from kopru.explain.flops import FlopTracer, SequenceCost, count_flops
from kopru.explain.parameters import build_kopru_meta, build_reference
from kopru.explain.report import (
    FORMATS,
    LORA_ALPHA,
    LORA_RANK,
    RECIPES,
    Component,
    Explanation,
    ImageBudget,
    Stage,
    human,
    human_bytes,
)
from kopru.presets import PRESETS, Preset, get_preset, hf_config, reference_config

__all__ = [  # the preset table's names are re-exported: they were first published here
    "ARCHITECTURES", "FORMATS", "LORA_ALPHA", "LORA_RANK", "PRESETS", "RECIPES", "Component", "Explanation",
    "FlopTracer", "ImageBudget", "Preset", "SequenceCost", "Settings", "Stage", "Target", "build_kopru_meta",
    "build_reference", "config_target", "count_flops", "draw_diagram", "explain", "get_preset", "hf_config", "human",
    "human_bytes", "list_presets", "model_dir_target", "preset_target", "reference_config", "summary_table",
]
