"""BLIP-2 stage 1 for the Q-Former: image-text contrastive (ITC), image-grounded text generation (ITG) and
image-text matching (ITM) losses, trained against the frozen vision tower, the LLM left out.

BLIP-2 (LAVIS `blip2_qformer.py`) runs caption tokens through the *same* BERT layers as the queries: the
self-attention is shared, text never cross-attends to the image, and text has its own FFN. What the three
objectives change is who may attend to whom in that shared self-attention:

- ITC: queries (with the image) and text run separately; similarity = max over queries of cos(query, CLS).
- ITG: one joint pass over [queries; text] where queries see only queries and text sees every query and the
  earlier text (causal), so the caption can only be predicted from what the queries took from the image.
- ITM: one joint pass with everything visible; a binary head on the query outputs says whether the pair
  matches, trained on hard negatives drawn from the ITC similarities.

Everything added here lives outside the connector (`QFormerPretrainingHeads`), reusing the connector's
`QFormer` layers by reference, so the query-only path the VLM runs and `connector.safetensors` keep their
exact names; the heads are thrown away after stage 1 or saved on their own (`save_heads`).

Text uses the LLM's tokenizer (no BERT vocabulary to download) with a separate embedding table inside the
Q-Former, and two existing ids in the roles of BERT's special tokens (`QFormerTextTokens`).
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from kopru.connectors.qformer import _ACTIVATIONS, QFormer, QFormerConfig, QFormerConnector
from kopru.data.formats import open_image
from kopru.data.sample import Sample
from kopru.model import KopruForConditionalGeneration
from kopru.processing import KopruProcessor

LOSSES: tuple[str, ...] = ("itc", "itg", "itm")
IGNORE_INDEX = -100

# --------------------------------------------------------------------------------------------------------
# Text tokens


@dataclass(frozen=True)
class TextBatch:
    input_ids: torch.Tensor  # [N, L] long
    attention_mask: torch.Tensor  # [N, L] bool, True = a real token


@dataclass(frozen=True)
class QFormerTextTokens:
    """The LLM tokenizer's ids in the roles BLIP-2 gives BERT's special tokens.

    BLIP-2 starts the text with [CLS] for ITC / ITM (its output is the text embedding) and swaps it for
    [DEC] in ITG (telling the shared layers to decode); it ends with [SEP], which ITG learns to predict so
    the decoder learns to stop. The Q-Former has its own embedding table, so reusing ids only has to keep the
    roles apart, never to match what the LLM means by them:
    - cls: the tokenizer's bos (else its cls, else eos);
    - dec: the image placeholder id of the Köprü config (a special token that never occurs in a caption);
    - end: the tokenizer's eos (BERT's [SEP]);
    - pad: the tokenizer's pad (always masked out as a key and in the loss).
    """

    cls_id: int
    dec_id: int
    end_id: int
    pad_id: int
    max_length: int = 32  # BLIP-2's max_txt_len, special tokens included

    @classmethod
    def from_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, dec_id: int, max_length: int = 32
    ) -> QFormerTextTokens:
        end_id = tokenizer.eos_token_id
        cls_id = next(
            (i for i in (tokenizer.bos_token_id, tokenizer.cls_token_id, end_id) if i is not None), None
        )
        if cls_id is None or end_id is None:
            raise ValueError("the Q-Former text side needs a tokenizer with an eos token (and ideally a bos)")
        if dec_id == cls_id:
            raise ValueError(f"the [DEC] id must differ from the [CLS] id, both are {cls_id}")
        if max_length < 3:
            raise ValueError(f"max_length must leave room for [CLS], a token and the end, found {max_length}")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
        return cls(cls_id=cls_id, dec_id=dec_id, end_id=end_id, pad_id=pad_id, max_length=max_length)

    def encode(self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> TextBatch:
        """[CLS] text [end], truncated to `max_length` and right-padded. ITG swaps [CLS] for [DEC]."""
        if not texts:
            raise ValueError("expected at least one text")
        body = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        rows = [[self.cls_id, *ids[: self.max_length - 2], self.end_id] for ids in body]
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = True
        return TextBatch(input_ids, attention_mask)


# --------------------------------------------------------------------------------------------------------
# Attention masks over [queries; text], bool [N, 1, Q + L, Q + L], True = the row may attend to the column


def bidirectional_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITM (and the text-only ITC pass with num_queries=0): everyone sees every query and every real token."""
    text_mask = text_mask.bool()
    n, length = text_mask.shape
    keys = torch.cat([text_mask.new_ones(n, num_queries), text_mask], dim=1)  # [N, Q + L]
    return keys[:, None, None, :].expand(n, 1, num_queries + length, num_queries + length)


