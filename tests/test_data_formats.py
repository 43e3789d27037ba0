"""Data loading and encoding: LLaVA JSON, caption JSONL, datasets folders and parquet; labels on answers only;
the encoder's image expansion against the processor's; every bad input either raised or counted by reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from kopru.data.encoding import IGNORE_INDEX, EncodedSample, SampleEncoder, TemplateMismatchError
from kopru.data.formats import SKIP_REASONS, SampleError, load_samples, record_to_sample
from kopru.data.sample import Sample

# A minimal chat template: role tags, answers closed by eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

LLAVA_RECORDS = [
    {"id": "text", "conversations": [
        {"from": "human", "value": "what colour is the shape?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "how many squares?"}, {"from": "gpt", "value": "three."},
    ]},
    {"id": "one", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "blue"},
    ]},
    {"id": "two", "image": ["a.png", "b.png"], "conversations": [
        {"from": "system", "value": "answer in one word."},
        {"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "no"},
        {"from": "human", "value": "sure?"}, {"from": "gpt", "value": "yes, sure."},
    ]},
]


def write_image(path: Path, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    for seed, name in enumerate(("a.png", "b.png")):
        write_image(tmp_path / "images" / name, seed)
    return tmp_path / "images"


@pytest.fixture(scope="module")
def processor(build):
    return build("projection")[1]


@pytest.fixture
def chat_processor(processor):
    processor.tokenizer.chat_template = CHAT_TEMPLATE
    yield processor
    processor.tokenizer.chat_template = None


def labelled_runs(encoded: EncodedSample, tokenizer) -> list[str]:
    """The decoded text of each run of consecutive labelled tokens."""
    labelled = (encoded.labels != IGNORE_INDEX).tolist()
    runs, current = [], []
    for token, keep in zip(encoded.input_ids.tolist(), labelled, strict=True):
        if keep:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    runs += [current] if current else []
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


# ----------------------------------------------------------------------------------------------- formats
def test_llava_json_with_zero_one_two_images_and_several_turns(images: Path) -> None:
    samples, report = load_samples(write_json(images / "data.json", LLAVA_RECORDS))
    assert report.total == 0
    assert [s.id for s in samples] == ["text", "one", "two"]
    assert [len(s.images) for s in samples] == [0, 1, 2]
    assert samples[2].images == [str(images / "a.png"), str(images / "b.png")]  # against the JSON's folder
    assert [m["role"] for m in samples[2].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert samples[0].messages[3] == {"role": "assistant", "content": "three."}


def test_llava_json_image_root_and_prepended_placeholder(tmp_path: Path, images: Path) -> None:
    record = {"image": "b.png", "conversations": [{"from": "human", "value": "describe"}, {"from": "gpt", "value": "x"}]}
    samples, _ = load_samples(write_json(tmp_path / "elsewhere" / "data.json", [record]), image_root=images)
    assert samples[0].images == [str(images / "b.png")]
    # LLaVA puts the image in front of the first human turn when the text does not mention it.
    assert samples[0].messages[0]["content"] == "<image>\ndescribe"
    assert samples[0].id == "data.json:0"


def test_caption_jsonl(tmp_path: Path, images: Path) -> None:
    lines = [json.dumps({"image": "a.png", "caption": "a red circle"}), "",
             json.dumps({"image": str(images / "b.png"), "text": "two squares"})]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    samples, _ = load_samples(tmp_path / "captions.jsonl", image_root=images)
    expected = Sample.caption(str(images / "a.png"), "a red circle")
    assert samples[0].messages == expected.messages and samples[0].images == expected.images
    assert samples[1].messages[1]["content"] == "two squares"


def test_datasets_folder_with_image_feature(tmp_path: Path, processor) -> None:
    import datasets

    pictures = [Image.fromarray(np.full((9, 7, 3), value, dtype=np.uint8)) for value in (10, 200)]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict({"image": pictures, "caption": ["dark", "light"]}, features=features)
    dataset.save_to_disk(str(tmp_path / "saved"))
    samples, _ = load_samples(tmp_path / "saved")
    assert [s.messages[1]["content"] for s in samples] == ["dark", "light"]
    assert all(isinstance(s.images[0], bytes) for s in samples)  # stored bytes, not decoded at load time
    encoded = SampleEncoder(processor).encode(samples[1])
    assert encoded.pixel_values.shape[0] == 1


def test_in_memory_dataset_with_a_bytes_column(images: Path) -> None:
    import datasets

    from kopru.data.formats import load_hf_dataset

    dataset = datasets.Dataset.from_dict({"image": [(images / "a.png").read_bytes()], "text": ["a red circle"]})
    samples, _ = load_hf_dataset(dataset)
    assert samples[0].images == [(images / "a.png").read_bytes()] and samples[0].id == "row 0"
    assert samples[0].messages[1] == {"role": "assistant", "content": "a red circle"}


def test_parquet_glob_with_llava_columns(tmp_path: Path, images: Path) -> None:
    import datasets

    rows = {"id": [r["id"] for r in LLAVA_RECORDS], "conversations": [r["conversations"] for r in LLAVA_RECORDS],
            "image": [None, ["a.png"], ["a.png", "b.png"]]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "part-0.parquet"))
    samples, _ = load_samples(str(tmp_path / "*.parquet"), image_root=images)
    assert [len(s.images) for s in samples] == [0, 1, 2]
    assert samples[1].images == [str(images / "a.png")]
    assert samples[2].messages[1]["content"] == "<image> and <image>: same?"


# ---------------------------------------------------------------------------------------------- bad files
def _missing_image(tmp_path: Path, images: Path) -> Path:
    bad = {"id": "bad", "image": "nope.png", "conversations": LLAVA_RECORDS[1]["conversations"]}
    return write_json(images / "data.json", [LLAVA_RECORDS[1], bad])


def _corrupt_line(tmp_path: Path, images: Path) -> Path:
    (images / "captions.jsonl").write_text(json.dumps({"image": "a.png", "caption": "ok"}) + '\n{"image": "a.png", cap\n')
    return images / "captions.jsonl"


def _mismatch(tmp_path: Path, images: Path) -> Path:
    bad = {"id": "bad", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "?"}]}
    return write_json(images / "data.json", [LLAVA_RECORDS[1], bad])


@pytest.mark.parametrize(("make", "reason", "where"), [
    (_missing_image, "missing_image", "record 1"),
    (_corrupt_line, "corrupt_json", "line 2"),
    (_mismatch, "placeholder_mismatch", "record 1"),
])
def test_bad_records_raise_or_are_counted(tmp_path: Path, images: Path, make, reason: str, where: str) -> None:
    path = make(tmp_path, images)
    with pytest.raises(SampleError, match=where) as error:
        load_samples(path)
    assert error.value.reason == reason and path.name in str(error.value)
    samples, report = load_samples(path, policy="skip")
    assert len(samples) == 1 and dict(report.counts) == {reason: 1}


def _too_long(images: Path) -> Sample:
    return Sample([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "red"}],
                  [str(images / "a.png")], id="long")


def _truncated(images: Path) -> Sample:
    data = (images / "a.png").read_bytes()
    (images / "cut.png").write_bytes(data[: len(data) // 2])
    return Sample.caption(str(images / "cut.png"), "red", id="cut")


def _not_an_image(images: Path) -> Sample:
    (images / "notes.jpg").write_text("not an image at all")
    return Sample.caption(str(images / "notes.jpg"), "red", id="text-file")


def _no_answer(images: Path) -> Sample:
    return Sample([{"role": "user", "content": "hello"}], id="silent")


@pytest.mark.parametrize(("make", "reason", "max_length"), [
    (_too_long, "too_long", 10), (_truncated, "unreadable_image", None), (_not_an_image, "unreadable_image", None),
    (_no_answer, "no_loss_tokens", None),
])
def test_bad_samples_raise_or_are_counted(images: Path, processor, make, reason: str, max_length: int | None) -> None:
    sample = make(images)
    with pytest.raises(ValueError, match=sample.id) as error:
        SampleEncoder(processor, max_length=max_length).encode(sample)
    assert error.value.reason == reason
    skipping = SampleEncoder(processor, max_length=max_length, policy="skip")
    assert skipping.encode(sample) is None and dict(skipping.report.counts) == {reason: 1}


def test_too_long_names_length_and_max_length(images: Path, processor) -> None:
    length = SampleEncoder(processor).encode(_too_long(images)).length
    with pytest.raises(ValueError, match=f"max_length=10 tokens, found {length}"):
        SampleEncoder(processor, max_length=10).encode(_too_long(images))


# ------------------------------------------------------------------------------------------------- labels
def _conversation(image: Image.Image) -> Sample:
    return Sample([
        {"role": "system", "content": "be brief."},
        {"role": "user", "content": "<image>\nwhat colour is the shape?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "how many squares are there?"},
        {"role": "assistant", "content": "there are two."},
    ], [image], id="chat")


def test_labels_cover_exactly_the_answers_with_a_chat_template(chat_processor, make_image) -> None:
    encoded = SampleEncoder(chat_processor).encode(_conversation(make_image(0)))
    assert labelled_runs(encoded, chat_processor.tokenizer) == ["red</s>", "there are two.</s>"]
    labelled = encoded.labels != IGNORE_INDEX
    assert torch.equal(encoded.labels[labelled], encoded.input_ids[labelled])


def test_labels_cover_exactly_the_answers_with_the_fallback_template(processor, make_image) -> None:
    assert not processor.tokenizer.chat_template
    encoded = SampleEncoder(processor).encode(_conversation(make_image(0)))
    assert labelled_runs(encoded, processor.tokenizer) == [" red</s>", " there are two.</s>"]


def test_plain_template_labels_the_caption_and_ignores_user_text(processor, make_image) -> None:
    sample = Sample([{"role": "user", "content": "describe <image> please"},
                     {"role": "assistant", "content": "a red circle"}], [make_image(1)])
    encoder = SampleEncoder(processor, template="plain")
    encoded = encoder.encode(sample)
    assert labelled_runs(encoded, processor.tokenizer) == ["a red circle</s>"]
    assert encoder.render(sample)[0] == "<s><image>a red circle</s>"


@pytest.mark.parametrize("strategy", ["projection", "cross_attention"])
@pytest.mark.parametrize("chat_template", [None, CHAT_TEMPLATE])
def test_expansion_equals_the_processors(build, make_image, strategy: str, chat_template: str | None) -> None:
    _, processor = build(strategy)
    processor.tokenizer.chat_template = chat_template
    sample = _conversation(make_image(0))
    sample.messages[3]["content"] = "and this one? <image>"
    sample.images.append(make_image(1))
    encoder = SampleEncoder(processor)
    encoded = encoder.encode(sample)
    text, _ = encoder.render(sample)
    reference = processor(text, sample.images)
    assert torch.equal(encoded.input_ids, reference["input_ids"][0])
    assert torch.allclose(encoded.pixel_values, reference["pixel_values"])
    # image and marker positions never carry labels
    image_ids = torch.tensor([i for i in (processor.config.image_token_id, processor.config.image_start_token_id,
                                          processor.config.image_end_token_id) if i is not None])
    assert (encoded.labels[torch.isin(encoded.input_ids, image_ids)] == IGNORE_INDEX).all()


def test_prompt_is_the_rendering_up_to_the_answer(chat_processor, make_image) -> None:
    encoder = SampleEncoder(chat_processor)
    sample = _conversation(make_image(0))
    text, spans = encoder.render(sample)
    assert text.startswith(encoder.prompt(sample.messages[:4]))
    assert len(encoder.prompt(sample.messages[:4])) == spans[1][0]


def test_template_that_rewrites_earlier_turns_is_refused(processor) -> None:
    processor.tokenizer.chat_template = "{{ messages | length }}" + CHAT_TEMPLATE
    try:
        with pytest.raises(TemplateMismatchError, match="not a prefix"):
            SampleEncoder(processor)
    finally:
        processor.tokenizer.chat_template = None


def test_template_without_end_of_turn_is_refused(processor) -> None:
    processor.tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    try:
        with pytest.raises(ValueError, match="never learns to stop"):
            SampleEncoder(processor)
    finally:
        processor.tokenizer.chat_template = None


# ---------------------------------------------------------------------------------------------------- fuzz
# Arbitrary JSON-ish records, lines and files: a parser either gives usable samples or raises SampleError with a
# message that says where; nothing else escapes (issue 13). Records are biased towards the keys the formats read,
# so the draws reach the checks behind them.
_TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ["<image>", "<image>\nwhat colour?", "a <image> and <image>", "\ud800", "lone \udfff surrogate", "a\x00b", ""])
_SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | _TEXT
_JSON = st.recursive(_SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
                     max_leaves=8)
_IMAGE = st.sampled_from(["a.png", "nope.png", "", "../images/a.png", "x" * 300, "a\x00.png", "/", "."]) | st.binary(
    max_size=8) | st.fixed_dictionaries({}, optional={"bytes": st.binary(max_size=8) | _JSON, "path": _TEXT}) | _JSON
_TURN = st.fixed_dictionaries({}, optional={
    "from": st.sampled_from(["human", "gpt", "system", "user", "assistant", "bot"]) | _JSON, "value": _TEXT | _JSON})
_RECORD = st.fixed_dictionaries({}, optional={
    "id": _JSON, "image": _IMAGE | st.lists(_IMAGE, max_size=3), "images": st.lists(_IMAGE, max_size=2),
    "conversations": st.lists(_TURN, max_size=4) | _JSON, "caption": _TEXT | _JSON, "text": _TEXT,
}) | _JSON
# Conversations of the right shape with arbitrary text: these parse, and reach the encoder.
_CONVERSATION = st.fixed_dictionaries({
    "conversations": st.lists(st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system"]),
                                                     "value": _TEXT}), min_size=1, max_size=4),
    "image": st.lists(st.just("a.png") | st.binary(max_size=8), max_size=2)})
_CAPTION = st.fixed_dictionaries({"image": st.just("a.png") | st.lists(st.just("a.png"), max_size=2), "caption": _TEXT})
_SHAPED = _CONVERSATION | _CAPTION | _RECORD
_LINE = _SHAPED.map(lambda record: json.dumps(record, default=repr).encode()) | st.binary(max_size=30) | st.sampled_from(
    [b'{"caption": "\\ud800", "image": "a.png"}', b"\xff\xfe{}", b"{not json", b""]) | st.builds(
    lambda: b"[" * 100_000) | st.builds(lambda: b"1" * 5000)  # deeper than Python's stack; more digits than int() takes


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    write_image(root / "a.png")
    return root


def _check_usable(sample: Sample, root: Path) -> None:
    """What a parser promises of a sample it returns."""
    assert all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str) for m in sample.messages)
    assert all(m["content"].encode("utf-8") for m in sample.messages if m["content"])
    assert sum(m["content"].count("<image>") for m in sample.messages) == len(sample.images)
    assert all(isinstance(image, bytes) or Path(image).is_file() for image in sample.images)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=_SHAPED)
def test_fuzz_records_give_a_sample_or_a_sample_error(fuzz_root: Path, record) -> None:
    try:
        sample = record_to_sample(record, "data.jsonl: line 7", fuzz_root, "data.jsonl:7")
    except SampleError as error:
        event(f"refused: {error.reason}")
        assert str(error).startswith("data.jsonl: line 7") and error.reason in SKIP_REASONS
        assert str(error).endswith(f"[{error.reason}]")
        return
    event("parsed")
    _check_usable(sample, fuzz_root)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_LINE, max_size=5), policy=st.sampled_from(["error", "skip"]))
def test_fuzz_jsonl_files(fuzz_root: Path, lines: list[bytes], policy: str) -> None:
    path = fuzz_root / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        samples, report = load_samples(path, policy=policy)
    except SampleError as error:
        assert policy == "error" and str(error).startswith(f"{path}: line ")
        return
    for sample in samples:
        _check_usable(sample, fuzz_root)
    assert len(samples) + report.total <= len(lines)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.lists(_SHAPED, max_size=4).map(lambda r: json.dumps(r, default=repr).encode()) | _LINE,
       policy=st.sampled_from(["error", "skip"]))
def test_fuzz_llava_json_files(fuzz_root: Path, content: bytes, policy: str) -> None:
    path = fuzz_root / "fuzz.json"
    path.write_bytes(content)
    try:
        samples, _ = load_samples(path, policy=policy)
    except SampleError as error:
        assert str(error).startswith(f"{path}: ")
        return
    for sample in samples:
        _check_usable(sample, fuzz_root)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=_SHAPED)
def test_fuzz_parsed_samples_encode_or_raise_a_sample_error(fuzz_root: Path, processor, record) -> None:
    """What parses also encodes, or is a SampleError: text the tokenizer takes, images that open."""
    try:
        sample = record_to_sample(record, "r", fuzz_root, "r")
    except SampleError:
        return
    try:
        encoded = SampleEncoder(processor, max_length=512).encode_or_raise(sample)
    except SampleError as error:
        event(f"encoder refused: {error.reason}")  # --hypothesis-show-statistics: how far the draws reach
        assert str(error).startswith(f"sample {sample.id!r}")
        return
    event("encoded")
    assert encoded.num_images == len(sample.images)


def test_lone_surrogates_are_refused_by_name(processor, images: Path) -> None:
    """JSON's "\\ud800" escape gives a str the tokenizer fails on with a TypeError naming nothing."""
    samples, report = load_samples(write_json(images / "data.json", [
        {"id": "s", "conversations": [{"from": "human", "value": "hi \ud800"}, {"from": "gpt", "value": "x"}]}]),
        policy="skip")
    assert samples == [] and dict(report.counts) == {"unencodable_text": 1}
    assert "turn 0: expected text encodable as UTF-8, found a lone surrogate '\\ud800' at character 3" in report.examples[
        "unencodable_text"][0]
    built = Sample([{"role": "user", "content": "a\udfffb"}, {"role": "assistant", "content": "c"}], id="built")
    with pytest.raises(SampleError, match=r"sample 'built': messages\[0\]\.content: expected text encodable as "
                       r"UTF-8, found a lone surrogate '\\udfff' at character 1") as refused:
        SampleEncoder(processor).encode_or_raise(built)
    assert refused.value.reason == "unencodable_text"
