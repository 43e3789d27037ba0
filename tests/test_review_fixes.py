"""Regression tests for the fixes of a code review: each test fails on the behaviour the review described.

Everything is tiny, random and local (see conftest.py); nothing is downloaded.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONNECTORS, IMAGE_SIZE, LLM_LAYERS, NUM_PATCHES, PATCH_SIZE, QFORMER, STRATEGIES
from PIL import Image
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    BloomConfig,
    BloomForCausalLM,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from kopru import KopruConfig, KopruForConditionalGeneration, VisionTowerConfig
from kopru.connectors import CrossAttentionConfig
from kopru.convert import convert
from kopru.image_processing import CONFIG_NAME, ImagePreprocessor
from kopru.tiny import tiny_tokenizer
from kopru.vision import VisionTower

try:  # transformers 5: the Pillow backend by name (CLIPImageProcessor picks torchvision when it is installed)
    from transformers import CLIPImageProcessorPil as PilCLIPImageProcessor
except ImportError:  # transformers 4: CLIPImageProcessor is the Pillow/NumPy one
    from transformers import CLIPImageProcessor as PilCLIPImageProcessor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def open_gates(model: KopruForConditionalGeneration, value: float) -> None:
    with torch.no_grad():
        for block in model.connector.blocks:
            block.attn_gate.fill_(value)
            block.mlp_gate.fill_(value)


# ------------------------------------------------------------------------------------------------ 1. dtype
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_from_backbones_bf16_casts_connector_and_runs(vision_dirs, llm_dirs, make_image, strategy) -> None:
    """Before: the connector stayed fp32 next to a bf16 LLM and the forward raised a dtype mismatch."""
    torch.manual_seed(0)
    config = KopruConfig(vision=str(vision_dirs["clip"]), llm=str(llm_dirs["llama"]), strategy=strategy,
                         connector=CONNECTORS[strategy])
    model, processor = KopruForConditionalGeneration.from_backbones(config, dtype=torch.bfloat16)
    assert {p.dtype for p in model.connector.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.llm.parameters()} == {torch.bfloat16}
    batch = processor("<image> describe it", [make_image(0)])
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16
    assert bool(torch.isfinite(logits).all())


# ----------------------------------------------------------------------------------- 2. save into a directory
def test_save_pretrained_refuses_foreign_directory_and_replaces_own_save(build, make_image, tmp_path) -> None:
    model, processor = build("projection")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a Köprü model"):
        model.save_pretrained(foreign, processor)
    assert sorted(p.name for p in foreign.iterdir()) == ["precious.txt"]
    assert (foreign / "precious.txt").read_text() == "keep me"

    target = tmp_path / "model"
    model.save_pretrained(target, processor)
    with torch.no_grad():
        for param in model.connector.parameters():
            param.add_(0.5)
    model.save_pretrained(target, processor)  # over the earlier save
    loaded, loaded_processor = KopruForConditionalGeneration.from_pretrained(target)
    batch = processor("<image> describe it", [make_image(0)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
    # Nothing left behind but the two directories (no staging folders).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "model"]


# ------------------------------------------------------------------------------------------ 3. preprocessing
@pytest.mark.parametrize("shortest_edge", [32, 40])  # 40: resize to 40, then crop 32 (as 256 -> 224 in CLIP)
def test_preprocessing_matches_hf_clip_image_processor(vision_dirs, tmp_path, shortest_edge) -> None:
    """A CLIP encoder dir with HF's preprocessor_config.json gives HF's pixel values.

    HF resizes the shortest side to `shortest_edge` and the long side to int(size * long / short) (truncated,
    as torchvision does), with Pillow bicubic on the uint8 image, then crops the centre ((orig - crop) // 2),
    rescales (float64 * 1/255 -> float32) and normalises. The same Pillow resize on the same uint8 pixels
    leaves only float rounding (~1e-7) in rescale/normalise, hence atol 1e-5. The sizes include ones where
    rounding the long side instead of truncating it would pick another size (40x62: 49.6, 33x100: 96.97,
    45x64: 45.5, 100x30: 106.7) and odd crop margins (50x41 -> 32x39).
    """
    vision_dir = tmp_path / "clip"
    shutil.copytree(vision_dirs["clip"], vision_dir)
    PilCLIPImageProcessor(size={"shortest_edge": shortest_edge},
                          crop_size={"height": 32, "width": 32}).save_pretrained(vision_dir)
    tower = VisionTower.from_config(VisionTowerConfig(str(vision_dir)))
    ours = ImagePreprocessor.for_encoder(str(vision_dir), tower)
    hf = PilCLIPImageProcessor.from_pretrained(vision_dir)
    images = [image(h, w, seed) for seed, (h, w) in enumerate([(40, 48), (40, 62), (62, 40), (33, 100),
                                                               (45, 64), (100, 30), (50, 41), (17, 23)])]
    expected = hf(images, return_tensors="pt").pixel_values
    found = ours(images)
    assert found.shape == expected.shape == (len(images), 3, 32, 32)
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=0)


def test_tiny_encoders_ship_their_family_mean_std(vision_dirs) -> None:
    """Before: every encoder without a preprocessor_config.json got mean/std 0.5, wrong for CLIP. Now an encoder
    without settings is refused (tests/test_image_processors.py), and the tiny ones ship their family's."""
    for kind, mean, std in (("clip", CLIP_MEAN, CLIP_STD), ("siglip", (0.5,) * 3, (0.5,) * 3)):
        assert (vision_dirs[kind] / CONFIG_NAME).is_file()
        tower = VisionTower.from_config(VisionTowerConfig(str(vision_dirs[kind])))
        preprocessor = ImagePreprocessor.for_encoder(str(vision_dirs[kind]), tower)
        assert preprocessor.size == IMAGE_SIZE
        assert tuple(preprocessor.image_mean) == pytest.approx(mean)
        assert tuple(preprocessor.image_std) == pytest.approx(std)


# ------------------------------------------------------------------------------------------------ 4. processor
def test_processor_checks_images_per_text(build, make_image) -> None:
    model, processor = build("projection")
    with pytest.raises(ValueError, match=r"text 0 holds 2 '<image>' placeholder\(s\) but 1 image"):
        processor(["<image> and <image>", "no image"], [[make_image(0)], [make_image(1)]])
    # A single PIL image, not in a list, for one placeholder.
    batch = processor("describe <image>", make_image(0))
    assert batch["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


# ---------------------------------------------------------------------------------- 5. LLMs dropping kwargs
@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory) -> Path:
    """BloomModel.forward takes **kwargs but calls each block with a fixed argument list: the image context
    never reaches the decoder layers' pre-hooks (MptModel does the same)."""
    path = tmp_path_factory.mktemp("bloom")
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=64, n_layer=LLM_LAYERS, n_head=4,
                                 bos_token_id=0, eos_token_id=1, pad_token_id=2)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cross_attention_refuses_llm_that_drops_kwargs(vision_dirs, bloom_dir, make_image) -> None:
    torch.manual_seed(0)
    config = KopruConfig(vision=str(vision_dirs["clip"]), llm=str(bloom_dir), strategy="cross_attention",
                         connector=CONNECTORS["cross_attention"])
    model, processor = KopruForConditionalGeneration.from_backbones(config)
    batch = processor("<image> describe it", [make_image(0)], padding_side="left")
    with torch.no_grad(), pytest.raises(RuntimeError, match="gated cross-attention block"):
        model(**batch)
    with pytest.raises(RuntimeError, match="gated cross-attention block"):
        model.generate(**batch, max_new_tokens=2)


