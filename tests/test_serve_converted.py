"""`kopru serve` on converted HF checkpoints answers what HF does (issue 12's last acceptance line).

For tiny LLaVA, LLaVA-NeXT, BLIP-2 and Mllama checkpoints in both layouts (tests/vlm_checkpoints.py): convert, serve the
conversion on localhost, ask "What is shown?" about non-square pictures through the official `openai` client (PNG
data URLs, temperature 0, max_tokens N), and compare with HF's AutoProcessor + chat template + greedy generate
with the same max_new_tokens and the same stop ids (the engine's: the source's eos ids and the template's
end-of-turn token), decoded with skip_special_tokens; the finish_reason must say whether HF stopped on a stop id.
BLIP-2 ships no chat template: HF is prompted as its model card prompts it, "Question: ... Answer:", and the
conversion's template (written by the converter) must give the same prompt. Streamed answers must join to the whole
answer. The random tiny models never pick a stop id within N tokens, so one more test gives a source an extra eos id
(a token greedy decoding picks) and checks that the server stops there.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoProcessor
from vlm_checkpoints import KINDS, LAYOUTS, checkpoint
from vlm_checkpoints import hf_greedy_answer as shared_hf_greedy_answer

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from conftest import RunningServer, data_url  # noqa: E402

from kopru.chat import ChatSession, load_engine  # noqa: E402
from kopru.convert import convert  # noqa: E402
from kopru.convert.verify import QUESTION, verification_picture  # noqa: E402
from kopru.generation import SamplingParams, format_chat  # noqa: E402
from kopru.serve import load_server  # noqa: E402

NEW_TOKENS = 8
SIZES = [(200, 120), (96, 160)]  # (width, height): wide and tall, neither a multiple of a tile size in use


def ask(client, model: str, image: Image.Image, stream: bool) -> tuple[str, str]:
    """(the answer's text, its finish_reason)."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                             {"type": "text", "text": QUESTION}]}]
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=NEW_TOKENS,
                                           stream=stream)
    if not stream:
        return reply.choices[0].message.content, reply.choices[0].finish_reason
    pieces, finish_reason = [], None
    for chunk in reply:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish_reason = chunk.choices[0].finish_reason
    return "".join(pieces), finish_reason


