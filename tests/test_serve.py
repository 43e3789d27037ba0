"""`kopru serve` against the official `openai` client: a real tiny model behind a real server on localhost.

The expected answers come from `GenerationEngine.complete` on the same model, called directly (no HTTP);
the server must reproduce them streamed and not streamed, alone and batched with other requests.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import http.client
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from conftest import RunningServer, data_url, drawn_image, free_port, png_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from kopru import (  # noqa: E402
    KopruConfig,
    serve,  # noqa: E402
)
from kopru.cli import build_parser  # noqa: E402
from kopru.generation import SamplingParams, format_chat  # noqa: E402
from kopru.lesson.tiny import save_tiny_served_model  # noqa: E402
from kopru.serve import (  # noqa: E402
    APIError,
    Budget,
    ServerLimits,
    ServerSecurity,
    create_app,
    decode_image,
    decode_json_body,
    load_server,
    parse_chat_request,
    read_image_url,
    served_model_name,
)

MODEL_NAME = "tiny-kopru"
# Small limits, so that each bad-input case is cheap to build; no batch window, so that a request sent alone
# is generated at once instead of waiting for companions that never come.
LIMITS = ServerLimits(max_image_bytes=150_000, max_image_pixels=256 * 256, max_images_per_request=2,
                      max_new_tokens=1024, default_new_tokens=16, max_request_bytes=1_000_000, max_batch_size=4,
                      batch_window_ms=0)
# The tests of batching itself: a wide window, so that requests sent together on a busy 2-core machine still
# arrive within it.
BATCHING = dataclasses.replace(LIMITS, batch_window_ms=300)



def user_message(question: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


QUESTIONS = ["What is in the picture?", "What colour is the shape?", "Where is the shape?", "How many shapes?"]


def http_request(url: str, method: str = "GET", body: bytes | None = None, timeout: float = 60,
                 headers: dict[str, str] | None = None) -> tuple[int, str]:
    """(status, body text) from a plain HTTP/1.1 request (the standard library's client: no extra dependency).
    A body is sent as JSON unless `headers` say otherwise."""
    location = urlsplit(url)
    connection = http.client.HTTPConnection(location.hostname, location.port, timeout=timeout)
    try:
        sent = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, location.path, body=body, headers={**sent, **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def get_json(url: str) -> dict:
    status, text = http_request(url)
    assert status == 200, f"GET {url}: {status} {text[:200]}"
    return json.loads(text)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Köprü model, saved (`kopru.lesson.tiny.save_tiny_served_model`: the shipped pretrained tiny vision encoder,
    a random projection connector and a random tiny Llama, whose answers run long enough to be streamed in many
    pieces and cut off mid-stream; the shipped pretrained LLM answers in one to three tokens)."""
    return save_tiny_served_model(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("allowed")
    drawn_image(1).save(root / "shape.png")
    return root


@pytest.fixture(scope="module")
def server(model_dir: Path, local_dir: Path):
    app = load_server(model_dir, model_name=MODEL_NAME, limits=LIMITS, allow_local_dir=local_dir)
    running = RunningServer(app)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def engine(server: RunningServer):
    return server.app.state.kopru.worker.engine


@pytest.fixture(scope="module")
def client(server: RunningServer):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


class SideServer(RunningServer):
    """Another app on the module's engine (the module's own server is idle meanwhile), for tests that need
    other limits or security settings, or that break the worker on purpose."""

    def __init__(self, engine, limits: ServerLimits = LIMITS, security: ServerSecurity | None = None) -> None:
        super().__init__(create_app(engine, MODEL_NAME, limits, **({} if security is None else {"security": security})))
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def batching(engine) -> SideServer:
    """A server on the module's engine with the wide batch window (BATCHING), for the tests of batching."""
    side = SideServer(engine, BATCHING)
    yield side
    side.stop()


def expected(engine, messages: list[dict], max_tokens: int, **sampling):
    """What the engine itself answers (greedy unless `sampling` says otherwise), with no server in between."""
    decoded = parse_chat_request({"model": MODEL_NAME, "messages": messages}, MODEL_NAME, LIMITS, None).messages
    prompt, images = format_chat(engine.processor, decoded)
    params = SamplingParams(max_new_tokens=max_tokens, **{"temperature": 0.0, **sampling})
    return engine.complete([prompt], [images], params)[0]


def metrics(server: RunningServer) -> dict:
    return get_json(server.url + "/metrics")


def test_models_health_and_page(server: RunningServer, client) -> None:
    assert [model.id for model in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    assert get_json(server.url + "/health")["status"] == "ok"
    status, page = http_request(server.url + "/")
    assert status == 200 and 'id="answer"' in page


def test_served_model_name_rules(tmp_path: Path) -> None:
    assert served_model_name(tmp_path / "my-vlm") == "my-vlm"
    for stage in ("final", "latest", "checkpoint-300"):  # a stage of a run: the run's name
        assert served_model_name(tmp_path / "runs" / "my-vlm" / stage) == "my-vlm", stage
        assert served_model_name(tmp_path / "runs" / "my-vlm" / stage, "stored") == "stored", stage
    assert served_model_name(tmp_path / "finale", "stored") == "finale"  # a folder's own name comes first
    parser = build_parser()
    for flag in ("--served-model-name", "--model-name"):  # vLLM's name, and the older one
        assert parser.parse_args(["serve", "--model", "m", flag, "vlm-x"]).served_model_name == "vlm-x"


def test_a_trained_model_is_served_under_its_run_name(model_dir: Path, tmp_path: Path) -> None:
    """kopru train saves runs/NAME/final: that model is offered (GET /v1/models) and answers as NAME, not
    "final"; the name stored in its config wins over the folder it was moved to."""
    final = tmp_path / "runs" / "my-vlm" / "final"
    shutil.copytree(model_dir, final)
    moved = tmp_path / "elsewhere" / "final"
    shutil.copytree(model_dir, moved)
    config = KopruConfig.load(moved / "kopru_config.json")
    config.name = "stored-name"
    config.save(moved / "kopru_config.json")
    for path, name in ((final, "my-vlm"), (moved, "stored-name")):
        served = RunningServer(load_server(path, limits=LIMITS))
        try:
            client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            assert [model.id for model in client.models.list().data] == [name]
            reply = client.chat.completions.create(model=name, messages=user_message("hi", data_url(drawn_image(0))),
                                                   max_tokens=2, temperature=0)
            assert reply.model == name and reply.choices[0].message.content is not None
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model="final", messages=user_message("hi"), max_tokens=2)
        finally:
            served.stop()


def test_streamed_equals_whole_equals_engine(server: RunningServer, client, engine) -> None:
    messages = user_message(QUESTIONS[0], data_url(drawn_image(0)))
    reference = expected(engine, messages, max_tokens=24)
    assert reference.completion_tokens > 0

    whole = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0)
    assert whole.choices[0].message.content == reference.text
    assert whole.choices[0].finish_reason == reference.finish_reason
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (reference.prompt_tokens,
                                                                          reference.completion_tokens)
    assert whole.usage.total_tokens == reference.prompt_tokens + reference.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == reference.text
    assert sum(1 for d in deltas if d) >= 2, "expected the answer in several pieces, found one"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reference.finish_reason
    assert chunks[-1].usage.completion_tokens == reference.completion_tokens
    assert chunks[-1].usage.prompt_tokens == reference.prompt_tokens


def test_sampling_settings_reach_the_engine(server: RunningServer, client, engine) -> None:
    """A seed makes sampling repeatable, and a stop string ends the answer before it (not included)."""
    messages = user_message(QUESTIONS[1], data_url(drawn_image(1)))
    sampled = expected(engine, messages, max_tokens=16, temperature=1.0, top_k=20, seed=7)
    greedy = expected(engine, messages, max_tokens=16).text
    assert sampled.text != greedy, "the sampled answer should differ from the greedy one"
    for _ in range(2):
        reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=1.0,
                                               seed=7, extra_body={"top_k": 20})
        assert reply.choices[0].message.content == sampled.text

    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 2]
    cut = expected(engine, messages, max_tokens=16, stop=[stop])
    assert cut.finish_reason == "stop" and stop not in cut.text and greedy.startswith(cut.text)
    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=0,
                                           stop=stop)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (cut.text, "stop")


