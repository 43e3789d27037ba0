"""The tiny pretrained backbones: the shipped copy loads through Köprü's own loaders, its tokenizer and chat
template behave as the training code assumes, both models learnt something, and the builders work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedModel

from kopru.backbones import ASSETS_DIR, default_backbones
from kopru.cli import build_parser
from kopru.data.synthetic import COLOURS, MAX_COUNT, REGIONS, SHAPES, shapes_dataset
from kopru.image_processing import ImagePreprocessor
from kopru.lesson.pretrain_tiny import (
    REPORT_NAME,
    answer_mass,
    build_tiny_backbones,
    iter_report_lines,
    lm_loss,
    object_targets,
    pack,
    patch_regions,
    pretrain_language,
    pretrain_vision,
    pretrained_backbones,
    region_weights,
    render_chat,
    render_documents,
    shapes_targets,
    text_samples,
    tiny_vision_encoder,
)
from kopru.llm import load_llm
from kopru.vision import load_vision_encoder

TURKISH = [
    "Resimde kaç üçgen var?",
    "Solda iki mavi kare, üstte kırmızı bir daire var.",
    "İstanbul'da ılık bir gün; ÇĞIİÖŞÜ çğıiöşü.",
    "Işık, ağaç, gözlük, şüphe, çöp, ığdır, Üsküdar",
    "Sağdaki rakam hangisi? 7",
]
CONVERSATIONS = [
    [{"role": "user", "content": "<image>\nHow many circles are there?"}, {"role": "assistant", "content": "three"}],
    [{"role": "system", "content": "Kısa cevap ver."}, {"role": "user", "content": "Kareler ne renk?"},
     {"role": "assistant", "content": "mavi"}, {"role": "user", "content": "Üçgen nerede?"},
     {"role": "assistant", "content": "solda"}],
]
SMALL_VISION = {"num_scenes": 16, "num_digits": 8, "eval_size": 8, "batch_size": 6}
SMALL_LLM = {"num_scenes": 12, "num_digits": 6, "eval_size": 6, "batch_size": 2, "block": 32}


@pytest.fixture(scope="module")
def assets() -> dict[str, Path]:
    paths = default_backbones()
    assert paths == {"vision": ASSETS_DIR / "vision", "llm": ASSETS_DIR / "llm"}, "the shipped copy is missing"
    return paths


@pytest.fixture(scope="module")
def tokenizer(assets: dict[str, Path]):
    return AutoTokenizer.from_pretrained(str(assets["llm"]))


@pytest.fixture(scope="module")
def llm(assets: dict[str, Path]) -> PreTrainedModel:
    return load_llm(str(assets["llm"])).eval()


@pytest.fixture(scope="module")
def encoder(assets: dict[str, Path]) -> PreTrainedModel:
    return load_vision_encoder(str(assets["vision"])).eval()


# --- the shipped copy ---------------------------------------------------------------------------------------

def test_assets_load_in_float32_and_stay_small(assets, encoder, llm, tokenizer) -> None:
    assert encoder.config.model_type == "clip_vision_model" and encoder.dtype == torch.float32
    assert (encoder.config.image_size, encoder.config.patch_size) == (64, 8)
    assert llm.config.model_type == "llama" and llm.dtype == torch.float32
    assert llm.config.num_key_value_heads < llm.config.num_attention_heads and not llm.config.tie_word_embeddings
    assert llm.get_input_embeddings().num_embeddings == len(tokenizer)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer.unk_token_id < len(tokenizer)  # an existing token: nothing was appended on loading
    preprocessor = ImagePreprocessor.from_pretrained(assets["vision"])
    assert (preprocessor.size, preprocessor.mode) == (64, "resize")
    assert preprocessor.image_mean == preprocessor.image_std == (0.5, 0.5, 0.5)
    size = sum(f.stat().st_size for f in ASSETS_DIR.rglob("*") if f.is_file())
    assert size < 10 * 2**20


@pytest.mark.slow
def test_llm_report_is_the_shipped_models_own(assets, llm, tokenizer) -> None:
    """The committed report's held-out loss, measured again on the shipped LLM (so the report describes these
    weights), and the answer format it claims, on a fresh sample of held-out questions. (The vision report's
    accuracies come from heads that are not shipped; test_vision_features_separate_colours_shapes_and_counts
    measures the shipped encoder's features instead.)"""
    report = json.loads((assets["llm"] / REPORT_NAME).read_text())
    qa, captions = text_samples(200, 200, report["seed"], "test")  # pretrain_language's eval_size
    blocks = pack(tokenizer, render_documents(qa, captions), report["block"], report["seed"])
    assert blocks.numel() == report["test_tokens"]
    measured = lm_loss(llm, blocks)
    assert measured == pytest.approx(report["test_loss"], rel=1e-4)
    assert measured < 1.0
    for language in ("en", "tr"):
        questions = [s for s in qa if s.meta["language"] == language][:40]
        assert answer_mass(llm, tokenizer, questions) > 0.9, language


# --- tokenizer and chat template ----------------------------------------------------------------------------

@pytest.mark.parametrize("text", TURKISH)
def test_tokenizer_round_trips_turkish(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges learnt, not byte by byte


def test_task_words_are_single_tokens(tokenizer) -> None:
    for word in (" üçgen", " kırmızı", " triangle", " yellow", " solda", " evet", " hayır"):
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_generation_prompt_is_a_prefix_of_the_conversation(tokenizer, messages) -> None:
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full == render_chat(messages)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:index + 1], tokenize=False)
        assert full.startswith(prompt) and full.startswith(through)
        assert through[len(prompt):].rstrip() == f" {message['content']}{tokenizer.eos_token}"


