"""Converting HF LLaVA and BLIP-2 checkpoints: the converted model, reloaded from disk, matches HF's logits.

Every reference is a tiny random HF model saved to a temporary directory with its tokenizer; nothing is
downloaded. The real check is the reloaded Köprü model: it shares no module with the HF reference.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NUM_PATCHES, PATCH_SIZE, random_image
from PIL import Image
from transformers import (
    Blip2ForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    SiglipVisionConfig,
    T5Config,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from vlm_checkpoints import (
    IMAGE_SIZE,
    NUM_QUERIES,
    PATCH,
    blip2_config,
    build_blip2,
    build_llava,
    tokenizer_with_image_token,
)

from kopru.convert import CONVERTERS, convert
from kopru.convert import blip2 as blip2_converter
from kopru.lesson.tiny import tiny_tokenizer
from kopru.model import KopruForConditionalGeneration

ATOL = 1e-4


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> tuple[LlavaForConditionalGeneration, Path]:
    return build_llava(tmp_path_factory.mktemp("llava") / "hf")


@pytest.fixture(scope="module")
def blip2(tmp_path_factory) -> tuple[Blip2ForConditionalGeneration, Path]:
    return build_blip2(tmp_path_factory.mktemp("blip2") / "hf")


def fresh_inputs(image_id: int, per_image: int, vocab: int, seed: int = 123) -> dict[str, torch.Tensor]:
    """Two prompts with the image block at different offsets; the second left-padded by three positions."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for before, after in ((3, 9), (7, 2)):
        text = torch.randint(3, min(vocab, image_id), (before + after,), generator=generator)
        rows.append(torch.cat([text[:before], torch.full((per_image,), image_id), text[before:]]))
    width = max(len(r) for r in rows)
    input_ids = torch.full((2, width), 2)
    attention_mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = row
        attention_mask[i, width - len(row):] = 1
    pixel_values = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


@torch.no_grad()
def reloaded_logit_diff(reference: PreTrainedModel, dst: Path, image_id: int, per_image: int) -> float:
    """Largest |logit difference| of the converted model, loaded from `dst`, against the HF reference."""
    model, processor = KopruForConditionalGeneration.from_pretrained(dst)
    model.eval()
    reference.eval()
    assert model.image_count.placeholders == per_image
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_id
    inputs = fresh_inputs(image_id, per_image, reference.config.text_config.vocab_size)
    expected = reference(**inputs).logits.float()
    found = model(**inputs).logits.float()
    assert found.shape == expected.shape
    valid = inputs["attention_mask"].bool()
    return float((expected[valid] - found[valid]).abs().max())


# ------------------------------------------------------------------------------------------------ LLaVA


LLAVA_VARIANTS = {
    "penultimate": {},
    "two_layers": {"vision_feature_layer": [-2, -1]},
    "full": {"vision_feature_select_strategy": "full"},
}


