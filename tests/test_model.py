"""The whole model against independent references: the loss by hand, batch vs single prompts, the plain
text LLM (cross-attention with closed gates), a no-cache greedy loop, and save / load round trips."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import (
    CONNECTORS,
    CROSS_ATTENTION,
    LLM_HIDDEN,
    LLM_KINDS,
    NARROW_LLM_HIDDEN,
    NUM_PATCHES,
    QFORMER,
    STRATEGIES,
    VISION_HIDDEN,
    open_gates,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from kopru import KopruConfig, VisionTowerConfig, available_strategies
from kopru.connectors.cross_attention import ImageContext
from kopru.llm import decoder_layers
from kopru.model import KopruForConditionalGeneration
from kopru.training.recipes import apply_recipe

# Two prompts of different lengths; the second holds two images.
PROMPTS = ["a red circle on the left of a blue <image> square", "<image> how many? <image> three."]
PLACEHOLDERS_PER_IMAGE = {"projection": NUM_PATCHES, "qformer": QFORMER["num_queries"], "cross_attention": 1}


@pytest.fixture
def images(make_image):
    return [[make_image(0)], [make_image(1), make_image(2)]]


def image_token_ids(model: KopruForConditionalGeneration) -> torch.Tensor:
    config = model.config
    return torch.tensor([config.image_token_id, config.image_start_token_id, config.image_end_token_id])


def positions_of(input_ids: torch.Tensor, token_id: int) -> list[int]:
    return (input_ids == token_id).nonzero()[:, -1].tolist()


def build_with_images_visible(build, strategy: str, llm: str = "llama", **kwargs):
    model, processor = build(strategy, llm, **kwargs)
    if strategy == "cross_attention":
        open_gates(model)
    return model, processor


# ------------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("llm", LLM_KINDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_logits_and_loss_by_hand(build, images, strategy, llm) -> None:
    model, processor = build_with_images_visible(build, strategy, llm)
    batch = processor(PROMPTS, images, return_labels=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    per_image = PLACEHOLDERS_PER_IMAGE[strategy]
    assert (ids == model.config.image_token_id).sum(1).tolist() == [per_image, 2 * per_image]
    assert bool((mask == 0).any()), "the batch should be right padded"
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (*ids.shape, len(processor.tokenizer))

    # Image placeholders, markers and padding never count; the rest is next-token cross-entropy.
    is_image = torch.isin(ids, image_token_ids(model))
    # The processor leaves image ids in the labels: the model must mask them.
    assert bool(torch.isin(batch["labels"], image_token_ids(model)).any())
    labels = ids.masked_fill(is_image | (mask == 0), -100)
    targets = labels[:, 1:]
    counted = targets != -100
    log_probs = torch.log_softmax(out.logits[:, :-1][counted].double(), dim=-1)
    expected = -log_probs.gather(-1, targets[counted].unsqueeze(-1)).mean()
    torch.testing.assert_close(out.loss, expected.float())
    # The same loss when the caller already masked the labels.
    with torch.no_grad():
        assert torch.equal(model(**{**batch, "labels": labels}).loss, out.loss)


@pytest.mark.parametrize("strategy", ["projection", "qformer"])
def test_image_features_are_written_at_the_placeholders_in_order(build, images, strategy) -> None:
    model, processor = build(strategy)
    batch = processor(PROMPTS, images)
    ids = batch["input_ids"]
    with torch.no_grad():
        embeds, extra = model.prepare_inputs(ids, batch["pixel_values"])
        features = model.encode_images(batch["pixel_values"])  # [3 images, per image, llm width]
        table = model.llm.get_input_embeddings().weight
    assert extra == {}
    is_placeholder = ids == model.config.image_token_id
    torch.testing.assert_close(embeds[~is_placeholder], table[ids[~is_placeholder]], rtol=0, atol=0)
    per_image = PLACEHOLDERS_PER_IMAGE[strategy]
    row0 = positions_of(ids[:1], model.config.image_token_id)
    row1 = positions_of(ids[1:], model.config.image_token_id)
    torch.testing.assert_close(embeds[0, row0], features[0], rtol=0, atol=0)
    torch.testing.assert_close(embeds[1, row1[:per_image]], features[1], rtol=0, atol=0)
    torch.testing.assert_close(embeds[1, row1[per_image:]], features[2], rtol=0, atol=0)


@pytest.mark.parametrize("llm", LLM_KINDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_padded_batch_matches_each_prompt_alone(build, images, strategy, llm) -> None:
    model, processor = build_with_images_visible(build, strategy, llm)
    batch = processor(PROMPTS, images)
    with torch.no_grad():
        batched = model(**batch).logits
    lengths = []
    for row, (prompt, own_images) in enumerate(zip(PROMPTS, images, strict=True)):
        alone = processor(prompt, own_images)
        length = alone["input_ids"].shape[1]
        lengths.append(length)
        assert int(batch["attention_mask"][row].sum()) == length
        assert torch.equal(batch["input_ids"][row, :length], alone["input_ids"][0])
        with torch.no_grad():
            expected = model(**alone).logits[0]
        torch.testing.assert_close(batched[row, :length], expected, rtol=0, atol=1e-5)
    assert lengths[0] != lengths[1]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_text_only_row_beside_an_image_row(build, make_image, strategy) -> None:
    model, processor = build_with_images_visible(build, strategy)
    texts, images = ["a red circle on the left of a blue square", "<image> two"], [[], [make_image(0)]]
    batch = processor(texts, images)
    with torch.no_grad():
        batched = model(**batch).logits
        for row, (text, own_images) in enumerate(zip(texts, images, strict=True)):
            alone = processor(text, own_images or None)
            length = alone["input_ids"].shape[1]
            torch.testing.assert_close(batched[row, :length], model(**alone).logits[0], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_placeholder_and_image_count_mismatch(build, make_image, strategy) -> None:
    model, processor = build(strategy)
    batch = processor("a red <image> circle", [make_image(0)])
    two_images = processor("<image> and <image>", [make_image(1), make_image(2)])["pixel_values"]
    per_image = PLACEHOLDERS_PER_IMAGE[strategy]
    with pytest.raises(ValueError) as error, torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=two_images)
    message = str(error.value)
    assert f"holds {per_image} placeholder" in message
    assert f"the 2 image(s) give {2 * per_image}" in message


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_placeholders_without_images(build, make_image, strategy) -> None:
    model, processor = build(strategy)
    batch = processor("a red <image> circle", [make_image(0)])
    with pytest.raises(ValueError, match="no images were given"), torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(ValueError, match="1 '<image>' placeholder"):
        processor("a red <image> circle")


def test_unknown_strategy_lists_the_known_ones(vision_dirs, llm_dirs) -> None:
    known = available_strategies()
    assert set(STRATEGIES) <= set(known)
    with pytest.raises(ValueError, match="unknown strategy 'bridge'") as error:
        KopruConfig(
            vision=VisionTowerConfig(str(vision_dirs["clip"])), llm=str(llm_dirs["llama"]), strategy="bridge"
        )
    for name in known:
        assert repr(name) in str(error.value)


# ---------------------------------------------------------------------------------------- cross-attention


@pytest.mark.parametrize("llm", LLM_KINDS)
def test_closed_gates_give_exactly_the_text_llm(build, llm_dirs, images, llm) -> None:
    model, processor = build("cross_attention", llm)
    assert not any(bool(b.attn_gate.any() or b.mlp_gate.any()) for b in model.connector.blocks)
    batch = processor(PROMPTS, images)
    plain = AutoModelForCausalLM.from_pretrained(llm_dirs[llm]).eval()
    old = plain.get_input_embeddings().num_embeddings
    assert torch.equal(model.llm.get_input_embeddings().weight[:old], plain.get_input_embeddings().weight)
    assert torch.equal(model.llm.get_output_embeddings().weight[:old], plain.get_output_embeddings().weight)
    # The plain LLM gets the same rows for the added image tokens, so both see the same input ids.
    plain.resize_token_embeddings(len(processor.tokenizer))
    with torch.no_grad():
        plain.get_input_embeddings().weight[old:] = model.llm.get_input_embeddings().weight[old:]
        plain.get_output_embeddings().weight[old:] = model.llm.get_output_embeddings().weight[old:]
        expected = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = model(**batch).logits
    assert torch.equal(got, expected)


def test_cross_attention_leaves_the_base_llm_frozen(build) -> None:
    model, _ = build("cross_attention")
    assert not any(param.requires_grad for param in model.llm.parameters())
    assert not any(param.requires_grad for param in model.vision.parameters())
    assert all(param.requires_grad for param in model.connector.parameters())


def layer_inputs(model: KopruForConditionalGeneration, batch: dict) -> list[torch.Tensor]:
    """The hidden states each decoder layer receives, after any cross-attention block in front of it."""
    captured = []

    def capture(_layer, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).clone())

    layers = decoder_layers(model.llm)
    handles = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@pytest.mark.parametrize("llm", ["llama", "gpt2"])
@pytest.mark.parametrize(
    ("connector", "positions"),
    [({"every_n_layers": 2}, [1, 3]), ({"every_n_layers": 3}, [2]), ({"layers": [2, 0]}, [0, 2])],
)
def test_blocks_sit_in_front_of_their_layers(build, make_image, llm, connector, positions) -> None:
    model, processor = build("cross_attention", llm, connector=connector)
    assert model.connector.positions == positions
    assert len(model.connector.blocks) == len(positions)
    batch = processor("<image> a red circle on the left", [make_image(0)])
    closed = layer_inputs(model, batch)
    assert len(closed) == 4
    for index, position in enumerate(positions):
        open_gates(model, 0.0)
        with torch.no_grad():
            model.connector.blocks[index].attn_gate.fill_(1.0)
        opened = layer_inputs(model, batch)
        changed = [not torch.equal(a, b) for a, b in zip(closed, opened, strict=True)]
        # Block `index` first changes the input of its own layer; every later layer sees the change too.
        assert changed == [i >= position for i in range(4)]


@pytest.mark.parametrize("llm", LLM_KINDS)
def test_an_image_reaches_only_the_positions_after_it(build, make_image, llm) -> None:
    model, processor = build_with_images_visible(build, "cross_attention", llm)
    text = "a red circle on the left <image> of a blue square"
    first, second = processor(text, [make_image(0)]), processor(text, [make_image(1)])
    assert torch.equal(first["input_ids"], second["input_ids"])
    (placeholder,) = positions_of(first["input_ids"], model.config.image_token_id)
    with torch.no_grad():
        a, b = model(**first).logits[0], model(**second).logits[0]
    assert placeholder > 2
    assert torch.equal(a[:placeholder], b[:placeholder])
    assert bool(((a - b).abs().amax(-1)[placeholder:] > 1e-4).all())


@pytest.mark.parametrize("llm", ["llama", "gpt2"])
def test_second_image_reaches_only_the_positions_after_it(build, make_image, llm) -> None:
    model, processor = build_with_images_visible(build, "cross_attention", llm)
    text = "<image> a red circle <image> on the left"
    first = processor(text, [make_image(0), make_image(1)])
    second = processor(text, [make_image(0), make_image(2)])
    p1, p2 = positions_of(first["input_ids"], model.config.image_token_id)
    with torch.no_grad():
        a, b = model(**first).logits[0], model(**second).logits[0]
    assert p2 > p1 + 2
    assert torch.equal(a[:p2], b[:p2])
    assert bool(((a - b).abs().amax(-1)[p2:] > 1e-4).all())


def test_attend_to_most_recent_differs_from_previous_after_the_second_image(build, make_image) -> None:
    previous, processor = build_with_images_visible(build, "cross_attention")
    most_recent, _ = build_with_images_visible(
        build, "cross_attention", connector={**CROSS_ATTENTION, "attend_to": "most_recent"}
    )
    # Same seed: the same weights, only the visibility rule differs.
    same = zip(previous.state_dict().items(), most_recent.state_dict().items(), strict=True)
    for (name, a), (_, b) in same:
        assert torch.equal(a, b), name
    batch = processor("<image> a red circle <image> on the left", [make_image(0), make_image(1)])
    _, p2 = positions_of(batch["input_ids"], previous.config.image_token_id)
    with torch.no_grad():
        a, b = previous(**batch).logits[0], most_recent(**batch).logits[0]
    assert torch.equal(a[:p2], b[:p2])  # before the second image both see only the first
    assert bool(((a - b).abs().amax(-1)[p2:] > 1e-4).all())


@pytest.mark.parametrize(
    ("attend_to", "expected"),
    [
        # Images of 2 key/value tokens each; a text position with n images before it (counting its own
        # placeholder) sees all n images ("previous") or only the n-th ("most_recent").
        ("previous", [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]),
        ("most_recent", [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]]),
    ],
)
def test_image_context_visibility(attend_to, expected) -> None:
    keys = torch.zeros(1, 1, 4, 8)
    context = ImageContext([(keys, keys)], torch.tensor([2]), tokens_per_image=2, attend_to=attend_to)
    visible = context.for_positions(torch.tensor([[0, 1, 1, 2]]))
    sees = torch.tensor([[0.0], [1.0], [1.0], [1.0]])
    assert torch.equal(visible.sees_image[0], sees)
    # Rows that see no image attend to everything (no all-masked row, no NaN) and are zeroed by sees_image.
    expected_mask = torch.tensor(expected, dtype=torch.bool) | (sees == 0)
    assert torch.equal(visible.mask[0, 0], expected_mask)


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stage1_trains_exactly_the_connector(build, images, strategy) -> None:
    model, processor = build(strategy)
    apply_recipe(model, "align")
    if strategy == "cross_attention":
        open_gates(model, 0.5)  # closed gates would block every gradient except the gates' own
    assert all(param.requires_grad for param in model.connector.parameters())
    assert not any(param.requires_grad for param in [*model.vision.parameters(), *model.llm.parameters()])
    batch = processor(PROMPTS, images, return_labels=True)
    model(**batch).loss.backward()
    assert [name for name, param in model.vision.named_parameters() if param.grad is not None] == []
    assert [name for name, param in model.llm.named_parameters() if param.grad is not None] == []
    no_grad = [name for name, param in model.connector.named_parameters() if param.grad is None]
    assert no_grad == []
    # A key bias adds the same score to every key of a query, which softmax ignores: its true gradient is 0.
    zero = [
        name for name, param in model.connector.named_parameters()
        if not name.endswith("key.bias") and not bool(param.grad.abs().sum() > 0)
    ]
    assert zero == []


# ---------------------------------------------------------------------------------------------- generation


def greedy_without_cache(model: KopruForConditionalGeneration, batch: dict, steps: int):
    """Reference: the full forward of the whole sequence at every step, argmax of the last position.

    Returns the new tokens [B, steps] and the last-position logits of every step [steps, B, V]."""
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch.get("pixel_values")
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            # Left padding: each row counts positions from its own first token.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions)
            last = out.logits[:, -1]
            token = last.argmax(-1)
            tokens.append(token)
            logits.append(last)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(tokens, dim=1), torch.stack(logits)


def generate_recording_logits(model: KopruForConditionalGeneration, batch: dict, **options):
    """model.generate, and the last-position logits of every LLM call it made [calls, B, V]."""
    seen = []
    handle = model.llm.register_forward_hook(lambda _llm, _args, output: seen.append(output.logits[:, -1]))
    try:
        generated = model.generate(**batch, **options)
    finally:
        handle.remove()
    return generated, torch.stack(seen)


@pytest.mark.parametrize("llm", LLM_KINDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_greedy_generation_matches_full_recompute_and_single_prompts(build, images, strategy, llm) -> None:
    model, processor = build_with_images_visible(build, strategy, llm)
    batch = processor(PROMPTS, images, padding_side="left")
    assert bool((batch["attention_mask"][:, 0] == 0).any()), "the batch should be left padded"
    generated, logits = generate_recording_logits(model, batch, max_new_tokens=6)
    assert generated.shape == (2, 6)
    assert not bool(torch.isin(generated, image_token_ids(model)).any())
    expected_tokens, expected_logits = greedy_without_cache(model, batch, 6)
    assert torch.equal(generated, expected_tokens)
    # Tiny random LLMs keep their argmax under small errors, so compare the distributions themselves too:
    # the cached decoding must see what the full recompute sees.
    torch.testing.assert_close(logits[:6], expected_logits, rtol=0, atol=1e-5)
    for row, (prompt, own_images) in enumerate(zip(PROMPTS, images, strict=True)):
        alone = processor(prompt, own_images, padding_side="left")
        alone_generated, alone_logits = generate_recording_logits(model, alone, max_new_tokens=6)
        assert torch.equal(alone_generated[0], generated[row])
        torch.testing.assert_close(alone_logits[:6, 0], logits[:6, row], rtol=0, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sampling_is_seeded_and_top_k_1_is_greedy(build, images, strategy) -> None:
    model, processor = build_with_images_visible(build, strategy)
    batch = processor(PROMPTS, images, padding_side="left")

    def sample(seed: int, **options) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return model.generate(**batch, max_new_tokens=6, do_sample=True, generator=generator, **options)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    greedy = model.generate(**batch, max_new_tokens=6)
    assert torch.equal(sample(2, top_k=1), greedy)
    assert torch.equal(sample(3, top_p=1e-6), greedy)


def test_generation_stops_each_row_at_eos(build, images) -> None:
    model, processor = build_with_images_visible(build, "cross_attention")
    batch = processor(PROMPTS, images, padding_side="left")
    greedy = model.generate(**batch, max_new_tokens=6)
    eos, pad = [int(greedy[0, 2]), int(greedy[1, 3])], processor.tokenizer.pad_token_id
    assert pad not in greedy.flatten().tolist()
    stopped = model.generate(**batch, max_new_tokens=6, eos_token_id=eos, pad_token_id=pad)
    # Each row's first eos in the unstopped run; generation ends once every row has one.
    stops = [min(i for i, token in enumerate(row) if token in eos) for row in greedy.tolist()]
    assert max(stops) < 5
    assert stopped.shape == (2, max(stops) + 1)
    for row, stop in enumerate(stops):
        assert torch.equal(stopped[row, : stop + 1], greedy[row, : stop + 1])
        assert bool((stopped[row, stop + 1 :] == pad).all())


def test_cross_attention_image_keys_values_are_computed_once(build, images) -> None:
    model, processor = build_with_images_visible(build, "cross_attention", connector={"every_n_layers": 1})
    calls = {"k_proj": [0] * 4, "v_proj": [0] * 4, "q_proj": [0] * 4}
    handles = []
    for index, block in enumerate(model.connector.blocks):
        for name, counts in calls.items():
            def count(*_, counts=counts, index=index):
                counts[index] += 1

            handles.append(getattr(block, name).register_forward_hook(count))
    batch = processor(PROMPTS, images, padding_side="left")
    try:
        generated = model.generate(**batch, max_new_tokens=6)
    finally:
        for handle in handles:
            handle.remove()
    assert generated.shape == (2, 6)
    assert calls["k_proj"] == [1] * 4
    assert calls["v_proj"] == [1] * 4
    # Whereas the queries run at the prefill and at every decoding step.
    assert all(count >= 6 for count in calls["q_proj"])


# --------------------------------------------------------------------------------------------- save / load


def perturb_connector(model: KopruForConditionalGeneration, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.connector.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("llm", ["llama", "qwen2"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_save_pretrained_round_trip(build, images, tmp_path, strategy, llm) -> None:
    model, processor = build_with_images_visible(build, strategy, llm)
    perturb_connector(model, 1)  # nothing a fresh connector could reproduce by chance
    target = tmp_path / "saved"
    model.save_pretrained(target, processor)
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no staging folder left behind

    loaded, loaded_processor = KopruForConditionalGeneration.from_pretrained(target)
    loaded.eval()
    batch = processor(PROMPTS, images)
    reloaded_batch = loaded_processor(PROMPTS, images)
    for key, value in batch.items():
        assert torch.equal(reloaded_batch[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_save_pretrained_without_processor_is_refused(build, tmp_path) -> None:
    # A saved model without its tokenizer could not be loaded again; nothing may be written.
    model, _ = build("projection")
    with pytest.raises(TypeError, match="KopruProcessor"):
        model.save_pretrained(tmp_path / "saved", None)
    assert not (tmp_path / "saved").exists()
    assert list(tmp_path.iterdir()) == []


def test_save_pretrained_writes_no_pickle(build, tmp_path) -> None:
    model, processor = build("projection")
    model.save_pretrained(tmp_path / "saved", processor)
    files = [p for p in (tmp_path / "saved").rglob("*") if p.is_file()]
    weights = sorted(str(p.relative_to(tmp_path / "saved")) for p in files if p.suffix == ".safetensors")
    assert weights == ["connector.safetensors", "llm/model.safetensors", "vision/model.safetensors"]
    for file in files:
        assert file.suffix in {".json", ".safetensors", ".jinja", ".txt"}, file
        head = file.read_bytes()[:4]
        assert not head.startswith(b"\x80"), f"{file} is a pickle"
        assert not head.startswith(b"PK\x03\x04"), f"{file} is a zip (torch.save) archive"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_connector_checkpoint_round_trip(build, images, tmp_path, strategy) -> None:
    model, processor = build_with_images_visible(build, strategy)
    perturb_connector(model, 1)
    model.save_connector(tmp_path)
    # The same backbones (same seed: the same rows for the added image tokens), another connector.
    fresh, _ = build(strategy)
    perturb_connector(fresh, 2)
    batch = processor(PROMPTS, images)
    with torch.no_grad():
        expected = model(**batch).logits
        assert not torch.allclose(fresh(**batch).logits, expected)
        fresh.load_connector(tmp_path)
        assert torch.equal(fresh(**batch).logits, expected)


def test_connector_checkpoint_fits_backbones_built_under_another_seed(build, images, tmp_path) -> None:
    model, processor = build("projection", seed=0)
    model.save_connector(tmp_path)
    fresh, _ = build("projection", seed=1)
    fresh.load_connector(tmp_path)
    batch = processor(PROMPTS, images)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_connector_for_another_llm_width_is_rejected_with_shapes(build, tmp_path) -> None:
    narrow, _ = build("projection", "llama_narrow")
    narrow.save_connector(tmp_path)
    model, _ = build("projection", "llama")
    before = {name: t.clone() for name, t in model.connector.state_dict().items()}
    with pytest.raises(ValueError) as error:
        model.load_connector(tmp_path)
    message = str(error.value)
    wide, narrow_width, vision = LLM_HIDDEN, NARROW_LLM_HIDDEN, VISION_HIDDEN
    assert f"layers.0.weight: expected ({wide}, {vision}), found ({narrow_width}, {vision})" in message
    assert f"layers.2.weight: expected ({wide}, {wide}), found ({narrow_width}, {narrow_width})" in message
    # Nothing was half loaded.
    for name, tensor in model.connector.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_connector_with_an_edited_config_is_rejected_with_shapes(build, tmp_path) -> None:
    wide, _ = build("qformer", connector={**QFORMER, "num_queries": 8})
    wide.save_connector(tmp_path)
    config_file = tmp_path / "kopru_config.json"
    saved = json.loads(config_file.read_text())
    saved["connector"]["num_queries"] = QFORMER["num_queries"]  # the config now claims 4 queries
    config_file.write_text(json.dumps(saved))
    model, _ = build("qformer")
    with pytest.raises(ValueError, match=r"query_tokens: expected \(1, 4, 32\), found \(1, 8, 32\)"):
        model.load_connector(tmp_path)


def test_connector_of_another_strategy_is_rejected(build, tmp_path) -> None:
    projection, _ = build("projection")
    projection.save_connector(tmp_path)
    model, _ = build("qformer")
    with pytest.raises(ValueError, match="strategy 'projection'"):
        model.load_connector(tmp_path)


def test_every_strategy_config_is_importable_from_the_package() -> None:
    """`from kopru import QFormerConfig` once failed: each registered strategy's config is a public name."""
    import kopru
    from kopru import strategy_class

    for name in available_strategies():
        config_class = strategy_class(name).config_class
        assert getattr(kopru, config_class.__name__) is config_class, name
        assert config_class.__name__ in kopru.__all__


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


def test_stage2_respects_trainable_encoder(build) -> None:
    trainable, _ = build("projection", vision_config={"trainable": True})
    apply_recipe(trainable, "instruct")
    assert all(p.requires_grad for p in trainable.vision.encoder.parameters())
    assert all(p.requires_grad for p in trainable.connector.parameters())

    frozen, _ = build("projection")
    apply_recipe(frozen, "instruct")
    assert not any(p.requires_grad for p in frozen.vision.encoder.parameters())
    assert all(p.requires_grad for p in frozen.connector.parameters())


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


def test_save_pretrained_replaces_atomically(build, tmp_path):
    model, processor = build("projection")
    target = tmp_path / "saved"
    model.save_pretrained(target, processor)
    shutil.rmtree(target / "vision")  # a damaged earlier save is replaced whole
    model.save_pretrained(target, processor)
    assert (target / "vision" / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no staging folder left behind
