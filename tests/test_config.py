"""KopruConfig: validation, the JSON round trip, and old saved configs."""

from __future__ import annotations

import json
import warnings

import pytest
from conftest import counting_config

from kopru import KopruConfig, VisionTowerConfig
from kopru.connectors.resampler import ResamplerConfig


def test_unknown_strategy_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown strategy 'bridge'.*cross_attention.*projection.*qformer"):
        counting_config("bridge")


def test_config_json_round_trip(tmp_path):
    config = counting_config("cross_attention", {"layers": [3, 8], "resampler": {"num_latents": 16}})
    config.save(tmp_path / "c.json")
    loaded = KopruConfig.load(tmp_path / "c.json")
    assert loaded == config
    assert isinstance(loaded.connector.resampler, ResamplerConfig)
    with pytest.raises(ValueError, match="no field"):
        KopruConfig.from_dict({**config.to_dict(), "connecter": {}})


def test_config_markers_in_pairs_and_vision_string() -> None:
    with pytest.raises(ValueError, match="pairs"):
        KopruConfig(vision="some/encoder", llm="some/llm", image_start_token="<image_start>", image_end_token=None)
    with pytest.raises(ValueError, match="pairs"):
        KopruConfig(vision="some/encoder", llm="some/llm", image_start_token=None)
    config = KopruConfig(vision="path/string", llm="some/llm")
    assert isinstance(config.vision, VisionTowerConfig)
    assert config.vision.name_or_path == "path/string"
    assert config.vision == VisionTowerConfig("path/string")


def test_a_config_saved_with_the_old_extra_field_still_loads(tmp_path):
    # `extra` was a field nothing read; every model saved before its removal has "extra": {} in its config.
    config = counting_config("qformer", {"num_queries": 8})
    old = {**config.to_dict(), "extra": {}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty one is dropped without a word
        assert KopruConfig.load(tmp_path / "old.json") == config
    assert "extra" not in config.to_dict()
    with pytest.warns(UserWarning, match=r"ignoring the old 'extra' field \{'note': 'mine'\}"):
        assert KopruConfig.from_dict({**old, "extra": {"note": "mine"}}) == config
