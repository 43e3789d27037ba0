"""`kopru export`: Köprü models out as HF checkpoints that transformers loads and runs alone.

The references are independent of the exporter: the tiny HF checkpoints the conversion tests build (convert then
export must give back every tensor under its original name, and the same config), HF's own processors and
`generate` (a model trained by `kopru train`, exported, answers through them exactly as `kopru chat` answers),
Köprü's own rendering of a conversation (the exported chat template must give HF the same ids).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import Blip2VisionConfig, MllamaVisionConfig
from vlm_checkpoints import LLAVA_15_TEMPLATE as LLAVA_15

from kopru.backbones import ASSETS_DIR
from kopru.cli import main
from kopru.config import KopruConfig, VisionTowerConfig
from kopru.convert import convert
from kopru.convert.verify import hf_adds_special_tokens
from kopru.export import export
from kopru.export.chat_template import check_special_tokens, exported_chat_template
from kopru.export.common import hf_image_processor, image_settings
from kopru.generation import format_chat
from kopru.image_processing import ImagePreprocessor

FAMILIES = ("llava", "llava_next", "blip2", "mllama")


def hf_checkpoint(kind: str, path: Path) -> Path:
    """The tiny random HF checkpoint of `kind`, with its processor (and chat template, BLIP-2 has none)."""
    if kind == "blip2":
        from vlm_checkpoints import build_blip2

        return build_blip2(path)[1]
    from vlm_checkpoints import build

    return build(kind, path)


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("kind", FAMILIES)
def test_convert_then_export_gives_back_the_hf_checkpoint(kind: str, tmp_path: Path) -> None:
    src = hf_checkpoint(kind, tmp_path / "hf")
    convert(kind, src, tmp_path / "kopru")
    report = export(kind, tmp_path / "kopru", tmp_path / "out")
    out = tmp_path / "out"
    assert report["hf_class"] == json.loads((src / "config.json").read_text())["architectures"][0]

    original, exported = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)  # every tensor under its original name, nothing more
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    if (src / "chat_template.jinja").is_file():  # a template that prints its own image token comes back as it was
        assert (out / "chat_template.jinja").read_text() == (src / "chat_template.jinja").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging folder left


@pytest.mark.slow
def test_cli_blip2_verify_json(tmp_path: Path, capsys) -> None:
    """The BLIP-2 export checked by transformers alone in another process: its processor puts the query tokens in
    front of the prompt, and the Köprü side, given that layout, agrees on ids, pixels, logits and tokens."""
    src = hf_checkpoint("blip2", tmp_path / "hf")
    convert("blip2", src, tmp_path / "kopru")
    code = main(["export", "--to", "blip2", str(tmp_path / "kopru"), str(tmp_path / "out"), "--verify", "--json",
                 "--threads", "1"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, report
    verify = report["verify"]
    assert verify["passed"] and verify["failure"] is None
    assert verify["hf"]["model_class"] == "Blip2ForConditionalGeneration" and not verify["hf"]["kopru_imported"]
    assert "in front of the whole prompt" in verify["layout"]
    for check in verify["checks"]:
        assert check["input_ids_equal"] and check["max_pixel_diff"] == 0.0 and check["max_logit_diff"] <= 1e-4
        assert check["tokens_equal"] and check["hf_tokens"]  # BLIP-2's random LLM does not stop at once
    assert not (tmp_path / "out" / "config.json").read_text().count("auto_map")  # no remote code to trust


@pytest.mark.slow
def test_cli_verify_exits_1_naming_the_first_difference(build, tmp_path: Path, capsys, monkeypatch) -> None:
    """An export whose template forgets the image markers: HF's ids lose them, and --verify says where."""
    from kopru.export import llava

    model, processor = build("projection")
    model.save_pretrained(tmp_path / "src", processor)
    unmarked = copy.deepcopy(processor)
    unmarked.config.image_start_token = unmarked.config.image_end_token = None
    monkeypatch.setattr(llava, "exported_chat_template", lambda _: exported_chat_template(unmarked))
    capsys.readouterr()
    code = main(["export", "--to", "llava", str(tmp_path / "src"), str(tmp_path / "out"), "--verify", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert re.search(r"verify failed: 200x120 image: input ids differ at position \d+: HF \d+, Köprü \d+ .*the "
                     r"checkpoint is written at", err), err
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------ models built by Köprü
@torch.no_grad()
def _same_on_the_users_path(src: Path, dst: Path) -> None:
    """HF (in this process, Köprü not involved in loading) on DST and Köprü on SRC: the chat question about a drawn
    picture gives the same ids and last-position logits."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kopru.convert.verify import QUESTION, chat_messages, kopru_user_path, verification_picture
    from kopru.model import KopruForConditionalGeneration

    image = verification_picture()
    processor = AutoProcessor.from_pretrained(dst)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    expected = AutoModelForImageTextToText.from_pretrained(dst).eval()(**inputs).logits[0, -1]
    model, kopru_processor = KopruForConditionalGeneration.from_pretrained(src)
    ours = kopru_user_path(model, kopru_processor, image, new_tokens=1, hf_keys=set(inputs))
    kopru_prompt = format_chat(kopru_processor, chat_messages(image))[0]
    kopru_ids = kopru_processor(kopru_prompt, [[image]], add_special_tokens=False)["input_ids"][0].tolist()
    assert inputs["input_ids"][0].tolist() == ours.input_ids == kopru_ids
    assert float((expected - ours.last_logits).abs().max()) <= 1e-5


@pytest.mark.parametrize(("vision", "llm"), [("siglip", "llama"), ("clip", "qwen2")])
def test_projection_on_other_backbones_exports_to_llava(build, vision: str, llm: str, tmp_path: Path) -> None:
    """SigLIP (no CLS: "full" selection, no additional token) and a Qwen2 with tied embeddings."""
    model, processor = build("projection", vision=vision, llm=llm)
    model.save_pretrained(tmp_path / "src", processor)
    export("llava", tmp_path / "src", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vision_feature_select_strategy"] == ("full" if vision == "siglip" else "default")
    _same_on_the_users_path(tmp_path / "src", tmp_path / "out")


def test_llm_hf_llava_cannot_hold_is_refused(build, tmp_path: Path, capsys) -> None:
    model, processor = build("projection", llm="gpt2")  # HF's LLaVA ties `embed_tokens`, which GPT-2 names `wte`
    model.save_pretrained(tmp_path / "src", processor)
    _refused(["export", "--to", "llava", str(tmp_path / "src"), str(tmp_path / "out")],
             r"LlavaForConditionalGeneration cannot be built around this model \(its LLM is 'gpt2'\)", tmp_path, capsys)


def _mllama_vision(path: Path) -> Path:
    """A tiny random Llama-3.2-Vision encoder saved on its own, with its image processor's settings."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    from kopru.convert.mllama import MllamaTiledVisionModel

    torch.manual_seed(0)
    config = MllamaVisionConfig(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                                intermediate_size=64, vision_output_dim=96, image_size=16, patch_size=4,
                                max_num_tiles=4, intermediate_layers_indices=[0, 1])
    MllamaTiledVisionModel(config).save_pretrained(path)
    MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=4).save_pretrained(path)
    return path


@torch.no_grad()
def test_cross_attention_built_by_kopru_exports_to_mllama(llm_dirs, tmp_path: Path) -> None:
    """Gated blocks every 2 layers of a Köprü Llama (its head keeps every row: Mllama's embeddings get 8 unused
    ones), image markers printed by the template, gates away from 0 so the blocks matter."""
    from kopru.model import KopruForConditionalGeneration

    config = KopruConfig(
        vision=VisionTowerConfig(str(_mllama_vision(tmp_path / "vision")), feature_layer=-1, drop_cls=False),
        llm=str(llm_dirs["llama"]), strategy="cross_attention", image_token="<|image|>",
        connector={"every_n_layers": 2, "rows_without_image": "attend_all"}, resolution={"mode": "tiled"})
    model, processor = KopruForConditionalGeneration.from_backbones(config)
    for block in model.connector.blocks:
        block.attn_gate.fill_(0.8)
        block.mlp_gate.fill_(-0.6)
    model.save_pretrained(tmp_path / "src", processor)
    export("mllama", tmp_path / "src", tmp_path / "out")
    text = json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]
    rows = model.llm.get_output_embeddings().weight.shape[0]
    assert text["cross_attention_layers"] == [1, 4] and text["num_hidden_layers"] == 6 and text["vocab_size"] == rows
    _same_on_the_users_path(tmp_path / "src", tmp_path / "out")


