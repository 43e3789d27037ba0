"""`kopru explain`: parameter counts against HF's reference classes built on the meta device, stage shapes against
a real forward pass of tiny models, hand-computed figures, bad input, and no network."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import transformers
from conftest import STRATEGIES

from kopru.cli import main
from kopru.explain import PRESETS, build_reference, draw_diagram, explain, get_preset, reference_config
from kopru.training.recipes import apply_recipe, count_parameters


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test; the hub is also told it is offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"explain tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _linear(i: int, o: int) -> int:
    return i * o + o


@pytest.mark.slow
def test_acceptance_llava_json_projector_and_positions(no_network, capsys):
    assert main(["explain", "--preset", "llava-1.5-7b", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    projector = [c for c in report["components"] if c["name"].startswith("projector")]
    assert len(projector) == 1
    # 1024 -> 4096 -> 4096 with biases, by hand
    assert projector[0]["params"] == _linear(1024, 4096) + _linear(4096, 4096) == 20_979_712
    assert projector[0]["trainable"]["align"] == 20_979_712
    assert report["image"]["llm_positions"] == 576 and report["image"]["cross_attention_kv"] == 0
    assert report["params_by_role"]["connector"] == 20_979_712
    assert report["trainable"]["align"] == 20_979_712


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_renders_as_json(name, no_network, explained_preset):
    """`--format json` for every preset: the figures come out as JSON numbers equal to the explanation's own
    (Llama-3.2-Vision's canvas once came from NumPy and was not serialisable)."""
    explanation = explained_preset(name)
    report = json.loads(explanation.format("json"))
    assert report["total_params"] == explanation.total_params
    assert report["image"]["llm_positions"] == explanation.image.llm_positions
    assert report["image"]["cross_attention_kv"] == explanation.image.cross_attention_kv


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.reference is not None])
def test_preset_counts_equal_hf_reference_on_meta(name, no_network, explained_preset):
    preset = get_preset(name)
    model_class = getattr(transformers, preset.reference)
    with torch.device("meta"):  # built here from the preset's configs, independently of explain's builders
        reference = model_class(reference_config(preset))
    explanation = explained_preset(name)
    assert explanation.total_params == sum(p.numel() for p in reference.parameters())
    # Per role as well: the vision side is the reference's encoder, the LLM side its text model + head.
    inner = getattr(reference, "model", reference)
    vision = next(getattr(inner, a) for a in ("vision_tower", "vision_model", "visual") if hasattr(inner, a))
    vision_params = sum(p.numel() for p in vision.parameters())
    if preset.architecture == "qwen2_vl":  # the merger is Qwen2-VL's connector, inside `visual`
        vision_params -= sum(p.numel() for p in vision.merger.parameters())
    assert explanation.component("vision") == vision_params


def test_reference_built_presets_agree_with_kopru_built_ones(explained_preset):
    """LLaVA-NeXT is explained from HF's class, LLaVA-1.5 from Köprü's model: same parts + one newline vector."""
    next_ = explained_preset("llava-next-7b")
    llava = explained_preset("llava-1.5-7b")
    assert next_.total_params == llava.total_params + 4096
    assert next_.component("vision") == llava.component("vision")
    assert next_.component("llm") == llava.component("llm")
    # LoRA adapters: peft on the Köprü model, r x (in + out) per Linear on the HF one.
    assert next_.component("adapter") == llava.component("adapter") == 32 * 128 * (
        4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))


