"""Strategy 2, BLIP-2: a Q-Former whose learned queries read the image through cross-attention.

A fixed set of `num_queries` learned vectors goes through a small BERT-style encoder. Their self-attention
lets the queries coordinate, and every `cross_attention_frequency`-th layer they also attend to the vision
features; a linear layer then maps each query to one LLM token. The LLM therefore sees `num_queries`
image tokens whatever the resolution of the vision encoder.

Only the query stream is implemented: in the connector the Q-Former never sees text. BLIP-2's stage-1
objectives (ITC / ITM / ITG) also run text tokens through the same layers with a second, text-side FFN;
those modules live in `kopru.training.qformer_stage1` (`QFormerTextSide`), outside the connector, so the
connector's forward pass and checkpoint names stay exactly as they are here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from kopru.connectors.base import Connector, register_strategy
from kopru.paths import check_exists

logger = logging.getLogger(__name__)

# Activations BERT-family checkpoints use, in pure PyTorch. "gelu" is the exact erf GELU of BERT/BLIP-2.
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
}

# Model types whose encoder layers have BERT's structure and parameter names.
_BERT_FAMILY = ("bert", "roberta", "xlm-roberta", "camembert")


@dataclass
class QFormerConfig:
    num_queries: int = 32
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    # Layer i has cross-attention to the image when i % cross_attention_frequency == 0 (BLIP-2 uses 2).
    cross_attention_frequency: int = 2
    layer_norm_eps: float = 1e-12
    # BLIP-2 pre-trains with 0.1; 0.0 keeps the connector deterministic unless training asks for it.
    dropout: float = 0.0
    # A BERT-family checkpoint (path or hub id) to initialise the layers from, as BLIP-2 starts from
    # bert-base-uncased; None leaves everything randomly initialised.
    init_from: str | None = None
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        for name in ("num_queries", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"qformer {name} must be a positive integer, found {value!r}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"qformer hidden_size must be divisible by num_heads, "
                f"found hidden_size={self.hidden_size}, num_heads={self.num_heads}"
            )
        if not isinstance(self.cross_attention_frequency, int) or self.cross_attention_frequency < 1:
            raise ValueError(
                f"qformer cross_attention_frequency must be an integer >= 1, "
                f"found {self.cross_attention_frequency!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"qformer dropout must be in [0, 1), found {self.dropout}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"qformer layer_norm_eps must be > 0, found {self.layer_norm_eps}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"qformer hidden_act must be one of {sorted(_ACTIVATIONS)}, found {self.hidden_act!r}"
            )

    def has_cross_attention(self, layer_idx: int) -> bool:
        return layer_idx % self.cross_attention_frequency == 0


class QFormerAttention(nn.Module):
    """Multi-head attention followed by BERT's post-LN residual: out = LN(x + dense(attn(x, context)))."""

    def __init__(self, config: QFormerConfig, kv_dim: int) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        hidden = config.hidden_size
        self.query = nn.Linear(hidden, hidden)
        # Cross-attention reads the vision encoder's features directly, so keys/values start at its width.
        self.key = nn.Linear(kv_dim, hidden)
        self.value = nn.Linear(kv_dim, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.resid_dropout = nn.Dropout(config.dropout)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:  # [N, L, D] -> [N, heads, L, D / heads]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,  # [N, Q, hidden]
        context: torch.Tensor | None = None,  # [N, T, kv_dim]; None means self-attention
        attn_mask: torch.Tensor | None = None,  # bool, broadcastable to [N, heads, Q, T]; True = attend
    ) -> torch.Tensor:
        context = x if context is None else context
        q = self._split_heads(self.query(x))
        k = self._split_heads(self.key(context))
        v = self._split_heads(self.value(context))
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        attn = attn.transpose(1, 2).flatten(2)
        return self.norm(x + self.resid_dropout(self.dense(attn)))


