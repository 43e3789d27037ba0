"""The generation engine against independent references: the simple DynamicCache loop (`generate`), HF
`generate` of the same LLM, HF's logits processors, the tokenizer's own decoding, and hand-made cases."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import LLM_KINDS, STRATEGIES
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper
from transformers.convert_slow_tokenizer import bytes_to_unicode

from kopru.data.encoding import SampleEncoder
from kopru.generation import (
    GenerationEngine,
    IncrementalDetokenizer,
    SamplingParams,
    StopStringMatcher,
    apply_repetition_penalty,
    decode_step,
    filter_top_k_top_p,
    format_chat,
)

# Two prompts of different lengths (so the batch is left padded); the second holds two images.
PROMPTS = ["a red circle on the left of a blue <image> square", "<image> how many? <image> three."]
TEXT_PROMPTS = ["<s>a red circle on the left", "<s>how many squares are there? three. what colour"]
TURKISH = "solda kırmızı bir daire, sağda sarı bir üçgen var; ĞÜŞİÖÇ ğüşıöç."
SHORT_TURKISH = "sağda üçgen; ĞÜŞİÖÇ ğüşıöç."


@pytest.fixture
def images(make_image):
    return [[make_image(0)], [make_image(1), make_image(2)]]


def visible_images(build, strategy: str, llm: str = "llama", **kwargs):
    """A model whose images change its output: cross-attention gates start closed (tanh(0) = 0); open them."""
    model, processor = build(strategy, llm, **kwargs)
    if strategy == "cross_attention":
        with torch.no_grad():
            for block in model.connector.blocks:
                block.attn_gate.fill_(1.0)
                block.mlp_gate.fill_(1.0)
    return model, processor


def until_eos(tokens: list[int], eos: list[int]) -> list[int]:
    return next((tokens[:i] for i, token in enumerate(tokens) if token in eos), tokens)


def record_logits(llm):
    """Last-position logits of every LLM call, [B, V] each."""
    seen = []
    handle = llm.register_forward_hook(lambda _llm, _args, output: seen.append(output.logits[:, -1].float().clone()))
    return seen, handle


# ----------------------------------------------------------------------------------------- greedy decoding


@pytest.mark.parametrize("llm", LLM_KINDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.slow
def test_greedy_engine_equals_the_reference_loop(build, images, strategy, llm) -> None:
    model, processor = visible_images(build, strategy, llm)
    batch = processor(PROMPTS, images, padding_side="left", add_special_tokens=False)
    assert bool((batch["attention_mask"][:, 0] == 0).any()), "the batch should be left padded"
    reference_logits, handle = record_logits(model.llm)
    try:
        reference = model.generate(**batch, max_new_tokens=8, eos_token_id=[])
    finally:
        handle.remove()
    engine = GenerationEngine(model, processor)
    engine_logits, handle = record_logits(model.llm)
    try:
        completions = engine.complete(PROMPTS, images, SamplingParams(max_new_tokens=8))
    finally:
        handle.remove()
    for row, completion in enumerate(completions):
        expected = until_eos(reference[row].tolist(), engine.eos_ids)
        assert completion.token_ids == expected
        assert completion.completion_tokens == len(expected)
        assert completion.prompt_tokens == int(batch["attention_mask"][row].sum())
        assert completion.finish_reason == ("length" if len(expected) == 8 else "stop")
        assert completion.text == processor.decode(expected)
    # The distributions themselves, not only their argmax: the static cache sees what the dynamic one sees.
    steps = min(len(engine_logits), len(reference_logits))
    assert steps >= 2
    torch.testing.assert_close(torch.stack(engine_logits[:steps]), torch.stack(reference_logits[:steps]),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["anyres", "dynamic"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_high_resolution_engine_equals_the_reference_loop(build, strategy, mode) -> None:
    """Images of different sizes take different numbers of positions (and cross-attention K/V): the engine's
    static cache and image buffers see exactly what the reference loop sees."""
    from PIL import Image

    from kopru.config import ResolutionConfig

    resolution = ResolutionConfig(mode=mode, grid_pinpoints=[[32, 64], [64, 32]] if mode == "anyres" else None)
    model, processor = visible_images(build, strategy, resolution=resolution)
    sized = [[Image.new("RGB", (61, 23), (200, 30, 30))],
             [Image.new("RGB", (20, 40), (30, 200, 30)), Image.new("RGB", (64, 64), (30, 30, 200))]]
    batch = processor(PROMPTS, sized, padding_side="left", add_special_tokens=False)
    reference = model.generate(**batch, max_new_tokens=6, eos_token_id=[])
    engine = GenerationEngine(model, processor)
    for row, completion in enumerate(engine.complete(PROMPTS, sized, SamplingParams(max_new_tokens=6))):
        assert completion.token_ids == until_eos(reference[row].tolist(), engine.eos_ids)
        assert completion.prompt_tokens == int(batch["attention_mask"][row].sum())


@pytest.mark.parametrize("llm", ["llama", "qwen2"])
@pytest.mark.slow
def test_greedy_text_only_equals_hf_generate(build, llm) -> None:
    model, processor = build("projection", llm)
    engine = GenerationEngine(model, processor)
    completions = engine.complete(TEXT_PROMPTS, [[], []], SamplingParams(max_new_tokens=10))
    for prompt, completion in zip(TEXT_PROMPTS, completions, strict=True):
        ids = processor.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        hf = model.llm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
        expected = until_eos(hf[0, ids.shape[1]:].tolist(), engine.eos_ids)
        assert completion.token_ids == expected
        ours = model.generate(ids, max_new_tokens=10)
        assert until_eos(ours[0].tolist(), engine.eos_ids) == expected


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.slow
def test_batched_equals_one_by_one(build, images, strategy) -> None:
    model, processor = visible_images(build, strategy)
    engine = GenerationEngine(model, processor, max_batch_size=4)
    prompts = [*PROMPTS, "<image> what colour?"]
    request_images = [*images, [images[1][0]]]
    params = [SamplingParams(max_new_tokens=n) for n in (3, 9, 6)]
    together = engine.complete(prompts, request_images, params)
    for index, prompt in enumerate(prompts):
        alone = engine.complete([prompt], [request_images[index]], params[index])[0]
        assert alone == together[index]
    assert [c.completion_tokens for c in together if c.finish_reason == "length"] == \
        [p.max_new_tokens for p, c in zip(params, together, strict=True) if c.finish_reason == "length"]


@pytest.mark.slow
def test_requests_beyond_max_batch_size_run_in_chunks(build, images) -> None:
    model, processor = visible_images(build, "projection")
    whole = GenerationEngine(model, processor, max_batch_size=8).complete(PROMPTS * 2, images * 2,
                                                                         SamplingParams(max_new_tokens=5))
    chunked = GenerationEngine(model, processor, max_batch_size=3).complete(PROMPTS * 2, images * 2,
                                                                           SamplingParams(max_new_tokens=5))
    assert chunked == whole
    assert whole[0] == whole[2] and whole[1] == whole[3]


@pytest.mark.slow
def test_cross_attention_image_keys_values_computed_once_per_request(build, images) -> None:
    model, processor = visible_images(build, "cross_attention")
    calls = {"k_proj": 0, "q_proj": 0}
    handles = [getattr(model.connector.blocks[0], name).register_forward_hook(
        lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)) for name in calls]
    try:
        completion = GenerationEngine(model, processor).complete(
            PROMPTS[:1], images[:1], SamplingParams(max_new_tokens=6))[0]
    finally:
        for handle in handles:
            handle.remove()
    assert calls["k_proj"] == 1
    assert calls["q_proj"] == 1 + completion.completion_tokens - 1  # prefill + one per decoding step


# ------------------------------------------------------------------------------------------------ sampling


def test_repetition_penalty_matches_hf_processor() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=generator)
    ids = torch.randint(0, 50, (3, 12), generator=generator)
    penalties = [1.3, 0.7, 1.0]
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, ids, True)
    ours = apply_repetition_penalty(logits, seen, torch.tensor(penalties).unsqueeze(1))
    for row, penalty in enumerate(penalties):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids[row:row + 1], logits[row:row + 1].clone())
        torch.testing.assert_close(ours[row:row + 1], expected, rtol=0, atol=0)
    # By hand: a positive logit is divided, a negative one multiplied.
    by_hand = apply_repetition_penalty(torch.tensor([[2.0, -2.0, 3.0]]), torch.tensor([[True, True, False]]),
                                       torch.tensor([[2.0]]))
    assert by_hand.tolist() == [[1.0, -4.0, 3.0]]


@pytest.mark.slow
def test_repetition_penalty_end_to_end_equals_hf_generate(build) -> None:
    model, processor = build("projection", "llama")
    engine = GenerationEngine(model, processor)
    prompt = TEXT_PROMPTS[1]
    ids = processor.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    plain = engine.complete([prompt], [[]], SamplingParams(max_new_tokens=16))[0]
    penalised = engine.complete([prompt], [[]], SamplingParams(max_new_tokens=16, repetition_penalty=1.5))[0]
    hf = model.llm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                            repetition_penalty=1.5)
    assert penalised.token_ids == until_eos(hf[0, ids.shape[1]:].tolist(), engine.eos_ids)
    assert penalised.token_ids != plain.token_ids, "the case should exercise the penalty"


def test_top_k_top_p_match_hf_warpers() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 64, generator=generator) * 3
    top_k, top_p = [0, 5, 20, 1], [0.9, 1.0, 0.5, 0.3]
    ours = filter_top_k_top_p(logits, torch.tensor(top_k), torch.tensor(top_p))
    for row in range(4):
        expected = logits[row:row + 1].clone()
        if top_k[row] > 0:
            expected = TopKLogitsWarper(top_k[row])(None, expected)
        if top_p[row] < 1:
            expected = TopPLogitsWarper(top_p[row])(None, expected)
        assert torch.equal(ours[row:row + 1].isinf(), expected.isinf()), row
        assert torch.equal(ours[row:row + 1][~ours[row:row + 1].isinf()], expected[~expected.isinf()])


def test_top_k_keeps_ties_with_the_kth_as_hf() -> None:
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    ours = filter_top_k_top_p(logits, torch.tensor([2, 1]), torch.tensor([1.0, 1.0]))
    expected = torch.cat([TopKLogitsWarper(k)(None, logits[row:row + 1].clone()) for row, k in enumerate([2, 1])])
    assert torch.equal(ours.isinf(), expected.isinf())
    assert ours.isinf().sum(-1).tolist() == [1, 0]  # 3, 2, 2 stay; four equal logits all stay


@pytest.mark.parametrize("options", [{"temperature": 0.0}, {"temperature": 1.0, "top_k": 5},
                                     {"temperature": 1.0, "top_p": 0.8}, {"temperature": 0.7},
                                     {"temperature": 1.0, "top_k": 8, "top_p": 0.9, "repetition_penalty": 1.3}])
def test_reference_loop_and_engine_sample_the_same_tokens(build, images, options) -> None:
    """One sampler for both loops: from the same prompt (so the same logits, to 1e-5) and the same seed, the
    reference loop (a generator seeded with s) and the engine (a request with seed s) pick the same tokens, for
    greedy, top-k, top-p, temperature and the repetition penalty."""
    model, processor = visible_images(build, "projection")
    prompt, own_images = PROMPTS[1], images[1]
    batch = processor([prompt], [own_images], padding_side="left", add_special_tokens=False)
    sampled = options["temperature"] > 0
    reference = model.generate(**batch, max_new_tokens=8, eos_token_id=[], do_sample=sampled,
                               generator=torch.Generator().manual_seed(11), **options)[0].tolist()
    params = SamplingParams(max_new_tokens=8, seed=11, ignore_eos=True, **options)
    [completion] = GenerationEngine(model, processor).complete([prompt], [own_images], params)
    assert completion.token_ids == reference
    if sampled:  # the case samples: another seed picks other tokens
        other = model.generate(**batch, max_new_tokens=8, eos_token_id=[], do_sample=True,
                               generator=torch.Generator().manual_seed(12), **options)[0].tolist()
        assert other != reference


@pytest.mark.slow
def test_sampling_is_seeded_per_request_and_top_k_1_is_greedy(build, images) -> None:
    model, processor = visible_images(build, "qformer")
    engine = GenerationEngine(model, processor)

    def sample(seed: int, **options):
        return engine.complete(PROMPTS, images, SamplingParams(max_new_tokens=8, temperature=1.0, seed=seed,
                                                              **options))

    first = sample(0)
    assert sample(0) == first
    assert sample(1) != first
    # A seeded request samples the same tokens whatever it is batched with.
    alone = engine.complete(PROMPTS[1:], images[1:], SamplingParams(max_new_tokens=8, temperature=1.0, seed=0))
    assert alone[0] == first[1]
    greedy = engine.complete(PROMPTS, images, SamplingParams(max_new_tokens=8))
    assert sample(2, top_k=1) == greedy
    assert sample(3, top_p=1e-6) == greedy
    mixed = engine.complete(PROMPTS, images, [SamplingParams(max_new_tokens=8),
                                              SamplingParams(max_new_tokens=8, temperature=1.0, seed=0)])
    assert mixed == [greedy[0], first[1]]


def test_invalid_sampling_parameters_are_named() -> None:
    with pytest.raises(ValueError, match=r"temperature >= 0 \(found -1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"0 < top_p <= 1 \(found 0"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens >= 1"):
        SamplingParams(max_new_tokens=0)
    # NaN compares False with every bound: it must fail each check, not slip through (issue 13)
    for name in ("temperature", "top_p", "repetition_penalty"):
        with pytest.raises(ValueError, match=f"{name}.*found nan"):
            SamplingParams(**{name: float("nan")})
    with pytest.raises(ValueError, match="finite repetition_penalty"):
        SamplingParams(repetition_penalty=float("inf"))
    for seed in (2**63, -(2**63) - 1):  # beyond what torch.Generator.manual_seed takes
        with pytest.raises(ValueError, match="seed within 64-bit"):
            SamplingParams(seed=seed)


# ---------------------------------------------------------------------------------- stops, text, streaming


@pytest.mark.slow
def test_stop_string_spanning_tokens_cuts_the_text(build, images) -> None:
    model, processor = visible_images(build, "projection")
    engine = GenerationEngine(model, processor)
    full = engine.complete(PROMPTS[:1], images[:1], SamplingParams(max_new_tokens=12))[0]
    pieces = [processor.decode(full.token_ids[:n]) for n in range(len(full.token_ids) + 1)]
    # A stop string made of the end of token 3's text and the start of token 4's: it spans two tokens.
    cut = len(pieces[3])
    assert len(pieces[4]) > cut and cut >= 1
    stop = pieces[4][cut - 1:cut + 1]
    before = full.text[:full.text.find(stop)]
    stopped = engine.complete(PROMPTS[:1], images[:1], SamplingParams(max_new_tokens=12, stop=[stop, "never"]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == before
    assert stop not in stopped.text
    streamed = [e for e in engine.stream(PROMPTS[:1], images[:1], SamplingParams(max_new_tokens=12, stop=[stop]))]
    assert "".join(e.text for e in streamed) == before
    assert [e.finish_reason for e in streamed][-1] == "stop"
    assert all(e.finish_reason is None for e in streamed[:-1])


def test_max_tokens_ends_with_length(build, images) -> None:
    model, processor = visible_images(build, "cross_attention")
    completion = GenerationEngine(model, processor).complete(PROMPTS, images, SamplingParams(max_new_tokens=3))
    for c in completion:
        assert (c.finish_reason, c.completion_tokens) in (("length", 3), ("stop", 0), ("stop", 1), ("stop", 2))
    assert any(c.finish_reason == "length" for c in completion)


def test_eos_ends_with_stop(build, images) -> None:
    model, processor = visible_images(build, "projection")
    engine = GenerationEngine(model, processor)
    full = engine.complete(PROMPTS[:1], images[:1], SamplingParams(max_new_tokens=8))[0]
    engine.eos_ids, engine._eos_set = [full.token_ids[2]], {full.token_ids[2]}
    stopped = engine.complete(PROMPTS[:1], images[:1], SamplingParams(max_new_tokens=8))[0]
    first = full.token_ids.index(full.token_ids[2])
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == full.token_ids[:first]
    assert stopped.text == processor.decode(full.token_ids[:first])


def byte_tokens(tokenizer, text: str) -> list[int]:
    """`text` as one token per UTF-8 byte: every multi-byte character is split across tokens."""
    alphabet = bytes_to_unicode()
    return tokenizer.convert_tokens_to_ids([alphabet[b] for b in text.encode()])


def test_incremental_detokenizer_handles_split_turkish_characters(build) -> None:
    _, processor = build("projection")
    tokenizer = processor.tokenizer
    for ids in (byte_tokens(tokenizer, TURKISH), tokenizer(TURKISH, add_special_tokens=False)["input_ids"]):
        assert tokenizer.decode(ids) == TURKISH
        detokenizer = IncrementalDetokenizer(tokenizer, tokenizer("<s>soru:", add_special_tokens=False)["input_ids"])
        pieces = [detokenizer.add(token) for token in ids] + [detokenizer.flush()]
        assert "".join(pieces) == TURKISH
        assert not any("\ufffd" in piece for piece in pieces)
    # Byte by byte, a two-byte letter appears only with its second byte.
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert [detokenizer.add(token) for token in byte_tokens(tokenizer, "aş")] == ["a", "", "ş"]


def test_stop_matcher_holds_back_only_possible_stop_prefixes() -> None:
    matcher = StopStringMatcher(["</cevap>", "##"])
    assert matcher.feed("merhaba <") == ("merhaba ", False)
    assert matcher.feed("/cev") == ("", False)
    assert matcher.feed("ap> sonra") == ("", True)
    assert matcher.text == "merhaba "
    matcher = StopStringMatcher(["##"])
    assert matcher.feed("a#") == ("a", False)
    assert matcher.feed("b") == ("#b", False)
    assert matcher.finish() == ""


def test_streaming_concatenates_to_the_completion_with_turkish(build, images) -> None:
    model, processor = visible_images(build, "projection")
    engine = GenerationEngine(model, processor)
    # Make the model answer in Turkish: every step's logits prefer the next byte of the Turkish sentence.
    answer = byte_tokens(processor.tokenizer, SHORT_TURKISH)
    step = {"n": 0}

    def force(_llm, _args, output):
        logits = output.logits
        logits[:, -1, answer[min(step["n"], len(answer) - 1)]] += 1e4
        step["n"] += 1
        return output

    handle = model.llm.register_forward_hook(force)
    try:
        params = SamplingParams(max_new_tokens=len(answer))
        events = list(engine.stream(PROMPTS[:1], images[:1], params))
        step["n"] = 0
        completion = engine.complete(PROMPTS[:1], images[:1], params)[0]
    finally:
        handle.remove()
    assert completion.text == SHORT_TURKISH
    assert "".join(e.text for e in events) == SHORT_TURKISH
    assert sum(e.finish_reason is not None for e in events) == 1
    assert events[-1].finish_reason == "length"
    assert events[-1].completion_tokens == completion.completion_tokens == len(answer)
    assert all(e.completion_tokens is None for e in events[:-1])
    assert not any("\ufffd" in e.text for e in events)


# ------------------------------------------------------------------------------------------ prompts, errors


def test_prompt_beyond_the_context_window_is_refused_with_numbers(build, images) -> None:
    model, processor = build("projection")
    engine = GenerationEngine(model, processor, max_seq_len=32)
    assert engine.context_window == 32
    length = engine.count_prompt_tokens(PROMPTS[0], images[0])
    assert length == int(processor(PROMPTS[0], images[0], add_special_tokens=False)["attention_mask"].sum())
    assert length > 32
    with pytest.raises(ValueError, match=rf"prompt 0 takes {length} tokens .* context window is 32"):
        engine.complete(PROMPTS[:1], images[:1])


def test_generation_stops_at_the_context_window(build) -> None:
    model, processor = build("projection")
    engine = GenerationEngine(model, processor, max_seq_len=24)
    prompt = TEXT_PROMPTS[0]
    length = engine.count_prompt_tokens(prompt, [])
    completion = engine.complete([prompt], [[]], SamplingParams(max_new_tokens=100))[0]
    if completion.finish_reason == "length":
        assert completion.completion_tokens == 24 - length


def test_image_count_mismatch_and_empty_prompt_are_refused(build, images) -> None:
    model, processor = build("projection")
    engine = GenerationEngine(model, processor)
    with pytest.raises(ValueError, match="placeholder"):
        engine.complete(PROMPTS[:1], [images[1]])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.complete([TEXT_PROMPTS[0], ""], [[], []])


def test_format_chat_renders_as_training_does(build, make_image) -> None:
    _, processor = build("projection")
    first, second = make_image(0), make_image(1)
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image": first}, {"type": "text", "text": "Ne renk?"}]},
        {"role": "assistant", "content": "Kırmızı."},
        {"role": "user", "content": [{"type": "text", "text": "Ya bu?"}, {"type": "image", "image": second}]},
    ]
    prompt, found = format_chat(processor, messages)
    assert found == [first, second]
    expected = SampleEncoder(processor).prompt([
        {"role": "user", "content": "<image>\nNe renk?"}, {"role": "assistant", "content": "Kırmızı."},
        {"role": "user", "content": "Ya bu?\n<image>"}])
    assert prompt == expected
    assert prompt == "<s>User: <image>\nNe renk?\nAssistant: Kırmızı.</s>\nUser: Ya bu?\n<image>\nAssistant:"
    with pytest.raises(ValueError, match=r"messages\[0\]\.content\[0\]: expected \{'type': 'text'"):
        format_chat(processor, [{"role": "user", "content": [{"type": "audio"}]}])


def test_format_chat_uses_the_tokenizer_chat_template(build) -> None:
    _, processor = build("projection")
    processor.tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    try:
        prompt, _ = format_chat(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                              "text": "hi"}]}])
    finally:
        processor.tokenizer.chat_template = None
    assert prompt == "<|user|><image>\nhi</s><|assistant|>"


# -------------------------------------------------------------------------------------------------- compile


@pytest.mark.parametrize("strategy", ["projection", "cross_attention"])
@pytest.mark.slow
def test_decode_step_has_no_graph_breaks(build, images, strategy) -> None:
    model, processor = visible_images(build, strategy)
    engine = GenerationEngine(model, processor)
    captured = []
    engine._step = lambda *args: captured.append(args) or decode_step(*args)
    engine.complete(PROMPTS, images, SamplingParams(max_new_tokens=3))
    with torch.inference_mode():
        explanation = torch._dynamo.explain(decode_step)(*captured[0])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.skipif(not os.environ.get("KOPRU_COMPILE_TESTS"),
                    reason="torch.compile on CPU takes about 35 s per graph here; set KOPRU_COMPILE_TESTS=1 to run")
@pytest.mark.parametrize("strategy", ["projection", "cross_attention"])
def test_compiled_engine_equals_eager(build, images, strategy) -> None:
    model, processor = visible_images(build, strategy)
    params = [SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8, temperature=0.8, seed=3)]
    eager = GenerationEngine(model, processor).complete(PROMPTS, images, params)
    text_only = GenerationEngine(model, processor).complete(TEXT_PROMPTS[:1], [[]], params[0])
    compiled = GenerationEngine(model, processor, compile=True)
    # Shapes (and image / no image) in turn, each again once warm: warm shapes skip most guard checks, so the
    # compiled step must still pick the right graph for each.
    for _ in range(2):
        assert compiled.complete(PROMPTS, images, params) == eager
        assert compiled.complete(PROMPTS[:1], images[:1], params[0]) == eager[:1]  # batch 1 -> another bucket
        assert compiled.complete(TEXT_PROMPTS[:1], [[]], params[0]) == text_only


def test_counted_prompts_are_not_tokenised_again_and_a_wrong_count_is_refused(build, images, monkeypatch) -> None:
    """The server counts a request's tokens once, when it admits it; the engine takes that count instead of
    tokenising the prompt a second time before the batch is encoded, and checks it against the encoding."""
    model, processor = build("projection")
    engine = GenerationEngine(model, processor)
    counts = [engine.count_prompt_tokens(p, i) for p, i in zip(PROMPTS, images, strict=True)]
    expected = engine.complete(PROMPTS, images, SamplingParams(max_new_tokens=3))
    calls = []
    monkeypatch.setattr(engine, "count_prompt_tokens", lambda *args: calls.append(args))
    assert engine.complete(PROMPTS, images, SamplingParams(max_new_tokens=3), prompt_tokens=counts) == expected
    assert calls == []
    wrong = [counts[0] + 1, counts[1]]
    with pytest.raises(ValueError, match=rf"counted as \[{wrong[0]}, {wrong[1]}\] tokens but encode to "
                                         rf"\[{counts[0]}, {counts[1]}\]"):
        engine.complete(PROMPTS, images, SamplingParams(max_new_tokens=3), prompt_tokens=wrong)
    with pytest.raises(ValueError, match=r"expected one prompt token count per prompt \(2\), found 1"):
        engine.complete(PROMPTS, images, prompt_tokens=counts[:1])
