"""Strategy 3, Flamingo / Llama-3.2-Vision: gated cross-attention blocks inside a frozen LLM.

Each block sits in front of one decoder layer. It lets the text attend to the image states and adds the
result through `tanh(gate)`, gates starting at 0, so an untrained model is exactly the text LLM.

Image context flows through the call, never through state kept in a layer (OpenFlamingo's fragility):
the model passes an `ImageContext` to the LLM as the keyword argument `kopru_image_context`;
transformers hands extra keyword arguments to every decoder layer, and a forward pre-hook on each chosen
layer runs its block on that layer's input. A call without the keyword runs the LLM untouched.

The image keys/values of every block are computed once per sequence (`ImageContext.build`) and reused by
each decoding step.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from kopru.connectors.base import Connector, register_strategy
from kopru.connectors.resampler import PerceiverResampler, ResamplerConfig
from kopru.llm import decoder_layers

CONTEXT_KWARG = "kopru_image_context"


@dataclass
class CrossAttentionConfig:
    # A block in front of every n-th decoder layer (layers n-1, 2n-1, ...), as OpenFlamingo places them ...
    every_n_layers: int | None = 4
    # ... or in front of these decoder-layer indices (overrides every_n_layers).
    layers: list[int] | None = None
    num_heads: int | None = None  # None: the LLM's
    num_kv_heads: int | None = None  # None: the LLM's (grouped-query attention carries over)
    intermediate_size: int | None = None  # None: the LLM's
    qk_norm: bool = True  # per-head RMSNorm on queries and keys, as Llama-3.2-Vision
    # "previous": a token sees every image before it (Llama-3.2-Vision); "most_recent": only the last (Flamingo).
    attend_to: Literal["previous", "most_recent"] = "previous"
    # What a text row that sees no image (e.g. the bos and user header before Llama-3.2-Vision's <|image|>) gets
    # from a block. "zero": nothing, from the attention or the MLP (Meta's reference Llama 3.2 Vision).
    # "attend_all": what transformers' Mllama gives it. Its cross-attention mask row is fully masked, which
    # `_prepare_cross_attention_mask` turns into no mask at all: the row attends (ordinary softmax) to every
    # image position of its sample -- Mllama's padding tiles included, see `build_context` -- through the
    # attention gate, and only the MLP is zeroed. Converted Mllama checkpoints use it so their logits equal HF's.
    rows_without_image: Literal["zero", "attend_all"] = "zero"
    resampler: ResamplerConfig | None = None

    __nested__ = {"resampler": ResamplerConfig}

    def __post_init__(self) -> None:
        if self.layers is None and (self.every_n_layers is None or self.every_n_layers < 1):
            raise ValueError(f"every_n_layers must be >= 1 when layers is not given, found {self.every_n_layers}")
        if self.attend_to not in ("previous", "most_recent"):
            raise ValueError(f"attend_to must be 'previous' or 'most_recent', found {self.attend_to!r}")
        if self.rows_without_image not in ("zero", "attend_all"):
            raise ValueError(f"rows_without_image must be 'zero' or 'attend_all', found {self.rows_without_image!r}")
        if isinstance(self.resampler, dict):
            self.resampler = ResamplerConfig(**self.resampler)

    def block_positions(self, num_layers: int) -> list[int]:
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad or len(set(self.layers)) != len(self.layers):
                raise ValueError(
                    f"cross-attention layers must be distinct indices in 0..{num_layers - 1}, found {self.layers}"
                )
            positions = sorted(self.layers)
        else:
            positions = [i for i in range(num_layers) if (i + 1) % self.every_n_layers == 0]
        if not positions:
            raise ValueError(
                f"cross_attention would insert no block: layers={self.layers}, every_n_layers={self.every_n_layers} "
                f"on an LLM with {num_layers} layers; expected at least one position"
            )
        return positions


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GatedCrossAttentionBlock(nn.Module):
    """tanh-gated cross-attention then tanh-gated MLP; the layout of Llama-3.2-Vision's cross-attention layer."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, intermediate_size: int, eps: float, qk_norm: bool):
        super().__init__()
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"cross-attention needs dim % heads == 0 and heads % kv_heads == 0, found dim={dim}, "
                f"heads={num_heads}, kv_heads={num_kv_heads}"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.input_norm = nn.RMSNorm(dim, eps=eps)
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_norm = nn.RMSNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, intermediate_size)
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def keys_values(self, image_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, dim] -> keys, values [B, kv_heads, N, head_dim]; once per sequence."""
        batch, length, _ = image_states.shape
        keys = self.k_proj(image_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        values = self.v_proj(image_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return self.k_norm(keys), values

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                sees_image: torch.Tensor, attends: torch.Tensor | None = None) -> torch.Tensor:
        """`sees_image` [B, T, 1] of 0/1 gates the MLP; `attends` (default: `sees_image`) the attention output,
        1 also on rows without an image under rows_without_image "attend_all"."""
        batch, length, _ = hidden.shape
        query = self.q_proj(self.input_norm(hidden)).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(
            self.q_norm(query), keys, values, attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads
        )
        attended = self.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))
        # Rows that do not attend get no image signal at all (their attention row was unmasked only to avoid NaN).
        hidden = hidden + self.attn_gate.tanh() * attended * (sees_image if attends is None else attends)
        return hidden + self.mlp_gate.tanh() * self.mlp(self.post_attention_norm(hidden)) * sees_image


@dataclass
class ImageContext:
    """What the gated blocks need for one LLM call; built by the model, passed through the call.

    It carries the blocks themselves, so the hooks on the decoder layers are plain functions holding nothing
    (a deep copy of the model runs its own blocks).
    """

    keys_values: list[tuple[torch.Tensor, torch.Tensor]]  # per block, [B, kv_heads, images * per_image, head_dim]
    images_per_sample: torch.Tensor  # [B]
    tokens_per_image: int
    attend_to: str
    blocks: nn.ModuleList | None = None
    # Per call: [B, 1, T, N] visibility of each image position from each text position, and [B, T, 1] of 0/1.
    mask: torch.Tensor | None = None
    sees_image: torch.Tensor | None = None
    # Indices of the blocks that ran during the call: the model checks that the LLM passed the context on.
    ran: list[int] = field(default_factory=list)
    # [B, N]: which of its sample's images each key/value position belongs to, -1 on padding. None: every image
    # has `tokens_per_image` positions (images of different sizes, anyres or dynamic, set it).
    image_of_position: torch.Tensor | None = None
    # rows_without_image "attend_all": rows that see no image attend to every position of their sample's images
    # ([B, N] `unseen_visible` when given -- Mllama's padding tiles, whose `image_of_position` is -1, included --
    # else every position of an image of the sample); `attends` [B, T, 1] per call: rows whose attention counts.
    attend_all_unseen: bool = False
    unseen_visible: torch.Tensor | None = None
    attends: torch.Tensor | None = None

    def for_positions(self, images_seen: torch.Tensor) -> ImageContext:
        """The same keys/values with the mask for text positions that have `images_seen` [B, T] images before them
        (counting an image's own placeholder)."""
        if self.image_of_position is None:
            kv_length = self.keys_values[0][0].shape[2]
            image_of_position = torch.arange(kv_length, device=images_seen.device) // self.tokens_per_image
        else:
            image_of_position = self.image_of_position.unsqueeze(1)  # [B, 1, N]
        seen = images_seen.unsqueeze(-1)  # [B, T, 1]
        if self.attend_to == "most_recent":
            mask = (image_of_position == seen - 1) & (image_of_position >= 0)
        else:
            mask = (image_of_position < seen) & (image_of_position >= 0)
        sees_image = mask.any(-1, keepdim=True)
        dtype = self.keys_values[0][0].dtype
        attends = None
        if self.attend_all_unseen:
            visible = self.unseen_visible
            if visible is None:
                visible = (image_of_position >= 0) & (image_of_position < self.images_per_sample.view(-1, 1, 1))
                visible = visible.reshape(visible.shape[0], -1)
            visible = visible.unsqueeze(1)  # [B, 1, N]
            mask = torch.where(sees_image, mask, visible)
            attends = (sees_image | visible.any(-1, keepdim=True)).to(dtype)  # a sample without images: nothing
        mask = mask | ~mask.any(-1, keepdim=True)  # no empty attention row (NaN); its output is not used
        return dataclasses.replace(self, mask=mask.unsqueeze(1), sees_image=sees_image.to(dtype), attends=attends,
                                   ran=[])


def run_block(index: int, _layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of a decoder layer: run gated block `index` on the layer's input, if the call carries
    an image context."""
    context: ImageContext | None = kwargs.get(CONTEXT_KWARG)
    if context is None:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    keys, values = context.keys_values[index]
    hidden = context.blocks[index](hidden, keys, values, context.mask, context.sees_image, context.attends)
    context.ran.append(index)
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@register_strategy("cross_attention")
class CrossAttentionConnector(Connector):
    config_class = CrossAttentionConfig
    splices_into_text = False
    llm_trains_in_stage2 = False  # the base LLM stays frozen (Flamingo, Llama-3.2-Vision)

    def __init__(self, config: CrossAttentionConfig, vision_dim: int, llm_config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        dim = llm_config.hidden_size
        num_heads = config.num_heads or llm_config.num_attention_heads
        num_kv_heads = config.num_kv_heads or getattr(llm_config, "num_key_value_heads", None) or num_heads
        intermediate = config.intermediate_size or getattr(llm_config, "intermediate_size", None) or 4 * dim
        eps = getattr(llm_config, "rms_norm_eps", None) or getattr(llm_config, "layer_norm_epsilon", 1e-6)
        self.resampler = PerceiverResampler(config.resampler, vision_dim) if config.resampler else None
        self.projection = nn.Linear(vision_dim, dim)
        self.positions = config.block_positions(llm_config.num_hidden_layers)
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(dim, num_heads, num_kv_heads, intermediate, eps, config.qk_norm)
            for _ in self.positions
        )

    @classmethod
    def output_tokens(cls, config: CrossAttentionConfig, vision_tokens: int) -> int:
        return config.resampler.num_latents if config.resampler else vision_tokens

    @classmethod
    def keeps_patch_grid(cls, config: CrossAttentionConfig) -> bool:
        return config.resampler is None

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """[images, tokens, vision_dim] -> image states [images, kv tokens, llm_dim]"""
        if self.resampler is not None:
            image_features = self.resampler(image_features)
        return self.projection(image_features)

    def attach(self, llm: PreTrainedModel) -> None:
        """Put each block in front of its decoder layer (forward pre-hooks; the LLM's weights are untouched)."""
        layers = decoder_layers(llm)
        for index, position in enumerate(self.positions):
            layer = layers[position]
            for key, hook in list(layer._forward_pre_hooks.items()):
                if isinstance(hook, functools.partial) and hook.func is run_block:
                    del layer._forward_pre_hooks[key]  # attached before (e.g. to this LLM's previous connector)
            layer.register_forward_pre_hook(functools.partial(run_block, index), with_kwargs=True)

    def build_context(self, image_states: torch.Tensor | list[torch.Tensor],
                      images_per_sample: torch.Tensor, real_positions: list[torch.Tensor] | None = None
                      ) -> ImageContext:
        """Lay the flat [images, N, dim] states out per sample ([B, max_images * N, dim], zero padded) and
        compute every block's keys/values once.

        `image_states` may also be a list of [N_i, dim], one per image, when images differ in length (anyres,
        dynamic resolution): each sample's images are concatenated and padding positions are masked out.

        `real_positions` (with a list, rows_without_image "attend_all"): per image a [N_i] bool, False on
        positions that only rows without an image attend to (Mllama's padding tiles, which HF keeps in
        `cross_attention_states`); rows that see the image attend to its True positions only.
        """
        if isinstance(image_states, list):
            return self._build_ragged_context(image_states, images_per_sample, real_positions)
        if real_positions is not None:
            raise ValueError(f"real_positions come with a list of per-image states, found a tensor "
                             f"{list(image_states.shape)}")
        batch = images_per_sample.shape[0]
        per_image = image_states.shape[1]
        max_images = max(int(images_per_sample.max()), 1) if batch else 1
        slots = torch.arange(max_images, device=image_states.device).expand(batch, -1)
        occupied = slots < images_per_sample.unsqueeze(1)  # [B, max_images], images in order of appearance
        padded = image_states.new_zeros(batch, max_images, per_image, image_states.shape[-1])
        padded[occupied] = image_states
        padded = padded.flatten(1, 2)
        keys_values = [block.keys_values(padded) for block in self.blocks]
        return ImageContext(keys_values, images_per_sample, per_image, self.config.attend_to, self.blocks,
                            attend_all_unseen=self.config.rows_without_image == "attend_all")

    def _build_ragged_context(self, image_states: list[torch.Tensor], images_per_sample: torch.Tensor,
                              real_positions: list[torch.Tensor] | None = None) -> ImageContext:
        if len(image_states) != int(images_per_sample.sum()):
            raise ValueError(
                f"expected states for {int(images_per_sample.sum())} image(s), one per placeholder, found "
                f"{len(image_states)}"
            )
        per_sample, index_per_sample, start = [], [], 0
        for count in images_per_sample.tolist():
            states = image_states[start:start + count]
            start += count
            per_sample.append(torch.cat(states) if states else image_states[0].new_zeros(0, image_states[0].shape[-1]))
            index_per_sample.append(torch.cat([torch.full((s.shape[0],), i, dtype=torch.long) for i, s in
                                               enumerate(states)]) if states else torch.zeros(0, dtype=torch.long))
        unseen_visible = None
        if real_positions is not None:
            shapes = [tuple(real.shape) for real in real_positions]
            if shapes != [(states.shape[0],) for states in image_states]:
                raise ValueError(f"expected one real_positions [N_i] per image, {[s.shape[0] for s in image_states]}"
                                 f" long, found shapes {shapes}")
            real = torch.cat([r.cpu() for r in real_positions]) if real_positions else torch.zeros(0, dtype=torch.bool)
            real_per_sample = real.split([len(index) for index in index_per_sample])
            # Every position of the sample's images for rows without an image; the real ones only for the others.
            unseen_visible = [torch.ones(len(index), dtype=torch.bool) for index in index_per_sample]
            index_per_sample = [index.masked_fill(~r, -1) for index, r in zip(index_per_sample, real_per_sample,
                                                                                strict=True)]
        longest = max(max(s.shape[0] for s in per_sample), 1)
        padded = image_states[0].new_zeros(len(per_sample), longest, image_states[0].shape[-1])
        image_of_position = torch.full((len(per_sample), longest), -1, dtype=torch.long)
        visible = torch.zeros(len(per_sample), longest, dtype=torch.bool)
        for row, (states, index) in enumerate(zip(per_sample, index_per_sample, strict=True)):
            padded[row, :states.shape[0]] = states
            image_of_position[row, :index.shape[0]] = index
            if unseen_visible is not None:
                visible[row, :index.shape[0]] = unseen_visible[row]
        keys_values = [block.keys_values(padded) for block in self.blocks]
        return ImageContext(keys_values, images_per_sample, 0, self.config.attend_to, self.blocks,
                            image_of_position=image_of_position.to(padded.device),
                            attend_all_unseen=self.config.rows_without_image == "attend_all",
                            unseen_visible=visible.to(padded.device) if unseen_visible is not None else None)


def check_blocks_ran(llm_kwargs: dict) -> None:
    """Cross-attention reaches the LLM through its decoder layers' keyword arguments; an LLM class that does not
    pass them on would silently ignore the images."""
    context = llm_kwargs.get(CONTEXT_KWARG)
    if context is not None and len(context.ran) != len(context.blocks):
        raise RuntimeError(
            f"{len(context.blocks)} gated cross-attention block(s) should have run, {len(context.ran)} did: this LLM "
            "does not pass extra keyword arguments on to its decoder layers; use projection or qformer with it"
        )
