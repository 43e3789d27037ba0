"""The web demo's screenshot (docs/serve/web_demo.png): a trained model answering a held-out question, in the page.

    kopru train --strategy projection --max-steps 600 --batch-size 16 --lr 1e-3 --builtin-train-size 1000 \\
        --builtin-eval-size 100 --eval-questions 800 --eval-every 0 --save-every 0 --output-dir runs/shapes-vlm
    python scripts/web_demo_screenshot.py --model runs/shapes-vlm/final --task colour --out docs/serve/web_demo.png

1. Serves the model as `kopru serve` does (`load_server`, on a free local port).
2. Measures it on the question type it will be shown answering: every held-out question of that task and
   language (scenes of the "test" split, which training never sees) asked the way the page asks (the image,
   then the question; greedy, at most 64 tokens), answers compared as the training evaluation compares them
   (`normalize_text`). The accuracy is printed: quote it beside the screenshot.
3. Opens the page in headless Chromium (Debian's `chromium`; driven over the DevTools protocol, no Selenium),
   uploads scene `--scene` of those questions, asks, checks that the page shows the engine's own answer and
   that it is the right one (it refuses to take a screenshot of a wrong answer), and saves the screenshot.

Needs the test extras (`websockets`). `tests/test_web_demo.py` drives the page with this file's helpers.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

WINDOW = (900, 760)
TASKS = ("colour", "count", "where", "exists")


# ------------------------------------------------------------------------------------------------ Chromium
def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def chromium(window: tuple[int, int] = WINDOW) -> Iterator[str]:
    """A headless Chromium with remote debugging on a free port; yields the DevTools HTTP address."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("expected Chromium on PATH (Debian: apt-get install -y chromium), found none")
    profile = tempfile.mkdtemp(prefix="kopru-chromium-")
    process = subprocess.Popen(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
         f"--window-size={window[0]},{window[1]}", "--force-device-scale-factor=1", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        for line in process.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            if "DevTools listening on" in line:
                address = line.split("ws://", 1)[1].split("/", 1)[0]
                break
            if time.monotonic() > deadline:
                raise RuntimeError("chromium did not start its DevTools server within 60 s")
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


class DevTools:
    """The few DevTools protocol calls the page needs, over one page's websocket."""

    def __init__(self, url: str) -> None:
        from websockets.sync import client

        self._stack = contextlib.ExitStack()  # entered as a context manager, as websockets >= 16 asks
        self.socket = self._stack.enter_context(client.connect(url, max_size=64 * 1024 * 1024, open_timeout=30))
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
                status = self.evaluate("document.getElementById('status') && "
                                       "document.getElementById('status').textContent")
                raise AssertionError(f"timed out waiting for {expression!r}; page status: {status!r}")
            time.sleep(0.1)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        self._stack.close()


def open_page(devtools_address: str, server_url: str, model_name: str, window: tuple[int, int] = WINDOW) -> DevTools:
    """The demo page of the server at `server_url`, loaded, showing `model_name` as its model."""
    with urllib.request.urlopen(devtools_address + "/json/list", timeout=30) as response:
        page = next(target for target in json.load(response) if target["type"] == "page")
    tools = DevTools(page["webSocketDebuggerUrl"])
    tools.call("Emulation.setDeviceMetricsOverride", width=window[0], height=window[1], deviceScaleFactor=1,
               mobile=False)
    tools.call("Page.enable")
    tools.call("Page.navigate", url=server_url + "/")
    tools.wait_for(f"document.readyState === 'complete' && "
                   f"document.getElementById('model').textContent === {json.dumps(model_name)}")
    return tools


def upload(tools: DevTools, image_file: Path, width: int) -> None:
    """Choose `image_file` in the page's file input; wait until its preview (`width` pixels wide) is drawn."""
    root = tools.call("DOM.getDocument")["root"]["nodeId"]
    file_input = tools.call("DOM.querySelector", nodeId=root, selector="#image")["nodeId"]
    tools.call("DOM.setFileInputFiles", nodeId=file_input, files=[str(image_file)])
    tools.wait_for("document.getElementById('preview').style.display === 'block' && "
                   "document.getElementById('preview').complete && "
                   f"document.getElementById('preview').naturalWidth === {width}")


def ask(tools: DevTools, question: str, outcome: str = "done") -> tuple[str, int]:
    """Type the question, press Ask, wait for the stream to end; (the answer shown, pieces received)."""
    tools.evaluate(f"document.getElementById('question').value = {json.dumps(question)}")
    tools.evaluate("document.getElementById('ask').click()")
    tools.wait_for("document.getElementById('answer').dataset.state !== 'streaming'")
    state = tools.evaluate("document.getElementById('answer').dataset.state")
    if state != outcome:
        status = tools.evaluate("document.getElementById('status').textContent")
        raise AssertionError(f"expected the page to end in state {outcome!r}, found {state!r}: {status!r}")
    return (tools.evaluate("document.getElementById('answer').textContent"),
            int(tools.evaluate("document.getElementById('answer').dataset.chunks")))


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """uvicorn serving `app` in a thread on a free local port; yields its URL."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the server did not start within 30 s")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# ------------------------------------------------------------------------------------------- the model
def page_prompt(engine, image, question: str) -> tuple[str, list]:
    """The prompt the page's request becomes in the server: an image part, then a text part."""
    from kopru.generation import format_chat

    parts = [{"type": "image", "image": image}, {"type": "text", "text": question}]
    return format_chat(engine.processor, [{"role": "user", "content": parts}])


def held_out_questions(task: str, language: str, scenes: int, seed: int) -> list:
    """Every question of `task` in `language` about `scenes` scenes of the held-out ("test") split."""
    from kopru.data.synthetic import shapes_dataset

    samples = shapes_dataset(scenes, seed=seed, languages=(language,), split="test")
    return [sample for sample in samples if sample.meta["task"] == f"shapes-{task}"]


def answers(engine, samples: list, batch_size: int = 8) -> list[str]:
    """The engine's greedy answers (at most 64 tokens, as the page asks) to each sample's question."""
    from kopru.generation import SamplingParams

    params = SamplingParams(max_new_tokens=64, temperature=0.0)
    texts = []
    for start in range(0, len(samples), batch_size):
        prompts, images = zip(*(page_prompt(engine, s.images[0], question_of(s)) for s in
                                samples[start:start + batch_size]), strict=True)
        texts += [done.text for done in engine.complete(list(prompts), list(images), params)]
    return texts


def question_of(sample) -> str:
    return sample.messages[0]["content"].removeprefix("<image>").strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved Köprü model (kopru train's OUTPUT_DIR/final)")
    parser.add_argument("--out", default="docs/serve/web_demo.png", help="where the screenshot goes")
    parser.add_argument("--task", choices=TASKS, default="colour", help="the question type shown and measured")
    parser.add_argument("--language", choices=["en", "tr"], default="en")
    parser.add_argument("--eval-scenes", type=int, default=300, help="held-out scenes to measure on (one question "
                                                                     "of the task each)")
    parser.add_argument("--eval-seed", type=int, default=1, help="seed of the held-out scenes (kopru train's own "
                                                                 "evaluation uses seed 0)")
    parser.add_argument("--scene", type=int, default=0, help="which of those questions the screenshot shows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the models are tiny)")
    args = parser.parse_args(argv)

    import torch

    from kopru.serve import ServerLimits, load_server

    torch.set_num_threads(args.threads)
    if find_chromium() is None:
        print("error: expected Chromium on PATH (Debian: apt-get install -y chromium), found none", file=sys.stderr)
        return 2
    app = load_server(args.model, limits=ServerLimits(batch_window_ms=5))
    try:
        return _measure_and_screenshot(app, args)
    finally:
        app.state.kopru.worker.close()


def _measure_and_screenshot(app, args: argparse.Namespace) -> int:
    from PIL import Image

    from kopru.alignment import normalize_text

    engine, name = app.state.kopru.worker.engine, app.state.kopru.model_name

    samples = held_out_questions(args.task, args.language, args.eval_scenes, args.eval_seed)
    if not 0 <= args.scene < len(samples):
        print(f"error: --scene must be between 0 and {len(samples) - 1}, found {args.scene}", file=sys.stderr)
        return 2
    given = answers(engine, samples)
    right = [normalize_text(answer, args.language) == normalize_text(str(s.meta["answer"]), args.language)
             for answer, s in zip(given, samples, strict=True)]
    chance = 1 / len(samples[0].meta["choices"])
    print(f"{name}: shapes-{args.task}/{args.language} held-out accuracy {sum(right) / len(right):.3f} "
          f"({sum(right)} of {len(right)} questions, chance {chance:.3f}; scenes of the test split, seed "
          f"{args.eval_seed})")

    shown = samples[args.scene]
    question, truth = question_of(shown), str(shown.meta["answer"])
    print(f"scene {args.scene}: {question!r} -> {given[args.scene]!r} (expected {truth!r})")
    if not right[args.scene]:
        print(f"error: the model answers scene {args.scene} wrongly; pick another --scene", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory() as folder, serving(app) as url, chromium() as devtools:
        image_file = Path(folder) / "scene.png"
        image: Image.Image = shown.images[0]
        image.save(image_file)
        tools = open_page(devtools, url, name)
        try:
            upload(tools, image_file, width=image.width)
            on_page, _ = ask(tools, question)
            if on_page != given[args.scene]:
                raise AssertionError(f"the page shows {on_page!r}; the engine answers {given[args.scene]!r}")
            png = tools.screenshot()
        finally:
            tools.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.open(io.BytesIO(png)).convert("RGB").save(args.out)
    print(f"screenshot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