# --- what the models learnt ---------------------------------------------------------------------------------

def _mean_nll(llm: PreTrainedModel, ids: list[int]) -> float:
    with torch.no_grad():
        tensor = torch.tensor([ids])
        return float(llm(input_ids=tensor, labels=tensor).loss)


@pytest.mark.trained
def test_llm_prefers_well_formed_text_to_shuffled_tokens(llm, tokenizer, trained_figure) -> None:
    sentences = [
        render_chat([{"role": "user", "content": "\nHow many squares are there?"},
                     {"role": "assistant", "content": "two"}]),
        render_chat([{"role": "user", "content": "\nResimde kırmızı bir daire var mı?"},
                     {"role": "assistant", "content": "evet"}]),
        "<s>Solda iki mavi kare, üstte kırmızı bir daire var.</s>",
    ]
    generator = torch.Generator().manual_seed(0)
    for text in sentences:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        shuffled = [ids[0]] + [ids[1:][i] for i in torch.randperm(len(ids) - 1, generator=generator).tolist()]
        right, wrong = _mean_nll(llm, ids), _mean_nll(llm, shuffled)
        trained_figure(f"{text[:12]}/right", right)
        trained_figure(f"{text[:12]}/wrong_over_right", wrong / right)
        assert right < 1.5 and wrong > 4 * right, (text, right, wrong)


def _linear_probe_accuracy(features: torch.Tensor, labels: list[str], ridge: float = 1.0) -> float:
    """Fit a ridge-regularised linear classifier (least squares on one-hot targets, standardised features) on the
    first half, classify the second half. Linear, as the connectors read the features; a nearest-centroid probe
    measured colour 1.00 on the previous encoder and 0.88 on the one with per-patch object heads, whose
    features cluster by shape first while colour stays linearly exact (pretrain report: 1.000)."""
    half = len(labels) // 2
    classes = sorted(set(labels[:half]))
    mean, std = features[:half].mean(0), features[:half].std(0) + 1e-6
    train = (features[:half] - mean) / std
    targets = torch.tensor([[1.0 if y == c else 0.0 for c in classes] for y in labels[:half]])
    weights = torch.linalg.solve(train.T @ train + ridge * half * torch.eye(train.shape[1]), train.T @ targets)
    predicted = (((features[half:] - mean) / std) @ weights).argmax(1).tolist()
    return sum(classes[p] == y for p, y in zip(predicted, labels[half:], strict=True)) / (len(labels) - half)