# ------------------------------------------------------------------------------------------- trained models
def _trained(tmp_path: Path, mode: str) -> Path:
    from kopru.training import TrainConfig, train

    summary = train(TrainConfig(
        strategy="projection", train_data="builtin:shapes", builtin_train_size=16, builtin_eval_size=4,
        eval_questions=4, batch_size=4, max_steps=3, lr=3e-3, eval_every=0, save_every=0, seed=0,
        output_dir=str(tmp_path / "run"), resolution={} if mode == "fixed" else {"mode": mode},
    ))
    return Path(summary.final_model)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "target"), [("fixed", "llava"), ("anyres", "llava_next")])
def test_trained_model_answers_through_hf_as_kopru_chat(mode: str, target: str, tmp_path: Path, capsys) -> None:
    """`kopru train` (the built-in backbones: image markers, a string-content chat template), `kopru export`, then
    HF's processor + chat template + generate give `kopru chat`'s answer on a held-out scene."""
    from vlm_checkpoints import hf_greedy_answer

    from kopru.data.synthetic import shapes_dataset

    model_dir = _trained(tmp_path, mode)
    out = tmp_path / "out"
    report = export(target, model_dir, out, verify=mode == "fixed")  # the separate-process check once
    if mode == "fixed":
        assert report["verify"]["passed"], report["verify"]["failure"]
        assert all(c["input_ids_equal"] and c["max_logit_diff"] == 0.0 for c in report["verify"]["checks"])

    sample = shapes_dataset(1, seed=1, split="test")[0]
    image, question = sample.images[0], "What colour is the shape?"
    image.save(tmp_path / "scene.png")
    capsys.readouterr()
    assert main(["chat", "--model", str(model_dir), "--image", str(tmp_path / "scene.png"), question,
                 "--max-new-tokens", "8", "--threads", "1"]) == 0
    kopru_answer = capsys.readouterr().out.strip()
    hf_answer, hf_ids = hf_greedy_answer(out, image, question)
    assert hf_answer.strip() == kopru_answer and hf_ids  # the same words, through transformers alone
    prompt = json.loads((out / "processor_config.json").read_text())
    assert prompt["processor_class"] == ("LlavaProcessor" if mode == "fixed" else "LlavaNextProcessor")