def itg_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITG: queries see the queries only; text sees every query and the text up to itself (causal)."""
    n, length = text_mask.shape
    total = num_queries + length
    mask = bidirectional_mask(num_queries, text_mask).clone(memory_format=torch.contiguous_format)
    causal = torch.ones(length, length, dtype=torch.bool, device=text_mask.device).tril()
    mask[:, :, num_queries:, num_queries:] &= causal
    # Without this the queries would read the caption they are supposed to let the text predict.
    mask[:, :, :num_queries, num_queries:total] = False
    return mask


# --------------------------------------------------------------------------------------------------------
# The text side


class QFormerTextSide(nn.Module):
    """Text embeddings and the text-side FFN of every Q-Former layer; the attention is the Q-Former's own.

    BLIP-2 normalises [queries; text] embeddings with one LayerNorm (BERT's embedding LayerNorm), which is the
    Q-Former's `query_norm`, so the text side has no LayerNorm of its own.
    """

    def __init__(self, qformer: QFormer, vocab_size: int, max_length: int) -> None:
        super().__init__()
        hidden = qformer.config.hidden_size
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_length, hidden)
        nn.init.normal_(self.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.position_embeddings.weight, std=0.02)
        # BLIP-2 initialises the query FFN and the text FFN from the same BERT FFN; copying the query FFN does
        # the same whether the Q-Former came from BERT (init_from) or is random.
        self.text_ffns = nn.ModuleList([copy.deepcopy(layer.query_ffn) for layer in qformer.layers])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"text of {length} tokens is longer than the "
                f"{self.position_embeddings.num_embeddings} position embeddings"
            )
        positions = torch.arange(length, device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)

    def forward(
        self,
        qformer: QFormer,
        input_ids: torch.Tensor,  # [N, L]
        attn_mask: torch.Tensor,  # bool [N, 1, Q + L, Q + L] (Q = 0 without image features)
        image_features: torch.Tensor | None = None,  # [N, T, Dv]; None: a text-only pass
        image_mask: torch.Tensor | None = None,  # [N, T]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over [queries; text] through `qformer`'s layers -> (queries [N, Q, H], text [N, L, H]).

        Queries follow exactly `QFormer.forward` (shared self-attention, cross-attention, query FFN); text
        tokens share the self-attention and go through the text FFN, never through cross-attention.
        """
        n = input_ids.shape[0]
        x = self.embed(input_ids)
        num_queries = 0
        cross_mask = None
        if image_features is not None:
            image_features = image_features.to(qformer.query_tokens.dtype)
            num_queries = qformer.config.num_queries
            x = torch.cat([qformer.query_tokens.expand(n, -1, -1), x], dim=1)
            if image_mask is not None:
                cross_mask = image_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
        if attn_mask.shape[-1] != x.shape[1]:
            raise ValueError(f"attn_mask covers {attn_mask.shape[-1]} positions, the input has {x.shape[1]}")
        x = qformer.dropout(qformer.query_norm(x))
        for layer, text_ffn in zip(qformer.layers, self.text_ffns, strict=True):
            x = layer.self_attention(x, attn_mask=attn_mask)
            queries, text = x[:, :num_queries], text_ffn(x[:, num_queries:])
            if num_queries:
                if layer.cross_attention is not None:
                    queries = layer.cross_attention(queries, context=image_features, attn_mask=cross_mask)
                queries = layer.query_ffn(queries)
            x = torch.cat([queries, text], dim=1)
        return x[:, :num_queries], x[:, num_queries:]


class QFormerLMHead(nn.Module):
    """BERT's prediction head (dense, activation, LayerNorm, vocabulary projection), as BLIP-2's ITG uses."""

    def __init__(self, config: QFormerConfig, vocab_size: int, tied: bool) -> None:
        super().__init__()
        self.transform = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            _ACTIVATIONS[config.hidden_act](),
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
        )
        # Tied: the projection is the text word-embedding matrix (BERT's default), passed in at call time.
        self.decoder = None if tied else nn.Linear(config.hidden_size, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        weight = word_embeddings if self.decoder is None else self.decoder.weight
        return F.linear(self.transform(hidden), weight, self.bias)


class QFormerPretrainingHeads(nn.Module):
    """Everything stage 1 adds to the Q-Former; nothing of it is needed by the VLM afterwards."""

    def __init__(
        self,
        qformer: QFormer,
        vocab_size: int,
        max_length: int,
        embed_dim: int = 256,
        tie_lm_head: bool = True,
    ) -> None:
        super().__init__()
        config = qformer.config
        self.text_side = QFormerTextSide(qformer, vocab_size, max_length)
        self.vision_proj = nn.Linear(config.hidden_size, embed_dim)
        self.text_proj = nn.Linear(config.hidden_size, embed_dim)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.lm_head = QFormerLMHead(config, vocab_size, tied=tie_lm_head)
        # CLIP / BLIP-2 learn the softmax temperature; 0.07 is their start, clamped to [0.001, 0.5].
        self.temp = nn.Parameter(torch.tensor(0.07))
        for module in (self.vision_proj, self.text_proj, self.itm_head, self.lm_head):
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, std=0.02)
                    if sub.bias is not None:
                        nn.init.zeros_(sub.bias)
        # The FFN copies inherit a frozen Q-Former's flags; the heads always train.
        self.requires_grad_(True)