def _probe_accuracies(encoder: PreTrainedModel, assets: dict[str, Path]) -> dict[str, float]:
    """Linear-probe accuracy on held-out one-group scenes, from the layer -2 patch features (what the
    projection connector reads) mean-pooled over the region the group is in."""
    scenes = shapes_dataset(96, seed=5, languages=("en",), kind="caption", split="test", max_groups=1)
    pixels = ImagePreprocessor.from_pretrained(assets["vision"])([s.images[0] for s in scenes])
    groups = [s.meta["scene"][0] for s in scenes]
    pooling = region_weights(64)[[REGIONS.index(g["region"]) for g in groups]]  # [images, patches]
    with torch.no_grad():
        patches = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    features = torch.einsum("bp,bpd->bd", pooling, patches)
    return {key: _linear_probe_accuracy(features, [str(g[key]) for g in groups])
            for key in ("colour", "shape", "count")}


def test_object_targets_give_each_patch_its_cells_group() -> None:
    # 64 px, 8 px patches: cell edges at 21 and 43 px; a patch belongs to the cell holding its centre.
    cells = patch_regions(64).view(8, 8)
    left, right, top, bottom, middle = (REGIONS.index(r) for r in ("left", "right", "top", "bottom", "middle"))
    assert cells[3].tolist() == [left] * 3 + [middle] * 2 + [right] * 3
    assert cells[:, 3].tolist() == [top] * 3 + [middle] * 2 + [bottom] * 3
    assert cells[0, 0] == cells[7, 7] == -1  # corners are never used
    scene = shapes_dataset(1, seed=2, languages=("en",), kind="caption", split="test")[0]
    batch = shapes_targets([scene])
    targets = object_targets(batch.regions, patch_regions(64))[0]  # [patches, 4]
    for group in scene.meta["scene"]:
        inside = patch_regions(64) == REGIONS.index(group["region"])
        expected = [1 + SHAPES.index(group["shape"]), 1 + COLOURS.index(group["colour"]), group["count"],
                    1 + REGIONS.index(group["region"])]
        assert (targets[inside] == torch.tensor(expected)).all(), group
    occupied = [REGIONS.index(g["region"]) for g in scene.meta["scene"]]
    empty = ~torch.isin(patch_regions(64), torch.tensor(occupied))
    assert (targets[empty][:, :3] == 0).all()  # no group: shape and colour "none", count 0


@pytest.mark.trained
def test_vision_features_separate_colours_shapes_and_counts(assets, encoder, trained_seed, trained_figure) -> None:
    trained = _probe_accuracies(encoder, assets)
    torch.manual_seed(trained_seed)
    untrained = _probe_accuracies(tiny_vision_encoder().eval(), assets)  # same architecture, random weights
    for key in trained:
        trained_figure(f"trained/{key}", trained[key])
        trained_figure(f"untrained/{key}", untrained[key])
    assert trained["colour"] > 0.9 > 2 / len(COLOURS)
    assert trained["shape"] > 0.7 > 2 / len(SHAPES)
    assert trained["count"] > 0.6 > 2 / MAX_COUNT
    # Colour is in the pixels (a random encoder keeps it); shape and count are what pretraining added.
    assert trained["shape"] > untrained["shape"] + 0.2 and trained["count"] > untrained["count"] + 0.2


