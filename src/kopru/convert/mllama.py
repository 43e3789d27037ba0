"""HF `MllamaForConditionalGeneration` (Llama-3.2-Vision) -> Köprü `cross_attention` strategy.

Language side. Mllama's text decoder interleaves self-attention layers with gated cross-attention layers
(`text_config.cross_attention_layers`, [3, 8, 13, ...] in the 11B model). Köprü splits them apart:

* the self-attention layers, with the embeddings, final norm and `lm_head`, become a plain
  `LlamaForCausalLM` (rope parameters, RMSNorm eps, heads, key/value heads, sizes copied from the text
  config);
* each cross-attention layer becomes a `GatedCrossAttentionBlock` placed in front of the self-attention layer
  that followed it in Mllama: block positions [3, 7, 11, ...] for [3, 8, 13, ...]. Two adjacent
  cross-attention layers, or one at the very end, have no such layer and are refused.

Vocabulary. Mllama's `embed_tokens` has `vocab_size + 8` rows (the extra rows hold `<|image|>` and friends)
while its `lm_head` has `vocab_size`. A causal LM needs one size for both, so the Llama gets `vocab_size + 8`
and the 8 extra `lm_head` rows are zero: the first `vocab_size` logits equal Mllama's, the extra tokens (which
Mllama cannot emit at all) get logit 0. Mask them when sampling if that matters; for a trained model the top
logits are far above 0, so greedy decoding is not affected in practice.

Vision side. `MllamaVisionModel` takes tiled images ([B, images, tiles, 3, H, W] plus aspect-ratio ids and
masks). A converted model uses resolution mode "tiled": Köprü's processor tiles each image exactly as HF's
`MllamaImageProcessor` (`kopru.geometry.tiles`: best canvas of up to `max_num_tiles` tiles, aspect-preserving resize,
zero padding, split), `MllamaTiledVisionModel` below runs the encoder on all `max_num_tiles` tiles of each
image and the model keeps each image's own tiles: tiles x ((image_size / patch_size)^2 + 1) cross-attention
key/value positions per image (1601 per tile at 560 px / patch 14), `vision_output_dim` wide (last layer and
the intermediate layers, as Mllama concatenates them), so `feature_layer` must stay -1.

Semantics. Mllama text rows that see no image (Llama-3.2-Vision's template puts the bos and the user header
before `<|image|>`) still get cross-attention output in transformers: `_prepare_cross_attention_mask` turns
their fully masked row into no mask at all, so they attend (ordinary softmax) to every position of the sample's
`cross_attention_states` -- every tile of every image, padding tiles included -- through `o_proj` and the
attention gate; only the MLP is zeroed by `full_text_row_masked_out_mask`. Meta's reference implementation
zeroes both. A converted model reproduces transformers (`rows_without_image="attend_all"`): its image K/V hold
all `max_num_tiles` tiles of each image, rows that see an image attend to the real tiles only, the others to
all of them. That costs K/V for the padding tiles (max_num_tiles x 1601 positions per image). In a padded HF
batch a sample with fewer images than another also attends to the padding images' states, so HF's output
there depends on the batch; Köprü gives every sample what HF gives it alone. `rows_without_image="zero"` gives
Meta's behaviour (and K/V for the real tiles only).
Köprü's blocks attend to every image before a token ("previous"); HF's processor builds that mask for
consecutive images only (non-consecutive ones see just the most recent image). In the text an image is one
`<|image|>` (`config.image_token_id`) and there are no markers, as in Mllama.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MllamaForConditionalGeneration, MllamaVisionModel
from transformers.modeling_outputs import BaseModelOutput

from kopru.config import KopruConfig, ResolutionConfig, VisionTowerConfig
from kopru.connectors.cross_attention import CrossAttentionConfig, CrossAttentionConnector
from kopru.convert.common import image_preprocessor, load_tokenizer, rename
from kopru.geometry import supported_aspect_ratios, tile_layout
from kopru.high_resolution_processing import aspect_ratio_inputs
from kopru.model import KopruForConditionalGeneration
from kopru.processing import KopruProcessor
from kopru.vision import VisionTower

EXTRA_EMBEDDINGS = 8  # MllamaTextModel.embed_tokens has vocab_size + 8 rows
IMAGE_TOKEN = "<|image|>"


# ------------------------------------------------------------------------------------------------ vision
def single_tile_aspect_ratio_id(config) -> int:
    """Mllama's aspect-ratio id of a 1x1 tiling (ids are 1-based; 0 is padding)."""
    ratios = [list(ratio) for ratio in config.supported_aspect_ratios]
    if [1, 1] not in ratios:
        raise ValueError(f"expected [1, 1] among the encoder's supported_aspect_ratios, found {ratios}")
    return ratios.index([1, 1]) + 1


