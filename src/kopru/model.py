"""The Köprü model: vision tower -> connector -> causal LLM.

Spliced strategies write the connector's vectors into the text embeddings at the image placeholders with
one vectorised `masked_scatter`; `cross_attention` passes an `ImageContext` through the LLM call instead.

On disk (`save_pretrained`): `kopru_config.json`, `vision/` and `llm/` as ordinary HF checkpoints (so they
load through the same code path as any encoder / causal LM) and `connector.safetensors`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from kopru.config import CONFIG_FILE, KopruConfig, VisionTowerConfig
from kopru.connectors import Connector, strategy_class
from kopru.connectors.cross_attention import CONTEXT_KWARG, check_blocks_ran
from kopru.connectors.reduction import pack_anyres, token_reduction
from kopru.generation.reference import generate as generate_tokens
from kopru.geometry import (
    ImagePlan,
    cached_cross_attention_kv,
    connector_tokens,
    image_positions,
    packs_anyres_grid,
    plan_image,
)
from kopru.high_resolution_processing import aspect_ratio_inputs
from kopru.image_processing import ImagePreprocessor
from kopru.llm import cache_argument, load_llm
from kopru.paths import atomic_directory
from kopru.processing import KopruProcessor, add_image_tokens
from kopru.vision import VisionTower

CONNECTOR_FILE = "connector.safetensors"
IGNORE_INDEX = -100


class KopruForConditionalGeneration(nn.Module):
    def __init__(self, config: KopruConfig, vision: VisionTower, llm: PreTrainedModel,
                 connector: Connector | None = None) -> None:
        super().__init__()
        if config.image_token_id is None:
            raise ValueError("config.image_token_id is unset; build through from_backbones() or add_image_tokens()")
        self.config = config
        self.vision = vision
        self.llm = llm
        # k x k pixel shuffle / average pooling of each encoder pass's patch grid, before any connector.
        self.reduction = token_reduction(config.resolution)
        if connector is None:
            vision_dim = self.reduction.output_dim(vision.hidden_size)
            connector = strategy_class(config.strategy)(config.connector, vision_dim, llm.config)
            if packs_anyres_grid(config):
                # LLaVA-NeXT's learned row separator, LLM wide; it lives (and is saved, and trains) with the
                # connector. Initialised as HF's LlavaNextModel does.
                dim = llm.config.hidden_size
                connector.image_newline = nn.Parameter(torch.randn(dim) / dim**0.5)
            connector.to(dtype=next(llm.parameters()).dtype)
        self.connector = connector
        # Positions of an image at the encoder's native size; anyres / dynamic images count per size
        # (`image_positions`), which the processor expands and `prepare_inputs` checks.
        native = vision.image_size
        self.image_count = image_positions(config, vision.encoder.config, native, native)
        self._native_plan = self.plan(native, native)  # every fixed-resolution image takes this one plan
        self._cache_argument = cache_argument(llm)
        if not connector.llm_trains_in_stage2:
            llm.requires_grad_(False)  # the base LLM stays frozen; only the gated blocks (and resampler) learn
        connector.attach(llm)
        marker_ids = [config.image_token_id, config.image_start_token_id, config.image_end_token_id]
        self.register_buffer("_image_ids", torch.tensor([i for i in marker_ids if i is not None]), persistent=False)

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def from_backbones(
        cls, config: KopruConfig, dtype: torch.dtype | None = None
    ) -> tuple[KopruForConditionalGeneration, KopruProcessor]:
        """A new model from a pretrained encoder and LLM (local paths or hub ids); the connector starts random."""
        vision = VisionTower.from_config(config.vision, dtype=dtype)
        llm = load_llm(config.llm, dtype=dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(config.llm)
        except (OSError, ValueError) as error:
            raise FileNotFoundError(f"expected a tokenizer beside the LLM at {config.llm!r}: {error}") from None
        check_tokenizer_fits(tokenizer, llm)
        vocab = add_image_tokens(tokenizer, config)
        if vocab > llm.get_input_embeddings().num_embeddings:
            _grow_embeddings(llm, vocab)
        model = cls(config, vision, llm).eval()
        model.connector.init_pretrained_weights()
        image_processor = ImagePreprocessor.for_encoder(config.vision.name_or_path, vision)
        return model, KopruProcessor(tokenizer, image_processor, config, model.image_count,
                                     encoder_config=vision.encoder.config)

    # ------------------------------------------------------------------------------------------------ forward
    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """[images, 3, H, W] -> connector output [images, features, llm_dim]

        anyres / dynamic images of different sizes give different lengths: see `encode_image_list`.
        """
        if self.config.resolution.mode == "fixed":
            return self._encode_passes(pixel_values, self._native_plan)
        features = self.encode_image_list(pixel_values, image_sizes)
        lengths = {f.shape[0] for f in features}
        if len(lengths) > 1:
            raise ValueError(f"these images give features of different lengths {sorted(lengths)}; use "
                             "encode_image_list")
        return torch.stack(features)

    def plan(self, height: int, width: int) -> ImagePlan:
        """How an image of this size goes through the encoder (see `kopru.geometry.plan_image`)."""
        return plan_image(self.config, self.vision.encoder.config, height, width)

    def _encode_passes(self, pixel_values: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        """Encoder passes of one plan's shape [passes, 3, H, W] -> connector output [passes, tokens, llm_dim]."""
        features = self.vision(pixel_values)
        rows, columns = plan.grid
        return self.connector(self.reduction(features, rows * self.reduction.factor, columns * self.reduction.factor))

    def encode_image_list(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
                          ) -> list[torch.Tensor]:
        """One [features, llm_dim] tensor per image, each exactly as long as `kopru.geometry.image_positions` counts.

        fixed: pixel_values [images, 3, S, S]. anyres: [images, 1 + most tiles, 3, S, S] (base view first) and
        `image_sizes` [images, 2] = original (height, width). dynamic: [images, 3, H, W] zero padded, each image
        in its top-left corner at its `smart_resize` size, and `image_sizes` as for anyres. tiled: [images,
        max_tiles, 3, S, S] (each image's own tiles first, `kopru.high_resolution_processing.TiledPreprocessor`) and `image_sizes` as for anyres.
        """
        if self.config.resolution.mode == "fixed":
            return list(self.encode_images(pixel_values).unbind(0))
        return self._encode_planned(pixel_values, self._plans(pixel_values, image_sizes))

    def _plans(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[ImagePlan]:
        mode = self.config.resolution.mode
        if image_sizes is None:
            raise ValueError(f"resolution mode {mode!r} needs image_sizes [images, 2] (original height, width) beside "
                             "pixel_values, as the processor returns them; found none")
        if image_sizes.shape != (pixel_values.shape[0], 2):
            raise ValueError(f"expected image_sizes of shape [{pixel_values.shape[0]}, 2] (one (height, width) per "
                             f"image), found {list(image_sizes.shape)}")
        return [self.plan(int(h), int(w)) for h, w in image_sizes.tolist()]

    def _encode_planned(self, pixel_values: torch.Tensor, plans: list[ImagePlan],
                        all_tiles: list | None = None) -> list[torch.Tensor]:
        if self.config.resolution.mode == "anyres":
            return self._encode_anyres(pixel_values, plans)
        if self.config.resolution.mode == "tiled":
            return self._encode_tiled(pixel_values, plans, all_tiles)
        return self._encode_dynamic(pixel_values, plans)

    def _encode_tiled(self, pixel_values: torch.Tensor, plans: list[ImagePlan],
                      all_tiles: list | None = None) -> list[torch.Tensor]:
        """Llama-3.2-Vision: all `max_tiles` tiles of every image through the encoder together (its tile position
        embeddings and global layers see the whole canvas), then only each image's own tiles to the connector:
        HF masks the padding tiles out of cross-attention, so leaving them out gives the same attention.

        `all_tiles`, when a list, receives per image (states of all `max_tiles` tiles [max_tiles * tokens, dim],
        [max_tiles * tokens] bool: True on its own tiles): HF's rows without an image attend to the padding tiles
        too (rows_without_image "attend_all")."""
        size, max_tiles = self.vision.image_size, plans[0].tiling.max_tiles
        if pixel_values.dim() != 5 or pixel_values.shape[1:] != (max_tiles, 3, size, size):
            raise ValueError(f"tiled resolution expects pixel_values [images, {max_tiles} tiles, 3, {size}, {size}], "
                             f"found {list(pixel_values.shape)}")
        ids, mask = aspect_ratio_inputs([plan.tiling for plan in plans], max_tiles, device=pixel_values.device)
        features = self.vision(pixel_values, aspect_ratio_ids=ids, aspect_ratio_mask=mask)
        rows, columns = plans[0].grid
        factor = self.reduction.factor
        if all_tiles is not None:  # the connector on every tile (it works tile by tile), then the real ones kept
            states = self.connector(self.reduction(features, rows * factor, columns * factor))
            states = states.unflatten(0, (len(plans), max_tiles))  # [images, max_tiles, tokens, dim]
            real = mask.bool().unsqueeze(-1).expand(-1, -1, states.shape[2])
            all_tiles.extend(zip(states.flatten(1, 2).unbind(0), real.flatten(1).unbind(0), strict=True))
            states = states[mask.bool()]
        else:
            features = features.unflatten(0, (len(plans), max_tiles))[mask.bool()]  # [real tiles, tokens, dim]
            states = self.connector(self.reduction(features, rows * factor, columns * factor))
        return [out.flatten(0, 1) for out in states.split([plan.passes for plan in plans])]

    def _encode_anyres(self, pixel_values: torch.Tensor, plans: list[ImagePlan]) -> list[torch.Tensor]:
        size = self.vision.image_size
        most = max(plan.passes for plan in plans)
        if pixel_values.dim() != 5 or pixel_values.shape[1] < most or pixel_values.shape[-2:] != (size, size):
            raise ValueError(
                f"anyres expects pixel_values [images, >= {most} views, 3, {size}, {size}], found "
                f"{list(pixel_values.shape)}"
            )
        views = torch.cat([pixels[:plan.passes] for pixels, plan in zip(pixel_values, plans, strict=True)])
        outputs = self._encode_passes(views, plans[0]).split([plan.passes for plan in plans])
        if packs_anyres_grid(self.config):
            return [pack_anyres(out, plan.layout, self.connector.image_newline) for out, plan in
                    zip(outputs, plans, strict=True)]
        return [out.flatten(0, 1) for out in outputs]

    def _encode_dynamic(self, pixel_values: torch.Tensor, plans: list[ImagePlan]) -> list[torch.Tensor]:
        tallest, widest = max(p.pass_size[0] for p in plans), max(p.pass_size[1] for p in plans)
        if pixel_values.dim() != 4 or pixel_values.shape[-2] < tallest or pixel_values.shape[-1] < widest:
            raise ValueError(
                f"dynamic resolution expects pixel_values [images, 3, >= {tallest}, >= {widest}], found "
                f"{list(pixel_values.shape)}"
            )
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, plan in enumerate(plans):
            by_size.setdefault(plan.pass_size, []).append(index)
        features: list[torch.Tensor | None] = [None] * len(plans)
        for (height, width), indices in by_size.items():  # images of one size share an encoder batch
            out = self._encode_passes(pixel_values[indices, :, :height, :width], plans[indices[0]])
            for index, image_features in zip(indices, out, strict=True):
                features[index] = image_features
        return features

    def prepare_inputs(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Text embeddings with the images in them, and the extra keyword arguments for the LLM call.

        `image_sizes` (anyres / dynamic resolution): [images, 2] original (height, width), from the processor.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_placeholder = input_ids == self.config.image_token_id
        if pixel_values is None:
            if bool(is_placeholder.any()):
                raise ValueError(
                    f"the text holds {int(is_placeholder.sum())} image placeholder position(s) but no images were given"
                )
            return embeds, {}
        fixed = self.config.resolution.mode == "fixed"
        if not self.connector.splices_into_text:
            images_per_sample = is_placeholder.sum(1)
            self._check_image_count(int(images_per_sample.sum()), pixel_values.shape[0], per_image=1)
            if fixed:
                states = self.encode_images(pixel_values).to(embeds.dtype)
            real_positions = None
            if not fixed:
                # rows_without_image "attend_all" on Mllama tiles: HF's rows without an image attend to every
                # tile, padding tiles included, so the K/V hold all of them (the real ones marked).
                attend_all = getattr(self.connector.config, "rows_without_image", "zero") == "attend_all"
                all_tiles = [] if attend_all and self.config.resolution.mode == "tiled" else None
                states = [f.to(embeds.dtype) for f in self._checked_features(pixel_values, image_sizes, all_tiles)]
                if all_tiles is not None:
                    states = [tiles.to(embeds.dtype) for tiles, _ in all_tiles]
                    real_positions = [real for _, real in all_tiles]
            image_context = self.connector.build_context(states, images_per_sample, real_positions)
            images_seen = torch.cumsum(is_placeholder, dim=1)
            return embeds, {CONTEXT_KWARG: image_context.for_positions(images_seen)}
        if fixed:
            features = self.encode_images(pixel_values).to(embeds.dtype)
            self._check_image_count(int(is_placeholder.sum()), features.shape[0], per_image=features.shape[1])
        else:
            per_image = self._checked_features(pixel_values, image_sizes)
            self._check_placeholder_runs(is_placeholder, [f.shape[0] for f in per_image])
            features = torch.cat(per_image).to(embeds.dtype)
        embeds = embeds.masked_scatter(is_placeholder.unsqueeze(-1), features)
        return embeds, {}

    def _checked_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None,
                          all_tiles: list | None = None) -> list[torch.Tensor]:
        """Per-image features, each checked against the count the processor expanded the text to (`all_tiles`:
        see `_encode_tiled`)."""
        plans = self._plans(pixel_values, image_sizes)
        features = self._encode_planned(pixel_values, plans, all_tiles)
        for index, ((height, width), plan, image_features) in enumerate(
                zip(image_sizes.tolist(), plans, features, strict=True)):
            counted = connector_tokens(self.config, plan)
            if image_features.shape[0] != counted:
                raise RuntimeError(
                    f"image {index} ({width}x{height}): the model produced {image_features.shape[0]} features but "
                    f"image_positions counts {counted}; the count and the model disagree"
                )
            if all_tiles is not None:  # the K/V kept for rows without an image: what `kopru budget` counts
                kept, cached = all_tiles[index][0].shape[0], cached_cross_attention_kv(self.config, plan)
                if kept != cached:
                    raise RuntimeError(
                        f"image {index} ({width}x{height}): the model keeps {kept} cross-attention K/V positions but "
                        f"cached_cross_attention_kv counts {cached}; the count and the model disagree"
                    )
        return features

    def _check_placeholder_runs(self, is_placeholder: torch.Tensor, lengths: list[int]) -> None:
        """Every image's placeholders against its own feature count; images of different sizes differ."""
        self._check_image_count(int(is_placeholder.sum()), len(lengths), per_image=None, total=sum(lengths))
        padded = torch.nn.functional.pad(is_placeholder, (1, 1)).flatten().int()
        edges = padded.diff()
        runs = ((edges == -1).nonzero().flatten() - (edges == 1).nonzero().flatten()).tolist()
        if len(runs) == len(lengths):  # adjacent images without markers merge into one run: the total must do
            for index, (found, expected) in enumerate(zip(runs, lengths, strict=True)):
                if found != expected:
                    raise ValueError(
                        f"image placeholders and image features do not match: image {index} has {found} placeholder "
                        f"position(s) in the text, its features are {expected}"
                    )

    def _check_image_count(self, placeholders: int, images: int, per_image: int | None, total: int | None = None
                           ) -> None:
        total = images * per_image if total is None else total
        if placeholders != total:
            detail = f"{per_image} per image" if per_image is not None else "counted per image size"
            raise ValueError(
                f"image placeholders and image features do not match: the text holds {placeholders} placeholder "
                f"position(s), the {images} image(s) give {total} ({detail})"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **llm_kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits, and with `labels` the causal-LM loss; image and marker positions never count in the loss."""
        embeds, extra = self.prepare_inputs(input_ids, pixel_values, image_sizes=image_sizes)
        if labels is not None:
            labels = labels.masked_fill(torch.isin(input_ids, self._image_ids), IGNORE_INDEX)
        if "cache" in llm_kwargs and self._cache_argument != "cache":
            llm_kwargs[self._cache_argument] = llm_kwargs.pop("cache")
        output = self.llm(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
            **extra, **llm_kwargs,
        )
        check_blocks_ran(extra)
        return output

    def count_loss_tokens(self, input_ids: torch.Tensor, labels: torch.Tensor) -> int:
        """Positions that count in the loss (after the causal shift, image positions excluded)."""
        labels = labels.masked_fill(torch.isin(input_ids, self._image_ids), IGNORE_INDEX)
        return int((labels[:, 1:] != IGNORE_INDEX).sum())

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """New tokens [batch, new]; see `kopru.generation.reference.generate` for the options."""
        return generate_tokens(self, input_ids, attention_mask, pixel_values, **kwargs)

    # ------------------------------------------------------------------------------------------- save / load
    def save_pretrained(self, path: str | Path, processor: KopruProcessor) -> None:
        """Whole model and its processor: written to a temporary folder beside `path`, then renamed into place."""
        if not isinstance(processor, KopruProcessor):
            raise TypeError(f"save_pretrained needs the model's KopruProcessor, found {type(processor).__name__}")
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not (path / CONFIG_FILE).is_file():
            raise FileExistsError(
                f"{path} exists and is not a Köprü model directory (no {CONFIG_FILE}); expected a new or empty "
                "directory, or an earlier save to replace"
            )
        with atomic_directory(path) as staging:
            self.vision.encoder.save_pretrained(staging / "vision", safe_serialization=True)
            self.llm.save_pretrained(staging / "llm", safe_serialization=True)
            processor.save_pretrained(staging / "llm", staging / "vision")
            self._write_connector(staging)
            saved = dataclasses.replace(
                self.config, llm="llm", vision=dataclasses.replace(self.config.vision, name_or_path="vision")
            )
            saved.save(staging / CONFIG_FILE)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype | None = None
    ) -> tuple[KopruForConditionalGeneration, KopruProcessor]:
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"expected a Köprü model directory with {CONFIG_FILE} at {path}, found none")
        config = KopruConfig.load(path / CONFIG_FILE)
        resolved = dataclasses.replace(
            config,
            llm=_resolve(path, config.llm),
            vision=dataclasses.replace(config.vision, name_or_path=_resolve(path, config.vision.name_or_path)),
        )
        vision = VisionTower.from_config(resolved.vision, dtype=dtype)
        llm = load_llm(resolved.llm, dtype=dtype)
        model = cls(config, vision, llm).eval()
        model.load_connector_weights(path / CONNECTOR_FILE)
        processor = KopruProcessor.from_dirs(
            resolved.llm, resolved.vision.name_or_path, config, model.image_count, vision.image_size,
            encoder_config=vision.encoder.config,
        )
        check_tokenizer_fits(processor.tokenizer, llm)
        return model, processor

    def save_connector(self, path: str | Path) -> None:
        """What stage 1 produces: the connector weights and the config naming the backbones they fit."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._write_connector(path)
        self.config.save(path / CONFIG_FILE)

    def load_connector(self, path: str | Path) -> None:
        """Load a `save_connector` checkpoint onto this model's backbones."""
        path = Path(path)
        saved = KopruConfig.load(path / CONFIG_FILE)
        if saved.strategy != self.config.strategy or saved.connector != self.config.connector:
            raise ValueError(
                f"connector checkpoint at {path} is for strategy {saved.strategy!r} with {saved.connector}; "
                f"this model has {self.config.strategy!r} with {self.config.connector}"
            )
        if saved.resolution != self.config.resolution:
            raise ValueError(
                f"connector checkpoint at {path} was trained with {saved.resolution}; this model has "
                f"{self.config.resolution}"
            )
        tensors = self._fitting_connector_weights(path / CONNECTOR_FILE)
        mine, theirs = self._backbone_identity(), _read_metadata(path / CONNECTOR_FILE)
        differ = {k: (mine[k], theirs.get(k)) for k in mine if k in theirs and theirs[k] != mine[k]}
        if differ:
            raise ValueError(
                f"connector checkpoint at {path} was trained on other backbones: "
                + ", ".join(f"{k}: this model {a!r}, checkpoint {b!r}" for k, (a, b) in differ.items())
            )
        self.connector.load_state_dict(tensors)

    def _backbone_identity(self) -> dict[str, str]:
        """What a connector depends on beyond its own shapes: which features it reads, which LLM it writes to."""
        vision, llm = self.vision, self.llm.config
        return {
            "vision_model_type": vision.encoder.config.model_type,
            "feature_layers": json.dumps(vision.feature_layers),
            "drop_cls": str(vision.drop_cls),
            "final_norm": str(vision.config.final_norm),
            "llm_model_type": llm.model_type,
            "llm_hidden_size": str(llm.hidden_size),
            "markers": json.dumps([self.config.image_start_token, self.config.image_end_token]),
        }

    def _write_connector(self, directory: Path) -> None:
        tensors = {name: t.detach().contiguous() for name, t in self.connector.state_dict().items()}
        target = directory / CONNECTOR_FILE
        temporary = target.with_suffix(".tmp")
        save_file(tensors, str(temporary), metadata={"strategy": self.config.strategy, **self._backbone_identity()})
        temporary.replace(target)

    def load_connector_weights(self, file: str | Path) -> None:
        self.connector.load_state_dict(self._fitting_connector_weights(file))

    def _fitting_connector_weights(self, file: str | Path) -> dict[str, torch.Tensor]:
        """The tensors of a connector file, after checking every name and shape against this connector."""
        file = Path(file)
        if not file.is_file():
            raise FileNotFoundError(f"expected connector weights at {file}, found nothing")
        loaded = load_file(str(file))
        expected = self.connector.state_dict()
        missing = sorted(set(expected) - set(loaded))
        unexpected = sorted(set(loaded) - set(expected))
        wrong = [
            f"{name}: expected {tuple(expected[name].shape)}, found {tuple(loaded[name].shape)}"
            for name in expected.keys() & loaded.keys()
            if expected[name].shape != loaded[name].shape
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"connector weights in {file} do not fit the {self.config.strategy!r} config: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}"
            )
        return loaded

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device


@torch.no_grad()
def _grow_embeddings(llm: PreTrainedModel, vocab: int) -> None:
    """Add rows for the image tokens, each the mean of the existing rows.

    Deterministic on purpose (HF's mean resizing samples from the RNG): in stage 1 these rows stay frozen, so a
    connector-only checkpoint reproduces the model exactly on freshly built backbones.
    """
    old = llm.get_input_embeddings().num_embeddings
    llm.resize_token_embeddings(vocab, mean_resizing=False)
    for embedding in {id(m): m for m in (llm.get_input_embeddings(), llm.get_output_embeddings()) if m is not None}.values():
        embedding.weight[old:] = embedding.weight[:old].mean(0)


def _read_metadata(file: Path) -> dict[str, str]:
    if not file.is_file():
        raise FileNotFoundError(f"expected connector weights at {file}, found nothing")
    with safe_open(str(file), "pt") as handle:
        return handle.metadata() or {}


def check_tokenizer_fits(tokenizer, llm: PreTrainedModel) -> None:
    """A tokenizer with more ids than the LLM has embedding rows belongs to another model."""
    rows = llm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"tokenizer does not match the LLM: it has {len(tokenizer)} tokens, the LLM's embedding table has "
            f"{rows} rows"
        )
    model_eos = {*_ids(llm.config.eos_token_id), *_ids(getattr(llm.generation_config, "eos_token_id", None))}
    if tokenizer.eos_token_id is not None and model_eos and tokenizer.eos_token_id not in model_eos:
        raise ValueError(
            f"tokenizer does not match the LLM: its end-of-sequence id is {tokenizer.eos_token_id}, the LLM's "
            f"config expects one of {sorted(model_eos)}"
        )


def _ids(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _resolve(root: Path, name: str) -> str:
    candidate = root / name
    return str(candidate) if candidate.exists() else name


__all__ = ["KopruForConditionalGeneration", "KopruConfig", "VisionTowerConfig"]