def test_a_kopru_model_builds_and_trains_on_the_assets(assets) -> None:
    from kopru import KopruConfig, KopruForConditionalGeneration, VisionTowerConfig
    from kopru.data.encoding import SampleEncoder

    config = KopruConfig(vision=VisionTowerConfig(str(assets["vision"])), llm=str(assets["llm"]))
    model, processor = KopruForConditionalGeneration.from_backbones(config)
    sample = shapes_dataset(1, seed=0, split="test")[0]
    encoded = SampleEncoder(processor).encode(sample)  # the chat template passes the encoder's checks
    answer = encoded.labels[encoded.labels != -100].tolist()
    assert processor.tokenizer.decode(answer) == f" {sample.meta['answer']}</s>"
    output = model(input_ids=encoded.input_ids[None], labels=encoded.labels[None],
                   pixel_values=encoded.pixel_values)
    assert torch.isfinite(output.loss)


# --- the builders -------------------------------------------------------------------------------------------

def _check_built(paths: dict[str, Path]) -> None:
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", REPORT_NAME):
        assert (paths["vision"] / name).is_file(), name
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", REPORT_NAME):
        assert (paths["llm"] / name).is_file(), name
    encoder = load_vision_encoder(str(paths["vision"]))
    llm = load_llm(str(paths["llm"]))
    tokenizer = AutoTokenizer.from_pretrained(str(paths["llm"]))
    assert encoder.config.image_size == 64 and llm.config.vocab_size == len(tokenizer)
    assert tokenizer.decode(tokenizer("Üçgen nerede?", add_special_tokens=False)["input_ids"]) == "Üçgen nerede?"


@pytest.mark.slow
def test_builders_save_loadable_backbones(tmp_path: Path) -> None:
    vision = pretrain_vision(tmp_path / "vision", steps=2, progress=False, **SMALL_VISION)
    language = pretrain_language(tmp_path / "llm", steps=2, progress=False, **SMALL_LLM)
    assert vision["steps"] == language["steps"] == 2
    _check_built({"vision": tmp_path / "vision", "llm": tmp_path / "llm"})
    # What was saved is what was trained: not the seeded initial weights, and the report's held-out loss is the
    # saved LLM's own.
    torch.manual_seed(0)
    initial = tiny_vision_encoder().state_dict()
    saved = load_vision_encoder(str(tmp_path / "vision")).state_dict()
    assert initial.keys() == saved.keys() and any(not torch.equal(initial[k], saved[k]) for k in initial)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "llm"))
    qa, captions = text_samples(SMALL_LLM["eval_size"], SMALL_LLM["eval_size"], 0, "test")
    blocks = pack(tokenizer, render_documents(qa, captions), SMALL_LLM["block"], 0)
    assert lm_loss(load_llm(str(tmp_path / "llm")), blocks) == pytest.approx(language["test_loss"], rel=1e-5)
    assert len(list(iter_report_lines(tmp_path))) > 10  # `kopru pretrain-tiny`'s summary reads both reports


def test_pretrained_backbones_builds_other_seeds_once_into_the_cache(tmp_path, monkeypatch) -> None:
    import kopru.lesson.pretrain_tiny as pretrain_tiny

    calls = []

    def small_build(out_dir, seed):
        calls.append(seed)
        return build_tiny_backbones(out_dir, seed=seed, vision_steps=1, llm_steps=1, progress=False,
                                    vision_options=SMALL_VISION, llm_options=SMALL_LLM)

    monkeypatch.setenv("KOPRU_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrain_tiny, "build_tiny_backbones", small_build)
    paths = pretrained_backbones(seed=3)
    assert paths == {"vision": tmp_path / "tiny-3" / "vision", "llm": tmp_path / "tiny-3" / "llm"}
    assert pretrained_backbones(seed=3) == paths and calls == [3]  # the second call finds the cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-3"]  # no staging directory left behind
    _check_built(paths)


def test_cli_has_the_pretrain_command() -> None:
    args = build_parser().parse_args(["pretrain-tiny", "--out", "somewhere"])
    assert (args.out, args.seed, args.threads) == ("somewhere", 0, None)