def single_tile_inputs(pixel_values: torch.Tensor, config) -> dict[str, torch.Tensor]:
    """[images, 3, H, W] -> MllamaVisionModel inputs with one image per sample, each image one tile."""
    if pixel_values.dim() != 4:
        raise ValueError(f"expected pixel_values [images, 3, H, W], found shape {tuple(pixel_values.shape)}")
    images = pixel_values.shape[0]
    tiles = pixel_values.new_zeros(images, 1, config.max_num_tiles, *pixel_values.shape[1:])
    tiles[:, 0, 0] = pixel_values
    device = pixel_values.device
    aspect_ratio_ids = torch.full((images, 1), single_tile_aspect_ratio_id(config), device=device)
    aspect_ratio_mask = torch.zeros(images, 1, config.max_num_tiles, dtype=torch.long, device=device)
    aspect_ratio_mask[..., 0] = 1
    return {"pixel_values": tiles, "aspect_ratio_ids": aspect_ratio_ids,
            "aspect_ratio_mask": aspect_ratio_mask}


class MllamaTiledVisionModel(MllamaVisionModel):
    """`MllamaVisionModel` behind the `VisionTower` interface; the weights (and their names) are
    MllamaVisionModel's, so `vision/` of a converted model is an ordinary Mllama vision checkpoint.

    * tiled (resolution mode "tiled", as HF): pixel_values [images, max_num_tiles, 3, S, S] with
      `aspect_ratio_ids` [images] and `aspect_ratio_mask` [images, max_num_tiles]. Every image runs all
      max_num_tiles tiles, padding ones zero, exactly as HF's processor pads them: Mllama's encoder lets real
      patches attend to padding patches (its mask only hides padding from padding), so only that reproduces HF's
      features. Output: one row per tile, [images * max_num_tiles, patches + 1, vision_output_dim]; the model
      keeps an image's own tiles (HF masks the others out of cross-attention, which is the same).
    * single tile (resolution mode "fixed"): pixel_values [images, 3, S, S], each image one 1x1 tile.

    `hidden_states` has one entry, equal to `last_hidden_state` (last layer and the intermediate layers
    concatenated, as Mllama's projector consumes them), so `feature_layer` must stay -1.
    """

    def forward(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None, output_hidden_states: bool | None = None, **kwargs
    ) -> BaseModelOutput:
        if aspect_ratio_ids is None:
            inputs = single_tile_inputs(pixel_values, self.config)
        else:
            inputs = tiled_inputs(pixel_values, aspect_ratio_ids, aspect_ratio_mask, self.config)
        tiled = super().forward(**inputs, **kwargs).last_hidden_state  # [images, 1, tiles, patches, dim]
        if aspect_ratio_ids is None:
            features = tiled[:, 0, 0]  # tile 0 of each image
        else:
            features = tiled.flatten(0, 2)
        return BaseModelOutput(last_hidden_state=features, hidden_states=(features,))


MllamaSingleTileVisionModel = MllamaTiledVisionModel  # the name earlier releases used


def tiled_inputs(pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor | None,
                 config) -> dict[str, torch.Tensor]:
    """[images, tiles, 3, H, W] + per-image ids / masks -> MllamaVisionModel inputs, one image per sample."""
    tiles = config.max_num_tiles
    if pixel_values.dim() != 5 or pixel_values.shape[1] != tiles:
        raise ValueError(f"expected tiled pixel_values [images, {tiles} tiles (the encoder's max_num_tiles), 3, H, W], "
                         f"found shape {tuple(pixel_values.shape)}")
    images = pixel_values.shape[0]
    if aspect_ratio_mask is None or tuple(aspect_ratio_ids.shape) != (images,) or \
            tuple(aspect_ratio_mask.shape) != (images, tiles):
        found = None if aspect_ratio_mask is None else tuple(aspect_ratio_mask.shape)
        raise ValueError(f"expected aspect_ratio_ids [{images}] and aspect_ratio_mask [{images}, {tiles}], found "
                         f"{tuple(aspect_ratio_ids.shape)} and {found}")
    bad = aspect_ratio_ids[(aspect_ratio_ids < 1) | (aspect_ratio_ids > config.max_aspect_ratio_id)]
    if bad.numel():
        raise ValueError(f"expected aspect_ratio_ids in 1..{config.max_aspect_ratio_id} (the encoder's "
                         f"supported_aspect_ratios), found {bad.tolist()}")
    return {"pixel_values": pixel_values.unsqueeze(1), "aspect_ratio_ids": aspect_ratio_ids.view(images, 1),
            "aspect_ratio_mask": aspect_ratio_mask.view(images, 1, tiles)}


