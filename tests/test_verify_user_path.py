"""`kopru convert --verify` on the user's path, per family and checkpoint layout (tests/vlm_checkpoints.py).

HF side: AutoProcessor + its chat template (BLIP-2, which ships none: "Question: ... Answer:") + the HF model's
greedy generate. Köprü side: the conversion reloaded from disk, format_chat + Köprü's processor + GenerationEngine.
Pictures are drawn, wide and tall.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from vlm_checkpoints import KINDS, LAYOUTS, checkpoint, hf_greedy_answer

from kopru.chat import ChatSession, load_engine
from kopru.cli import main
from kopru.convert.verify import QUESTION, answer_tokens, verification_picture
from kopru.generation import SamplingParams

# Llama-3.2-Vision's template puts <|image|> after the bos and the user header: those rows see no image, and a
# conversion reproduces what HF gives them (rows_without_image "attend_all", see kopru.convert.mllama).


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(kind, layout) -> (HF dir, Köprü dir, the CLI's JSON report, its exit code); built once per pair."""
    cache: dict[tuple[str, str], tuple[Path, Path, dict, int]] = {}

    def get(kind: str, layout: str):
        if (kind, layout) not in cache:
            root = tmp_path_factory.mktemp(f"{kind}-{layout}")
            src = checkpoint(kind, layout, root / "hf")
            out = io.StringIO()
            from contextlib import redirect_stdout

            with redirect_stdout(out):
                code = main(["convert", "--from", kind, str(src), str(root / "kopru"), "--verify", "--json"])
            cache[kind, layout] = (src, root / "kopru", json.loads(out.getvalue()), code)
        return cache[kind, layout]

    return get


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_verify_passes_on_the_users_path(converted, kind: str, layout: str) -> None:
    _, _, report, code = converted(kind, layout)
    user = report["user_path"]
    assert user["failure"] is None, user["failure"]
    assert code == 0 and user["passed"] is True
    assert [check["image_size"] for check in user["checks"]] == [[200, 120], [96, 160]]
    for check in user["checks"]:
        assert check["input_ids_equal"] and check["tokens_equal"] and len(check["hf_tokens"]) == 8
        assert check["max_pixel_diff"] <= 1e-4 and check["max_logit_diff"] <= 1e-4
    # The picture decides the answer (HF's own), so equal greedy tokens show that Köprü sees the same picture: a
    # conversion that ignored the image, or read it wrongly, would give both pictures one answer.
    wide, tall = (check["hf_tokens"] for check in user["checks"])
    assert wide != tall, f"HF answers both pictures with {wide}: the check could not see an ignored image"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_kopru_chat_prints_hfs_greedy_answer(converted, kind: str, layout: str) -> None:
    """ChatSession (kopru chat's code path) on two more aspect ratios answers what HF's processor + generate do,
    and HF's answers to the two pictures differ (the check would see an image ignored)."""
    src, dst, _, _ = converted(kind, layout)
    engine = load_engine(str(dst), device="cpu")
    answers = []
    for width, height in ((240, 100), (100, 240)):
        image = verification_picture(width, height)
        expected, ids = hf_greedy_answer(src, image, QUESTION)
        out = io.StringIO()
        session = ChatSession(engine, SamplingParams(max_new_tokens=8, temperature=0.0))
        answer = session.ask(QUESTION, [image], out)
        assert answer.strip() == expected.strip(), f"{width}x{height}"
        assert out.getvalue().strip() == expected.strip(), f"{width}x{height}"
        answers.append(ids)  # ids: a random model's tokens may decode to the same replacement characters
    assert answers[0] != answers[1], f"HF answers both pictures with {answers[0]}"


def test_verify_fails_naming_a_different_resample(converted, tmp_path: Path, capsys) -> None:
    """Tampering the converted model's image-processor settings: the reloaded conversion resizes differently."""
    from kopru.convert import load_reference
    from kopru.convert.verify import verify_user_path

    src, dst, _, _ = converted("llava", "transformers5")
    tampered = tmp_path / "tampered"
    shutil.copytree(dst, tampered)
    settings_file = tampered / "vision" / "preprocessor_config.json"
    settings = json.loads(settings_file.read_text())
    settings["resample"] = 0  # nearest instead of bicubic
    settings_file.write_text(json.dumps(settings))
    result = verify_user_path(load_reference("llava", str(src)), str(src), tampered, verification_picture())
    assert result.input_ids_equal and result.max_pixel_diff > 1e-2
    assert result.failure.startswith("pixel values differ by up to ")