def test_concurrent_requests_are_batched_and_answered_correctly(batching: SideServer, engine) -> None:
    client = batching.client
    requests = [user_message(QUESTIONS[i], data_url(drawn_image(i))) for i in range(4)]
    references = [expected(engine, messages, max_tokens=20).text for messages in requests]
    assert len(set(references)) > 1, "the four requests must differ, or a mix-up could not be seen"
    before = metrics(batching)

    def ask(index: int) -> str:
        if index % 2:  # half streamed, half not: both kinds share a batch
            stream = client.chat.completions.create(model=MODEL_NAME, messages=requests[index], max_tokens=20,
                                                    temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        reply = client.chat.completions.create(model=MODEL_NAME, messages=requests[index], max_tokens=20,
                                               temperature=0)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert answers == references
    after = metrics(batching)
    new_batches = {int(size): count - before["batch_sizes"].get(size, 0) for size, count in after["batch_sizes"].items()}
    assert sum(size * count for size, count in new_batches.items()) == 4
    assert max(size for size, count in new_batches.items() if count) >= 2, f"no batching: {new_batches}"


def test_batch_never_shortens_an_answer(batching: SideServer, engine) -> None:
    """A long prompt and a request for many new tokens do not share a batch when the batch, padded to the long
    prompt, would leave the other too little room: each gets the answer it gets alone."""
    client = batching.client
    short = user_message(QUESTIONS[3], data_url(drawn_image(3)))
    wanted = expected(engine, short, max_tokens=200)
    assert (wanted.finish_reason, wanted.completion_tokens) == ("length", 200)
    long = user_message("red circle " * 330)
    prompt, images = format_chat(engine.processor, parse_chat_request(
        {"model": MODEL_NAME, "messages": long}, MODEL_NAME, LIMITS, None).messages)
    assert engine.context_window - 200 < engine.count_prompt_tokens(prompt, images) < engine.context_window - 8
    long_reply = expected(engine, long, max_tokens=8).text
    before = metrics(batching)

    def ask(messages: list[dict], max_tokens: int) -> str:
        reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                               temperature=0)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(ask, [short, long], [200, 8]))
    assert answers == [wanted.text, long_reply]
    after = metrics(batching)
    assert after["batches"] - before["batches"] == 2


def test_local_file_under_allowed_dir(server: RunningServer, client, engine, local_dir: Path) -> None:
    reference = expected(engine, user_message(QUESTIONS[1], data_url(drawn_image(1))), max_tokens=12).text
    for url in (str(local_dir / "shape.png"), (local_dir / "shape.png").as_uri()):
        reply = client.chat.completions.create(model=MODEL_NAME, messages=user_message(QUESTIONS[1], url),
                                               max_tokens=12, temperature=0)
        assert reply.choices[0].message.content == reference


def test_local_files_refused_by_default(local_dir: Path) -> None:
    body = {"model": MODEL_NAME, "messages": user_message("hi", str(local_dir / "shape.png"))}
    with pytest.raises(APIError) as caught:
        parse_chat_request(body, MODEL_NAME, LIMITS, allow_local_dir=None)
    assert caught.value.status == 400 and caught.value.code == "local_files_refused"
    assert "--allow-local-dir" in caught.value.message