# -------------------------------------------------------------------------------------------- chat template


def _conversations(image: Image.Image, string_content: bool) -> list[list[dict]]:
    """List content as HF's docs write it; string content too where the template takes strings (a template that
    prints its own image token gets strings as they are from HF, as list parts from Köprü, as for the source)."""
    def text(value: str) -> list[dict]:
        return [{"type": "text", "text": value}]

    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": image}, *text("What is shown?")]}],
        [{"role": "system", "content": text("Be brief.")},
         {"role": "user", "content": [*text("left "), {"type": "image", "image": image}, *text("right")]},
         {"role": "assistant", "content": text("two")},
         {"role": "user", "content": [*text("and this"), {"type": "image", "image": image}]}],
        [{"role": "user", "content": text("no image here")}],
    ]
    if string_content:
        conversations.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}])
    return conversations


def _bos_adding(tokenizer):
    from tokenizers.processors import TemplateProcessing

    tokenizer._tokenizer.post_processor = TemplateProcessing(single=f"{tokenizer.bos_token} $A",
                                                             special_tokens=[(tokenizer.bos_token,
                                                                              tokenizer.bos_token_id)])
    return tokenizer


@pytest.mark.parametrize("template", ["string", "list", "none"])
@pytest.mark.parametrize("adds_bos", [False, True])
def test_exported_template_gives_hf_the_ids_kopru_renders(build, template: str, adds_bos: bool) -> None:
    """HF's path (the exported template on list content, special tokens as apply_chat_template(tokenize=True)
    adds them, each image token expanded) gives the ids of Köprü's (format_chat, no special tokens, placeholders
    expanded with the markers)."""
    _, processor = build("projection")
    processor = copy.deepcopy(processor)
    assert processor.config.uses_markers
    tokenizer = _bos_adding(processor.tokenizer) if adds_bos else processor.tokenizer
    string_template = (ASSETS_DIR / "llm" / "chat_template.jinja").read_text()  # the built-in LLM's
    tokenizer.chat_template = {"string": string_template, "list": LLAVA_15, "none": None}[template]
    exported = exported_chat_template(processor)
    per_image = processor.image_count.placeholders
    for conversation in _conversations(Image.new("RGB", (12, 20)), string_content=template != "list"):
        prompt, _ = format_chat(processor, conversation)
        kopru_ids = tokenizer(processor.expand(prompt), add_special_tokens=False)["input_ids"]
        hf_messages = [{**m, "content": [{k: v for k, v in part.items() if k != "image"} for part in m["content"]]}
                       if isinstance(m["content"], list) else m for m in conversation]
        text = tokenizer.apply_chat_template(hf_messages, chat_template=exported, add_generation_prompt=True,
                                             tokenize=False)
        text = text.replace(processor.config.image_token, processor.config.image_token * per_image)  # HF's expansion
        assert tokenizer(text, add_special_tokens=hf_adds_special_tokens(text, tokenizer))["input_ids"] == kopru_ids, \
            (template, text)