def test_verify_fails_naming_a_different_template(converted, tmp_path: Path) -> None:
    from kopru.convert import load_reference
    from kopru.convert.verify import verify_user_path

    src, dst, _, _ = converted("llava", "transformers5")
    tampered = tmp_path / "tampered"
    shutil.copytree(dst, tampered)
    template_file = tampered / "llm" / "chat_template.jinja"
    template_file.write_text(template_file.read_text().replace("'ASSISTANT:'", "'ASSISTANT: '"))
    result = verify_user_path(load_reference("llava", str(src)), str(src), tampered, verification_picture())
    assert not result.input_ids_equal
    assert result.failure.startswith("input ids differ at position ")


def test_cli_exits_1_and_names_the_divergence(converted, tmp_path: Path, capsys, monkeypatch) -> None:
    """The CLI's exit code and stderr line, on a conversion whose saved template differs from the source's."""
    import kopru.convert.common as common

    src, _, _, _ = converted("llava", "transformers5")
    original = common.source_chat_template
    monkeypatch.setattr(common, "source_chat_template",
                        lambda path: (original(path)[0].replace("'ASSISTANT:'", "'ASSISTANT: '"), "x"))
    code = main(["convert", "--from", "llava", str(src), str(tmp_path / "kopru"), "--verify"])
    captured = capsys.readouterr()
    assert code == 1
    assert "verify failed: 200x120 image: input ids differ at position " in captured.err
    assert "input ids DIFFER" in captured.out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_blip2_puts_the_query_tokens_before_bos_as_hf(converted, layout: str) -> None:
    """The premise of BLIP-2's user's path: HF's Blip2Processor gives query tokens, then the tokenizer's bos, then
    "Question: ... Answer:"; the conversion's template (written by the converter) gives the same ids."""
    from transformers import AutoProcessor

    from kopru.generation import format_chat
    from kopru.model import KopruForConditionalGeneration

    src, dst, _, _ = converted("blip2", layout)
    image = verification_picture()
    hf = AutoProcessor.from_pretrained(src)
    expected = hf(images=[image], text=f"Question: {QUESTION} Answer:")["input_ids"][0]
    queries = hf.num_query_tokens
    assert expected[:queries] == [hf.tokenizer.convert_tokens_to_ids("<image>")] * queries
    assert expected[queries] == hf.tokenizer.bos_token_id
    _, processor = KopruForConditionalGeneration.from_pretrained(dst)
    prompt, images = format_chat(processor, [{"role": "user", "content": [{"type": "image", "image": image},
                                                                          {"type": "text", "text": QUESTION}]}])
    assert processor(prompt, [images], add_special_tokens=False)["input_ids"][0].tolist() == expected


def test_a_template_that_renders_no_image_is_named_by_convert_verify(converted, tmp_path: Path, capsys) -> None:
    """A source template that prints no image token: `kopru convert --verify` names the source and what was found."""
    src, _, _, _ = converted("llava", "transformers5")
    blind = tmp_path / "blind"
    shutil.copytree(src, blind)
    (blind / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ c['text'] }}{% endfor %}\n{% endfor %}")
    code = main(["convert", "--from", "llava", str(blind), str(tmp_path / "kopru"), "--verify"])
    err = capsys.readouterr().err
    assert code != 0
    assert f"HF's processor (AutoProcessor from {blind}) refuses the prompt the processor's chat template" in err
    assert "Found total 0 <image> tokens and 1 images" in err


def test_answers_are_compared_up_to_the_stop_token() -> None:
    """HF's generate keeps the token it stopped on, Köprü's engine does not count it in the answer: the answer is
    what comes before the first stop id (a stop id of either form, int or list)."""
    assert answer_tokens([5, 9, 1, 7], 1) == [5, 9]
    assert answer_tokens([5, 9, 2], [1, 2]) == [5, 9]
    assert answer_tokens([5, 9], [1, 2]) == [5, 9]  # ran to max_new_tokens
    assert answer_tokens([1], None) == [1]


def test_a_template_printing_the_bos_of_a_bos_adding_tokenizer_gets_one_bos(tmp_path: Path, capsys) -> None:
    """Llama 3's tokenizer adds the bos and Llama-3.2-Vision's template prints it: HF's chat path
    (apply_chat_template(tokenize=True)) adds no second one, and neither does the user's path here."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    src = checkpoint("mllama", "transformers5", tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
    tokenizer.save_pretrained(src)
    assert AutoTokenizer.from_pretrained(src)("a")["input_ids"][0] == tokenizer.bos_token_id
    assert main(["convert", "--from", "mllama", str(src), str(tmp_path / "kopru"), "--verify", "--json"]) == 0
    user = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["user_path"]
    assert user["passed"] and all(check["input_ids_equal"] for check in user["checks"])
