"""`kopru serve` against the official `openai` client: a real tiny model behind a real server on localhost.

The expected answers come from `GenerationEngine.complete` on the same model, called directly (no HTTP);
the server must reproduce them streamed and not streamed, alone and batched with other requests.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from kopru import KopruConfig, KopruForConditionalGeneration, VisionTowerConfig  # noqa: E402
from kopru.cli import build_parser  # noqa: E402
from kopru.generation import SamplingParams, format_chat  # noqa: E402
from kopru.pretrain_tiny import default_backbones  # noqa: E402
from kopru.serve import (  # noqa: E402
    APIError,
    ServerLimits,
    decode_image,
    load_server,
    parse_chat_request,
    served_model_name,
)
from kopru.tiny import save_tiny_llm  # noqa: E402

MODEL_NAME = "tiny-kopru"
# Small limits, so that each bad-input case is cheap to build; a wide batch window, so that requests sent
# together on a busy 2-core machine still arrive within it.
LIMITS = ServerLimits(max_image_bytes=150_000, max_image_pixels=256 * 256, max_images_per_request=2,
                      max_new_tokens=1024, default_new_tokens=16, max_request_bytes=1_000_000, max_batch_size=4,
                      batch_window_ms=300)
COLOURS = [(220, 30, 30), (30, 160, 40), (30, 60, 220), (240, 200, 20)]


def drawn_image(seed: int, size: int = 64) -> Image.Image:
    """A coloured shape on a light background, different per seed."""
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    box = (8 + 4 * seed, 8, 40 + 4 * seed, 48)
    (draw.ellipse if seed % 2 else draw.rectangle)(box, fill=COLOURS[seed % len(COLOURS)])
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def user_message(question: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


QUESTIONS = ["What is in the picture?", "What colour is the shape?", "Where is the shape?", "How many shapes?"]


def http_request(url: str, method: str = "GET", body: bytes | None = None, timeout: float = 60) -> tuple[int, str]:
    """(status, body text) from a plain HTTP/1.1 request (the standard library's client: no extra dependency)."""
    location = urlsplit(url)
    connection = http.client.HTTPConnection(location.hostname, location.port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, location.path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def get_json(url: str) -> dict:
    status, text = http_request(url)
    assert status == 200, f"GET {url}: {status} {text[:200]}"
    return json.loads(text)


class RunningServer:
    """uvicorn in a thread of this process, on a free port."""

    def __init__(self, app) -> None:
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.app.state.kopru.worker.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Köprü model, saved: the shipped pretrained tiny vision encoder, a random projection connector and
    a random tiny Llama. A random LLM seldom ends its answer early, so answers run long enough to be streamed
    in many pieces and to be cut off mid-stream (the shipped pretrained LLM answers in one to three tokens)."""
    root = tmp_path_factory.mktemp("served")
    llm = save_tiny_llm(root / "llm", "llama")
    torch.manual_seed(0)
    config = KopruConfig(vision=VisionTowerConfig(str(default_backbones()["vision"])), llm=str(llm),
                         strategy="projection")
    model, processor = KopruForConditionalGeneration.from_backbones(config)
    path = root / "model"
    model.save_pretrained(path, processor)
    return path


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


def test_concurrent_requests_are_batched_and_answered_correctly(server: RunningServer, client, engine) -> None:
    requests = [user_message(QUESTIONS[i], data_url(drawn_image(i))) for i in range(4)]
    references = [expected(engine, messages, max_tokens=20).text for messages in requests]
    assert len(set(references)) > 1, "the four requests must differ, or a mix-up could not be seen"
    before = metrics(server)

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
    after = metrics(server)
    new_batches = {int(size): count - before["batch_sizes"].get(size, 0) for size, count in after["batch_sizes"].items()}
    assert sum(size * count for size, count in new_batches.items()) == 4
    assert max(size for size, count in new_batches.items() if count) >= 2, f"no batching: {new_batches}"


def test_batch_never_shortens_an_answer(server: RunningServer, client, engine) -> None:
    """A long prompt and a request for many new tokens do not share a batch when the batch, padded to the long
    prompt, would leave the other too little room: each gets the answer it gets alone."""
    short = user_message(QUESTIONS[3], data_url(drawn_image(3)))
    wanted = expected(engine, short, max_tokens=200)
    assert (wanted.finish_reason, wanted.completion_tokens) == ("length", 200)
    long = user_message("red circle " * 330)
    prompt, images = format_chat(engine.processor, parse_chat_request(
        {"model": MODEL_NAME, "messages": long}, MODEL_NAME, LIMITS, None).messages)
    assert engine.context_window - 200 < engine.count_prompt_tokens(prompt, images) < engine.context_window - 8
    long_reply = expected(engine, long, max_tokens=8).text
    before = metrics(server)

    def ask(messages: list[dict], max_tokens: int) -> str:
        reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                               temperature=0)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(ask, [short, long], [200, 8]))
    assert answers == [wanted.text, long_reply]
    after = metrics(server)
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
            400, "invalid_image", "messages"),
        "data URL not base64": ({**ok, "messages": user_message("hi", "data:image/png;base64,@@@@")}, 400,
                                "invalid_image_url", "messages"),
        "remote URL": ({**ok, "messages": user_message("hi", "https://example.com/cat.png")}, 400,
                       "invalid_image_url", "messages"),
        "image too many bytes": ({**ok, "messages": user_message(
            "hi", "data:image/png;base64," + base64.b64encode(_noise_png(256)).decode())}, 400, "image_too_large",
            "messages"),
        "image too many pixels": ({**ok, "messages": user_message("hi", data_url(Image.new("RGB", (300, 300))))},
                                  400, "image_too_large", "messages"),
        "too many images": ({**ok, "messages": user_message("hi", image, image, image)}, 400, "too_many_images",
                            "messages"),
        "file outside the allowed dir": ({**ok, "messages": user_message("hi", str(outside))}, 400,
                                         "local_files_refused", "messages"),
        "symlink out of the allowed dir": ({**ok, "messages": user_message("hi", str(local_dir / "escape.png"))},
                                           400, "local_files_refused", "messages"),
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


def test_bad_image_is_named_by_its_place_in_the_request(server: RunningServer, client) -> None:
    """Images are counted from 1 across all of the request's messages; the message names the bad one that way
    (and its JSON path), never the in-memory stream Pillow read it from."""
    png = png_bytes(drawn_image(1))
    bad_images = {
        "truncated PNG": (png[: len(png) // 2], "expected complete image data, found it truncated or corrupt"),
        "not an image": (b"this is not a picture", "expected an image Pillow can read (PNG, JPEG, WebP, ...)"),
    }
    for case, (data, expected) in bad_images.items():
        bad = "data:image/png;base64," + base64.b64encode(data).decode()
        messages = [*user_message("first", data_url(drawn_image(0))), {"role": "assistant", "content": "ok"},
                    *user_message("second", bad)]
        status, text = http_request(server.url + "/v1/chat/completions", "POST", json.dumps(
            {"model": MODEL_NAME, "messages": messages, "max_tokens": 4}).encode())
        error = json.loads(text)["error"]
        assert (status, error["code"]) == (400, "invalid_image"), (case, text)
        assert error["message"].startswith(f"image 2 of the request (messages[2].content[0]): {expected}"), \
            (case, error["message"])
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
    after = metrics(server)
    assert after["active_requests"] == 0
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


def test_busy_server_answers_429(model_dir: Path) -> None:
    """With room for one request, a second one gets 429 while the first streams; then it is served again."""
    app = load_server(model_dir, model_name=MODEL_NAME, limits=ServerLimits(max_queued_requests=1,
                                                                            max_new_tokens=256))
    busy = RunningServer(app)
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
        response.read()  # the first request runs to its end
        connection.close()
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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_cli_serve_subcommand(model_dir: Path) -> None:
    port = _free_port()
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
