"""Shared fixtures: tiny random backbones saved once per session in Hugging Face format, and model builders.

Everything runs on CPU in float32 and eval mode; nothing is downloaded.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import io
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers.utils import logging as hf_logging

from kopru import KopruConfig, KopruForConditionalGeneration, KopruProcessor, VisionTowerConfig
from kopru.lesson.tiny import save_tiny_llm, save_tiny_vision

hf_logging.disable_progress_bar()
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker: with `-n 2` on 2 cores, two threads each oversubscribe the CPU, and the tiny
    # models' ops then wait on each other's scheduler slices (engine calls measured 40x slower).
    torch.set_num_threads(1)

# --- tests of trained numbers ----------------------------------------------------------------------------
# A test marked `trained` asserts on a figure that comes out of training (a loss, an accuracy, a recall). Another
# CPU rounds differently (AVX512, AVX2 or generic kernels, MKL's own dispatch, aarch64), training amplifies the
# difference, and the figure moves: such a test asserts with a margin that covers the spread measured over CPU
# profiles and seeds (`python scripts/trained_spread.py`, which runs these tests with `--trained-seeds` and
# collects what they report through `trained_figure`). `make test` runs them a second time on generic kernels.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--trained-seeds", default="0", help="seeds for tests that take `trained_seed`: '0', "
                     "'0,3' or '0-9' (scripts/trained_spread.py measures the spread of trained figures over them)")


def _seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "trained_seed" in metafunc.fixturenames:
        metafunc.parametrize("trained_seed", _seeds(metafunc.config.getoption("--trained-seeds")),
                             ids=lambda seed: f"seed{seed}")


@pytest.fixture
def trained_figure(request: pytest.FixtureRequest) -> Callable[..., None]:
    """trained_figure(name, value): report a trained figure the test asserts on. Written as a JSON line to
    $KOPRU_TRAINED_LOG when that is set (scripts/trained_spread.py), otherwise ignored."""

    def _record(name: str, value: float) -> None:
        path = os.environ.get("KOPRU_TRAINED_LOG")
        if path:
            seed = request.node.callspec.params.get("trained_seed") if hasattr(request.node, "callspec") else None
            test = re.sub(r"\[\]$", "", re.sub(r"-?seed\d+-?", "", request.node.name))
            line = {"test": test, "figure": name, "value": float(value), "seed": seed,
                    "capability": torch.backends.cpu.get_cpu_capability()}
            with open(path, "a") as log:
                log.write(json.dumps(line) + "\n")

    return _record


VISION_KINDS = ("clip", "siglip", "vit")
LLM_KINDS = ("llama", "qwen2", "gpt2")
STRATEGIES = ("projection", "qformer", "cross_attention")

# The tiny backbones' sizes (kopru.lesson.tiny defaults): vision 32x32 images, 8x8 patches, width 32, 2 layers;
# LLMs width 64, 4 layers.
IMAGE_SIZE, PATCH_SIZE, VISION_HIDDEN, VISION_LAYERS = 32, 8, 32, 2
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2
LLM_HIDDEN, LLM_LAYERS, NARROW_LLM_HIDDEN = 64, 4, 32

QFORMER = {"num_queries": 4, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}
CROSS_ATTENTION = {"every_n_layers": 2}
CONNECTORS: dict[str, dict | None] = {
    "projection": None, "qformer": QFORMER, "cross_attention": CROSS_ATTENTION,
}


def counting_config(strategy: str = "projection", connector=None, markers: bool = True, **config) -> KopruConfig:
    """A config to count image positions with: the backbones' names are never opened, nothing is loaded.
    markers=False: no <image_start>/<image_end> (HF's processors have none)."""
    return KopruConfig(vision=VisionTowerConfig("unused"), llm="unused", strategy=strategy, connector=connector,
                       image_start_token="<image_start>" if markers else None,
                       image_end_token="<image_end>" if markers else None, **config)


@pytest.fixture(scope="session")
def vision_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision")
    return {kind: save_tiny_vision(root / kind, kind) for kind in VISION_KINDS}


@pytest.fixture(scope="session")
def llm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm")
    return {
        "llama": save_tiny_llm(root / "llama", "llama", tie=False),  # grouped-query attention, untied head
        "qwen2": save_tiny_llm(root / "qwen2", "qwen2", tie=True),
        "gpt2": save_tiny_llm(root / "gpt2", "gpt2"),
        # Same family as "llama" but another width: a connector trained for one does not fit the other.
        "llama_narrow": save_tiny_llm(root / "llama_narrow", "llama", hidden=NARROW_LLM_HIDDEN, tie=False),
    }


Builder = Callable[..., tuple[KopruForConditionalGeneration, KopruProcessor]]


@pytest.fixture(scope="session")
def build(vision_dirs: dict[str, Path], llm_dirs: dict[str, Path]) -> Builder:
    """build(strategy, llm="llama", vision="clip", connector=<tiny default>, seed=0, **config)
    -> (model, processor), the model in eval mode.

    The seed fixes both the random connector and the rows `resize_token_embeddings` adds for the image tokens,
    so two builds with the same arguments are the same model.
    """

    def _build(strategy: str = "projection", llm: str = "llama", vision: str = "clip", connector=None,
               seed: int = 0, vision_config: dict | None = None, **config):
        torch.manual_seed(seed)
        kopru_config = KopruConfig(
            vision=VisionTowerConfig(str(vision_dirs[vision]), **(vision_config or {})),
            llm=str(llm_dirs[llm]),
            strategy=strategy,
            connector=CONNECTORS.get(strategy) if connector is None else connector,
            **config,
        )
        model, processor = KopruForConditionalGeneration.from_backbones(kopru_config)
        return model.eval(), processor

    return _build


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic random RGB image of width x height."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def make_image() -> Callable[[int], Image.Image]:
    """A deterministic random 48x40 RGB image per seed (not square, so the processor has to resize it)."""

    def _make(seed: int) -> Image.Image:
        return random_image(48, 40, seed)

    return _make


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus noise: every resampling filter gives a different result on it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / width, 255 * y / height, 127 + 127 * np.sin((x + y) / 7)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def open_gates(model: KopruForConditionalGeneration, value: float = 1.0) -> None:
    """Cross-attention blocks start with tanh(0) = 0 gates, where no image reaches the text (and no gradient the
    blocks' own weights); set both gates of every block to `value`."""
    with torch.no_grad():
        for block in model.connector.blocks:
            block.attn_gate.fill_(value)
            block.mlp_gate.fill_(value)


def free_port() -> int:
    """A port no other test (xdist runs them in parallel) is using."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def truncate(file: Path) -> None:
    """Cut a file to half its size (a write interrupted part way)."""
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def flip_bit(file: Path) -> None:
    """Flip one bit three quarters into a file: past any header, a bit of the data itself."""
    data = bytearray(file.read_bytes())
    data[len(data) * 3 // 4] ^= 0x10
    file.write_bytes(bytes(data))


# ------------------------------------------------------------------------------ serving (kopru serve tests)
SHAPE_COLOURS = [(220, 30, 30), (30, 160, 40), (30, 60, 220), (240, 200, 20)]


def drawn_image(seed: int, size: int = 64) -> Image.Image:
    """A coloured shape on a light background, different per seed."""
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    box = (8 + 4 * seed, 8, 40 + 4 * seed, 48)
    (draw.ellipse if seed % 2 else draw.rectangle)(box, fill=SHAPE_COLOURS[seed % len(SHAPE_COLOURS)])
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


class RunningServer:
    """uvicorn in a thread of this process, on a free port."""

    def __init__(self, app) -> None:
        import uvicorn

        from kopru.serve import uvicorn_config

        self.app = app
        # The settings `kopru serve` runs with (read timeout, connection limit), on a free port.
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", 0, log_level="warning",
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


# ------------------------------------------------------------------------------ kopru explain / kopru budget
EXPLAINED_IMAGE = (640, 480)  # not square: anyres, dynamic sizes and tiles each count it their own way


@pytest.fixture(scope="session")
def explained_preset() -> Callable[[str], Any]:
    """explained_preset(name): explain(preset=name, image=EXPLAINED_IMAGE, flops=False), built once per preset
    for the session (0.3-1 s each on the meta device; test_explain and test_budget read the same figures)."""
    from kopru.explain import explain  # here: every session imports conftest, few need explain (0.35 s)

    return functools.cache(lambda name: explain(preset=name, image=EXPLAINED_IMAGE, flops=False))


# ------------------------------------------------------------------------------ kopru budget
def run_cli(*args: str) -> tuple[int, str, str]:
    """`kopru budget ARGS` in this process: (exit code, stdout, stderr)."""
    from kopru.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["budget", *args])
    return code, out.getvalue(), err.getvalue()


def budget_json(*args: str, exit_code: int = 0) -> dict:
    """`kopru budget ARGS --json`, parsed; the exit code checked."""
    code, out, err = run_cli(*args, "--json")
    assert code == exit_code, err
    return json.loads(out)


@pytest.fixture
def load_script(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Any]:
    """load_script("scripts/compare_run.py"): a script of this repository imported as a module, registered in
    sys.modules under its file name for the test (its dataclasses look their module up there)."""

    def _load(relative_path: str) -> Any:
        path = Path(__file__).resolve().parents[1] / relative_path
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, path.stem, module)
        spec.loader.exec_module(module)
        return module

    return _load
