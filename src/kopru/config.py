"""Typed configuration of a Köprü model.

A `KopruConfig` names the two pretrained backbones (by path or hub id), the connection strategy and that
strategy's own dataclass. It round-trips through JSON (`to_dict` / `from_dict`) so that a saved model
says exactly how it was built.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from kopru.connectors import strategy_class

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