def _encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def test_decode_image_formats_and_refusals() -> None:
    """Any Pillow format and mode comes out RGB at its own size; broken or oversize input is refused with 400."""
    base = drawn_image(1, size=48)
    frames = [base, drawn_image(2, size=48)]
    cases = {
        "RGBA PNG": _encoded(base.convert("RGBA"), "PNG"),
        "palette PNG": _encoded(base.convert("P"), "PNG", transparency=0),
        "CMYK JPEG": _encoded(base.convert("CMYK"), "JPEG"),
        "greyscale WebP": _encoded(base.convert("L"), "WEBP"),
        "animated GIF (first frame)": _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
    }
    for name, data in cases.items():
        image = decode_image(data, LIMITS, name)
        assert (image.mode, image.size) == ("RGB", (48, 48)), name

    png = _encoded(base, "PNG")
    with pytest.raises(APIError) as caught:
        decode_image(png[: len(png) // 2], LIMITS, "messages[0].content[0]")
    assert (caught.value.status, caught.value.code) == (400, "invalid_image")
    assert caught.value.message.startswith("messages[0].content[0]: expected complete image data, found it "
                                           "truncated or corrupt")

    # 8000 x 8000 black pixels compress to 8 KB; the header alone refuses them, nothing is decoded.
    huge = _encoded(Image.new("1", (8000, 8000)), "PNG")
    start = time.perf_counter()
    with pytest.raises(APIError) as caught:
        decode_image(huge, dataclasses.replace(LIMITS, max_image_bytes=len(huge)), "big")
    assert caught.value.code == "image_too_large" and "8000x8000" in caught.value.message
    assert time.perf_counter() - start < 1.0


def _noise_png(size: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return png_bytes(Image.fromarray(pixels))


def _bad_requests(local_dir: Path) -> dict[str, tuple[bytes | dict, int, str | None, str | None]]:
    """name -> (body, HTTP status, error code, error param)"""
    image = data_url(drawn_image(2))
    ok = {"model": MODEL_NAME, "max_tokens": 4}
    outside = local_dir.parent / "outside.png"
    drawn_image(3).save(outside)
    (local_dir / "escape.png").unlink(missing_ok=True)
    (local_dir / "escape.png").symlink_to(outside)
    assert len(_noise_png(256)) > LIMITS.max_image_bytes
    return {
        "malformed JSON": (b'{"model": "tiny-kopru", "messages": [', 400, "invalid_json", None),
        "not an object": (b"[1, 2]", 400, "invalid_json", None),
        "missing model": ({"messages": user_message("hi")}, 400, "missing_required_parameter", "model"),
        "missing messages": ({"model": MODEL_NAME}, 400, "missing_required_parameter", "messages"),
        "empty messages": ({**ok, "messages": []}, 400, "invalid_value", "messages"),
        "unknown model": ({"model": "gpt-4o", "messages": user_message("hi")}, 404, "model_not_found", "model"),
        "unknown role": ({**ok, "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value",
                         "messages[0].role"),
        "data URL not an image": ({**ok, "messages": user_message(
            "hi", "data:image/png;base64," + base64.b64encode(b"this is not a picture").decode())},
            400, "invalid_image", "messages[0].content[0].image_url"),
        "data URL not base64": ({**ok, "messages": user_message("hi", "data:image/png;base64,@@@@")}, 400,
                                "invalid_image_url", "messages[0].content[0].image_url"),
        "remote URL": ({**ok, "messages": user_message("hi", "https://example.com/cat.png")}, 400,
                       "invalid_image_url", "messages[0].content[0].image_url"),
        "image too many bytes": ({**ok, "messages": user_message(
            "hi", "data:image/png;base64," + base64.b64encode(_noise_png(256)).decode())}, 400, "image_too_large",
            "messages[0].content[0].image_url"),
        "image too many pixels": ({**ok, "messages": user_message("hi", data_url(Image.new("RGB", (300, 300))))},
                                  400, "image_too_large", "messages[0].content[0].image_url"),
        "too many images": ({**ok, "messages": user_message("hi", image, image, image)}, 400, "too_many_images",
                            "messages"),
        "file outside the allowed dir": ({**ok, "messages": user_message("hi", str(outside))}, 400,
                                         "local_files_refused", "messages[0].content[0].image_url"),
        "symlink out of the allowed dir": ({**ok, "messages": user_message("hi", str(local_dir / "escape.png"))},
                                           400, "local_files_refused", "messages[0].content[0].image_url"),
        "prompt beyond the context window": ({**ok, "messages": user_message("red circle " * 1200, image)}, 400,
                                             "context_length_exceeded", "messages"),
        "image placeholder typed as text": ({**ok, "messages": user_message("what is <image> here?")}, 400,
                                            "invalid_value", "messages[0].content[0].text"),
        "max_tokens above the limit": ({**ok, "max_tokens": LIMITS.max_new_tokens + 1,
                                        "messages": user_message("hi")}, 400, "invalid_value", "max_tokens"),
        "temperature not a number": ({**ok, "temperature": "hot", "messages": user_message("hi")}, 400,
                                     "invalid_type", "temperature"),
        "n above 1": ({**ok, "n": 2, "messages": user_message("hi")}, 400, "invalid_value", "n"),
        "body too large": (b'{"pad": "' + b"x" * LIMITS.max_request_bytes + b'"}', 413, "request_too_large", None),
    }


def test_bad_input_gets_openai_error_and_server_goes_on(server: RunningServer, client, engine,
                                                        local_dir: Path) -> None:
    for name, (body, status, code, param) in _bad_requests(local_dir).items():
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, text = http_request(server.url + "/v1/chat/completions", "POST", content)
        assert got == status, f"{name}: {got} {text[:300]}"
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert (error["code"], error["param"]) == (code, param), f"{name}: {error}"
        assert error["type"] == "invalid_request_error" and error["message"], name
        assert " object at 0x" not in error["message"], f"{name}: {error['message']}"

    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        got, text = http_request(server.url + path, method)
        assert got == status and json.loads(text)["error"]["message"], (path, got, text)

    # The official client turns these bodies into its typed errors.
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=user_message("hi"))
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_NAME, messages=user_message("red circle " * 1200))
    assert caught.value.code == "context_length_exceeded"

    # ... and the server still answers, correctly.
    messages = user_message(QUESTIONS[2], data_url(drawn_image(2)))
    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected(engine, messages, max_tokens=12).text
    assert metrics(server)["active_requests"] == 0
    assert metrics(server)["image_pixels_held"] == 0, "a refused request kept its images' pixels reserved"


def test_bad_image_is_named_by_its_place_in_the_request(server: RunningServer, client) -> None:
    """Images are counted from 1 across all of the request's messages; the message names the bad one that way
    (and its JSON path), never the in-memory stream Pillow read it from."""
    png = png_bytes(drawn_image(1))
    bad_images = {
        "truncated PNG": (png[: len(png) // 2], "expected complete image data, found it truncated or corrupt"),
        "not an image": (b"this is not a picture", "expected an image Pillow can read (PNG, JPEG, WebP, ...)"),
        # Pillow's PPM reader raises a bare ValueError ("invalid literal for int()") for a damaged header
        "damaged PPM header": (b"P6\n4M 4\n255\n" + bytes(48), "expected a complete image header, found it "
                               "truncated or corrupt"),
    }
    for case, (data, expected) in bad_images.items():
        bad = "data:image/png;base64," + base64.b64encode(data).decode()
        messages = [*user_message("first", data_url(drawn_image(0))), {"role": "assistant", "content": "ok"},
                    *user_message("second", bad)]
        status, text = http_request(server.url + "/v1/chat/completions", "POST", json.dumps(
            {"model": MODEL_NAME, "messages": messages, "max_tokens": 4}).encode())
        error = json.loads(text)["error"]
        assert (status, error["code"]) == (400, "invalid_image"), (case, text)
        field = "messages[2].content[0].image_url"  # the field, as the error's param names it too
        assert error["message"].startswith(f"image 2 of the request ({field}): {expected}"), (case, error["message"])
        assert error["param"] == field, (case, error)
        assert "0x" not in error["message"], (case, error["message"])
        with pytest.raises(openai.BadRequestError) as caught:  # the official client shows the same message
            client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4, stream=True)
        assert "image 2 of the request" in str(caught.value) and "0x" not in str(caught.value), case


def test_client_disconnect_mid_stream(server: RunningServer, client, engine) -> None:
    again = user_message(QUESTIONS[0], data_url(drawn_image(0)))
    reference = expected(engine, again, max_tokens=12).text  # computed while the worker is idle
    messages = user_message(QUESTIONS[3], data_url(drawn_image(3)))
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": LIMITS.max_new_tokens, "temperature": 0,
            "stream": True}
    before = metrics(server)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    contents = 0
    while contents < 2:
        line = response.readline().decode()
        assert line, "the stream ended before two pieces of the answer came"
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            contents += 1
    connection.sock.shutdown(socket.SHUT_RDWR)  # leave mid-answer
    connection.close()
    deadline = time.monotonic() + 30
    while metrics(server)["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metrics(server)["active_requests"] == 0, "the abandoned request still holds its slot"
    while metrics(server)["requests_cancelled"] == before["requests_cancelled"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = metrics(server)
    assert after["requests_cancelled"] == before["requests_cancelled"] + 1, "the generation was not stopped"
    assert after["requests_done"] == before["requests_done"]

    reply = client.chat.completions.create(model=MODEL_NAME, messages=again, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == reference


def test_client_disconnect_while_waiting_for_a_whole_answer(server: RunningServer) -> None:
    before = metrics(server)
    body = {"model": MODEL_NAME, "messages": user_message(QUESTIONS[2], data_url(drawn_image(2))),
            "max_tokens": LIMITS.max_new_tokens, "temperature": 0}
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 30
    while metrics(server)["batches"] == before["batches"]:  # until its generation has begun
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.02)
    connection.sock.shutdown(socket.SHUT_RDWR)  # gone before the answer is complete
    connection.close()
    while metrics(server)["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metrics(server)["active_requests"] == 0
    # The worker counts the cancellation once it has stopped the generation, a moment after the slot is freed.
    while metrics(server)["requests_cancelled"] == before["requests_cancelled"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = metrics(server)
    assert (after["requests_cancelled"], after["requests_done"]) == (before["requests_cancelled"] + 1,
                                                                     before["requests_done"])


def test_engine_failure_answers_500_to_its_batch_only(server: RunningServer, client, engine,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    messages = user_message(QUESTIONS[0], data_url(drawn_image(0)))
    reference = expected(engine, messages, max_tokens=8).text
    real_stream = engine._stream
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated device failure")
        return real_stream(*args, **kwargs)

    monkeypatch.setattr(engine, "_stream", failing_once)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0)
    assert caught.value.code == "engine_error" and "simulated device failure" in caught.value.message
    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == reference


def test_busy_server_answers_429(engine) -> None:
    """With room for one request, a second one gets 429 while the first streams; once the first has left (its
    client gone mid-answer: no need to wait for its 256 tokens), the server serves again."""
    busy = SideServer(engine, ServerLimits(max_queued_requests=1, max_new_tokens=256))
    try:
        body = {"model": MODEL_NAME, "messages": user_message(QUESTIONS[0]), "max_tokens": 256, "temperature": 0}
        connection = http.client.HTTPConnection("127.0.0.1", busy.port, timeout=60)
        connection.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}).encode(),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: {")
        status, text = http_request(busy.url + "/v1/chat/completions", "POST", json.dumps(body).encode())
        assert status == 429, text
        assert json.loads(text)["error"]["type"] == "rate_limit_error"
        assert json.loads(text)["error"]["code"] == "server_busy"
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        deadline = time.monotonic() + 30
        while metrics(busy)["active_requests"]:
            assert time.monotonic() < deadline, "the abandoned request still holds the only slot"
            time.sleep(0.02)
        status, text = http_request(busy.url + "/v1/chat/completions", "POST",
                                    json.dumps({**body, "max_tokens": 4}).encode())
        assert status == 200, text
    finally:
        busy.stop()


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_images_per_request must be positive, found 0"):
        ServerLimits(max_images_per_request=0)
    with pytest.raises(ValueError, match="default_new_tokens"):
        ServerLimits(max_new_tokens=8, default_new_tokens=16)


@pytest.mark.slow
def test_cli_serve_subcommand(model_dir: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    process = subprocess.Popen(
        [sys.executable, "-m", "kopru.cli", "serve", "--model", str(model_dir), "--port", str(port),
         "--max-images-per-request", "3", "--served-model-name", "vlm-x", "--threads", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                health = get_json(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"kopru serve did not come up: {process.stdout.read()}") from None
                time.sleep(0.2)
        assert health == {"status": "ok", "model": "vlm-x"}
        assert [card["id"] for card in get_json(f"http://127.0.0.1:{port}/v1/models")["data"]] == ["vlm-x"]
        image = data_url(drawn_image(0))
        status, text = http_request(f"http://127.0.0.1:{port}/v1/chat/completions", "POST", json.dumps({
            "model": "vlm-x", "messages": user_message("hi", image, image, image, image)}).encode())
        assert status == 400 and "the limit is 3 per request" in json.loads(text)["error"]["message"]
    finally:
        process.terminate()
        process.wait(timeout=30)


# ==================================================================================== issue 13: hostile clients
# Each numbered defect of issue 13 has a test below that failed on the code before the fix.


def http_exchange(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None,
                  timeout: float = 30) -> tuple[int, dict[str, str], str]:
    """(status, headers with lower-case names, body text)."""
    location = urlsplit(url)
    connection = http.client.HTTPConnection(location.hostname, location.port, timeout=timeout)
    try:
        connection.request(method, location.path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
    finally:
        connection.close()


def post_chat(url: str, body: dict | bytes, headers: dict[str, str] | None = None,
              timeout: float = 30) -> tuple[int, dict]:
    """POST a chat request (a dict as JSON, or raw bytes) and return (status, the JSON answer)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, text = http_request(url + "/v1/chat/completions", "POST", data, timeout=timeout, headers=headers)
    return status, json.loads(text)


def ask_or_error(client, messages: list[dict], max_tokens: int = 8) -> str | tuple[int, str]:
    """The answer's text, or (HTTP status, error code) when the server refuses."""
    try:
        reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                               temperature=0)
    except openai.APIStatusError as error:
        return error.status_code, error.code
    return reply.choices[0].message.content


def test_defect1_lone_surrogate_is_refused_and_the_worker_lives(server: RunningServer, client, engine) -> None:
    """A lone UTF-16 surrogate ("\\ud800" in the JSON) used to kill the generation thread: every later request
    hung while /health said ok. It is refused with 400 naming the field, before the worker sees it."""
    good = user_message(QUESTIONS[1], data_url(drawn_image(1)))
    reference = expected(engine, good, max_tokens=8).text
    text = '"a \\ud800 b"'  # JSON text: the escape of a lone high surrogate
    head = f'{{"model": "{MODEL_NAME}", "max_tokens": 4, '
    bodies = {
        "messages[0].content": head + f'"messages": [{{"role": "user", "content": {text}}}]}}',
        "messages[0].content[0].text": head + f'"messages": [{{"role": "user", "content": [{{"type": "text", '
                                              f'"text": {text}}}]}}]}}',
        "stop": head + f'"stop": {text}, "messages": [{{"role": "user", "content": "hi"}}]}}',
    }
    for param, body in bodies.items():
        status, answer = post_chat(server.url, body.encode(), timeout=20)
        assert status == 400, (param, answer)
        assert answer["error"]["param"] == param and "lone surrogate" in answer["error"]["message"], answer
        # ... and a web page cannot post it as a "simple" text/plain request (no CORS preflight) either
        status, answer = post_chat(server.url, body.encode(), headers={"Content-Type": "text/plain"}, timeout=20)
        assert (status, answer["error"]["code"]) == (415, "unsupported_media_type"), answer
    assert ask_or_error(client, good) == reference
    assert get_json(server.url + "/health")["status"] == "ok" and metrics(server)["worker_alive"]


def test_a_failing_request_fails_alone(batching: SideServer, engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Must have: an exception while one request is prepared (tokenizing) or generated answers that request with a
    5xx; the requests sent with it, batched with it, get their right answers and the worker goes on."""
    client = batching.client
    goods = [user_message(QUESTIONS[i], data_url(drawn_image(i))) for i in (0, 2)]
    references = [expected(engine, messages, max_tokens=8).text for messages in goods]
    real_count, real_stream = engine.count_prompt_tokens, engine._stream
    batches: list[list[str]] = []

    def count_prompt_tokens(prompt: str, images: list) -> int:
        if "POISON" in prompt:
            raise TypeError("simulated tokenizer failure")
        return real_count(prompt, images)

    def stream(prompts: list[str], *args, **kwargs):
        batches.append(list(prompts))
        if any("VENOM" in prompt for prompt in prompts):
            raise RuntimeError("simulated failure of one request's generation")
        return real_stream(prompts, *args, **kwargs)

    monkeypatch.setattr(engine, "count_prompt_tokens", count_prompt_tokens)
    monkeypatch.setattr(engine, "_stream", stream)
    before = metrics(batching)
    requests = [goods[0], user_message("POISON"), user_message("VENOM"), goods[1]]
    quick = client.with_options(timeout=30)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda messages: ask_or_error(quick, messages), requests))
    assert answers == [references[0], (500, "internal_error"), (500, "engine_error"), references[1]]
    assert any(len(prompts) > 1 and any("VENOM" in p for p in prompts) for prompts in batches), \
        f"the failing request was never batched with another, so nothing was shown: {batches}"
    after = metrics(batching)
    assert after["worker_alive"] and after["requests_failed"] == before["requests_failed"] + 2


class _Fatal(BaseException):
    """Stands for whatever could still end the worker thread (not an Exception: the loop lets it through)."""


def test_a_dead_worker_is_reported_and_restarted(engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Must have: an error in the worker's own loop answers the request it held (500) and the loop goes on; if the
    thread dies all the same, its request gets 503, /health answers 503 until a new worker runs, and then
    requests are answered right again."""
    monkeypatch.setattr(serve.worker, "WORKER_RESTART_S", 0.0)
    side = SideServer(engine)
    worker = side.app.state.kopru.worker
    restart_now, health_read = threading.Event(), threading.Event()
    real_restart, real_fit, real_fail_held = getattr(worker, "restart", None), worker._fit, worker._fail_held
    faults: list[BaseException] = [RuntimeError("simulated fault in the loop"), _Fatal("simulated death")]

    def gated_restart() -> None:  # holds the restart until /health has been seen saying 503
        restart_now.wait(30)
        real_restart()

    def fail_held(error) -> None:
        real_fail_held(error)
        # The dying thread has answered its request (503): keep it alive until /health has been read, as a
        # loaded machine may deschedule it there (/health once said ok meanwhile).
        if error.status == 503:
            health_read.wait(30)

    def fit(pending):
        if faults:
            raise faults.pop(0)
        return real_fit(pending)

    monkeypatch.setattr(worker, "restart", gated_restart, raising=False)
    monkeypatch.setattr(worker, "_fit", fit)
    monkeypatch.setattr(worker, "_fail_held", fail_held)
    try:
        good = user_message(QUESTIONS[3], data_url(drawn_image(3)))
        reference = expected(engine, good, max_tokens=8).text
        assert ask_or_error(side.client, good) == (500, "worker_error")
        assert get_json(side.url + "/health")["status"] == "ok"
        assert ask_or_error(side.client, good) == (503, "worker_restarting")
        status, text = http_request(side.url + "/health")
        health_read.set()
        assert status == 503 and "_Fatal: simulated death" in json.loads(text)["reason"], text
        restart_now.set()
        deadline = time.monotonic() + 15
        while http_request(side.url + "/health")[0] != 200:
            assert time.monotonic() < deadline, "no new worker started"
            time.sleep(0.05)
        assert ask_or_error(side.client, good) == reference
        assert metrics(side)["worker_restarts"] == 1
    finally:
        health_read.set()
        restart_now.set()
        side.stop()


def test_defect2_top_k_and_seed_are_bounded(batching: SideServer, engine) -> None:
    """top_k 10**20 or seed 2**64 used to fail with a 500 'Overflow when unpacking long long', and so did every
    good request batched with them. Now: top_k up to the vocabulary, seeds within 64-bit signed integers (63 bits
    and a sign), anything else 400; the extremes that pass reach the engine and sample as it does."""
    client = batching.client
    vocab = engine.vocab_size
    base = {"model": MODEL_NAME, "messages": user_message("hi"), "max_tokens": 4}
    messages = user_message(QUESTIONS[0], data_url(drawn_image(0)))
    sampled = expected(engine, messages, max_tokens=8, temperature=1.0, top_k=vocab, seed=-(2**63)).text
    greedy = [expected(engine, m, max_tokens=8).text for m in (messages, user_message(QUESTIONS[2]))]
    hostile = [{**base, "top_k": 10**20}, {**base, "seed": 2**64}]

    def send(index: int):
        if index < 2:  # sent with the good ones, so that they would share a batch if admitted
            return post_chat(batching.url, hostile[index])[0]
        if index == 2:
            return client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=1.0,
                                                  seed=-(2**63), extra_body={"top_k": vocab}).choices[0].message.content
        return ask_or_error(client, [messages, user_message(QUESTIONS[2])][index - 3])

    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(send, range(5)))
    assert answers == [400, 400, sampled, *greedy]

    for name, value in (("top_k", 10**20), ("top_k", vocab + 1), ("top_k", -1), ("seed", 2**64), ("seed", 2**63),
                        ("seed", -(2**63) - 1), ("seed", 10**5000)):
        with pytest.raises(APIError) as caught:
            parse_chat_request({**base, name: value}, MODEL_NAME, LIMITS, None, vocab_size=vocab)
        assert (caught.value.status, caught.value.code, caught.value.param) == (400, "invalid_value", name), value
    for top_k, seed in ((vocab, 2**63 - 1), (1, -(2**63))):
        params = parse_chat_request({**base, "top_k": top_k, "seed": seed}, MODEL_NAME, LIMITS, None,
                                    vocab_size=vocab).params
        assert (params.top_k, params.seed) == (top_k, seed)


def test_defect3_text_is_bounded_before_tokenizing(server: RunningServer, engine) -> None:
    """A 30 MB prompt used to be tokenized whole on the worker (60 s during which no one else was served) before
    the context check. Text is now counted in characters when the request is parsed, stop strings included."""
    # Through the server: refused at its default limit, without the worker tokenizing anything.
    before = metrics(server)
    chars = 300_000  # above the default limit, and more tokens than the context window holds
    status, answer = post_chat(server.url, {"model": MODEL_NAME, "messages": [{"role": "user", "content": "a" * chars}]})
    assert (status, answer["error"]["code"]) == (400, "text_too_long"), answer
    assert metrics(server)["batches"] == before["batches"] and chars > ServerLimits().max_text_chars
    # The count: every text part and string content, and the stop strings.
    limits = dataclasses.replace(LIMITS, max_text_chars=1000)
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "a" * 600},
                                              {"role": "user", "content": [{"type": "text", "text": "b" * 400}]}]}
    assert len(parse_chat_request(body, MODEL_NAME, limits, None).messages) == 2  # 1000 characters: allowed
    for longer in ({**body, "stop": "x"}, {**body, "messages": [*body["messages"], {"role": "user", "content": "c"}]}):
        with pytest.raises(APIError) as caught:
            parse_chat_request(longer, MODEL_NAME, limits, None)
        assert (caught.value.status, caught.value.code) == (400, "text_too_long")
        assert "1001 characters" in caught.value.message


def test_defect3_json_is_parsed_off_the_event_loop(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 32 MiB body used to be parsed on the event loop (/health blocked for 2.5 s). With a parser held on
    purpose until /health has answered, /health answers while a body is being parsed (on the event loop, the
    parser would block it: /health would time out)."""
    real_loads = json.loads
    parsing, health_answered = threading.Event(), threading.Event()

    class HeldJson:
        dumps = staticmethod(json.dumps)

        @staticmethod
        def loads(data, **kwargs):
            parsing.set()
            health_answered.wait(10)
            return real_loads(data, **kwargs)

    monkeypatch.setattr(serve.parsing, "json", HeldJson)
    body = {"model": MODEL_NAME, "messages": user_message("hi"), "max_tokens": 2, "temperature": 0}
    with ThreadPoolExecutor(1) as pool:
        posted = pool.submit(post_chat, server.url, body)
        try:
            assert parsing.wait(30), "the body was never parsed"
            status, text = http_request(server.url + "/health", timeout=3)
        except TimeoutError:
            status, text = None, "no answer within 3 s: the parser blocks the event loop"
        finally:
            health_answered.set()
        assert posted.result()[0] == 200
    assert status == 200 and json.loads(text)["status"] == "ok", text


def test_defect5_json_depth_and_size_are_bounded(server: RunningServer) -> None:
    """JSON nested 100,000 deep used to answer 500 (RecursionError). Depth and the number of values are bounded
    and refused with 400, before parsing where it can be (a body of many small values takes a second to parse
    and holds the interpreter lock all along)."""
    limits = LIMITS
    deep = b"[" * 100_000 + b"]" * 100_000
    status, answer = post_chat(server.url, deep)
    assert (status, answer["error"]["code"]) == (400, "invalid_json"), answer
    for body in (deep, b'{"a": ' * (limits.max_json_depth + 1) + b"1" + b"}" * (limits.max_json_depth + 1)):
        with pytest.raises(APIError, match="nested"):
            decode_json_body(body, limits)
        status, answer = post_chat(server.url, body)
        assert (status, answer["error"]["code"]) == (400, "invalid_json"), answer
    assert decode_json_body(b'{"a": ' * (limits.max_json_depth - 1) + b"1" + b"}" * (limits.max_json_depth - 1),
                            limits)
    many = b"[" + b"0," * limits.max_json_items + b"0]"
    start = time.perf_counter()
    with pytest.raises(APIError, match="parses at most"):
        decode_json_body(many, limits)
    assert time.perf_counter() - start < 0.5
    assert post_chat(server.url, many)[0] == 400


@pytest.mark.parametrize(("name", "literal", "message"), [
    ("temperature", "NaN", "finite"), ("temperature", "Infinity", "finite"), ("temperature", "1e999", "finite"),
    ("temperature", "2.5", "at most 2.0"), ("repetition_penalty", "NaN", "finite"),
    ("repetition_penalty", "0", "above 0.0"), ("repetition_penalty", "-1", "above 0.0"),
    ("top_p", "NaN", "finite"), ("top_p", "0", "above 0.0"), ("top_p", "-Infinity", "finite"),
])
def test_defect4_non_finite_and_out_of_range_sampling_values_are_refused(server: RunningServer, name: str,
                                                                         literal: str, message: str) -> None:
    """temperature NaN used to be served as greedy, repetition_penalty NaN as an empty answer and
    repetition_penalty 0 as 1.0. Python's JSON reads NaN and Infinity (and 1e999 as infinity): each is refused."""
    body = f'{{"model": "{MODEL_NAME}", "messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 4, ' \
           f'"{name}": {literal}}}'
    status, answer = post_chat(server.url, body.encode())
    assert status == 400, answer
    assert (answer["error"]["code"], answer["error"]["param"]) == ("invalid_value", name)
    assert message in answer["error"]["message"], answer


def test_defect5_hostile_local_paths_get_400(server: RunningServer, local_dir: Path, tmp_path: Path) -> None:
    """Under --allow-local-dir a symlink loop, a NUL byte or a name longer than 255 characters used to answer
    500; so could anything else os.open refuses. Each is the client's fault: 400, naming the field."""
    (local_dir / "loop-a").unlink(missing_ok=True)
    (local_dir / "loop-b").unlink(missing_ok=True)
    (local_dir / "loop-a").symlink_to(local_dir / "loop-b")
    (local_dir / "loop-b").symlink_to(local_dir / "loop-a")
    fifo = local_dir / "pipe.png"
    if not fifo.exists():
        os.mkfifo(fifo)
    cases = {
        "symlink loop": (str(local_dir / "loop-a" / "x.png"), "local_files_refused"),
        "symlink loop, last component": (str(local_dir / "loop-a"), "local_files_refused"),
        "NUL byte": (str(local_dir / "a\x00b.png"), "invalid_image_url"),
        "name over 255 characters": (str(local_dir / ("n" * 300 + ".png")), "invalid_image_url"),
        "lone surrogate": (str(local_dir / "a\ud800.png"), "invalid_image_url"),
        "a directory": (str(local_dir), "invalid_image_url"),
        "a pipe (would block a plain open)": (str(fifo), "invalid_image_url"),
        "a file as a directory": (str(local_dir / "shape.png" / "x.png"), "invalid_image_url"),
        "missing": (str(local_dir / "missing.png"), "invalid_image_url"),
        "'..' back in": (str(local_dir / ".." / local_dir.name / "shape.png"), "local_files_refused"),
        "file URL with a NUL": ("file://" + str(local_dir) + "/a%00b.png", "invalid_image_url"),
    }
    field = "messages[0].content[0].image_url"
    for case, (url, code) in cases.items():
        with pytest.raises(APIError) as caught:
            read_image_url(url, LIMITS, local_dir, field, param=field)
        assert (caught.value.status, caught.value.code, caught.value.param) == (400, code, field), \
            (case, caught.value.message)
        status, answer = post_chat(server.url, {"model": MODEL_NAME, "max_tokens": 2,
                                                "messages": user_message("hi", url)})
        assert (status, answer["error"]["code"], answer["error"]["param"]) == (400, code, field), (case, answer)
        assert answer["error"]["message"].startswith(f"image 1 of the request ({field}): "), (case, answer)


def test_defect6_local_files_are_opened_without_following_links(local_dir: Path, tmp_path: Path) -> None:
    """The allowed directory used to be checked (symlinks resolved) and then read by path: while a folder inside it
    was swapped for a symlink, 22 of 1500 requests read a file outside it. Each path component is now opened
    relative to the last with O_NOFOLLOW, so no link is followed at any level, and no check precedes the read.

    A link is refused even when it points inside the directory; and a thread swapping a folder for a link to the
    outside, as fast as it can, never gets a file from the outside read (1.5 s of reads race with it)."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "dir").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(allowed / "dir" / "img.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(outside / "img.png")
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            os.rename(allowed / "dir", allowed / "dir-real")
            os.symlink(outside, allowed / "dir")
            os.unlink(allowed / "dir")
            os.rename(allowed / "dir-real", allowed / "dir")

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    colours: Counter = Counter()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                colours[read_image_url(str(allowed / "dir" / "img.png"), LIMITS, allowed, "image 1").getpixel((0, 0))] += 1
            except APIError as error:  # the folder was a link, or missing, at that instant
                colours[error.code] += 1
            except Exception as error:  # noqa: BLE001 - counted: the assertions below name it
                colours[type(error).__name__] += 1
    finally:
        stop.set()
        swapper.join(timeout=10)
    assert colours[(0, 0, 255)] == 0, f"a file outside the allowed directory was read: {dict(colours)}"
    assert colours[(255, 0, 0)] > 0 and colours["local_files_refused"] > 0, dict(colours)
    assert set(colours) <= {(255, 0, 0), "local_files_refused", "invalid_image_url"}, dict(colours)

    (allowed / "inner-link").symlink_to(allowed / "dir")
    with pytest.raises(APIError, match="is a symbolic link") as caught:
        read_image_url(str(allowed / "inner-link" / "img.png"), LIMITS, allowed, "image 1")
    assert caught.value.code == "local_files_refused"
    assert read_image_url(str(allowed / "dir" / "img.png"), LIMITS, allowed, "image 1").getpixel((0, 0)) == \
        (255, 0, 0)


def test_defect7_api_key_host_allow_list_media_type_and_cors(server: RunningServer, engine,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Hardening that was missing: an API key (401 without 'Authorization: Bearer KEY', compared in constant time),
    a Host allow-list against DNS rebinding (localhost names by default), JSON-only POST bodies (415), and CORS
    only for the origins named."""
    key = "sekret-key"
    compared = []
    real_compare = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or real_compare(a, b))
    side = SideServer(engine, security=ServerSecurity(api_key=key, cors_origins=("https://app.example",)))
    try:
        url, auth = side.url, {"Authorization": f"Bearer {key}"}
        body = json.dumps({"model": MODEL_NAME, "messages": user_message("hi"), "max_tokens": 2,
                           "temperature": 0}).encode()
        json_type = {"Content-Type": "application/json"}
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": key}, {"Authorization": "Basic x"}):
            for method, path, data in (("GET", "/v1/models", None), ("GET", "/metrics", None),
                                       ("POST", "/v1/chat/completions", body)):
                status, got, text = http_exchange(url + path, method, data, {**json_type, **headers})
                assert (status, json.loads(text)["error"]["code"]) == (401, "invalid_api_key"), (headers, path)
                assert got["www-authenticate"] == "Bearer"
        assert compared, "the key was not compared with hmac.compare_digest"
        for path in ("/health", "/"):  # a supervisor's probe and the page (which then asks for the key) are open
            assert http_exchange(url + path)[0] == 200
        keyed = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)  # sends Bearer KEY
        assert [model.id for model in keyed.models.list().data] == [MODEL_NAME]
        assert ask_or_error(keyed, user_message("hi"), max_tokens=2) == expected(engine, user_message("hi"), 2).text

        status, _, text = http_exchange(url + "/v1/chat/completions", "POST", body,
                                        {**auth, "Content-Type": "text/plain"})
        assert (status, json.loads(text)["error"]["code"]) == (415, "unsupported_media_type")
        for host in ("evil.example", f"evil.example:{side.port}", "127.0.0.2"):  # DNS rebinding: a foreign name
            status, _, text = http_exchange(url + "/v1/models", headers={**auth, "Host": host})
            assert (status, json.loads(text)["error"]["code"]) == (400, "invalid_host"), host
        for host in (f"localhost:{side.port}", "127.0.0.1", f"[::1]:{side.port}"):
            assert http_exchange(url + "/v1/models", headers={**auth, "Host": host})[0] == 200, host

        preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"}
        status, got, _ = http_exchange(url + "/v1/chat/completions", "OPTIONS", headers=preflight)
        assert status == 200 and got["access-control-allow-origin"] == "https://app.example"
        status, got, _ = http_exchange(url + "/v1/chat/completions", "OPTIONS",
                                       headers={**preflight, "Origin": "https://evil.example"})
        assert status == 400 and "access-control-allow-origin" not in got
        status, got, _ = http_exchange(url + "/v1/models", headers={**auth, "Origin": "https://app.example"})
        assert status == 200 and got["access-control-allow-origin"] == "https://app.example"
    finally:
        side.stop()

    # The defaults (the module's server): no key asked, localhost names only, no CORS at all.
    assert http_exchange(server.url + "/v1/models")[0] == 200
    status, _, text = http_exchange(server.url + "/v1/models", headers={"Host": "evil.example"})
    assert (status, json.loads(text)["error"]["code"]) == (400, "invalid_host")
    status, got, _ = http_exchange(server.url + "/v1/models", headers={"Origin": "https://app.example"})
    assert status == 200 and not any(name.startswith("access-control") for name in got)
    assert http_exchange(server.url + "/v1/chat/completions", "OPTIONS", headers=preflight)[0] == 405


@pytest.mark.slow
def test_defect7_slow_clients_are_timed_out_and_connections_limited(engine) -> None:
    """Slow clients used to be kept for ever (1000 half-sent requests stayed open). Each request must now arrive
    whole within --read-timeout-s of the connection opening (a byte now and then does not extend it), and
    connections beyond --max-connections are answered 503."""
    limits = dataclasses.replace(LIMITS, read_timeout_s=1.0, max_connections=8)
    side = SideServer(engine, limits)
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{side.port}\r\nContent-Type: application/json\r\n"
    partial = {
        "nothing": [b""],
        "half a request line": [b"POST /v1/chat/compl"],
        "headers without their end": [head.encode()],
        "half the body": [(head + "Content-Length: 1000\r\n\r\n").encode() + b'{"model": "tiny-k'],
        "a header byte every 0.25 s": [bytes([byte]) for byte in head.encode()],
    }

    def closed_after(pieces: list[bytes]) -> float:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", side.port), timeout=10) as sock:
            try:
                for piece in pieces:
                    sock.sendall(piece)
                    if len(pieces) > 1:
                        time.sleep(0.25)
                while sock.recv(4096):  # an answer (none comes) and then the close
                    pass
            except (ConnectionResetError, BrokenPipeError):
                pass
            except TimeoutError:
                return math.inf
        return time.monotonic() - start

    try:
        with ThreadPoolExecutor(len(partial)) as pool:
            waited = dict(zip(partial, pool.map(closed_after, partial.values()), strict=True))
        assert all(0.9 <= seconds <= 6 for seconds in waited.values()), waited
        # With as many connections open as allowed, the next request is refused by uvicorn's limit...
        idle = [socket.create_connection(("127.0.0.1", side.port), timeout=10) for _ in range(limits.max_connections)]
        time.sleep(0.1)
        assert http_request(side.url + "/health", timeout=10)[0] == 503
        for sock in idle:  # ... until the read timeout has closed them
            assert sock.recv(1) == b""  # closed by the server by now: they never sent a request
            sock.close()
        assert http_request(side.url + "/health", timeout=10)[0] == 200
        # A keep-alive connection: the first request is answered, the half-sent second one is closed.
        with socket.create_connection(("127.0.0.1", side.port), timeout=10) as sock:
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{side.port}\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            start = time.monotonic()
            sock.sendall(b"GET /heal")
            while sock.recv(4096):
                pass
            assert time.monotonic() - start <= 6
    finally:
        side.stop()


def test_defect7_cli_security_flags_and_exposure_warning(model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """`kopru serve --host 0.0.0.0` without a key warns loudly before serving; --api-key or KOPRU_API_KEY set the
    key (the flag wins); --allowed-host and --cors-origin reach the app; the read timeout and connection limit
    reach uvicorn."""
    from kopru.cli import _serve

    served = []

    def run(self, sockets=None) -> None:  # instead of serving: what would be served, with what settings
        served.append(self.config)
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.delenv("KOPRU_API_KEY", raising=False)
    flags = ["serve", "--model", str(model_dir), "--allowed-host", "vlm.example", "--cors-origin",
             "https://app.example", "--read-timeout-s", "3", "--max-connections", "7"]
    runs = [(["--host", "0.0.0.0"], None, None), (["--host", "0.0.0.0"], "from-env", "from-env"),
            (["--host", "0.0.0.0", "--api-key", "from-flag"], "from-env", "from-flag"), ([], None, None)]
    for extra, env, key in runs:
        if env is None:
            monkeypatch.delenv("KOPRU_API_KEY", raising=False)
        else:
            monkeypatch.setenv("KOPRU_API_KEY", env)
        assert _serve(build_parser().parse_args([*flags, *extra])) == 0
        config, err = served[-1], capsys.readouterr().err
        security = config.app.state.kopru.security
        assert security.api_key == key, extra
        assert ("WARNING" in err and "0.0.0.0" in err and "--api-key" in err) == (key is None and bool(extra)), err
        assert set(security.allowed_hosts) == {"localhost", "127.0.0.1", "::1", "vlm.example"}
        assert security.cors_origins == ("https://app.example",)
        assert config.limit_concurrency == 7 and config.http.read_timeout_s == 3.0
    assert ServerSecurity.for_bind("0.0.0.0").allowed_hosts is None  # another address, no names given: any Host
    assert ServerSecurity(allowed_hosts=("*",)).host_allowed("anything.example:80")
    assert ServerSecurity.for_bind("127.0.0.1").allowed_hosts == ("localhost", "127.0.0.1", "::1")
    assert ServerSecurity.for_bind("::1").exposure_warning("::1") is None


def test_images_and_bodies_are_bounded_across_requests(engine) -> None:
    """Must have: image decoding is bounded per request (the images-per-request and pixel limits) and across the
    queue: the pixels held by requests in progress may not exceed --max-queued-image-pixels; a request whose
    images would is answered 429 (retry), before its images are decoded, and is served once room is made. The
    bodies being received are bounded together the same way (--max-pending-body-bytes)."""
    limits = dataclasses.replace(LIMITS, max_queued_image_pixels=2 * 256 * 256,  # one request's worth of each
                                 max_pending_body_bytes=LIMITS.max_request_bytes)
    side = SideServer(engine, limits)
    try:
        # A body arriving slowly holds its bytes; another that would pass the total is refused meanwhile.
        with socket.create_connection(("127.0.0.1", side.port), timeout=30) as slow:
            slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                         b"\r\nContent-Length: 900000\r\n\r\n" + b" " * 600_000)
            deadline = time.monotonic() + 10
            while metrics(side)["body_bytes_held"] < 600_000:
                assert time.monotonic() < deadline, "the slow body's bytes were never counted"
                time.sleep(0.02)
            padded = {"model": MODEL_NAME, "messages": user_message("hi"), "max_tokens": 2, "pad": "x" * 500_000}
            status, answer = post_chat(side.url, padded)
            assert (status, answer["error"]["code"]) == (429, "server_busy"), answer
        deadline = time.monotonic() + 10
        while metrics(side)["body_bytes_held"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert post_chat(side.url, padded)[0] == 200

        big = data_url(drawn_image(1, size=256))
        holder = {"model": MODEL_NAME, "messages": user_message(QUESTIONS[0], big, big), "max_tokens": 200,
                  "temperature": 0, "stream": True}
        connection = http.client.HTTPConnection("127.0.0.1", side.port, timeout=60)
        connection.request("POST", "/v1/chat/completions", body=json.dumps(holder).encode(),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: {")
        assert metrics(side)["image_pixels_held"] == 2 * 256 * 256
        other = user_message(QUESTIONS[1], data_url(drawn_image(2)))
        assert ask_or_error(side.client, other) == (429, "server_busy")
        assert ask_or_error(side.client, user_message("hi"), max_tokens=2) == expected(engine, user_message("hi"),
                                                                                       2).text
        response.read()  # the first request runs to its end and gives its pixels back
        connection.close()
        deadline = time.monotonic() + 10
        while metrics(side)["image_pixels_held"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ask_or_error(side.client, other) == expected(engine, other, 8).text
        assert metrics(side)["image_pixels_held"] == 0
    finally:
        side.stop()


# ----------------------------------------------------------------------------------- fuzzing the request parser
SURROGATES = ["\ud800", "\udfff", "\udc80"]
_texts = st.text(max_size=12) | st.builds(lambda a, b, c: a + b + c, st.text(max_size=4), st.sampled_from(SURROGATES),
                                          st.text(max_size=4))
_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([10**20, 2**63, 2**64, -1, 0])
            | st.floats(allow_nan=True, allow_infinity=True) | _texts)
_json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(_texts, inner, max_size=3), max_leaves=8)


def _mostly(valid: st.SearchStrategy, hostile: st.SearchStrategy) -> st.SearchStrategy:
    """`valid` about seven times in eight: a request is refused at its first bad field, so each must usually be
    good for the fuzzer to reach the fields after it (the messages, then the images)."""
    return st.tuples(st.booleans(), st.booleans(), st.booleans()).flatmap(
        lambda coins: hostile if all(coins) else valid)  # st.one_of would not weigh repeated branches


def _image_urls(local_dir: Path) -> st.SearchStrategy:
    png = png_bytes(drawn_image(0, size=16))
    good = st.sampled_from(["data:image/png;base64," + base64.b64encode(png).decode(), str(local_dir / "shape.png")])
    return _mostly(good, st.sampled_from([
        "data:image/png;base64," + base64.b64encode(png[:40]).decode(),  # truncated
        "data:image/png;base64," + base64.b64encode(b"P6\n4M 4\n255\n" + bytes(48)).decode(),
        "data:image/png;base64,@@@", "data:,", "data:image/png;base64," + "A" * 4, "https://example.com/x.png",
        "ftp://x", "file:///etc/passwd", str(local_dir / "loop-a"), str(local_dir / "a\x00b"),
        str(local_dir / ("n" * 300)), "http://[::1", "file://" + str(local_dir) + "/%00", str(local_dir / "a\ud800"),
    ]) | _texts | _json_values)


def _chat_bodies(local_dir: Path) -> st.SearchStrategy:
    """Request bodies of the valid shape with a bad value here and there: what a careless or hostile client
    sends."""
    text = _mostly(st.text(max_size=12), _texts | _json_values)
    part = _mostly(st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": text}),
        st.fixed_dictionaries({"type": _mostly(st.just("image_url"), st.just("image")),
                               "image_url": _mostly(st.fixed_dictionaries({"url": _image_urls(local_dir)}),
                                                    _json_values)})), _json_values)
    message = _mostly(st.fixed_dictionaries({"role": _mostly(st.sampled_from(["user", "assistant", "system"]),
                                                             _json_values),
                                             "content": _mostly(text | st.lists(part, max_size=3), _json_values)}),
                      _json_values)
    valid = {"temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 100),
             "seed": st.integers(*serve.SEED_RANGE), "max_tokens": st.integers(1, 16),
             "max_completion_tokens": st.integers(1, 16), "n": st.just(1), "repetition_penalty": st.floats(0.5, 2),
             "stop": st.lists(st.text(min_size=1, max_size=4), max_size=2), "stream": st.booleans(),
             "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})}
    optional = {name: _mostly(strategy, _scalars | _json_values) for name, strategy in valid.items()}
    any_body = st.fixed_dictionaries({"model": _mostly(st.just(MODEL_NAME), _json_values),
                                      "messages": _mostly(st.lists(message, min_size=1, max_size=3), _json_values)},
                                     optional=optional)
    # and, as often, a good body whose images are where the fuzzing happens
    images = st.lists(st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
        {"url": _image_urls(local_dir)})}), min_size=1, max_size=LIMITS.max_images_per_request)
    image_body = st.builds(lambda parts: {"model": MODEL_NAME, "messages": [{"role": "user", "content": [
        *parts, {"type": "text", "text": "what is it?"}]}]}, images)
    return any_body | image_body


def test_fuzz_parse_chat_request_raises_only_api_errors(local_dir: Path) -> None:
    """Property: for any JSON value as the body, parse_chat_request returns a request or raises APIError with a 4xx
    status (nothing else escapes to become a 500), and every decoded pixel it reserved is given back."""
    budget = Budget(LIMITS.max_queued_image_pixels, "decoded image pixels")

    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.one_of(_chat_bodies(local_dir), _json_values))
    def check(body) -> None:
        try:
            request = parse_chat_request(body, MODEL_NAME, LIMITS, local_dir, vocab_size=100, budget=budget)
        except APIError as error:
            assert 400 <= error.status < 500, error.message
            assert error.body()["error"]["message"].encode("utf-8")  # encodable: it can be answered
        else:
            request.reservation.release()
        assert budget.used == 0

    check()


def test_fuzz_decode_json_body_raises_only_api_errors() -> None:
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=64) | st.builds(lambda value: json.dumps(value).encode(), _json_values)
           | st.builds(lambda depth: b"[" * depth + b"]" * depth, st.integers(0, 3000)))
    def check(data: bytes) -> None:
        try:
            decode_json_body(data, LIMITS)
        except APIError as error:
            assert error.status == 400 and error.code == "invalid_json"

    check()