def test_tokenizer_adding_more_than_bos_is_refused(build) -> None:
    from tokenizers.processors import TemplateProcessing

    _, processor = build("projection")
    tokenizer = copy.deepcopy(processor.tokenizer)
    tokenizer._tokenizer.post_processor = TemplateProcessing(single=f"$A {tokenizer.eos_token}",
                                                             special_tokens=[(tokenizer.eos_token,
                                                                              tokenizer.eos_token_id)])
    with pytest.raises(ValueError, match="adds special tokens other than a leading bos"):
        check_special_tokens(tokenizer)


def test_pad_mode_exports_as_llava_image_processor_with_the_same_pixels() -> None:
    """LLaVA-1.5's "pad" (image_aspect_ratio), which HF's CLIP processor ignores, leaves as LlavaImageProcessor's
    do_pad: HF's pixels equal Köprü's on wide, tall and square pictures."""
    from conftest import picture

    ours = ImagePreprocessor(size=32, mode="pad", shortest_edge=32, image_mean=(0.48145466, 0.4578275, 0.40821073),
                             image_std=(0.26862954, 0.26130258, 0.27577711))
    hf = hf_image_processor(image_settings(ours))
    assert type(hf).__name__.startswith("LlavaImageProcessor")
    images = [picture(200, 120, 0), picture(90, 300, 1), picture(64, 64, 2)]
    assert torch.equal(hf(images=images, return_tensors="pt")["pixel_values"], ours(images))


# ------------------------------------------------------------------------------------------------ refusals
def _source(root: Path, vision_dirs, llm_dirs, vision_kind: str = "clip", llm_kind: str = "llama", **config) -> Path:
    """A saved Köprü model as far as the refusals read it: kopru_config.json and the backbones' config.json (no
    weights: everything here is refused before a weight is read)."""
    root.mkdir(parents=True)
    (root / "vision").mkdir()
    if vision_kind == "blip2":
        Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8).save_pretrained(root / "vision")
    elif vision_kind == "mllama":
        MllamaVisionConfig(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                           intermediate_size=64, vision_output_dim=96, image_size=16, patch_size=4, max_num_tiles=4,
                           intermediate_layers_indices=[0, 1]).save_pretrained(root / "vision")
    else:
        (root / "vision" / "config.json").write_text((vision_dirs[vision_kind] / "config.json").read_text())
    (root / "llm").mkdir()
    (root / "llm" / "config.json").write_text((llm_dirs[llm_kind] / "config.json").read_text())
    vision_config = config.pop("vision", {})
    KopruConfig(vision=VisionTowerConfig("vision", **vision_config), llm="llm", **config).save(
        root / "kopru_config.json")
    return root


QFORMER = {"num_queries": 4, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}
BLIP2_VISION = {"feature_layer": -1, "final_norm": True, "drop_cls": False}
MLLAMA = {"vision": {"feature_layer": -1, "drop_cls": False}, "strategy": "cross_attention",
          "resolution": {"mode": "tiled"}, "image_token": "<|image|>",
          "connector": {"every_n_layers": 2, "rows_without_image": "attend_all"}}