def test_cross_attention_on_llama_runs_its_blocks(build, make_image) -> None:
    model, processor = build("cross_attention")
    batch = processor("<image> describe it", [make_image(0)], padding_side="left")
    with torch.no_grad():
        model(**batch)
    assert model.generate(**batch, max_new_tokens=2, eos_token_id=[]).shape == (1, 2)


# ------------------------------------------------------------------------------------ 6. Q-Former init_from
def test_qformer_init_from_not_needed_after_save(vision_dirs, llm_dirs, make_image, tmp_path) -> None:
    """Before: from_pretrained read the BERT checkpoint named by init_from again (gone -> error)."""
    bert_dir = tmp_path / "bert"
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=50, hidden_size=QFORMER["hidden_size"], num_hidden_layers=QFORMER["num_layers"],
                         num_attention_heads=QFORMER["num_heads"], intermediate_size=QFORMER["intermediate_size"],
                         max_position_embeddings=16)).save_pretrained(bert_dir, safe_serialization=True)
    assert list(bert_dir.glob("*.safetensors"))
    torch.manual_seed(0)
    config = KopruConfig(vision=str(vision_dirs["clip"]), llm=str(llm_dirs["llama"]), strategy="qformer",
                         connector={**QFORMER, "init_from": str(bert_dir)})
    model, processor = KopruForConditionalGeneration.from_backbones(config)
    bert = BertModel.from_pretrained(bert_dir)
    torch.testing.assert_close(model.connector.qformer.layers[0].self_attention.query.weight,
                               bert.encoder.layer[0].attention.self.query.weight)  # init_from took effect

    saved = tmp_path / "model"
    model.save_pretrained(saved, processor)
    shutil.rmtree(bert_dir)
    loaded, loaded_processor = KopruForConditionalGeneration.from_pretrained(saved)
    batch = processor("<image> describe it", [make_image(0)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**loaded_processor("<image> describe it", [make_image(0)])).logits,
                                   model(**batch).logits, atol=0, rtol=0)