# ---------------------------------------------------------------------------------------------- language
def block_positions(cross_attention_layers: list[int], num_layers: int) -> list[int]:
    """For each Mllama cross-attention layer, the index among the self-attention layers of the next layer."""
    cross = sorted(cross_attention_layers)
    if len(set(cross)) != len(cross) or any(not 0 <= i < num_layers for i in cross):
        raise ValueError(
            f"cross_attention_layers must be distinct indices in 0..{num_layers - 1}, found {cross}"
        )
    positions = [layer - before for before, layer in enumerate(cross)]
    num_self = num_layers - len(cross)
    if len(set(positions)) != len(positions) or positions and positions[-1] >= num_self:
        raise ValueError(
            f"Köprü places each gated block in front of a self-attention layer; cross_attention_layers "
            f"{cross} of {num_layers} have two adjacent cross-attention layers or one at the end"
        )
    return positions


# MllamaTextConfig fields against the LlamaConfig of its self-attention layers (read both ways); the
# vocabulary (+ EXTRA_EMBEDDINGS) and the layer count (- the cross-attention layers) differ, the rest is fixed:
# head_dim = hidden_size / heads, no biases, untied embeddings (Mllama's embeddings have 8 rows more than its head).
TEXT_CONFIG_NAMES = (
    ("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"),
    ("num_attention_heads", "num_attention_heads"), ("num_key_value_heads", "num_key_value_heads"),
    ("hidden_act", "hidden_act"), ("max_position_embeddings", "max_position_embeddings"),
    ("rms_norm_eps", "rms_norm_eps"), ("rope_parameters", "rope_parameters"), ("dropout", "attention_dropout"),
    ("initializer_range", "initializer_range"), ("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
    ("pad_token_id", "pad_token_id"),
)
LLAMA_FIXED = {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}


def language_config(text) -> LlamaConfig:
    """A Llama config for the self-attention layers of a `MllamaTextConfig`."""
    values = {ours: copy.deepcopy(getattr(text, theirs)) for theirs, ours in TEXT_CONFIG_NAMES}
    return LlamaConfig(
        **values, **LLAMA_FIXED,
        vocab_size=text.vocab_size + EXTRA_EMBEDDINGS,
        num_hidden_layers=text.num_hidden_layers - len(text.cross_attention_layers),
        head_dim=text.hidden_size // text.num_attention_heads,
    )


def text_config(llama: LlamaConfig, cross_attention_layers: list[int], vocab_size: int) -> dict:
    """The inverse of `language_config`: MllamaTextConfig values for a Llama with gated blocks that become the
    cross-attention layers `cross_attention_layers`; `vocab_size` is the head's rows (`unpad_lm_head`)."""
    values = {theirs: copy.deepcopy(getattr(llama, ours)) for theirs, ours in TEXT_CONFIG_NAMES}
    return {**values, "vocab_size": vocab_size, "cross_attention_layers": sorted(cross_attention_layers),
            "num_hidden_layers": llama.num_hidden_layers + len(cross_attention_layers), "tie_word_embeddings": False}


# One Mllama cross-attention decoder layer's weights against one Köprü gated block's (read both ways).
BLOCK_NAMES = (
    ("input_layernorm.weight", "input_norm.weight"),
    ("cross_attn.q_proj.weight", "q_proj.weight"),
    ("cross_attn.k_proj.weight", "k_proj.weight"),
    ("cross_attn.v_proj.weight", "v_proj.weight"),
    ("cross_attn.o_proj.weight", "o_proj.weight"),
    ("cross_attn.q_norm.weight", "q_norm.weight"),
    ("cross_attn.k_norm.weight", "k_norm.weight"),
    ("cross_attn_attn_gate", "attn_gate"),
    ("post_attention_layernorm.weight", "post_attention_norm.weight"),
    ("mlp.gate_proj.weight", "mlp.gate_proj.weight"),
    ("mlp.up_proj.weight", "mlp.up_proj.weight"),
    ("mlp.down_proj.weight", "mlp.down_proj.weight"),
    ("cross_attn_mlp_gate", "mlp_gate"),
)
TEXT = "model.language_model."


def weight_names(cross_attention_layers: list[int], num_layers: int) -> list[tuple[str, str]]:
    """(HF name, Köprü name) prefixes of an Mllama whose text decoder has `num_layers` layers, those in
    `cross_attention_layers` cross-attention layers (kopru.convert.common.rename; read both ways): the
    self-attention layers renumbered into the Llama, each cross-attention layer a gated block. `lm_head` also
    differs in rows (`pad_lm_head`)."""
    block_positions(cross_attention_layers, num_layers)  # refuses what Köprü's blocks cannot express
    cross = sorted(cross_attention_layers)
    names = [("model.vision_model.", "vision.encoder."), ("model.multi_modal_projector.", "connector.projection."),
             (f"{TEXT}embed_tokens.", "llm.model.embed_tokens."), (f"{TEXT}norm.", "llm.model.norm."),
             ("lm_head.", "llm.lm_head.")]
    self_layers = 0
    for index in range(num_layers):
        if index in cross:
            block = cross.index(index)
            names += [(f"{TEXT}layers.{index}.{hf}", f"connector.blocks.{block}.{ours}") for hf, ours in BLOCK_NAMES]
        else:
            names.append((f"{TEXT}layers.{index}.", f"llm.model.layers.{self_layers}."))
            self_layers += 1
    return names


def pad_lm_head(head: torch.Tensor) -> torch.Tensor:
    """Mllama's lm_head [vocab_size, dim] -> the Llama's [vocab_size + 8, dim], the extra rows zero."""
    padded = head.new_zeros(head.shape[0] + EXTRA_EMBEDDINGS, head.shape[1])
    padded[: head.shape[0]] = head
    return padded


def unpad_lm_head(head: torch.Tensor, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `pad_lm_head`, for a Köprü Llama -> (Mllama's lm_head, its embeddings, 8 rows more). A
    converted model's head ends in the 8 zero rows `pad_lm_head` added: they go. Any other Llama (a Köprü model
    built on its own) keeps every row of its head, and its embeddings get 8 zero rows that no token uses."""
    if head.shape[0] > EXTRA_EMBEDDINGS and not head[-EXTRA_EMBEDDINGS:].any():
        return head[:-EXTRA_EMBEDDINGS], embeddings
    return head, torch.cat([embeddings, embeddings.new_zeros(EXTRA_EMBEDDINGS, embeddings.shape[1])])


def kopru_weights_from_hf(reference: MllamaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The reference's weights under Köprü's names (`weight_names`), the head padded (`pad_lm_head`)."""
    text = reference.config.text_config
    state = rename(reference.state_dict(), weight_names(text.cross_attention_layers, text.num_hidden_layers),
                   to="kopru")
    state["llm.lm_head.weight"] = pad_lm_head(state["llm.lm_head.weight"])
    return state


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix):]: t for name, t in state.items() if name.startswith(prefix)}