REFUSALS = {
    # name: (target, source settings, the message's words)
    "qformer_to_llava": ("llava", {"strategy": "qformer", "connector": QFORMER},
                         r"--to llava takes a projection model; found strategy 'qformer' \(--to blip2"),
    "anyres_to_llava": ("llava", {"resolution": {"mode": "anyres"}}, r"found 'anyres' \(--to llava_next takes it\)"),
    "fixed_to_llava_next": ("llava_next", {}, r"--to llava_next takes resolution mode 'anyres'; found 'fixed' \(--to "
                                              "llava takes it\\)"),
    "dynamic": ("llava", {"resolution": {"mode": "dynamic"}}, r"found 'dynamic' \(no HF checkpoint class"),
    "pixel_shuffle": ("llava", {"resolution": {"reduction": "pixel_shuffle"}}, r"found a pixel_shuffle reduction"),
    "linear_projector": ("llava", {"connector": {"kind": "linear"}}, r"Linear-GELU-Linear .*found a linear projector"),
    "deeper_projector": ("llava", {"connector": {"kind": "mlp", "depth": 3}}, r"found an MLP of depth 3"),
    "final_norm_llava": ("llava", {"vision": {"final_norm": True, "feature_layer": -1}}, r"found final_norm=True"),
    "blip2_tower_to_llava": ("llava", {"vision_kind": "blip2"}, r"vision tower of type .*found 'blip_2_vision_model'"),
    "clip_to_blip2": ("blip2", {"strategy": "qformer", "connector": QFORMER, "image_start_token": None,
                                "image_end_token": None, "vision": BLIP2_VISION},
                      r"BLIP-2 vision tower .*found a 'clip_vision_model' tower"),
    "markers_to_blip2": ("blip2", {"vision_kind": "blip2", "strategy": "qformer", "connector": QFORMER,
                                   "vision": BLIP2_VISION}, r"cannot express image markers"),
    "blip2_features": ("blip2", {"vision_kind": "blip2", "strategy": "qformer", "connector": QFORMER,
                                 "image_start_token": None, "image_end_token": None},
                       r"last_hidden_state .*found feature_layer -2, final_norm False"),
    "projection_to_mllama": ("mllama", {}, r"--to mllama takes a cross_attention model; found strategy 'projection'"),
    "clip_to_mllama": ("mllama", {"strategy": "cross_attention"}, r"Mllama vision tower .*found 'clip_vision_model'"),
    "fixed_mllama": ("mllama", {"vision_kind": "mllama", **MLLAMA, "resolution": {"mode": "fixed"}},
                     r"tiles every image .*found mode 'fixed'"),
    "resampler": ("mllama", {"vision_kind": "mllama", **MLLAMA, "connector": {
        "every_n_layers": 2, "rows_without_image": "attend_all", "resampler": {"num_latents": 8}}},
        r"no Perceiver resampler"),
    "rows_zero": ("mllama", {"vision_kind": "mllama", **MLLAMA, "connector": {"every_n_layers": 2}},
                  r"found \{'rows_without_image': 'zero'\} \(rows_without_image 'zero' is Meta's reference"),
    "qwen2_to_mllama": ("mllama", {"vision_kind": "mllama", "llm_kind": "qwen2", **MLLAMA},
                        r"takes a Llama LLM .*found 'qwen2'"),
    "image_token_mllama": ("mllama", {"vision_kind": "mllama", **MLLAMA, "image_token": "<image>"},
                           r"writes images as '<\|image\|>' .*found the image token '<image>'"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_what_the_target_cannot_express_is_refused_before_anything_is_written(name, vision_dirs, llm_dirs, tmp_path,
                                                                              capsys) -> None:
    target, settings, words = REFUSALS[name]
    settings = dict(settings)
    src = _source(tmp_path / "src", vision_dirs, llm_dirs, **settings)
    _refused(["export", "--to", target, str(src), str(tmp_path / "out")], words, tmp_path, capsys)


def _refused(argv: list[str], words: str, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("kopru export: error: "), err
    assert re.search(words, err), err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_sources_that_are_not_a_whole_kopru_model_are_refused(build, tmp_path, capsys) -> None:
    model, _ = build("projection")
    model.save_connector(tmp_path / "stage1")
    _refused(["export", "--to", "llava", str(tmp_path / "stage1"), str(tmp_path / "out")],
             r"connector-only checkpoint \(stage 1.*export the full model", tmp_path, capsys)
    src = hf_checkpoint("llava", tmp_path / "hf")
    _refused(["export", "--to", "llava", str(src), str(tmp_path / "out")],
             r"is a Hugging Face checkpoint \(config.json, model_type 'llava'\), not a Köprü model", tmp_path, capsys)
    (tmp_path / "empty").mkdir()
    _refused(["export", "--to", "llava", str(tmp_path / "empty"), str(tmp_path / "out")],
             r"is not a Köprü model: expected kopru_config.json", tmp_path, capsys)
    _refused(["export", "--to", "llava", str(tmp_path / "missing"), str(tmp_path / "out")],
             r"expected a Köprü model directory at .*missing, found nothing", tmp_path, capsys)


def test_destination_is_refused_unless_new_empty_or_overwritten(build, tmp_path, capsys) -> None:
    model, processor = build("projection")
    model.save_pretrained(tmp_path / "src", processor)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["export", "--to", "llava", str(tmp_path / "src"), str(out)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty; expected a new or empty folder (--overwrite replaces it)" in err
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1  # untouched
    assert main(["export", "--to", "llava", str(tmp_path / "src"), str(tmp_path / "src" / "hf")]) == 2
    assert "overlap" in capsys.readouterr().err and not (tmp_path / "src" / "hf").exists()
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
