"""Training: resume gives the same losses as an uninterrupted run, two processes the same as one, config
files and flags combine, bad input stops or is counted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from kopru.checkpoint import latest_checkpoint
from kopru.training import TrainConfig, read_config_file, train, warmup_cosine


def _config(vision_dirs, llm_dirs, tmp_path, **overrides) -> TrainConfig:
    settings = dict(
        vision=str(vision_dirs["clip"]), llm=str(llm_dirs["llama"]), strategy="projection",
        train_data="builtin:shapes", builtin_train_size=24, builtin_eval_size=4, eval_questions=8,
        batch_size=8, max_steps=6, warmup_steps=2, lr=3e-3, eval_every=0, save_every=2,
        output_dir=str(tmp_path / "run"), seed=0,
    )
    return TrainConfig(**{**settings, **overrides})


@pytest.mark.trained
@pytest.mark.parametrize("strategy", ["projection", "cross_attention"])
def test_resume_gives_the_losses_of_an_uninterrupted_run(vision_dirs, llm_dirs, tmp_path, strategy, trained_seed,
                                                         trained_figure):
    connector = {"every_n_layers": 2} if strategy == "cross_attention" else {}
    whole = train(_config(vision_dirs, llm_dirs, tmp_path / "a", strategy=strategy, connector=connector,
                          seed=trained_seed))
    trained_figure("loss_drop", whole.losses[0] - whole.losses[-1])
    assert len(whole.losses) == 6 and whole.losses[-1] < whole.losses[0]

    killed = train(_config(vision_dirs, llm_dirs, tmp_path / "b", strategy=strategy, connector=connector,
                           stop_after=3, seed=trained_seed))
    assert killed.steps == 3 and killed.final_model is None
    assert latest_checkpoint(tmp_path / "b" / "run").name == "checkpoint-2"  # step 3 was lost with the "kill"
    resumed = train(_config(vision_dirs, llm_dirs, tmp_path / "b", strategy=strategy, connector=connector,
                            resume=True, seed=trained_seed))
    assert resumed.steps == 6
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(whole.losses), rtol=0, atol=1e-6)


@pytest.mark.parametrize("strategy", ["projection", "cross_attention"])
def test_gradient_checkpointing_keeps_the_losses(vision_dirs, llm_dirs, tmp_path, strategy):
    connector = {"every_n_layers": 2} if strategy == "cross_attention" else {}
    plain = train(_config(vision_dirs, llm_dirs, tmp_path / "a", strategy=strategy, connector=connector,
                          max_steps=3, save_every=0))
    checkpointed = train(_config(vision_dirs, llm_dirs, tmp_path / "b", strategy=strategy, connector=connector,
                                 max_steps=3, save_every=0, gradient_checkpointing=True))
    torch.testing.assert_close(torch.tensor(checkpointed.losses), torch.tensor(plain.losses), rtol=0, atol=1e-5)


def test_gradient_accumulation_matches_one_large_batch(vision_dirs, llm_dirs, tmp_path):
    large = train(_config(vision_dirs, llm_dirs, tmp_path / "a", max_steps=3, save_every=0))
    accumulated = train(_config(vision_dirs, llm_dirs, tmp_path / "b", max_steps=3, save_every=0,
                                batch_size=4, grad_accum=2))
    torch.testing.assert_close(torch.tensor(accumulated.losses), torch.tensor(large.losses), rtol=0, atol=1e-5)


def test_packing_gives_the_losses_of_padded_batches(vision_dirs, llm_dirs, tmp_path):
    padded = train(_config(vision_dirs, llm_dirs, tmp_path / "a", max_steps=3, save_every=0))
    packed = train(_config(vision_dirs, llm_dirs, tmp_path / "b", max_steps=3, save_every=0, packing=True,
                           pack_length=128))
    torch.testing.assert_close(torch.tensor(packed.losses), torch.tensor(padded.losses), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_give_the_losses_of_one(vision_dirs, llm_dirs, tmp_path, sharding):
    from kopru import KopruForConditionalGeneration

    single = train(_config(vision_dirs, llm_dirs, tmp_path / "single", max_steps=3, save_every=0))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        "-m", "kopru.cli", "train", "--vision", str(vision_dirs["clip"]), "--llm", str(llm_dirs["llama"]),
        "--builtin-train-size", "24", "--builtin-eval-size", "4", "--eval-questions", "8", "--batch-size", "4",
        "--max-steps", "3", "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "0", "--save-every", "2",
        "--output-dir", str(tmp_path / "ddp"), "--seed", "0", "--fsdp", str(sharding == "fsdp"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]  # the whole tail: a child's abort says little else
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(single.losses), rtol=0, atol=1e-5)
    # The saved model (gathered from the shards under FSDP) equals the single-process one.
    a, processor = KopruForConditionalGeneration.from_pretrained(ddp["final_model"])
    b, _ = KopruForConditionalGeneration.from_pretrained(single.final_model)
    batch = processor(["<image>\nHow many?"], [[_image()]])
    with torch.no_grad():
        torch.testing.assert_close(a(**batch).logits, b(**batch).logits, rtol=0, atol=1e-4)


def _free_port() -> int:
    """A port no other test (xdist runs them in parallel) is using for its rendezvous."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (200, 30, 30))