@pytest.mark.slow
def test_lesson_strategies_closed_form(explained_preset):
    """The three strategies over CLIP-L/336 + Vicuna-7B, against parameter formulas written out by hand."""
    d, ffn, layers = 4096, 11008, 32
    projection = explained_preset("projection-clip-l-vicuna-7b")
    assert projection.component("connector") == _linear(1024, d)  # the lesson's "~10M" is 4.2M
    assert projection.image.llm_positions == 576 + 2

    qformer = explained_preset("qformer-clip-l-vicuna-7b")
    w, f = 768, 3072
    attention = lambda kv: _linear(w, w) + 2 * _linear(kv, w) + _linear(w, w) + 2 * w  # noqa: E731
    per_layer = [attention(w) + (attention(1024) if i % 2 == 0 else 0) + _linear(w, f) + _linear(f, w) + 2 * w
                 for i in range(12)]
    expected = 32 * w + 2 * w + sum(per_layer) + _linear(w, d)
    assert qformer.component("connector") == expected
    assert qformer.image.llm_positions == 32 + 2

    cross = explained_preset("cross-attention-clip-l-vicuna-7b")
    head = d // 32
    block = 4 * d * d + 3 * d * ffn + 2 * d + 2 * head + 2  # q,k,v,o + SwiGLU + 2 RMSNorm + q/k norm + 2 gates
    assert cross.component("connector") == _linear(1024, d) + (layers // 4) * block
    assert cross.image.llm_positions == 1 + 2 and cross.image.cross_attention_kv == 576
    # The LLM stays frozen with cross-attention in every recipe; LoRA does not apply.
    assert cross.trainable("instruct") == cross.component("connector") and cross.trainable("lora") is None


@pytest.mark.parametrize(("image", "positions"), [((336, 336), 1176), ((672, 672), 2928), ((640, 480), 2340),
                                                   ((1920, 1080), 1948)])
def test_llava_next_positions_match_reference_values(image, positions):
    assert explain(preset="llava-next-7b", image=image, flops=False).image.llm_positions == positions


@pytest.mark.parametrize(("image", "tokens"), [((224, 224), 64), ((672, 672), 576), ((1920, 1080), 1222)])
def test_qwen2_vl_positions_match_reference_values(image, tokens):
    budget = explain(preset="qwen2-vl-7b", image=image, flops=False).image
    assert budget.placeholders == tokens and budget.llm_positions == tokens + 2


def test_mllama_shapes_equal_a_meta_forward_of_the_hf_encoder():
    explanation = explain(preset="llama-3.2-11b-vision", flops=False)  # the preset's image: 4 tiles
    model = build_reference(get_preset("llama-3.2-11b-vision"))
    config = model.config.vision_config
    features = model.model.vision_model(
        pixel_values=torch.empty(1, 1, 4, 3, 560, 560, device="meta"),
        aspect_ratio_ids=torch.ones(1, 1, dtype=torch.long, device="meta"),
        aspect_ratio_mask=torch.ones(1, 1, 4, dtype=torch.long, device="meta"),
    ).last_hidden_state
    stages = {s.name: s.shape for s in explanation.stages}
    assert stages["vision features (final + 5 intermediate)"] == list(features.shape)
    states = model.model.multi_modal_projector(features).reshape(1, -1, 4096)  # as MllamaModel.forward does
    assert stages["cross-attention states"] == list(states.shape)
    assert explanation.image.cross_attention_kv == 4 * ((config.image_size // config.patch_size) ** 2 + 1) == 6404
    cross = len(model.config.text_config.cross_attention_layers)
    # K/V cache: 32 self-attention layers x context, 8 cross-attention layers x 6404, 8 KV heads of 128, bf16
    assert explanation.memory["kv_cache"] == 2 * 32 * 8 * 128 * 131072 * 2
    assert explanation.memory["cross_attention_kv"] == 2 * cross * 8 * 128 * 6404 * 2


@pytest.mark.slow
def test_flops_agree_with_the_two_n_rule():
    """Dense LLM FLOPs per token are 2 x the LLM's matmul weights (embedding lookup excluded, head included)."""
    e = explain(preset="llava-1.5-7b")
    llm_matmul_weights = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32064
    assert e.flops["llm_per_text_token_dense"] == 2 * llm_matmul_weights
    assert e.flops["llm_attention_per_token_per_context_position"] == 2 * 2 * 32 * 4096
    assert e.flops["llm_per_image"] == 576 * e.flops["llm_per_text_token_dense"]
    assert e.flops["connector_per_image"] == 2 * 576 * (1024 * 4096 + 4096 * 4096)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tiny_model_shapes_and_counts_equal_a_real_forward(strategy, build, make_image, tmp_path):
    model, processor = build(strategy)
    model.save_pretrained(tmp_path / "m", processor)
    batch = processor(["<image>\nwhat colour is the shape?"], [make_image(0)], padding_side="left")
    text_tokens = batch["input_ids"].shape[1] - model.image_count.llm_positions
    explanation = explain(model_dir=tmp_path / "m", text_tokens=text_tokens, flops=False)
    stages = {s.name: s.shape for s in explanation.stages}

    pixels = batch["pixel_values"]
    with torch.no_grad():
        hidden = model.vision.encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        features = model.vision(pixels)
        out = model.connector(features)
        embeds, extra = model.prepare_inputs(batch["input_ids"], pixels)
        logits = model(**batch).logits
    assert stages["pixels"] == list(pixels.shape)
    assert stages["encoder hidden states"] == list(hidden.shape)
    assert stages["selected features"] == list(features.shape)
    assert stages["LLM input embeddings"] == list(embeds.shape)
    assert stages["LLM hidden states"] == list(embeds.shape)
    assert stages["logits"] == list(logits.shape)
    if strategy == "cross_attention":
        assert stages["image states (cross-attention input)"] == list(out.shape)
        keys = model.connector.build_context(out, torch.ones(1, dtype=torch.long)).keys_values[0][0]
        assert stages["keys / values per block"] == list(keys.shape)
    else:
        assert stages["connector output"] == list(out.shape)
    if strategy == "qformer":
        assert stages["Q-Former queries"] == list(model.connector.qformer(features).shape)

    assert explanation.total_params == sum(p.numel() for p in model.parameters())
    assert explanation.image.llm_positions == model.image_count.llm_positions
    for recipe in ("align", "instruct"):
        apply_recipe(model, recipe)
        assert explanation.trainable(recipe) == count_parameters(model)[0]


@pytest.mark.slow
def test_formats_and_diagram(tmp_path, no_network, capsys, explained_preset):
    diagram = tmp_path / "flow.png"
    assert main(["explain", "--preset", "cross-attention-clip-l-vicuna-7b", "--format", "markdown",
                 "--diagram", str(diagram)]) == 0
    text = capsys.readouterr().out
    assert "| stage | shape | note |" in text and "`[1, 32, 576, 128]`" in text  # K/V: 32 heads x 576 x 128
    assert diagram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = draw_diagram(explained_preset("qformer-clip-l-vicuna-7b"), tmp_path / "flow.svg")
    assert "[1, 32, 768]" in svg.read_text() or "1, 32, 768" in svg.read_text()
    assert main(["explain", "--preset", "qwen2-vl-7b", "--format", "text", "--image", "672x672", "--no-flops"]) == 0
    text = capsys.readouterr().out
    assert "672x672" in text and "not computed" in text


def test_bad_input_names_what_is_missing(tmp_path, capsys, llm_dirs):
    with pytest.raises(ValueError, match="unknown preset 'llava-9b'; expected one of .*llava-1.5-7b"):
        explain(preset="llava-9b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected kopru_config.json in the model directory"):
        explain(model_dir=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="expected a Köprü model directory"):
        explain(model_dir=tmp_path / "nowhere")
    from kopru import KopruConfig

    config = KopruConfig(vision=str(llm_dirs["llama"]), llm=str(llm_dirs["llama"]))
    with pytest.raises(ValueError, match="expected a vision encoder of type .*found model_type 'llama'"):
        explain(config=config)
    config = KopruConfig(vision=str(tmp_path / "no-vision"), llm=str(llm_dirs["llama"]))
    with pytest.raises(FileNotFoundError, match="expected the vision encoder's config.json"):
        explain(config=config)
    with pytest.raises(ValueError, match="unknown dtype 'fp12'"):
        explain(preset="llava-1.5-7b", dtype="fp12")
    # A figure whose config field is missing: the error names the field and what needs it.
    target_config = transformers.PretrainedConfig()  # a config with no context length in it
    from kopru.explain import Settings, preset_target
    from kopru.explain.architectures import _context

    target = preset_target(get_preset("llava-1.5-7b"))
    target.text = target_config
    with pytest.raises(ValueError, match="no 'max_position_embeddings' or 'n_positions' field, which the default "
                                         "context length"):
        _context(target, Settings())
    assert main(["explain", "--preset", "llava-1.5-7b", "--image", "640"]) == 2
    assert "expected an image size WIDTHxHEIGHT such as 640x480, or an existing image file; found '640'" in \
        capsys.readouterr().err


def test_config_file_counts_the_image_tokens_rows_the_real_build_adds(build, vision_dirs, llm_dirs, tmp_path):
    """From a kopru_config.json next to fresh backbones: the tokenizer's image tokens grow the LLM's embedding
    table in from_backbones, and explain counts those rows too."""
    from kopru import KopruConfig, VisionTowerConfig

    model, _ = build("qformer")
    config = KopruConfig(vision=VisionTowerConfig(str(vision_dirs["clip"])), llm=str(llm_dirs["llama"]),
                         strategy="qformer", connector=model.config.connector)
    config.save(tmp_path / "kopru_config.json")
    explanation = explain(config=tmp_path / "kopru_config.json", flops=False)
    assert explanation.total_params == sum(p.numel() for p in model.parameters())
    assert explanation.image.llm_positions == model.image_count.llm_positions


# --- the HF-reference architectures, tiny, against a real forward pass of the HF model ----------------------

TINY_CLIP = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
TINY_LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256}


def _real(preset):
    torch.manual_seed(0)
    return getattr(transformers, preset.reference)(reference_config(preset)).eval()


def test_tiny_llava_next_shapes_equal_a_real_forward():
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from kopru.explain import Preset

    preset = Preset("tiny-llava-next", "", "", "llava_next", "projection", TINY_CLIP, TINY_LLAMA,
                    reference="LlavaNextForConditionalGeneration",
                    reference_extra={"image_token_index": 63, "vision_feature_layer": -2,
                                     "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]]})
    width, height = 50, 30
    explanation = explain(preset=preset, image=(width, height), text_tokens=5, flops=False)
    stages = {s.name: s.shape for s in explanation.stages}
    model = _real(preset)
    crops = image_size_to_num_patches((height, width), model.config.image_grid_pinpoints, 32)
    pixels = torch.randn(1, crops, 3, 32, 32)
    sizes = torch.tensor([[height, width]])
    with torch.no_grad():
        out = model.model.get_image_features(pixels, sizes, vision_feature_layer=-2,
                                             vision_feature_select_strategy="default", output_hidden_states=True)
        tokens = out.pooler_output[0].shape[0]
        ids = torch.tensor([[63] * tokens + [1, 2, 3, 4, 5]])
        logits = model(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits
    assert stages["pixels"] == [1, crops, 3, 32, 32]
    assert stages["encoder hidden states"] == list(out.hidden_states[-2].shape)
    assert stages["image tokens (base + unpadded grid + newlines)"] == [1, *out.pooler_output[0].shape]
    assert explanation.image.llm_positions == tokens
    assert stages["logits"] == list(logits.shape)
    assert explanation.total_params == sum(p.numel() for p in model.parameters())


def test_tiny_qwen2_vl_shapes_equal_a_real_forward():
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from kopru.explain import Preset

    vision = {"model_type": "qwen2_vl_vision", "depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 4,
              "hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    text = {**TINY_LLAMA, "model_type": "qwen2_vl_text", "bos_token_id": 0, "eos_token_id": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    preset = Preset("tiny-qwen2-vl", "", "", "qwen2_vl", "projection", vision, text,
                    reference="Qwen2VLForConditionalGeneration",
                    reference_extra={"image_token_id": 60, "vision_start_token_id": 61, "vision_end_token_id": 62},
                    default_image=(100, 70))
    explanation = explain(preset=preset, text_tokens=4, flops=False)
    stages = {s.name: s.shape for s in explanation.stages}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 100, 3), dtype=np.uint8))
    inputs = Qwen2VLImageProcessorPil()(images=[image], return_tensors="pt")
    model = _real(preset)
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        tokens = out.pooler_output[0].shape[0]
        ids = torch.tensor([[61] + [60] * tokens + [62, 1, 2, 3, 4]])
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                       mm_token_type_ids=(ids == 60).int()).logits
    assert stages["patches (flattened, image repeated in time)"] == list(inputs["pixel_values"].shape)
    assert stages["encoder hidden states"] == list(out.last_hidden_state.shape)
    assert stages["merger output"] == list(out.pooler_output[0].shape)
    assert explanation.image.placeholders == tokens and explanation.image.llm_positions == tokens + 2
    assert stages["logits"] == list(logits.shape)
    assert explanation.total_params == sum(p.numel() for p in model.parameters())


def test_tiny_mllama_shapes_equal_a_real_forward():
    from kopru.explain import Preset

    vision = {"model_type": "mllama_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_global_layers": 1, "attention_heads": 4, "image_size": 28,
              "patch_size": 14, "max_num_tiles": 4, "intermediate_layers_indices": [0], "vision_output_dim": 64}
    text = {**TINY_LLAMA, "model_type": "mllama_text_model", "num_hidden_layers": 4, "cross_attention_layers": [1],
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    preset = Preset("tiny-mllama", "", "", "mllama", "cross_attention", vision, text,
                    reference="MllamaForConditionalGeneration", reference_extra={"image_token_index": 63})
    explanation = explain(preset=preset, text_tokens=4, flops=False)
    stages = {s.name: s.shape for s in explanation.stages}
    model = _real(preset)
    seen = {}
    for name in ("transformer", "global_transformer"):
        getattr(model.model.vision_model, name).register_forward_hook(
            lambda m, a, o, name=name: seen.update({name: o.last_hidden_state.shape}) and None)
    pixels = torch.randn(1, 1, 4, 3, 28, 28)
    ratio_ids, ratio_mask = torch.tensor([[1]]), torch.tensor([[[1, 0, 0, 0]]])
    with torch.no_grad():
        features = model.model.vision_model(pixel_values=pixels, aspect_ratio_ids=ratio_ids,
                                            aspect_ratio_mask=ratio_mask).last_hidden_state
        ids = torch.tensor([[63, 1, 2, 3, 4]])
        logits = model(input_ids=ids, pixel_values=pixels, aspect_ratio_ids=ratio_ids, aspect_ratio_mask=ratio_mask,
                       cross_attention_mask=torch.tensor([[[[1, 0, 0, 0]]] * 5])).logits
    assert stages["local encoder (each tile padded to a multiple of 8)"] == list(seen["transformer"])
    assert stages["global encoder"] == list(seen["global_transformer"])
    assert stages["vision features (final + 5 intermediate)"] == list(features.shape)
    states = model.model.multi_modal_projector(features).reshape(1, -1, 64)  # as MllamaModel.forward does
    assert stages["cross-attention states"] == list(states.shape)
    assert stages["logits"] == list(logits.shape)
    assert explanation.image.cross_attention_kv == 4 * 5  # 4 tiles x (2 x 2 patches + CLS)
    assert explanation.total_params == sum(p.numel() for p in model.parameters())


HIGH_RESOLUTION = [
    ("projection", {"mode": "fixed", "reduction": "pixel_shuffle"}),
    ("projection", {"mode": "anyres", "grid_pinpoints": [[32, 64], [64, 32]]}),
    ("qformer", {"mode": "anyres", "grid_pinpoints": [[32, 64], [64, 32]]}),
    ("projection", {"mode": "dynamic"}),
    ("cross_attention", {"mode": "dynamic", "reduction": "avg_pool"}),
    ("converted-mllama", {"mode": "tiled"}),  # all 4 tiles through the encoder; the cache holds them all
]


@pytest.mark.parametrize(("strategy", "resolution"), HIGH_RESOLUTION,
                         ids=[f"{s}-{r['mode']}-{r.get('reduction', 'none')}" for s, r in HIGH_RESOLUTION])
def test_saved_model_explained_at_its_resolution_equals_a_real_forward(build, tmp_path, strategy, resolution):
    """`explain --model` plans the image as the model does (once it counted every mode as fixed): each stage's
    shape equals the tensor a real forward pass of the saved model produces, and its image positions equal the
    processor's expansion and `kopru budget`'s count, for non-square pictures."""
    from PIL import Image
    from vlm_checkpoints import checkpoint

    from kopru.budget import load_kopru_model
    from kopru.config import ResolutionConfig
    from kopru.convert import convert
    from kopru.model import KopruForConditionalGeneration

    if strategy == "converted-mllama":
        convert("mllama", checkpoint("mllama", "hf5", tmp_path / "hf"), tmp_path / "m")
        model, processor = KopruForConditionalGeneration.from_pretrained(tmp_path / "m")
        strategy = model.config.strategy
    else:
        model, processor = build(strategy, resolution=ResolutionConfig(**resolution))
        model.save_pretrained(tmp_path / "m", processor)
    planned = load_kopru_model(tmp_path / "m")
    for width, height in [(40, 30), (23, 61)]:
        image = Image.new("RGB", (width, height), (200, 40, 90))
        batch = processor([f"{processor.config.image_token}\nwhat is it?"], [image], padding_side="left")
        expanded = int(torch.isin(batch["input_ids"][0], model._image_ids).sum())
        explanation = explain(model_dir=tmp_path / "m", image=(width, height), text_tokens=4, flops=False)
        assert explanation.image.llm_positions == expanded == planned.image_positions(width, height).tokens
        assert explanation.image.cross_attention_kv == planned.image_positions(width, height).cross_attention_kv
        if strategy == "cross_attention":  # the K/V the cache holds: budget's figure, tested against HF's cache
            kv_stage = next(s.shape for s in explanation.stages if s.name == "keys / values per block")
            assert kv_stage[2] == planned.image_positions(width, height).cached_kv

        seen: dict[str, list[int]] = {}

        def record(name: str, tensor: torch.Tensor, seen: dict = seen) -> None:  # returns None: a hook's
            seen.setdefault(name, list(tensor.shape))  # return value would replace the tensor

        hooks = [
            model.vision.register_forward_pre_hook(lambda m, args: record("pixels", args[0])),
            model.vision.encoder.register_forward_hook(
                lambda m, a, out: record("encoder hidden states", out.last_hidden_state)),
            model.vision.register_forward_hook(lambda m, a, out: record("selected features", out)),
            model.reduction.register_forward_hook(lambda m, a, out: record("reduced features", out)),
        ]
        sizes = batch.get("image_sizes")
        with torch.no_grad():
            features = model.encode_image_list(batch["pixel_values"], sizes)
            embeds, _ = model.prepare_inputs(batch["input_ids"], batch["pixel_values"], sizes)
        for hook in hooks:
            hook.remove()
        if model.reduction.factor == 1:
            seen.pop("reduced features")
        stages = {s.name: s.shape for s in explanation.stages}
        assert {"pixels", "encoder hidden states", "selected features"} <= seen.keys()
        for name, shape in seen.items():
            assert stages[name] == shape, (name, width, height)
        features_stage = "connector output" if strategy != "cross_attention" else "image states (cross-attention input)"
        assert stages[features_stage] == [1, *features[0].shape]
        # explain's sequence is its own text_tokens + the image positions; the real one has the prompt's text
        text_tokens = embeds.shape[1] - expanded
        assert stages["LLM input embeddings"] == [1, 4 + expanded, embeds.shape[2]] and text_tokens > 0
