"""Bad input gets a clear error naming what was expected and what was found."""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoTokenizer

from kopru import KopruConfig, KopruForConditionalGeneration, VisionTowerConfig
from kopru.cli import main
from kopru.convert import convert
from kopru.llm import load_llm
from kopru.processing import KopruProcessor


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


def test_from_pretrained_needs_a_kopru_directory(llm_dirs):
    with pytest.raises(FileNotFoundError, match="kopru_config.json"):
        KopruForConditionalGeneration.from_pretrained(llm_dirs["llama"])


def test_a_tokenizer_larger_than_the_llm_is_refused(build, tmp_path):
    model, processor = build("projection")
    model.save_pretrained(tmp_path / "saved", processor)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "saved" / "llm")
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(50)])
    tokenizer.save_pretrained(tmp_path / "saved" / "llm")
    rows = model.llm.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match=rf"tokenizer does not match the LLM: it has {rows + 50} tokens.* {rows} rows"):
        KopruForConditionalGeneration.from_pretrained(tmp_path / "saved")


def test_a_tokenizer_with_another_image_token_id_is_refused(build):
    model, processor = build("projection")
    config = model.config
    other = KopruConfig(**{**config.__dict__, "image_token_id": config.image_token_id + 1})
    with pytest.raises(ValueError, match=rf"expected '<image>' to have id {config.image_token_id + 1}, found "
                                          rf"{config.image_token_id}"):
        KopruProcessor(processor.tokenizer, processor.image_processor, other, model.image_count)


def test_missing_connector_weights(build, tmp_path):
    model, processor = build("qformer")
    model.save_pretrained(tmp_path / "saved", processor)
    (tmp_path / "saved" / "connector.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="expected connector weights at .*connector.safetensors"):
        KopruForConditionalGeneration.from_pretrained(tmp_path / "saved")


def test_a_vision_model_given_as_llm(vision_dirs):
    config = KopruConfig(vision=VisionTowerConfig(str(vision_dirs["clip"])), llm=str(vision_dirs["siglip"]))
    with pytest.raises(ValueError, match="found model_type 'siglip_vision_model'"):
        KopruForConditionalGeneration.from_backbones(config)


def test_convert_refuses_a_checkpoint_of_another_type(llm_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"--from llava expects a checkpoint of model_type 'llava', found 'llama'"):
        convert("llava", llm_dirs["llama"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_prints_the_error_without_a_traceback(llm_dirs, tmp_path, capsys):
    assert main(["convert", "--from", "blip2", str(llm_dirs["llama"]), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "expects a checkpoint of model_type 'blip-2', found 'llama'" in err
    assert "Traceback" not in err


def test_save_pretrained_replaces_atomically(build, tmp_path):
    model, processor = build("projection")
    target = tmp_path / "saved"
    model.save_pretrained(target, processor)
    shutil.rmtree(target / "vision")  # a damaged earlier save is replaced whole
    model.save_pretrained(target, processor)
    assert (target / "vision" / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no staging folder left behind