# ------------------------------------------------------------------------------ 7. connectors, other backbones
def test_load_connector_refuses_other_feature_layer(build, tmp_path) -> None:
    source, _ = build("projection")  # feature_layer -2
    source.save_connector(tmp_path / "connector")
    target, _ = build("projection", vision_config={"feature_layer": -1})
    with pytest.raises(ValueError, match="feature_layers"):
        target.load_connector(tmp_path / "connector")


def test_load_connector_refuses_other_llm_family(build, tmp_path) -> None:
    source, _ = build("projection", llm="llama")
    source.save_connector(tmp_path / "connector")
    target, _ = build("projection", llm="qwen2")  # same width: every shape fits
    assert target.llm.config.hidden_size == source.llm.config.hidden_size
    with pytest.raises(ValueError, match="llm_model_type"):
        target.load_connector(tmp_path / "connector")


# ---------------------------------------------------------------------------------- 8. stage 2 and the encoder
def test_freeze_for_stage2_respects_trainable_encoder(build) -> None:
    trainable, _ = build("projection", vision_config={"trainable": True})
    trainable.freeze_for_stage2()
    assert all(p.requires_grad for p in trainable.vision.encoder.parameters())
    assert all(p.requires_grad for p in trainable.connector.parameters())

    frozen, _ = build("projection")
    frozen.freeze_for_stage2()
    assert not any(p.requires_grad for p in frozen.vision.encoder.parameters())
    assert all(p.requires_grad for p in frozen.connector.parameters())


# ------------------------------------------------------------------------------ 9. cross-attention positions
def test_cross_attention_without_any_block_is_refused(build) -> None:
    with pytest.raises(ValueError, match=rf"every_n_layers=8 on an LLM with {LLM_LAYERS} layers"):
        build("cross_attention", connector=CrossAttentionConfig(every_n_layers=8))
    with pytest.raises(ValueError, match=rf"layers=\[\].*{LLM_LAYERS} layers"):
        build("cross_attention", connector=CrossAttentionConfig(layers=[]))


# ------------------------------------------------------------------------------------- 10. default eos
def test_generate_stops_at_generation_config_eos(build) -> None:
    model, processor = build("projection")
    batch = processor("what colour is the shape", padding_side="left")
    max_new = 8
    free = model.generate(**batch, max_new_tokens=max_new, eos_token_id=[])
    assert free.shape == (1, max_new)
    eos = int(free[0, 1])
    stop = free[0].tolist().index(eos) + 1  # 2 unless step 1 already produced the same id
    assert stop < max_new
    model.llm.generation_config.eos_token_id = eos
    stopped = model.generate(**batch, max_new_tokens=max_new)
    assert stopped.tolist() == free[:, :stop].tolist()
    assert model.generate(**batch, max_new_tokens=max_new, eos_token_id=[]).shape == (1, max_new)


