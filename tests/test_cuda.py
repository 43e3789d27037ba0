"""What only a CUDA device can show: bfloat16 generation against the reference loop, the compiled engine
(CUDA graphs) with no graph breaks, a bf16 training step and its resume, one request served from the GPU.

Every test here is marked `cuda` and skipped without a CUDA device; `scripts/gpu_check.sh` runs them
(`pytest -m cuda`) on a lent GPU. They mirror the CPU tests of the same things: tests/test_engine.py (greedy
engine vs `model.generate`, compiled vs eager), tests/test_training.py (resume) and tests/test_serve.py."""

from __future__ import annotations

import json
import math
import urllib.request

import pytest
import torch
from conftest import STRATEGIES, RunningServer, data_url, drawn_image, open_gates

from kopru.generation import GenerationEngine, SamplingParams, format_chat
from kopru.lesson.tiny import save_tiny_served_model
from kopru.training import TrainConfig, train
from kopru.training.checkpoint import latest_checkpoint

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# The prompts of tests/test_engine.py: two of different lengths (left padded), the second with two images.
PROMPTS = ["a red circle on the left of a blue <image> square", "<image> how many? <image> three."]
NEW_TOKENS = 8


@pytest.fixture
def images(make_image):
    return [[make_image(0)], [make_image(1), make_image(2)]]


def cuda_model(build, strategy: str):
    """A tiny random model in bfloat16 on the GPU whose images change its output (cross-attention gates open)."""
    model, processor = build(strategy)
    if strategy == "cross_attention":
        open_gates(model)
    return model.to("cuda", torch.bfloat16).eval(), processor


def on_cuda(batch: dict, dtype: torch.dtype) -> dict:
    """The processor's CPU tensors on the GPU; pixel values in the model's dtype."""
    return {key: (value.to("cuda", dtype) if value.is_floating_point() else value.to("cuda"))
            if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def record_logits(llm):
    seen = []
    handle = llm.register_forward_hook(lambda _llm, _args, output: seen.append(output.logits[:, -1].float().clone()))
    return seen, handle


def until_eos(tokens: list[int], eos: list[int]) -> list[int]:
    return next((tokens[:i] for i, token in enumerate(tokens) if token in eos), tokens)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_greedy_engine_equals_the_reference_loop(build, images, strategy) -> None:
    model, processor = cuda_model(build, strategy)
    batch = on_cuda(processor(PROMPTS, images, padding_side="left", add_special_tokens=False), torch.bfloat16)
    reference_logits, handle = record_logits(model.llm)
    try:
        reference = model.generate(**batch, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    finally:
        handle.remove()
    engine = GenerationEngine(model, processor)
    assert engine.device.type == "cuda"
    engine_logits, handle = record_logits(model.llm)
    try:
        completions = engine.complete(PROMPTS, images, SamplingParams(max_new_tokens=NEW_TOKENS))
    finally:
        handle.remove()
    for row, completion in enumerate(completions):
        assert completion.token_ids == until_eos(reference[row].tolist(), engine.eos_ids), row
    # The prefill's distribution itself: the static cache and the dynamic one see the same prompt. bf16 keeps
    # 8 bits of mantissa, so a logit of a few units is exact to about 0.02; different kernels (static vs
    # dynamic shapes) may round differently.
    torch.testing.assert_close(engine_logits[0], reference_logits[0], rtol=0.02, atol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiled_engine_has_no_graph_breaks_and_equals_eager(build, images, strategy) -> None:
    model, processor = cuda_model(build, strategy)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    eager = GenerationEngine(model, processor).complete(PROMPTS, images, params)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = GenerationEngine(model, processor, compile=True)
    for _ in range(2):  # the first call compiles and records the CUDA graphs, the second replays them
        assert compiled.complete(PROMPTS, images, params) == eager
        assert compiled.complete(PROMPTS[:1], images[:1], params) == eager[:1]  # batch 1: another bucket
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"


def _train_config(vision_dirs, llm_dirs, output, **overrides) -> TrainConfig:
    settings = dict(
        vision=str(vision_dirs["clip"]), llm=str(llm_dirs["llama"]), strategy="projection",
        train_data="builtin:shapes", builtin_train_size=24, builtin_eval_size=4, eval_questions=8,
        batch_size=8, max_steps=4, warmup_steps=1, lr=3e-3, eval_every=0, save_every=2,
        output_dir=str(output), seed=0, bf16=True,
    )
    return TrainConfig(**{**settings, **overrides})


@pytest.mark.slow
def test_bf16_training_step_and_resume(vision_dirs, llm_dirs, tmp_path) -> None:
    whole = train(_train_config(vision_dirs, llm_dirs, tmp_path / "whole"))
    assert len(whole.losses) == 4 and all(math.isfinite(loss) for loss in whole.losses), whole.losses

    killed = train(_train_config(vision_dirs, llm_dirs, tmp_path / "killed", stop_after=3))
    assert killed.steps == 3 and killed.final_model is None
    assert latest_checkpoint(tmp_path / "killed").name == "checkpoint-2"  # step 3 was lost with the "kill"
    resumed = train(_train_config(vision_dirs, llm_dirs, tmp_path / "killed", resume=True))
    assert resumed.steps == 4 and resumed.final_model is not None
    # Steps 1-2 come from the checkpoint as recorded; steps 3-4 are trained again from its weights and
    # optimizer state. CUDA's backward kernels are not bitwise deterministic (atomic adds), and bf16 rounds
    # to ~3 significant digits, so those match the uninterrupted run closely, not exactly.
    assert resumed.losses[:2] == killed.losses[:2]
    assert all(math.isfinite(loss) for loss in resumed.losses)
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(whole.losses), rtol=0.02, atol=0.02)


@pytest.mark.slow
def test_one_request_served_from_the_gpu(tmp_path) -> None:
    # The lent GPU machine has only what it came with: without the server's libraries this one test is skipped
    # (the reason lands in cuda_tests.json), not the whole module.
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from kopru.serve import ServerLimits, load_server, parse_chat_request

    model_dir = save_tiny_served_model(tmp_path)
    limits = ServerLimits(max_batch_size=4, batch_window_ms=50)
    server = RunningServer(load_server(model_dir, model_name="tiny-kopru", limits=limits, device="cuda",
                                       dtype="bfloat16"))
    try:
        engine = server.app.state.kopru.worker.engine
        assert engine.device.type == "cuda"
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(drawn_image(0))}},
                                                 {"type": "text", "text": "What is in the picture?"}]}]
        body = {"model": "tiny-kopru", "messages": messages, "max_tokens": 12, "temperature": 0}
        request = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
            reply = json.loads(response.read())
        # What the engine answers itself, with no server in between (as tests/test_serve.py checks on CPU).
        decoded = parse_chat_request(body, "tiny-kopru", limits, None).messages
        prompt, images = format_chat(engine.processor, decoded)
        expected = engine.complete([prompt], [images], SamplingParams(max_new_tokens=12, temperature=0.0))[0]
        assert expected.completion_tokens > 0
        assert reply["choices"][0]["message"]["content"] == expected.text
        assert reply["usage"]["completion_tokens"] == expected.completion_tokens
        assert reply["usage"]["prompt_tokens"] == expected.prompt_tokens
    finally:
        server.stop()