@pytest.mark.parametrize("variant", sorted(LLAVA_VARIANTS))
def test_llava_converts_and_reloads(variant: str, llava, tmp_path: Path) -> None:
    if variant == "penultimate":
        reference, src = llava
    else:
        reference, src = build_llava(tmp_path / "hf", **LLAVA_VARIANTS[variant])
    patches = (IMAGE_SIZE // PATCH) ** 2
    per_image = patches + int(variant == "full")

    report = convert("llava", src, tmp_path / "kopru", verify=True)
    assert report["strategy"] == "projection"
    assert report["image_positions"] == per_image
    assert report["max_abs_diff"] <= ATOL

    model, _ = KopruForConditionalGeneration.from_pretrained(tmp_path / "kopru")
    vision_width = reference.config.vision_config.hidden_size
    assert model.connector.layers[0].in_features == vision_width * (2 if variant == "two_layers" else 1)
    diff = reloaded_logit_diff(reference, tmp_path / "kopru", reference.config.image_token_id, per_image)
    assert diff <= ATOL, f"reloaded {variant} LLaVA differs from HF by {diff}"


# ----------------------------------------------------------------------------------------------- BLIP-2


def test_blip2_converts_and_reloads(blip2, tmp_path: Path) -> None:
    reference, src = blip2
    report = convert("blip2", src, tmp_path / "kopru", verify=True)
    assert report["strategy"] == "qformer"
    assert report["image_positions"] == NUM_QUERIES
    assert report["max_abs_diff"] <= ATOL
    # This tokenizer adds no bos (GPT-2 style): HF's prompt is the query tokens and the bare text, and the
    # converter's template follows the tokenizer; the user's path compares and agrees.
    user = report["user_path"]
    assert user["failure"] is None and user["passed"] is True
    assert all(check["input_ids_equal"] and check["tokens_equal"] for check in user["checks"])
    assert "bos_token" not in (tmp_path / "kopru" / "llm" / "chat_template.jinja").read_text()

    model, _ = KopruForConditionalGeneration.from_pretrained(tmp_path / "kopru")
    assert model.config.image_start_token is None and model.config.image_end_token is None
    assert model.vision.num_tokens == (IMAGE_SIZE // PATCH) ** 2 + 1  # BLIP-2 keeps the CLS token
    diff = reloaded_logit_diff(reference, tmp_path / "kopru", reference.config.image_token_id, NUM_QUERIES)
    assert diff <= ATOL, f"reloaded BLIP-2 differs from HF by {diff}"


def with_bos(tokenizer):
    """The tokenizer putting its bos in front of text, as OPT's does."""
    from tokenizers.processors import TemplateProcessing

    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
    return tokenizer


@pytest.mark.parametrize("adds_bos", [False, True])
def test_blip2_chat_template_renders_hfs_prompt_and_lavis_turns(adds_bos: bool) -> None:
    """One question: HF's Blip2Processor prompt (query tokens, the tokenizer's own special tokens, "Question: ...
    Answer:"); more turns: LAVIS's chained prompt (its README: "Question: which city is this? Answer: singapore.
    Question: why? Answer:"), each answer closed by eos. The strings are written out by hand."""
    from kopru.messages import ChatTemplate

    tokenizer = tokenizer_with_image_token()[0]
    if adds_bos:
        tokenizer = with_bos(tokenizer)
    tokenizer.chat_template = blip2_converter.chat_template(tokenizer, "<image>")
    chat = ChatTemplate.of(tokenizer, "<image>")
    bos = "<s>" if adds_bos else ""
    question = [{"role": "user", "content": [{"type": "image", "image": None},
                                             {"type": "text", "text": "which city is this?"}]}]
    assert chat.render(question, add_generation_prompt=True) == f"<image>{bos}Question: which city is this? Answer:"
    turns = [*question, {"role": "assistant", "content": "singapore."}, {"role": "user", "content": "why?"}]
    assert chat.render(turns, add_generation_prompt=True) == (
        f"<image>{bos}Question: which city is this? Answer: singapore.</s> Question: why? Answer:")
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert chat.render(system, add_generation_prompt=True) == f"{bos}Be brief. Question: hi Answer:"
    assert chat.end_of_turn_ids() == [tokenizer.eos_token_id]


def test_blip2_chat_template_trains_on_the_answer_and_eos(blip2) -> None:
    """The converted BLIP-2 can be trained with its template: the labels cover " singapore.</s>" only."""
    from kopru.data.encoding import IGNORE_INDEX, SampleEncoder
    from kopru.data.sample import Sample

    reference, src = blip2
    _, processor = blip2_converter.to_kopru(reference, str(src))
    encoder = SampleEncoder(processor)  # refuses a template that puts nothing after an answer
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    sample = Sample([{"role": "user", "content": "<image>which city is this?"},
                     {"role": "assistant", "content": "singapore."}], [image])
    encoded = encoder.encode(sample)
    labelled = encoded.labels[encoded.labels != IGNORE_INDEX].tolist()
    assert processor.tokenizer.decode(labelled) == " singapore.</s>"
    assert encoded.input_ids[:NUM_QUERIES].tolist() == [reference.config.image_token_id] * NUM_QUERIES


def test_blip2_tokenizer_appending_tokens_is_refused() -> None:
    from tokenizers.processors import TemplateProcessing

    tokenizer = tokenizer_with_image_token()[0]
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {tokenizer.eos_token}", special_tokens=[(tokenizer.eos_token, tokenizer.eos_token_id)])
    with pytest.raises(ValueError, match=r"in front of the text only .* found \['a', '</s>'\]"):
        blip2_converter.chat_template(tokenizer, "<image>")


def test_blip2_tokenizer_without_image_token(blip2, tmp_path: Path) -> None:
    _, src = blip2
    broken = shutil.copytree(src, tmp_path / "hf")
    for file in broken.glob("tokenizer*"):
        file.unlink()
    (broken / "special_tokens_map.json").unlink(missing_ok=True)
    tiny_tokenizer().save_pretrained(broken)
    with pytest.raises(ValueError, match=r"expected '<image>' -> \d+, found"):
        convert("blip2", broken, None)


def test_blip2_encoder_decoder_llm_is_refused() -> None:
    text = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    reference = Blip2ForConditionalGeneration(blip2_config(text, image_id=63))
    with pytest.raises(ValueError, match="decoder-only.*found text model_type 't5'"):
        blip2_converter.to_kopru(reference, "unused")


def test_blip2_without_image_token_id_is_refused(blip2, monkeypatch) -> None:
    reference, src = blip2
    monkeypatch.setattr(reference.config, "image_token_index", None)
    with pytest.raises(ValueError, match="image_token_id"):
        blip2_converter.to_kopru(reference, str(src))


# ------------------------------------------------------------------------------------------- CLI, errors


@pytest.mark.slow
def test_cli_convert_json(llava, tmp_path: Path) -> None:
    _, src = llava
    dst = tmp_path / "kopru"
    result = subprocess.run(
        [sys.executable, "-m", "kopru.cli", "convert", "--from", "llava", str(src), str(dst), "--verify", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["from"] == "llava" and report["dst"] == str(dst)
    assert report["max_abs_diff"] <= ATOL
    assert (dst / "kopru_config.json").is_file()


def test_missing_source_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert("llava", tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_format_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope") as error:
        convert("nope", tmp_path, tmp_path / "out")
    for kind in CONVERTERS:
        assert kind in str(error.value)


# --------------------------------------------------------------------------------------- image preprocessing
# The same settings as the fixtures' processors, as a transformers-4 checkpoint holds them in
# preprocessor_config.json (no processor_config.json): feature-extractor name and int sizes for LLaVA's CLIP,
# the Fast class name for BLIP-2.
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
TRANSFORMERS4_PREPROCESSOR = {
    "llava": {"feature_extractor_type": "CLIPFeatureExtractor", "do_resize": True, "size": 40, "resample": 3,
              "do_center_crop": True, "crop_size": IMAGE_SIZE, "do_normalize": True, "image_mean": _CLIP_MEAN,
              "image_std": _CLIP_STD, "processor_class": "LlavaProcessor"},
    "blip2": {"image_processor_type": "BlipImageProcessorFast", "do_resize": True,
              "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 3, "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD,
              "do_convert_rgb": True, "processor_class": "Blip2Processor"},
}


@pytest.mark.parametrize("layout", ["transformers5", "transformers4"])
@pytest.mark.parametrize("kind", ["llava", "blip2"])
def test_converted_pixels_equal_hf_processor(kind: str, layout: str, llava, blip2, tmp_path: Path) -> None:
    """The converted model carries the source's image-processor settings from whichever file it has, and its
    reloaded processor gives HF's pixels exactly, on non-square images; its vision/ loads in HF as the same."""
    from conftest import picture
    from transformers import AutoImageProcessor

    _, src = llava if kind == "llava" else blip2
    assert (src / "processor_config.json").is_file() and not (src / "preprocessor_config.json").exists()
    if layout == "transformers4":
        old = tmp_path / "old"
        shutil.copytree(src, old)
        (old / "processor_config.json").unlink()
        (old / "preprocessor_config.json").write_text(json.dumps(TRANSFORMERS4_PREPROCESSOR[kind]))
        src = old
    hf = AutoImageProcessor.from_pretrained(src)
    convert(kind, src, tmp_path / "kopru")
    _, processor = KopruForConditionalGeneration.from_pretrained(tmp_path / "kopru")
    images = [picture(200, 120, 0), picture(90, 300, 1), picture(333, 333, 2)]
    expected = hf(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(processor.image_processor(images), expected)
    saved = AutoImageProcessor.from_pretrained(tmp_path / "kopru" / "vision")
    assert torch.equal(saved(images=images, return_tensors="pt")["pixel_values"], expected)


def test_checkpoint_without_image_processor_is_refused(llava, tmp_path: Path) -> None:
    _, src = llava
    bare = tmp_path / "bare"
    shutil.copytree(src, bare)
    (bare / "processor_config.json").unlink()
    with pytest.raises(ValueError, match=rf"expected image-processor settings in {bare} .*found neither"):
        convert("llava", bare, tmp_path / "kopru")


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
    batch = processor("<image> describe it", [random_image(48, 40)])
    assert int((batch["input_ids"] == image_id).sum()) == NUM_PATCHES
    with torch.no_grad():
        model(**batch)
        ours = model.encode_images(batch["pixel_values"])
        theirs = reference.model.get_image_features(batch["pixel_values"], vision_feature_layer=-2,
                                                    vision_feature_select_strategy="default").pooler_output
    theirs = torch.stack(list(theirs))
    assert ours.shape[1] == NUM_PATCHES and theirs.shape[1] == NUM_PATCHES - 1
    torch.testing.assert_close(ours[:, 1:], theirs, atol=1e-5, rtol=1e-5)


def test_convert_refuses_a_checkpoint_of_another_type(llm_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"--from llava expects a checkpoint of model_type 'llava', found 'llama'"):
        convert("llava", llm_dirs["llama"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