class QFormerFeedForward(nn.Module):
    """BERT's FFN with post-LN residual; BLIP-2's query-side FFN (`intermediate_query` / `output_query`)."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]()
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.resid_dropout(self.output(self.act(self.intermediate(x)))))


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, encoder_hidden_size: int, layer_idx: int) -> None:
        super().__init__()
        self.self_attention = QFormerAttention(config, kv_dim=config.hidden_size)
        self.cross_attention = (
            QFormerAttention(config, kv_dim=encoder_hidden_size)
            if config.has_cross_attention(layer_idx)
            else None
        )
        # Queries only: the text-side FFN of stage 1 is a separate module added with the training code.
        self.query_ffn = QFormerFeedForward(config)

    def forward(
        self, queries: torch.Tensor, image_features: torch.Tensor, image_mask: torch.Tensor | None
    ) -> torch.Tensor:
        queries = self.self_attention(queries)
        if self.cross_attention is not None:
            queries = self.cross_attention(queries, context=image_features, attn_mask=image_mask)
        return self.query_ffn(queries)


class QFormer(nn.Module):
    """BLIP-2's Querying Transformer, query stream only: image features [N, T, Dv] -> [N, Q, hidden]."""

    def __init__(self, config: QFormerConfig, encoder_hidden_size: int) -> None:
        super().__init__()
        if encoder_hidden_size < 1:
            raise ValueError(f"qformer encoder_hidden_size must be >= 1, found {encoder_hidden_size}")
        self.config = config
        self.encoder_hidden_size = encoder_hidden_size
        self.query_tokens = nn.Parameter(torch.empty(1, config.num_queries, config.hidden_size))
        # Blip2QFormerModel normalises the query embeddings before the first layer, as BERT's embeddings do.
        self.query_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            [QFormerLayer(config, encoder_hidden_size, i) for i in range(config.num_layers)]
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # BERT's init, std 0.02 at BERT-base's width 768. A narrower Q-Former gets the same std x sqrt(fan-in)
        # (0.55 / sqrt(fan_in)): at a fixed 0.02 a 128-wide one barely changes its input per layer and learns
        # slowly (measured on the built-in tasks). The queries must be random: identical ones stay identical.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02 * math.sqrt(768 / module.in_features))
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.query_tokens, std=0.02)

    def forward(self, image_features: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        if image_features.dim() != 3 or image_features.shape[-1] != self.encoder_hidden_size:
            raise ValueError(
                f"qformer expects image features [images, tokens, {self.encoder_hidden_size}], "
                f"found {list(image_features.shape)}"
            )
        n, t = image_features.shape[:2]
        attn_mask = None
        if image_mask is not None:
            if image_mask.shape != (n, t):
                raise ValueError(
                    f"qformer image_mask must have shape [{n}, {t}], found {list(image_mask.shape)}"
                )
            # [N, T] -> [N, heads, queries, T] by broadcasting; SDPA reads a bool mask as True = attend.
            # An image with every position masked gets NaN queries (HF's additive mask gives uniform ones).
            attn_mask = image_mask.to(device=image_features.device, dtype=torch.bool)[:, None, None, :]
        # The vision tower may run in half precision while the Q-Former is kept in fp32, as BLIP-2 does.
        image_features = image_features.to(self.query_tokens.dtype)
        queries = self.dropout(self.query_norm(self.query_tokens.expand(n, -1, -1)))
        for layer in self.layers:
            queries = layer(queries, image_features, attn_mask)
        return queries


@register_strategy("qformer")
class QFormerConnector(Connector):
    config_class = QFormerConfig

    def __init__(self, config: QFormerConfig, vision_dim: int, llm_config: PretrainedConfig) -> None:
        super().__init__()
        self.qformer = QFormer(config, encoder_hidden_size=vision_dim)
        self.projection = nn.Linear(config.hidden_size, llm_config.hidden_size)
        self.init_from = config.init_from

    def init_pretrained_weights(self) -> None:
        if self.init_from is not None:
            random = load_bert_weights(self.qformer, self.init_from)
            logger.info("qformer initialised from %s; still random: %s", self.init_from, random)

    @classmethod
    def output_tokens(cls, config: QFormerConfig, vision_tokens: int) -> int:
        return config.num_queries

    def forward(self, image_features: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.projection(self.qformer(image_features, image_mask))


# --------------------------------------------------------------------------------------------------------
# Weight loading


def _bert_layer_mapping(layer_idx: int) -> dict[str, str]:
    """Our parameter name -> the BERT encoder's, for one layer's self-attention and FFN."""
    ours, bert = f"layers.{layer_idx}.", f"encoder.layer.{layer_idx}."
    pairs = {
        "self_attention.query": "attention.self.query",
        "self_attention.key": "attention.self.key",
        "self_attention.value": "attention.self.value",
        "self_attention.dense": "attention.output.dense",
        "self_attention.norm": "attention.output.LayerNorm",
        "query_ffn.intermediate": "intermediate.dense",
        "query_ffn.output": "output.dense",
        "query_ffn.norm": "output.LayerNorm",
    }
    return {f"{ours}{a}.{p}": f"{bert}{b}.{p}" for a, b in pairs.items() for p in ("weight", "bias")}


def load_bert_weights(qformer: QFormer, name_or_path: str) -> list[str]:
    """Initialise `qformer` from a BERT-family checkpoint the way BLIP-2 starts from bert-base-uncased.

    Layer i's self-attention and FFN come from BERT's layer i (BLIP-2 copies BERT's FFN into its query FFN),
    the query LayerNorm from BERT's embedding LayerNorm. Cross-attention and the query tokens have no BERT
    counterpart and stay random. Returns the names of our parameters that stayed random.
    """
    check_exists(name_or_path, "qformer init_from")
    try:
        bert_config = AutoConfig.from_pretrained(name_or_path)
    except OSError as err:
        raise FileNotFoundError(
            f"qformer init_from: cannot read a transformers config from {name_or_path!r}: {err}"
        ) from err
    except ValueError as err:  # a config whose model_type transformers does not know
        raise ValueError(
            f"qformer init_from {name_or_path!r} is not a BERT-family checkpoint: {err}"
        ) from err
    if bert_config.model_type not in _BERT_FAMILY:
        raise ValueError(
            f"qformer init_from must be a BERT-family checkpoint ({', '.join(_BERT_FAMILY)}), "
            f"found model_type {bert_config.model_type!r} at {name_or_path!r}"
        )
    # Compare shapes before loading the weights so a wrong checkpoint fails fast.
    config = qformer.config
    expected = {
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": config.hidden_act,
    }
    for bert_name, ours in expected.items():
        found = getattr(bert_config, bert_name)
        if found != ours:
            raise ValueError(
                f"qformer init_from {name_or_path!r}: expected {bert_name}={ours!r} (the Q-Former's), "
                f"found {found!r} in the BERT checkpoint"
            )
    if bert_config.num_hidden_layers < config.num_layers:
        raise ValueError(
            f"qformer init_from {name_or_path!r}: the Q-Former has {config.num_layers} layers "
            f"but the BERT checkpoint only {bert_config.num_hidden_layers}"
        )

    bert = AutoModel.from_pretrained(name_or_path, use_safetensors=True)
    bert_state = bert.state_dict()
    mapping = {
        "query_norm.weight": "embeddings.LayerNorm.weight",
        "query_norm.bias": "embeddings.LayerNorm.bias",
    }
    for i in range(config.num_layers):
        mapping.update(_bert_layer_mapping(i))

    params = dict(qformer.named_parameters())
    with torch.no_grad():
        for ours, theirs in mapping.items():
            if theirs not in bert_state:
                raise ValueError(
                    f"qformer init_from {name_or_path!r}: checkpoint has no parameter {theirs!r}"
                )
            params[ours].copy_(bert_state[theirs])
    return [name for name in params if name not in mapping]


# Blip2QFormerModel's names against QFormer's, per layer (encoder.layer.{i}.{block}.{module} <->
# layers.{i}.{block}.{module}); read both ways by `qformer_state_dict_from_hf` and `qformer_state_dict_to_hf`.
HF_ATTENTION_BLOCKS = (("attention", "self_attention"), ("crossattention", "cross_attention"))
HF_ATTENTION_MODULES = (("attention.query", "query"), ("attention.key", "key"), ("attention.value", "value"),
                        ("output.dense", "dense"), ("output.LayerNorm", "norm"))
HF_QUERY_FFN = (("intermediate_query.dense", "query_ffn.intermediate"), ("output_query.dense", "query_ffn.output"),
                ("output_query.LayerNorm", "query_ffn.norm"))
HF_QUERY_NORM = ("layernorm", "query_norm")
# Text-side modules BLIP-2's stage 1 runs text through; the connector runs queries only (module docstring).
HF_TEXT_SIDE = ("intermediate.dense", "output.dense", "output.LayerNorm")


def _hf_module_names() -> list[tuple[str, str]]:
    """(HF, ours) module names inside one layer."""
    attention = [(f"{hf_block}.{hf}", f"{block}.{ours}") for hf_block, block in HF_ATTENTION_BLOCKS
                 for hf, ours in HF_ATTENTION_MODULES]
    return attention + list(HF_QUERY_FFN)


def qformer_state_dict_from_hf(
    hf_state_dict: dict[str, torch.Tensor], query_tokens: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Map a `Blip2QFormerModel` state dict (optionally still prefixed `qformer.`) to `QFormer`'s keys.

    HF keeps the learned queries outside the Q-Former (`Blip2ForConditionalGeneration.query_tokens`); pass
    them as `query_tokens` to get a complete state dict. The text-side modules (`embeddings.*`, the layers'
    `intermediate.*` / `output.*` FFN) are dropped: our Q-Former runs queries only, through the query FFN.
    """
    modules = dict(_hf_module_names())
    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state_dict.items():
        name = key.removeprefix("qformer.")
        if name.startswith(HF_QUERY_NORM[0] + "."):
            out[HF_QUERY_NORM[1] + name.removeprefix(HF_QUERY_NORM[0])] = tensor
            continue
        if name.startswith("embeddings."):
            continue
        parts = name.split(".")
        # encoder.layer.{i}.{block...}.{weight|bias}
        if len(parts) < 5 or parts[:2] != ["encoder", "layer"] or not parts[2].isdigit():
            raise KeyError(f"unexpected key in a Blip2QFormerModel state dict: {key!r}")
        layer, module, param = parts[2], ".".join(parts[3:-1]), parts[-1]
        if module in modules:
            out[f"layers.{layer}.{modules[module]}.{param}"] = tensor
        elif module in HF_TEXT_SIDE:
            continue  # the text-side FFN
        else:
            raise KeyError(f"unexpected key in a Blip2QFormerModel state dict: {key!r}")
    if query_tokens is not None:
        out["query_tokens"] = query_tokens.reshape(1, *query_tokens.shape[-2:])
    return out


def qformer_state_dict_to_hf(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The inverse of `qformer_state_dict_from_hf`: `QFormer`'s state dict -> (a `Blip2QFormerModel` state dict,
    the query tokens [1, queries, hidden] that HF keeps outside the Q-Former)."""
    modules = {ours: hf for hf, ours in _hf_module_names()}
    out: dict[str, torch.Tensor] = {}
    query_tokens = None
    for key, tensor in state_dict.items():
        if key == "query_tokens":
            query_tokens = tensor
            continue
        if key.startswith(HF_QUERY_NORM[1] + "."):
            out[HF_QUERY_NORM[0] + key.removeprefix(HF_QUERY_NORM[1])] = tensor
            continue
        parts = key.split(".")
        module = ".".join(parts[2:-1])
        if len(parts) < 4 or parts[0] != "layers" or not parts[1].isdigit() or module not in modules:
            raise KeyError(f"unexpected key in a QFormer state dict: {key!r}")
        out[f"encoder.layer.{parts[1]}.{modules[module]}.{parts[-1]}"] = tensor
    if query_tokens is None:
        raise KeyError("expected 'query_tokens' in a QFormer state dict, found none")
    return out, query_tokens