def test_fuzz_the_server_never_answers_500(engine, local_dir: Path) -> None:
    """Property: whatever body is posted (bytes, or JSON near the chat shape, NaN and surrogates included), the
    server answers with a status below 500 and an OpenAI body; afterwards it still answers a good request
    right."""
    # Valid bodies generate little, at once (the module's 300 ms batch window would make each wait).
    limits = dataclasses.replace(LIMITS, max_new_tokens=4, default_new_tokens=2, batch_window_ms=0)
    app = create_app(engine, MODEL_NAME, limits, allow_local_dir=local_dir)
    side = RunningServer(app)
    try:
        @settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.binary(max_size=64) | st.builds(lambda value: json.dumps(value).encode(), _chat_bodies(local_dir)))
        def check(data: bytes) -> None:
            status, text = http_request(side.url + "/v1/chat/completions", "POST", data, timeout=30)
            assert status < 500, (data[:200], text[:300])
            if status >= 400:
                assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}

        check()
        good = user_message(QUESTIONS[1], data_url(drawn_image(1)))
        client = openai.OpenAI(base_url=side.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert ask_or_error(client, good, max_tokens=4) == expected(engine, good, 4).text
        assert metrics(side)["image_pixels_held"] == 0 and metrics(side)["worker_alive"]
    finally:
        side.stop()


@pytest.mark.slow
def test_soak_script_smoke(model_dir: Path, tmp_path: Path) -> None:
    """scripts/soak_server.py for a few seconds: it starts `kopru serve` on the tiny model, tries every hostile kind
    among good requests from the official client, and reports 0 lost, 0 wrong, no unexpected answer, with RSS
    samples (the README's figures come from a longer run of it)."""
    root = Path(__file__).resolve().parents[1]
    summary_file = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(root / "scripts" / "soak_server.py"), "--model", str(model_dir), "--duration", "4",
         "--good-clients", "2", "--hostile-clients", "1", "--slow-clients", "1", "--read-timeout-s", "1",
         "--sample-s", "1", "--json", str(summary_file)],
        env={**os.environ, "PYTHONPATH": str(root / "src")}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads(summary_file.read_text())
    assert summary["good_answered"] > 0 and (summary["good_lost"], summary["good_wrong"]) == (0, 0)
    assert summary["hostile_unexpected"] == 0 and not summary["health_failures"]
    assert len(summary["hostile_kinds"]) == 32, sorted(summary["hostile_kinds"])  # 29 kinds + 3 slow ones
    assert summary["samples"] and summary["rss_mib_peak"] > 0