# --------------------------------------------------------------------------------------------------------
# Losses


def max_over_queries_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """[I, Q, D] x [T, D] -> [I, T]: each image scores a text by its best-matching query (BLIP-2's ITC)."""
    return torch.einsum("iqd,td->itq", image_feats, text_feats).amax(dim=-1)


def itc_loss(similarity: torch.Tensor, positives: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric cross-entropy over the batch: mean of image->text (rows) and text->image (columns).

    `similarity` [B, B] is already divided by the temperature. `positives` [B, B] bool marks every pair that
    matches (at least the diagonal); their target mass is shared equally, so a batch holding one image twice
    (its English and Turkish caption) does not push a caption away from its own image.
    """
    if not bool(positives.diagonal().all()):
        raise ValueError("positives must include every diagonal pair")
    positives = positives.to(similarity.dtype)
    i2t = F.cross_entropy(
        similarity, positives / positives.sum(1, keepdim=True), label_smoothing=label_smoothing
    )
    t2i_positives = positives.t()
    t2i = F.cross_entropy(
        similarity.t(), t2i_positives / t2i_positives.sum(1, keepdim=True), label_smoothing=label_smoothing
    )
    return (i2t + t2i) / 2


def sample_hard_negatives(
    similarity: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, one column drawn with probability softmax(similarity) among the row's non-positives.

    Returns (indices [B], valid [B]); a row whose every column is positive has no negative (valid False, its
    index meaningless). Sampled on the CPU so that `generator` makes it reproducible on any device.
    """
    similarity = similarity.detach().float().cpu()
    negatives = ~positives.detach().bool().cpu()
    weights = similarity.softmax(dim=1) * negatives
    # If softmax underflows to zero on every negative, fall back to uniform over them; rows without any
    # negative get uniform weights only so that `multinomial` can run, and are reported invalid.
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, negatives.float())
    valid = negatives.any(dim=1)
    weights[~valid] = 1.0
    indices = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return indices, valid


