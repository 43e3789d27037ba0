"""The web demo end to end in headless Chromium: upload an image, ask, watch the answer stream, screenshot.

Chromium is driven over its DevTools protocol (a websocket; no Selenium, no driver binary). Needs Debian's
`chromium` package (`apt-get install -y chromium`); the test is skipped without it.
Set KOPRU_WEB_DEMO_SCREENSHOT=path to keep the screenshot (docs/serve/web_demo.png is made that way).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package: apt-get install -y chromium")
pytest.importorskip("uvicorn")
sync_client = pytest.importorskip("websockets.sync.client")

from test_serve import RunningServer, drawn_image  # noqa: E402

from kopru import KopruConfig, KopruForConditionalGeneration, VisionTowerConfig  # noqa: E402
from kopru.generation import SamplingParams, format_chat  # noqa: E402
from kopru.pretrain_tiny import default_backbones  # noqa: E402
from kopru.serve import ServerLimits, load_server  # noqa: E402

MODEL_NAME = "tiny-kopru-demo"
WINDOW = (900, 760)
QUESTION = "What colour is the shape?"


class DevTools:
    """The few DevTools protocol calls the test needs, over one page's websocket."""

    def __init__(self, url: str) -> None:
        self.socket = sync_client.connect(url, max_size=64 * 1024 * 1024, open_timeout=30)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # skip the events sent meanwhile
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                status = self.evaluate("document.getElementById('status') && document.getElementById('status').textContent")
                raise AssertionError(f"timed out waiting for {expression!r}; page status: {status!r}")
            time.sleep(0.1)

    def close(self) -> None:
        self.socket.close()


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium with remote debugging on a free port; yields the DevTools HTTP address."""
    profile = tempfile.mkdtemp(prefix="kopru-chromium-")
    process = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
         f"--window-size={WINDOW[0]},{WINDOW[1]}", "--force-device-scale-factor=1", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        for line in process.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            if "DevTools listening on" in line:
                address = line.split("ws://", 1)[1].split("/", 1)[0]
                break
            if time.monotonic() > deadline:
                raise RuntimeError("chromium did not start its DevTools server")
        else:
            raise RuntimeError(f"chromium exited with code {process.wait()} before its DevTools server started")
        yield f"http://{address}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory):
    """The shipped pretrained tiny backbones with a random projection connector: short, readable answers."""
    backbones = default_backbones()
    torch.manual_seed(0)
    config = KopruConfig(vision=VisionTowerConfig(str(backbones["vision"])), llm=str(backbones["llm"]),
                         strategy="projection")
    model, processor = KopruForConditionalGeneration.from_backbones(config)
    path = tmp_path_factory.mktemp("demo") / "model"
    model.save_pretrained(path, processor)
    # 128 x 128 pixels at most, so that the error test can upload a slightly larger image.
    app = load_server(path, model_name=MODEL_NAME, limits=ServerLimits(batch_window_ms=5, max_image_pixels=128 * 128))
    running = RunningServer(app)
    yield running
    running.stop()


def expected_answer(engine, image_file: Path, question: str) -> str:
    """The engine's own answer to what the page sends: the file's image, then the question (if any);
    greedy decoding, at most 64 tokens."""
    parts = [{"type": "image", "image": Image.open(image_file).convert("RGB")}]
    if question:
        parts.append({"type": "text", "text": question})
    prompt, images = format_chat(engine.processor, [{"role": "user", "content": parts}])
    answer = engine.complete([prompt], [images], SamplingParams(max_new_tokens=64, temperature=0.0))[0].text
    assert answer.strip(), "the model gives an empty answer: nothing to look for on the page"
    return answer


def ask(tools: DevTools, question: str, outcome: str = "done") -> tuple[str, int]:
    """Type the question, press Ask, wait for the stream to end; (the answer shown, pieces received)."""
    tools.evaluate(f"document.getElementById('question').value = {json.dumps(question)}")
    tools.evaluate("document.getElementById('ask').click()")
    tools.wait_for("document.getElementById('answer').dataset.state !== 'streaming'")
    state = tools.evaluate("document.getElementById('answer').dataset.state")
    assert state == outcome, tools.evaluate("document.getElementById('status').textContent")
    return (tools.evaluate("document.getElementById('answer').textContent"),
            int(tools.evaluate("document.getElementById('answer').dataset.chunks")))


def open_page(chromium: str, server: RunningServer) -> DevTools:
    with urllib.request.urlopen(chromium + "/json/list", timeout=30) as response:
        page = next(target for target in json.load(response) if target["type"] == "page")
    tools = DevTools(page["webSocketDebuggerUrl"])
    tools.call("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1], deviceScaleFactor=1,
               mobile=False)
    tools.call("Page.enable")
    tools.call("Page.navigate", url=server.url + "/")
    tools.wait_for(f"document.readyState === 'complete' && "
                   f"document.getElementById('model').textContent === {json.dumps(MODEL_NAME)}")
    return tools


def upload(tools: DevTools, image_file: Path, width: int) -> None:
    root = tools.call("DOM.getDocument")["root"]["nodeId"]
    file_input = tools.call("DOM.querySelector", nodeId=root, selector="#image")["nodeId"]
    tools.call("DOM.setFileInputFiles", nodeId=file_input, files=[str(image_file)])
    tools.wait_for("document.getElementById('preview').style.display === 'block' && "
                   "document.getElementById('preview').complete && "
                   f"document.getElementById('preview').naturalWidth === {width}")


def test_upload_ask_stream_screenshot(chromium: str, demo_server: RunningServer, tmp_path: Path) -> None:
    image = drawn_image(0, size=64)
    image_file = tmp_path / "shape.png"
    image.save(image_file)
    engine = demo_server.app.state.kopru.worker.engine
    answer = expected_answer(engine, image_file, QUESTION)
    caption = expected_answer(engine, image_file, "")
    assert len(caption.split()) >= 3, f"expected a caption of several words, found {caption!r}"

    tools = open_page(chromium, demo_server)
    try:
        upload(tools, image_file, width=64)
        assert ask(tools, QUESTION)[0] == answer
        shown, pieces = ask(tools, "")  # no question: the model captions the image
        assert shown == caption
        assert pieces >= 2, f"the caption came in {pieces} piece(s): not streamed"

        boxes = tools.evaluate("JSON.stringify(['preview', 'answer'].map((id) => { "
                               "const r = document.getElementById(id).getBoundingClientRect(); "
                               "return [r.left, r.top, r.right, r.bottom]; }))")
        preview_box, answer_box = (tuple(round(v) for v in box) for box in json.loads(boxes))
        shot = tools.call("Page.captureScreenshot", format="png")["data"]
    finally:
        tools.close()

    screenshot = Image.open(io.BytesIO(base64.b64decode(shot))).convert("RGB")
    if os.environ.get("KOPRU_WEB_DEMO_SCREENSHOT"):
        screenshot.save(os.environ["KOPRU_WEB_DEMO_SCREENSHOT"])
    pixels = np.asarray(screenshot, dtype=np.float32)
    assert screenshot.size == WINDOW
    assert pixels.std() > 10, "the screenshot is blank"

    # The uploaded image is on screen: the 192-px preview shows the 64-px image scaled 3x (pixelated).
    left, top, right, bottom = preview_box
    assert (right - left, bottom - top) == (194, 194)  # 192 + a 1-px border on each side
    shown_image = pixels[top + 1:top + 193, left + 1:left + 193]
    wanted = np.asarray(image.resize((192, 192), Image.Resampling.NEAREST), dtype=np.float32)
    assert np.abs(shown_image - wanted).mean() < 8, "the preview in the screenshot is not the uploaded image"

    # The answer is drawn: dark text pixels inside the answer box.
    left, top, right, bottom = answer_box
    assert bottom <= WINDOW[1], "the answer is below the visible page"
    assert (pixels[top:bottom, left:right].min(-1) < 100).sum() > 20, "no answer text in the screenshot"


def test_server_error_is_shown(chromium: str, demo_server: RunningServer, tmp_path: Path) -> None:
    """An image over the server's pixel limit: the page shows the server's message, and the next ask works."""
    big_file, small_file = tmp_path / "big.png", tmp_path / "small.png"
    drawn_image(1, size=160).save(big_file)
    drawn_image(1, size=64).save(small_file)
    tools = open_page(chromium, demo_server)
    try:
        upload(tools, big_file, width=160)
        ask(tools, QUESTION, outcome="error")
        status = tools.evaluate("document.getElementById('status').textContent")
        assert "160x160 = 25600 pixels; the limit is 16384" in status
        assert tools.evaluate("document.getElementById('status').className") == "error"
        upload(tools, small_file, width=64)
        assert ask(tools, QUESTION)[0]
    finally:
        tools.close()