# ------------------------------------------------------------------------------------ 11. tokenizer eos
def test_tokenizer_with_other_eos_is_refused(build, vision_dirs, llm_dirs, tmp_path) -> None:
    llm_dir = tmp_path / "llm"
    shutil.copytree(llm_dirs["llama"], llm_dir)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    tokenizer.eos_token = "<s>"  # id 0; the LLM's config says 1
    tokenizer.save_pretrained(llm_dir)
    config = KopruConfig(vision=str(vision_dirs["clip"]), llm=str(llm_dir))
    with pytest.raises(ValueError, match=r"end-of-sequence id is 0, .*\[1\]"):
        KopruForConditionalGeneration.from_backbones(config)

    model, processor = build("projection")
    saved = tmp_path / "model"
    model.save_pretrained(saved, processor)
    tokenizer = AutoTokenizer.from_pretrained(saved / "llm")
    tokenizer.eos_token = "<s>"
    tokenizer.save_pretrained(saved / "llm")
    with pytest.raises(ValueError, match=r"end-of-sequence id is 0, .*\[1\]"):
        KopruForConditionalGeneration.from_pretrained(saved)


# -------------------------------------------------------------------------------------------- 12. config
# -------------------------------------------------------------------------------- 13. LLaVA with SigLIP
def test_llava_with_siglip_keeps_every_patch(tmp_path) -> None:
    """HF's LLaVA with vision_feature_select_strategy "default" drops position 0 whatever the encoder, so a
    SigLIP-based LLaVA (no CLS token) loses its first patch and wants patches - 1 placeholders. Köprü only
    drops a real CLS token: the conversion keeps all patches. The difference is intended, which is why
    --verify (same inputs to both models) does not apply here; instead this checks that Köprü's image
    vectors are HF's with the first patch put back.
    """
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    reference = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                bos_token_id=0, eos_token_id=1, pad_token_id=2),
        image_token_id=image_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )).eval()
    src = tmp_path / "llava"
    reference.save_pretrained(src)
    tokenizer.save_pretrained(src)
    SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(src)

    report = convert("llava", src, tmp_path / "kopru")
    assert report["image_positions"] == NUM_PATCHES
    model, processor = KopruForConditionalGeneration.from_pretrained(tmp_path / "kopru")
    assert model.image_count.placeholders == NUM_PATCHES  # not NUM_PATCHES - 1
    batch = processor("<image> describe it", [image(40, 48)])
    assert int((batch["input_ids"] == image_id).sum()) == NUM_PATCHES
    with torch.no_grad():
        model(**batch)
        ours = model.encode_images(batch["pixel_values"])
        theirs = reference.model.get_image_features(batch["pixel_values"], vision_feature_layer=-2,
                                                    vision_feature_select_strategy="default").pooler_output
    theirs = torch.stack(list(theirs))
    assert ours.shape[1] == NUM_PATCHES and theirs.shape[1] == NUM_PATCHES - 1
    torch.testing.assert_close(ours[:, 1:], theirs, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------- 14. deepcopy
def test_deepcopy_cross_attention_runs_its_own_blocks(build, make_image) -> None:
    """Before: the copy's layer hooks ran the original connector's blocks."""
    model, processor = build("cross_attention")
    open_gates(model, 1.0)
    twin = copy.deepcopy(model)
    open_gates(twin, 0.0)
    batch = processor("<image> what colour is the shape", [make_image(0)])
    text_only = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        plain = twin.llm(**text_only).logits
        torch.testing.assert_close(twin(**batch).logits, plain)
        original = model(**batch).logits
        assert not torch.allclose(original, plain, atol=1e-4)
        torch.testing.assert_close(model.llm(**text_only).logits, plain)  # same base LLM underneath