def pair_positives(texts: Sequence[str], image_ids: Sequence[Hashable] | None = None) -> torch.Tensor:
    """[B, B] bool: image i and text j match if they come from the same image or text j equals text i."""
    n = len(texts)
    ids = list(range(n)) if image_ids is None else list(image_ids)
    if len(ids) != n:
        raise ValueError(f"expected one image id per text ({n}), found {len(ids)}")
    return torch.tensor([[ids[i] == ids[j] or texts[i] == texts[j] for j in range(n)] for i in range(n)])


# --------------------------------------------------------------------------------------------------------
# The pretrainer


class QFormerPretrainer:
    """Stage-1 losses for the Q-Former of a `qformer`-strategy Köprü model.

    Holds the model (not as a submodule) and the extra heads; `parameters()` are what stage 1 trains: the
    Q-Former and the heads. The vision tower runs without autograd, the LLM and the connector's projection
    into the LLM are not used.
    """

    def __init__(
        self,
        model: KopruForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        losses: Sequence[str] = LOSSES,
        embed_dim: int = 256,
        max_text_length: int = 32,
        tie_lm_head: bool = True,
        label_smoothing: float = 0.1,  # BLIP-2 smooths ITC and ITG targets by 0.1
        dec_token_id: int | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(model.connector, QFormerConnector):
            raise ValueError(
                f"Q-Former pretraining needs a model with strategy 'qformer', found {model.config.strategy!r}"
            )
        unknown = set(losses) - set(LOSSES)
        if unknown or not losses:
            raise ValueError(f"losses must be a non-empty subset of {LOSSES}, found {tuple(losses)}")
        self.model = model
        self.qformer: QFormer = model.connector.qformer
        self.tokenizer = tokenizer
        self.losses = tuple(loss for loss in LOSSES if loss in losses)
        self.label_smoothing = label_smoothing
        dec_id = model.config.image_token_id if dec_token_id is None else dec_token_id
        self.tokens = QFormerTextTokens.from_tokenizer(tokenizer, dec_id, max_text_length)
        vocab_size = max(len(tokenizer), dec_id + 1)
        reference = self.qformer.query_tokens
        self.heads = QFormerPretrainingHeads(
            self.qformer, vocab_size, max_text_length, embed_dim, tie_lm_head
        ).to(device=reference.device, dtype=reference.dtype)
        self.generator = torch.Generator().manual_seed(seed)  # the ITM negatives

    # ------------------------------------------------------------------------------------------ bookkeeping
    def parameters(self) -> list[nn.Parameter]:
        return [*self.qformer.parameters(), *self.heads.parameters()]

    def train(self, mode: bool = True) -> QFormerPretrainer:
        self.qformer.train(mode)
        self.heads.train(mode)
        return self

    def eval(self) -> QFormerPretrainer:
        return self.train(False)

    @property
    def device(self) -> torch.device:
        return self.qformer.query_tokens.device

    def save_heads(self, path: str | Path) -> None:
        """The stage-1 heads alone (the Q-Former itself is saved with the connector)."""
        tensors = {name: t.detach().contiguous() for name, t in self.heads.state_dict().items()}
        save_file(tensors, str(path))

    def load_heads(self, path: str | Path) -> None:
        """Heads written by `save_heads` (for a Q-Former whose connector was loaded the same way)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"expected Q-Former stage-1 heads at {path}, found nothing")
        loaded = load_file(str(path), device=str(self.device))
        expected = self.heads.state_dict()
        wrong = sorted(set(expected) ^ set(loaded)) + [
            f"{name}: expected {tuple(expected[name].shape)}, found {tuple(loaded[name].shape)}"
            for name in expected.keys() & loaded.keys() if expected[name].shape != loaded[name].shape]
        if wrong:
            raise ValueError(f"Q-Former heads in {path} do not fit this pretrainer: {wrong[:5]}")
        self.heads.load_state_dict(loaded)

    # ------------------------------------------------------------------------------------------- encoders
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen vision tower's features [N, T, Dv]."""
        with torch.no_grad():
            return self.model.vision(pixel_values.to(self.device))

    def encode_text(self, texts: Sequence[str]) -> TextBatch:
        batch = self.tokens.encode(self.tokenizer, texts)
        return TextBatch(batch.input_ids.to(self.device), batch.attention_mask.to(self.device))

    def image_embeddings(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(query outputs [N, Q, H] of the VLM's own query-only path, ITC features [N, Q, D] normalised)."""
        queries = self.qformer(image_features)
        return queries, F.normalize(self.heads.vision_proj(queries), dim=-1)

    def text_embeddings(self, text: TextBatch) -> torch.Tensor:
        """ITC text features [N, D] normalised: the [CLS] output of a text-only pass."""
        mask = bidirectional_mask(0, text.attention_mask)
        _, states = self.heads.text_side(self.qformer, text.input_ids, mask)
        return F.normalize(self.heads.text_proj(states[:, 0]), dim=-1)

    # --------------------------------------------------------------------------------------------- losses
    def loss(
        self, pixel_values: torch.Tensor, texts: Sequence[str], image_ids: Sequence[Hashable] | None = None
    ) -> dict[str, torch.Tensor]:
        """{"total", and each of `losses`}. `image_ids` marks which pairs share an image (default: none do);
        pairs sharing an image or an identical caption count as matches, not as contrastive negatives."""
        if pixel_values.shape[0] != len(texts):
            raise ValueError(
                f"expected one text per image, found {pixel_values.shape[0]} images, {len(texts)} texts"
            )
        if len(texts) < 2:
            raise ValueError("the contrastive and matching losses need a batch of at least 2 pairs")
        features = self.image_features(pixel_values)
        text = self.encode_text(texts)
        positives = pair_positives(texts, image_ids).to(self.device)
        out: dict[str, torch.Tensor] = {}

        sim = None
        if "itc" in self.losses or "itm" in self.losses:
            with torch.no_grad():
                self.heads.temp.clamp_(0.001, 0.5)
            # Without ITC the similarities only choose ITM's negatives: no graph needed.
            with torch.set_grad_enabled(torch.is_grad_enabled() and "itc" in self.losses):
                _, image_feats = self.image_embeddings(features)
                sim = max_over_queries_similarity(image_feats, self.text_embeddings(text)) / self.heads.temp
            if "itc" in self.losses:
                out["itc"] = itc_loss(sim, positives, self.label_smoothing)
        if "itg" in self.losses:
            out["itg"] = self.itg_loss(features, text)
        if "itm" in self.losses:
            assert sim is not None
            out["itm"] = self.itm_loss(features, text, sim, positives)
        out["total"] = torch.stack([out[name] for name in self.losses]).sum()
        return out

    def itg_loss(self, image_features: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """Next-token loss on the caption after [DEC], from the queries: causal text, blind queries."""
        input_ids = text.input_ids.clone()
        input_ids[:, 0] = self.tokens.dec_id
        mask = itg_mask(self.qformer.config.num_queries, text.attention_mask)
        _, states = self.heads.text_side(self.qformer, input_ids, mask, image_features)
        logits = self.heads.lm_head(states[:, :-1], self.heads.text_side.word_embeddings.weight)
        labels = text.input_ids[:, 1:].masked_fill(~text.attention_mask[:, 1:], IGNORE_INDEX)
        return F.cross_entropy(
            logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
        )

    def itm_logits(self, image_features: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """[N, 2] match logits: the ITM head on the query outputs of a fully visible joint pass, averaged."""
        mask = bidirectional_mask(self.qformer.config.num_queries, text.attention_mask)
        queries, _ = self.heads.text_side(self.qformer, text.input_ids, mask, image_features)
        return self.heads.itm_head(queries).mean(dim=1)

    def itm_loss(
        self, image_features: torch.Tensor, text: TextBatch, sim: torch.Tensor, positives: torch.Tensor
    ) -> torch.Tensor:
        """Binary match loss on the B positive pairs and, per pair, a hard negative image and a hard negative
        text, drawn from the ITC similarities (BLIP-2's sampling: harder negatives are likelier)."""
        b = len(text.input_ids)
        neg_image, image_ok = sample_hard_negatives(sim.t(), positives.t(), self.generator)  # per text
        neg_text, text_ok = sample_hard_negatives(sim, positives, self.generator)  # per image
        arange = torch.arange(b)
        image_index = torch.cat([arange, neg_image[image_ok], arange[text_ok]]).to(self.device)
        text_index = torch.cat([arange, arange[image_ok], neg_text[text_ok]]).to(self.device)
        labels = torch.zeros(len(image_index), dtype=torch.long, device=self.device)
        labels[:b] = 1
        pairs = TextBatch(text.input_ids[text_index], text.attention_mask[text_index])
        logits = self.itm_logits(image_features[image_index], pairs)
        return F.cross_entropy(logits.float(), labels)


# --------------------------------------------------------------------------------------------------------
# Training and retrieval


def caption_of(sample: Sample) -> str:
    """The caption of a `Sample.caption`: its first assistant turn."""
    for message in sample.messages:
        if message["role"] == "assistant":
            return message["content"]
    raise ValueError(f"sample {sample.id!r} has no assistant turn to use as a caption")


def _image_of(sample: Sample):
    if len(sample.images) != 1:
        raise ValueError(f"sample {sample.id!r}: expected one image per caption, found {len(sample.images)}")
    return sample.images[0]


def _image_key(image) -> Hashable:
    # Samples of one scene share a PIL object (English and Turkish captions); paths name the same file.
    return str(image) if isinstance(image, str | Path) else id(image)


def _pixels(processor: KopruProcessor, images: Sequence) -> torch.Tensor:
    return processor.image_processor([open_image(image) for image in images])


def _batches(count: int, batch_size: int, rng: random.Random):
    """Endless seeded epochs of index batches; a short last batch is dropped unless it is the only one."""
    while True:
        order = list(range(count))
        rng.shuffle(order)
        chunks = [order[i : i + batch_size] for i in range(0, count, batch_size)]
        if len(chunks) > 1 and len(chunks[-1]) < batch_size:
            chunks.pop()
        yield from chunks


def pretrain_qformer(
    model: KopruForConditionalGeneration,
    processor: KopruProcessor,
    samples: Sequence[Sample],
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-4,
    seed: int = 0,
    losses: Sequence[str] = LOSSES,
    weight_decay: float = 0.05,
    pretrainer: QFormerPretrainer | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train the Q-Former on image-caption samples with BLIP-2's stage-1 losses; returns the loss history.

    AdamW (BLIP-2's weight decay 0.05), linear warm-up then cosine decay to a tenth of `lr`, gradient norm
    clipped to 1. Only the Q-Former and the heads change; pass a `pretrainer` to keep the heads (e.g. for
    `retrieval_recall`), else they are built here and dropped. The Q-Former's train/eval mode and
    `requires_grad` flags are restored afterwards.

    `lr` 1e-4 is BLIP-2's, for a Q-Former started from BERT. A *random* narrow Q-Former (BERT's std 0.02 init
    at width 32-64) starts near a saddle: every layer adds ~1% to its residual, so queries and text [CLS]
    barely depend on their inputs and the ITC gradient (a product of the two) is ~1e-7. ITG and ITM pull it
    out; on the tiny test backbones that takes ~100 steps at lr 5e-3 before ITC moves at all.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, found {steps}")
    if len(samples) < 2 or batch_size < 2:
        raise ValueError("contrastive pretraining needs at least 2 samples and batch_size >= 2")
    if pretrainer is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pretrainer = QFormerPretrainer(model, processor.tokenizer, losses=losses, seed=seed)
    elif pretrainer.model is not model:
        raise ValueError("the pretrainer was built for another model")
    qformer = pretrainer.qformer
    was_training = qformer.training
    grad_flags = [p.requires_grad for p in qformer.parameters()]
    qformer.requires_grad_(True)
    params = [p for p in pretrainer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        fraction = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * fraction))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    batches = _batches(len(samples), batch_size, random.Random(seed))
    history: list[dict[str, float]] = []
    pretrainer.train()
    try:
        for step in tqdm(range(steps), desc="qformer stage 1", disable=not progress):
            batch = [samples[i] for i in next(batches)]
            images = [_image_of(s) for s in batch]
            pixel_values = _pixels(processor, images)
            out = pretrainer.loss(
                pixel_values, [caption_of(s) for s in batch], [_image_key(i) for i in images]
            )
            optimizer.zero_grad(set_to_none=True)
            out["total"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            history.append(
                {
                    "step": step,
                    **{k: float(v.detach()) for k, v in out.items()},
                    "lr": optimizer.param_groups[0]["lr"],
                }
            )
    finally:
        qformer.train(was_training)
        pretrainer.heads.train(was_training)
        for param, flag in zip(qformer.parameters(), grad_flags, strict=True):
            param.requires_grad_(flag)
        optimizer.zero_grad(set_to_none=True)
    return history


@torch.no_grad()
def retrieval_recall(
    model: KopruForConditionalGeneration,
    pretrainer: QFormerPretrainer,
    processor: KopruProcessor,
    samples: Sequence[Sample],
    ks: Sequence[int] = (1, 5),
    batch_size: int = 64,
) -> dict[str, float]:
    """Image->text and text->image recall@k over `samples` with the ITC similarity (max over queries).

    The gallery is the distinct images (shared PIL objects or equal paths count once) and all captions, as in
    COCO retrieval: an image scores a hit if any of its captions is in its top k, a caption if its image is.
    Returns {"i2t@k", "t2i@k" for each k, "images", "texts"}; chance for t2i@1 is 1 / images. Run it on one
    language's samples to report per language.
    """
    if pretrainer.model is not model:
        raise ValueError("the pretrainer was built for another model")
    if not samples:
        raise ValueError("expected at least one sample")
    keys: dict[Hashable, int] = {}
    images: list = []
    owner: list[int] = []  # caption index -> image index
    for sample in samples:
        image = _image_of(sample)
        key = _image_key(image)
        if key not in keys:
            keys[key] = len(images)
            images.append(image)
        owner.append(keys[key])
    texts = [caption_of(s) for s in samples]

    was_training = pretrainer.qformer.training
    pretrainer.eval()
    try:
        image_feats = torch.cat(
            [
                pretrainer.image_embeddings(
                    pretrainer.image_features(_pixels(processor, images[i : i + batch_size]))
                )[1]
                for i in range(0, len(images), batch_size)
            ]
        )
        text_feats = torch.cat(
            [
                pretrainer.text_embeddings(pretrainer.encode_text(texts[i : i + batch_size]))
                for i in range(0, len(texts), batch_size)
            ]
        )
    finally:
        pretrainer.train(was_training)
    sim = max_over_queries_similarity(image_feats, text_feats).float().cpu()  # [I, T]
    owner_t = torch.tensor(owner)
    matches = owner_t[None, :] == torch.arange(len(images))[:, None]  # [I, T]
    result: dict[str, float] = {}
    for k in ks:
        top_texts = sim.topk(min(k, len(texts)), dim=1).indices  # [I, k]
        result[f"i2t@{k}"] = float(matches.gather(1, top_texts).any(dim=1).float().mean())
        top_images = sim.t().topk(min(k, len(images)), dim=1).indices  # [T, k]
        result[f"t2i@{k}"] = float((top_images == owner_t[:, None]).any(dim=1).float().mean())
    result["images"], result["texts"] = float(len(images)), float(len(texts))
    return result


__all__ = [
    "LOSSES",
    "QFormerLMHead",
    "QFormerPretrainer",
    "QFormerPretrainingHeads",
    "QFormerTextSide",
    "QFormerTextTokens",
    "TextBatch",
    "bidirectional_mask",
    "caption_of",
    "itc_loss",
    "itg_mask",
    "max_over_queries_similarity",
    "pair_positives",
    "pretrain_qformer",
    "retrieval_recall",
    "sample_hard_negatives",
]
