"""Loading the LLM: any causal LM checkpoint, and a clear error for anything else."""

from __future__ import annotations

import pytest

from kopru.llm import load_llm


def test_llm_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="LLM path .*missing.* does not exist"):
        load_llm(str(tmp_path / "missing"))


def test_a_vision_encoder_is_not_a_causal_lm(vision_dirs):
    with pytest.raises(ValueError, match="expected a causal LM checkpoint.*found model_type 'clip_vision_model'"):
        load_llm(str(vision_dirs["clip"]))


def test_a_directory_without_a_config_is_not_an_llm(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"expected a Hugging Face LLM checkpoint \(config.json\) in .*empty.*found none"):
        load_llm(str(tmp_path / "empty"))