def _build(make, state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """`make()` on the meta device, then the (shared, not copied) tensors of `state`; no random init of a
    billion-parameter module only to overwrite it. Non-persistent buffers (rotary frequencies) are rebuilt."""
    with torch.device("meta"):
        module = make()
    module.load_state_dict({name: t.detach() for name, t in state.items()}, strict=True, assign=True)
    for owner in list(module.modules()):
        if any(b.is_meta for b in owner.buffers(recurse=False)) and hasattr(owner, "config"):
            rebuilt = _rebuild(owner, device)
            for name, buffer in rebuilt.named_buffers(recurse=False):
                setattr(owner, name, buffer)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"conversion left tensors without values: {left[:5]}")
    return module


def _rebuild(owner: nn.Module, device: torch.device) -> nn.Module:
    with torch.device(device):
        return type(owner)(owner.config)


def build_llm(reference: MllamaForConditionalGeneration, state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """The Llama of the self-attention layers; `state`: `kopru_weights_from_hf(reference)`."""
    config = language_config(reference.config.text_config)
    device = reference.lm_head.weight.device
    llm = _build(lambda: LlamaForCausalLM(config), _part(state, "llm."), device)
    llm.config.dtype = reference.lm_head.weight.dtype
    return llm.eval()


def build_vision(reference: MllamaForConditionalGeneration, state: dict[str, torch.Tensor]
                 ) -> MllamaTiledVisionModel:
    source = reference.model.vision_model
    device = source.patch_embedding.weight.device
    vision = _build(lambda: MllamaTiledVisionModel(source.config), _part(state, "vision.encoder."), device)
    vision.config.dtype = source.patch_embedding.weight.dtype
    return vision.eval()


# --------------------------------------------------------------------------------------------- converter
REFERENCE_CLASS = MllamaForConditionalGeneration


def kopru_config(reference: MllamaForConditionalGeneration, src: str) -> KopruConfig:
    text = reference.config.text_config
    return KopruConfig(
        vision=VisionTowerConfig(name_or_path=src, feature_layer=-1, drop_cls=False),
        llm=src,
        strategy="cross_attention",
        connector=CrossAttentionConfig(
            every_n_layers=None,
            layers=block_positions(text.cross_attention_layers, text.num_hidden_layers),
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads,
            intermediate_size=text.intermediate_size,
            qk_norm=True,
            attend_to="previous",
            rows_without_image="attend_all",  # rows before the first image attend as in HF (module docstring)
        ),
        image_token=IMAGE_TOKEN,
        image_start_token=None,
        image_end_token=None,
        image_token_id=reference.config.image_token_id,
        # HF's processor tiles every image (up to max_num_tiles, tile position embeddings by aspect ratio).
        resolution=ResolutionConfig(mode="tiled"),
    )


def to_kopru(
    reference: MllamaForConditionalGeneration, src: str
) -> tuple[KopruForConditionalGeneration, KopruProcessor]:
    activation = reference.config.text_config.hidden_act
    if activation != "silu":
        raise ValueError(f"expected a SiLU (SwiGLU) text MLP like the gated blocks', found {activation!r}")
    config = kopru_config(reference, src)
    state = kopru_weights_from_hf(reference)  # the source's tensors under Köprü's names (the head padded once)
    vision = VisionTower(build_vision(reference, state), config.vision)
    llm = build_llm(reference, state)
    device = reference.lm_head.weight.device
    connector = _build(
        lambda: CrossAttentionConnector(config.connector, vision.hidden_size, llm.config),
        _part(state, "connector."), device,
    )
    model = KopruForConditionalGeneration(config, vision, llm, connector)
    tokenizer = load_tokenizer(src, config)
    processor = KopruProcessor(tokenizer, image_preprocessor(src, vision), config, model.image_count,
                               encoder_config=vision.encoder.config)
    return model, processor


def random_inputs(reference: MllamaForConditionalGeneration, model: KopruForConditionalGeneration,
                  images_per_sample: int = 1, batch: int = 2, text_length: int = 10):
    """`images_per_sample` random tiled images at the start of each prompt, then random text.

    The images cycle through every tile arrangement the encoder supports (image sizes that are exact multiples
    of the tile size, so image k has arrangement k), so a batch mixes tile counts. HF side: the same tiles padded
    to `max_num_tiles` with zeros, aspect-ratio ids and masks, and a cross-attention mask in which each row sees
    the real tiles of the images up to its position (all rows see one). Köprü side: the tiles and image sizes.
    """
    config = reference.config
    vision = config.vision_config
    image_id, size, tiles = config.image_token_id, vision.image_size, vision.max_num_tiles
    arrangements = supported_aspect_ratios(tiles)
    text_ids = torch.randint(0, min(image_id, config.text_config.vocab_size), (batch, text_length))
    input_ids = torch.cat([torch.full((batch, images_per_sample), image_id), text_ids], dim=1)
    count = batch * images_per_sample
    layouts = [tile_layout(rows * size, columns * size, size, tiles)
               for rows, columns in (arrangements[k % len(arrangements)] for k in range(count))]
    pixels = torch.randn(count, tiles, 3, size, size)
    ids, mask = aspect_ratio_inputs(layouts, tiles)
    pixels = pixels * mask.view(count, tiles, 1, 1, 1)  # padding tiles are zero, as HF's processor pads
    images_seen = torch.cumsum(input_ids == image_id, dim=1)  # [B, T]
    sees = images_seen.unsqueeze(-1) > torch.arange(images_per_sample)  # [B, T, images]
    cross_attention_mask = sees.unsqueeze(-1).long() * mask.view(batch, 1, images_per_sample, tiles)
    attention_mask = torch.ones_like(input_ids)
    reference_inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixels.view(batch, images_per_sample, tiles, 3, size, size),
        "aspect_ratio_ids": ids.view(batch, images_per_sample),
        "aspect_ratio_mask": mask.view(batch, images_per_sample, tiles),
        "cross_attention_mask": cross_attention_mask,
    }
    sizes = torch.tensor([[layout.canvas[0], layout.canvas[1]] for layout in layouts])
    kopru_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels,
                    "image_sizes": sizes}
    return reference_inputs, kopru_inputs
