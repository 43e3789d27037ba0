"""`kopru chat` on a tiny saved model: one-shot and interactive answers equal the engine's for the same rendered
conversation; bad images and over-long prompts give a clear message and no traceback."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from kopru.chat import read_image
from kopru.cli import main
from kopru.generation import GenerationEngine, SamplingParams, format_chat
from kopru.model import KopruForConditionalGeneration


@pytest.fixture(scope="module")
def saved(build, tmp_path_factory, make_image):
    model, processor = build("cross_attention")
    with torch.no_grad():
        for block in model.connector.blocks:  # open the gates, so the images change the answers
            block.attn_gate.fill_(1.0)
            block.mlp_gate.fill_(1.0)
    root = tmp_path_factory.mktemp("chat")
    model.save_pretrained(root / "model", processor)
    for seed in (0, 1):
        make_image(seed).save(root / f"image{seed}.png")
    (root / "broken.png").write_bytes(b"not an image at all")
    whole = io.BytesIO()
    make_image(2).save(whole, format="PNG")
    (root / "bad.png").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])  # a PNG cut in half
    loaded, loaded_processor = KopruForConditionalGeneration.from_pretrained(root / "model")
    return root, GenerationEngine(loaded, loaded_processor)


def expected_answer(engine: GenerationEngine, messages: list[dict], images: list, tokens: int) -> str:
    prompt, _ = format_chat(engine.processor, messages)
    return engine.complete([prompt], [images], SamplingParams(max_new_tokens=tokens))[0].text


def test_one_shot_streams_the_engine_answer(saved, capsys) -> None:
    root, engine = saved
    code = main(["chat", "--model", str(root / "model"), "--image", str(root / "image0.png"), "--max-new-tokens", "6",
                 "ne görüyorsun?"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    image = read_image(str(root / "image0.png"))
    expected = expected_answer(engine, [{"role": "user", "content": "<image>\nne görüyorsun?"}], [image], 6)
    assert captured.out == expected + "\n"


def test_interactive_conversation_keeps_history_and_images(saved, monkeypatch, capsys) -> None:
    root, engine = saved
    lines = [f"/image {root / 'image0.png'}", f"/image {root / 'image1.png'}", "iki resim?",
             f"/image {root / 'broken.png'}", "/nonsense", "peki şimdi?", "/quit", "never read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    code = main(["chat", "--model", str(root / "model"), "--max-new-tokens", "5"])
    captured = capsys.readouterr()
    assert code == 0
    first_images = [read_image(str(root / "image0.png")), read_image(str(root / "image1.png"))]
    first_turn = {"role": "user", "content": "<image>\n<image>\niki resim?"}
    first = expected_answer(engine, [first_turn], first_images, 5)
    second = expected_answer(engine, [first_turn, {"role": "assistant", "content": first},
                                      {"role": "user", "content": "peki şimdi?"}], first_images, 5)
    assert captured.out == f"{first}\n{second}\n"
    assert f"error: {root / 'broken.png'}: expected an image Pillow can read" in captured.err
    assert "unknown command '/nonsense'" in captured.err
    assert "Traceback" not in captured.err


def test_unreadable_image_is_a_clear_error_without_traceback(saved, capsys) -> None:
    root, _ = saved
    cases = {
        "broken.png": ": expected an image Pillow can read (PNG, JPEG, WebP, ...), found data it does not recognise",
        "bad.png": ": expected complete image data, found it truncated or corrupt",
        "missing.png": "found nothing",
    }
    for name, message in cases.items():
        path = root / name
        assert main(["chat", "--model", str(root / "model"), "--image", str(path), "hi"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kopru chat: error: "), err
        assert message in err and str(path) in err, err
        assert "Traceback" not in err and " object at 0x" not in err


@pytest.mark.slow
def test_the_installed_entry_point_exits_2_with_the_message_alone(saved) -> None:
    """The same refusal through `python -m kopru.cli` in a fresh process: exit status 2, no traceback."""
    root, _ = saved
    path = root / "broken.png"
    result = subprocess.run(
        [sys.executable, "-m", "kopru.cli", "chat", "--model", str(root / "model"), "--image", str(path), "hi"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("kopru chat: error: "), result.stderr
    assert "expected an image Pillow can read" in result.stderr and str(path) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and " object at 0x" not in result.stderr


def test_prompt_beyond_the_context_is_a_clear_error(saved, capsys) -> None:
    root, engine = saved
    code = main(["chat", "--model", str(root / "model"), "--max-seq-len", "8", "--image", str(root / "image0.png"),
                 "bu resimde kaç tane kırmızı daire var, anlatır mısın?"])
    captured = capsys.readouterr()
    assert code == 2
    assert "context window is 8" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_bad_sampling_flag_is_refused(saved, capsys) -> None:
    root, _ = saved
    assert main(["chat", "--model", str(root / "model"), "--top-p", "0", "hi"]) == 2
    assert "0 < top_p <= 1" in capsys.readouterr().err