def test_align_recipe_trains_only_the_connector_and_saves_it(vision_dirs, llm_dirs, tmp_path):
    summary = train(_config(vision_dirs, llm_dirs, tmp_path, recipe="align", max_steps=2, save_every=0))
    connector_params = 32 * 64 + 64 + 64 * 64 + 64  # mlp2x_gelu: vision 32 -> LLM 64 -> 64
    assert summary.trainable_params == connector_params
    saved = sorted(p.name for p in (tmp_path / "run" / "final").iterdir())
    assert saved == ["connector.safetensors", "kopru_config.json"]


def test_lora_recipe_saves_a_merged_plain_model(vision_dirs, llm_dirs, tmp_path):
    from kopru import KopruForConditionalGeneration

    summary = train(_config(vision_dirs, llm_dirs, tmp_path, recipe="instruct", max_steps=2, save_every=0,
                            lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    full = train(_config(vision_dirs, llm_dirs, tmp_path / "full", recipe="instruct", max_steps=1, save_every=0))
    assert summary.trainable_params < full.trainable_params
    model, _ = KopruForConditionalGeneration.from_pretrained(summary.final_model)
    assert not any("lora" in name for name, _ in model.llm.named_parameters())
    assert model.config.name == "run"  # the run folder's name (output_dir = tmp_path / "run"): kopru serve's id


def test_config_file_and_flags(tmp_path, vision_dirs, llm_dirs):
    (tmp_path / "c.yaml").write_text(f"vision: {vision_dirs['clip']}\nllm: {llm_dirs['llama']}\nlr: 0.5\nmax_steps: 9\n")
    (tmp_path / "c.toml").write_text(f'vision = "{vision_dirs["clip"]}"\nllm = "{llm_dirs["llama"]}"\nlr = 0.5\n')
    assert read_config_file(tmp_path / "c.yaml")["max_steps"] == 9
    config = TrainConfig.from_file(tmp_path / "c.toml", lr=0.01, batch_size=None)
    assert config.lr == 0.01 and config.batch_size == 16
    (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['learning_rate'\]"):
        read_config_file(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="unknown recipe 'stage3'"):
        TrainConfig(vision="v", llm="l", recipe="stage3")


def test_warmup_then_cosine():
    factor = warmup_cosine(warmup=4, total=12)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(8) == pytest.approx(0.5) and factor(12) == pytest.approx(0.0)


def test_nan_loss_stops_with_the_last_good_checkpoint(vision_dirs, llm_dirs, tmp_path, monkeypatch):
    from kopru import training

    real = training._all_reduce_sum
    calls = {"n": 0}

    def poisoned(value, device):
        result = real(value, device)
        if torch.is_tensor(value):
            calls["n"] += 1
            if calls["n"] == 3:
                return math.nan
        return result

    monkeypatch.setattr(training, "_all_reduce_sum", poisoned)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3.*checkpoint-2"):
        train(_config(vision_dirs, llm_dirs, tmp_path))


def test_bad_samples_are_counted_in_the_summary(vision_dirs, llm_dirs, tmp_path, make_image):
    make_image(0).save(tmp_path / "ok.png")
    lines = [json.dumps({"image": "ok.png", "caption": f"a picture number {i}"}) for i in range(8)]
    lines += [json.dumps({"image": "missing.png", "caption": "gone"}), "{not json"]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    summary = train(_config(vision_dirs, llm_dirs, tmp_path, recipe="align", train_data=str(tmp_path / "data.jsonl"),
                            eval_data=None, max_steps=1, save_every=0, batch_size=4))
    assert summary.skipped == {"missing_image": 1, "corrupt_json": 1}
    with pytest.raises(ValueError, match="missing"):
        train(_config(vision_dirs, llm_dirs, tmp_path / "strict", recipe="align", skip_policy="error",
                      train_data=str(tmp_path / "data.jsonl"), max_steps=1, save_every=0, batch_size=4))


def test_qformer_stage1_recipe_then_align(vision_dirs, llm_dirs, tmp_path):
    qformer = {"num_queries": 4, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}
    stage1 = train(_config(vision_dirs, llm_dirs, tmp_path / "s1", strategy="qformer", connector=qformer,
                           recipe="qformer-stage1", max_steps=3, batch_size=4))
    assert stage1.steps == 3 and all(math.isfinite(x) for x in stage1.losses)
    align = train(_config(vision_dirs, llm_dirs, tmp_path / "s2", strategy="qformer", connector=qformer,
                          recipe="align", init_connector=stage1.final_model, max_steps=1, save_every=0))
    assert align.steps == 1
    with pytest.raises(ValueError, match="needs the qformer strategy"):
        train(_config(vision_dirs, llm_dirs, tmp_path / "s3", recipe="qformer-stage1", max_steps=1))


@pytest.mark.parametrize("name", ["train_builtin.yaml", "train_llava_format.toml"])
def test_example_configs_parse(name):
    from pathlib import Path

    settings = read_config_file(Path(__file__).parent.parent / "examples" / name)
    config = TrainConfig(**settings)
    assert config.max_steps > 0
