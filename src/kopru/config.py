"""Typed configuration of a Köprü model.

A `KopruConfig` names the two pretrained backbones (by path or hub id), the connection strategy and that
strategy's own dataclass. It round-trips through JSON (`to_dict` / `from_dict`) so that a saved model
says exactly how it was built.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kopru.connectors import strategy_class


@dataclass
class VisionTowerConfig:
    """Which encoder, and which of its features the connector sees."""

    name_or_path: str
    # Hidden-state index to take (-2 = penultimate, as LLaVA-1.5); a list concatenates several layers on
    # the channel axis, as Llama-3.2-Vision does.
    feature_layer: int | list[int] = -2
    # None: drop the CLS token exactly when the encoder has one (CLIP, ViT yes; SigLIP no).
    drop_cls: bool | None = None
    # Apply the encoder's final LayerNorm to the selected features (BLIP-2 feeds `last_hidden_state`).
    final_norm: bool = False
    trainable: bool = False


CONFIG_FILE = "kopru_config.json"  # a saved Köprü model directory holds its KopruConfig under this name
RESOLUTION_MODES = ("fixed", "anyres", "dynamic", "tiled")
REDUCTIONS = ("none", "pixel_shuffle", "avg_pool")


@dataclass
class ResolutionConfig:
    """How an image becomes encoder inputs, and how many tokens per encoder pass reach the connector.

    - "fixed": one pass at the encoder's native size (LLaVA-1.5, BLIP-2); every image costs the same.
    - "anyres": LLaVA-NeXT. The image is resized and padded to the best of `grid_pinpoints`, cut into tiles of
      the encoder's native size, and a base view of the whole image comes first. The projection strategy unpads
      the tile grid and ends each grid row with a learned newline embedding; the Q-Former reads each tile on its
      own (num_queries per tile) and cross-attention attends to all tiles' states.
    - "dynamic": Qwen2-VL. The image is resized (`smart_resize`) to multiples of patch x merge within
      [min_pixels, max_pixels] and seen in one pass, the encoder's position embeddings interpolated in 2-D.
    - "tiled": Llama-3.2-Vision (an Mllama encoder only). The image is resized keeping its aspect ratio onto the
      best canvas of up to the encoder's `max_num_tiles` tiles, padded and cut into tiles
      (`kopru.geometry.tiles`); the encoder sees all tiles of an image together (tile position embeddings by
      aspect ratio) and every real tile's states (patches + CLS unless dropped) reach the connector.

    `reduction` folds (pixel_shuffle: k x k neighbours concatenated, k^2 wider) or averages (avg_pool) each
    k x k block of patches before the connector, in every mode; in "dynamic" mode it is Qwen2-VL's k x k merge.
    """

    mode: Literal["fixed", "anyres", "dynamic", "tiled"] = "fixed"
    # anyres: (height, width) pixel sizes the tiled view may take, each a multiple of the encoder's image size.
    # None: LLaVA-NeXT's five layouts (1x2, 2x1, 2x2, 3x1, 1x3 tiles) at the encoder's size.
    grid_pinpoints: list[list[int]] | None = None
    # dynamic: the pixel budget of the resized image; None takes Qwen2-VL's defaults (56*56, 28*28*1280).
    min_pixels: int | None = None
    max_pixels: int | None = None
    reduction: Literal["none", "pixel_shuffle", "avg_pool"] = "none"
    reduction_factor: int = 2  # k of the k x k reduction; unused when reduction is "none"

    def __post_init__(self) -> None:
        if self.mode not in RESOLUTION_MODES:
            raise ValueError(f"resolution mode must be one of {list(RESOLUTION_MODES)}, found {self.mode!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"resolution reduction must be one of {list(REDUCTIONS)}, found {self.reduction!r}")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ValueError(f"resolution reduction_factor must be an integer >= 1, found {self.reduction_factor!r}")
        if self.grid_pinpoints is not None:
            pinpoints = [list(p) for p in self.grid_pinpoints]
            if not pinpoints or any(len(p) != 2 or not all(isinstance(v, int) and v > 0 for v in p) for p in pinpoints):
                raise ValueError(
                    "resolution grid_pinpoints must be a non-empty list of [height, width] positive integers, "
                    f"found {self.grid_pinpoints!r}"
                )
            self.grid_pinpoints = pinpoints
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"resolution {name} must be a positive integer or None, found {value!r}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(
                f"resolution min_pixels must not exceed max_pixels, found {self.min_pixels} > {self.max_pixels}"
            )

    @property
    def merge_size(self) -> int:
        """Patches per side folded into one token before the connector (1: none)."""
        return 1 if self.reduction == "none" else self.reduction_factor


@dataclass
class KopruConfig:
    vision: VisionTowerConfig  # or just the encoder's path / hub id
    llm: str
    strategy: str = "projection"
    # The strategy's own dataclass (ProjectionConfig, QFormerConfig, CrossAttentionConfig); None = defaults.
    connector: Any = None
    # The placeholder the user writes in a prompt; the processor expands it to the counted image positions.
    image_token: str = "<image>"
    # Markers around the image positions, as the lesson describes. None for converted checkpoints without them.
    image_start_token: str | None = "<image_start>"
    image_end_token: str | None = "<image_end>"
    # Filled in when the tokenizer is known (see `kopru.processing.add_image_tokens`).
    image_token_id: int | None = None
    image_start_token_id: int | None = None
    image_end_token_id: int | None = None
    # Fixed / anyres / dynamic resolution and token reduction; the default is one native-size pass per image.
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)
    # The model's name, the id `kopru serve` offers it under; `kopru train` stores its run folder's name here, so
    # that a model saved as runs/NAME/final keeps NAME wherever the folder goes. None: named after its folder.
    name: str | None = None

    __nested__ = {"resolution": ResolutionConfig}

    def __post_init__(self) -> None:
        connector_cls = strategy_class(self.strategy)
        if self.connector is None:
            self.connector = connector_cls.config_class()
        elif isinstance(self.connector, dict):
            self.connector = _from_dict(connector_cls.config_class, self.connector)
        elif not isinstance(self.connector, connector_cls.config_class):
            raise TypeError(
                f"strategy {self.strategy!r} expects a {connector_cls.config_class.__name__} connector config, "
                f"found {type(self.connector).__name__}"
            )
        if isinstance(self.vision, dict):
            self.vision = _from_dict(VisionTowerConfig, self.vision)
        elif isinstance(self.vision, str):
            self.vision = VisionTowerConfig(self.vision)
        if isinstance(self.resolution, dict):
            self.resolution = _from_dict(ResolutionConfig, self.resolution)
        elif not isinstance(self.resolution, ResolutionConfig):
            raise TypeError(f"resolution expects a ResolutionConfig or a dict, found {type(self.resolution).__name__}")
        if (self.image_start_token is None) != (self.image_end_token is None):
            raise ValueError(
                f"image markers come in pairs: found image_start_token={self.image_start_token!r}, "
                f"image_end_token={self.image_end_token!r}; give both or neither"
            )

    @property
    def uses_markers(self) -> bool:
        return self.image_start_token is not None and self.image_end_token is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KopruConfig:
        # Configs saved before `extra` was removed carry it (nothing ever read it): load them, and say what is
        # dropped when it held anything.
        if "extra" in data:
            data = dict(data)
            dropped = data.pop("extra")
            if dropped:
                warnings.warn(f"KopruConfig: ignoring the old 'extra' field {dropped!r} (no longer a field; "
                              "Köprü never read it)", UserWarning, stacklevel=2)
        return _from_dict(cls, data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> KopruConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"expected a Köprü config file at {path}, found nothing there")
        return cls.from_dict(json.loads(path.read_text()))


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass `cls` from `data`, refusing keys it does not know (typos would pass silently)."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; expected some of {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        nested = _nested_dataclass(cls, name)
        kwargs[name] = _from_dict(nested, value) if nested and isinstance(value, dict) else value
    return cls(**kwargs)


def _nested_dataclass(cls: type, name: str) -> type | None:
    hints = getattr(cls, "__nested__", {})
    return hints.get(name)


# ------------------------------------------------------------------------------ values against field types
def type_name(hint: Any) -> str:
    """A type as the help text shows it: `int | list[int]`, `str | None`, `one of 'a', 'b'`."""
    if hint is type(None):
        return "none"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(member.value) for member in hint)
    origin, members = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(member) for member in members)
    if origin in (types.UnionType, typing.Union):
        return " | ".join(type_name(member) for member in members)
    if origin is not None:
        inner = ", ".join("..." if member is Ellipsis else type_name(member) for member in members)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    return "any" if hint is Any else getattr(hint, "__name__", str(hint))


def coerce(hint: Any, value: Any) -> Any:
    """`value` (parsed JSON, YAML or TOML) as the type `hint` describes (from typing.get_type_hints): ints taken
    for floats, lists for tuples, each member of a union tried in turn; TypeError when it is none of them."""
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif isinstance(hint, type) and issubclass(hint, enum.Enum):
        for member in hint:
            if value in (member.value, member.name):
                return member
    else:
        origin, members = typing.get_origin(hint), typing.get_args(hint)
        if origin is typing.Literal:
            if value in members:
                return value
        elif origin in (types.UnionType, typing.Union):
            for member in members:
                try:
                    return coerce(member, value)
                except TypeError:
                    continue
        elif origin in (list, tuple) and isinstance(value, list):
            if origin is list:
                return [coerce(members[0] if members else Any, item) for item in value]
            if len(members) == 2 and members[1] is Ellipsis:
                return tuple(coerce(members[0], item) for item in value)
            if not members or len(members) == len(value):
                return tuple(coerce(member, item) for member, item in zip(members or [Any] * len(value),
                                                                                value, strict=True))
        elif origin is dict and isinstance(value, dict):
            key, item = members or (Any, Any)
            return {coerce(key, k): coerce(item, v) for k, v in value.items()}
        else:
            raise TypeError(f"no check written for values of type {hint!r}")
    raise TypeError(value)