def hf_greedy_answer(src: Path, image: Image.Image, eos_ids: list[int]) -> tuple[str, list[int]]:
    """HF's answer stopping where the served engine stops (`eos_ids`), which must include HF's own eos ids."""
    from transformers import GenerationConfig

    own = GenerationConfig.from_pretrained(src).eos_token_id
    own = [] if own is None else [own] if isinstance(own, int) else list(own)
    assert set(own) <= set(eos_ids), f"Köprü stops on {eos_ids}, HF on {own}"
    return shared_hf_greedy_answer(src, image, QUESTION, NEW_TOKENS, eos_ids)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(kind, layout) -> (HF dir, Köprü dir, running server, the engine's stop ids); one server per model."""
    cache: dict[tuple[str, str], tuple[Path, Path, RunningServer, list[int]]] = {}

    def get(kind: str, layout: str):
        if (kind, layout) not in cache:
            root = tmp_path_factory.mktemp(f"{kind}-{layout}")
            src = checkpoint(kind, layout, root / "hf")
            convert(kind, src, root / "kopru")
            server = RunningServer(load_server(root / "kopru", model_name=kind, device="cpu"))
            eos_ids = list(server.app.state.kopru.worker.engine.eos_ids)
            cache[kind, layout] = (src, root / "kopru", server, eos_ids)
        return cache[kind, layout]

    yield get
    for _, _, server, _ in cache.values():
        server.stop()


def client_for(server: RunningServer):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


# The older hub layout is served only in the full run: test_verify_user_path loads it for every family quickly.
@pytest.mark.parametrize("layout", [pytest.param(layout, marks=pytest.mark.slow) if layout == "hub4" else layout
                                    for layout in LAYOUTS])
@pytest.mark.parametrize("kind", KINDS)
def test_serve_answers_hfs_greedy_answer(served, kind: str, layout: str) -> None:
    src, _, server, eos_ids = served(kind, layout)
    client = client_for(server)
    for width, height in SIZES:
        image = verification_picture(width, height)
        expected, ids = hf_greedy_answer(src, image, eos_ids)
        whole = ask(client, kind, image, stream=False)
        # HF stopped early only on a stop id: the server says "stop" then, "length" when max_tokens ran out.
        finish_reason = "stop" if len(ids) < NEW_TOKENS or ids[-1] in eos_ids else "length"
        assert whole == (expected, finish_reason), f"{width}x{height}: HF generated {ids}"
        assert ask(client, kind, image, stream=True) == whole, f"{width}x{height}: streamed"


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_serve_stops_where_hf_stops(served, tmp_path: Path, kind: str) -> None:
    """A source whose generation_config also ends on the third token greedy decoding picks: the conversion
    carries that eos id, and the server stops where HF's generate stops ("stop", the eos itself not shown).

    The tiny tokenizer's only special tokens are ones a random model never picks, so the stop id is an ordinary
    token here: HF's text is its tokens before the stop id (what skip_special_tokens leaves of a real eos)."""
    src, _, _, eos_ids = served(kind, "transformers5")
    image = verification_picture(*SIZES[0])
    _, ids = hf_greedy_answer(src, image, eos_ids)
    stop_id = ids[2]
    assert stop_id not in ids[:2] and stop_id not in eos_ids, "pick another position"
    source = tmp_path / "hf"
    shutil.copytree(src, source)
    config_file = source / "generation_config.json"
    config = json.loads(config_file.read_text())
    own = config.get("eos_token_id")
    config["eos_token_id"] = [*([] if own is None else [own] if isinstance(own, int) else own), stop_id]
    config_file.write_text(json.dumps(config))
    convert(kind, source, tmp_path / "kopru")
    server = RunningServer(load_server(tmp_path / "kopru", model_name=kind, device="cpu"))
    try:
        engine_eos = list(server.app.state.kopru.worker.engine.eos_ids)
        assert stop_id in engine_eos
        _, stopped = hf_greedy_answer(source, image, engine_eos)
        assert stopped == ids[:3]  # HF's generate ended on the stop id
        expected = AutoProcessor.from_pretrained(source).decode(stopped[:-1], skip_special_tokens=True)
        client = client_for(server)
        assert ask(client, kind, image, stream=False) == (expected, "stop")
        assert ask(client, kind, image, stream=True) == (expected, "stop")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def end_of_turn(tmp_path_factory):
    """A converted tiny LLaVA with Llama-3's `<|eot_id|>` (vlm_checkpoints.build_end_of_turn_llava), HF's greedy
    answer for the first picture, stopping on its own generation_config's eos ids, and the conversion's server."""
    from vlm_checkpoints import build_end_of_turn_llava

    root = tmp_path_factory.mktemp("end-of-turn")
    image = verification_picture(*SIZES[0])
    src, end_of_turn_id = build_end_of_turn_llava(root / "hf", QUESTION, image)
    text, ids = shared_hf_greedy_answer(src, image, QUESTION, NEW_TOKENS)  # the checkpoint's own eos ids
    assert ids[-1] == end_of_turn_id and len(ids) < NEW_TOKENS, f"HF's generate did not stop on <|eot_id|>: {ids}"
    convert("llava", src, root / "kopru")
    server = RunningServer(load_server(root / "kopru", model_name="llama3-llava", device="cpu"))
    yield root / "kopru", image, text, ids, server
    server.stop()


def test_kopru_chat_stops_on_the_templates_end_of_turn_token_where_hf_stops(end_of_turn) -> None:
    """`kopru chat`'s code path ends the answer on the added special token `<|eot_id|>` exactly where HF's generate
    does: the same ids before it, the same text (the token itself not shown)."""
    dst, image, expected_text, expected_ids, _ = end_of_turn
    engine = load_engine(str(dst), device="cpu")
    assert expected_ids[-1] in engine.eos_ids
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    prompt, images = format_chat(engine.processor, messages)
    [completion] = engine.complete([prompt], [images], SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0))
    assert completion.token_ids + [expected_ids[-1]] == expected_ids  # Köprü's ids leave the stop id out
    assert completion.finish_reason == "stop"
    out = io.StringIO()
    answer = ChatSession(engine, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)).ask(QUESTION, [image], out)
    assert answer == expected_text and out.getvalue() == expected_text + "\n"


def test_kopru_serve_stops_on_the_templates_end_of_turn_token_where_hf_stops(end_of_turn) -> None:
    _, image, expected_text, _, server = end_of_turn
    client = client_for(server)
    assert ask(client, "llama3-llava", image, stream=False) == (expected_text, "stop")
    assert ask(client, "llama3-llava", image, stream=True) == (expected_text, "stop")
