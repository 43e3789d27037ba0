"""Training: resume gives the same losses as an uninterrupted run, two processes the same as one, config
files and flags combine, bad input stops or is counted."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import flip_bit, free_port, truncate
from safetensors.torch import load_file

from kopru.data.sample import Sample
from kopru.training import (
    QFORMER_HEADS_FILE,
    EncodedDataset,
    TrainConfig,
    build_model,
    global_batches,
    read_config_file,
    seed_everything,
    train,
    warmup_cosine,
)
from kopru.training.checkpoint import latest_checkpoint


def _config(vision_dirs, llm_dirs, tmp_path, **overrides) -> TrainConfig:
    settings = dict(
        vision=str(vision_dirs["clip"]), llm=str(llm_dirs["llama"]), strategy="projection",
        train_data="builtin:shapes", builtin_train_size=24, builtin_eval_size=4, eval_questions=8,
        batch_size=8, max_steps=6, warmup_steps=2, lr=3e-3, eval_every=0, save_every=2,
        output_dir=str(tmp_path / "run"), seed=0,
    )
    return TrainConfig(**{**settings, **overrides})


@pytest.mark.trained
@pytest.mark.slow  # the quick loop keeps the resumes from damaged checkpoints, which compare losses too
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
@pytest.mark.slow
def test_two_processes_give_the_losses_of_one(vision_dirs, llm_dirs, tmp_path, sharding):
    from kopru import KopruForConditionalGeneration

    single = train(_config(vision_dirs, llm_dirs, tmp_path / "single", max_steps=3, save_every=0))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
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
    from kopru.training import loop as training

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
    settings = dict(strategy="qformer", connector=qformer, batch_size=4)
    stage1 = train(_config(vision_dirs, llm_dirs, tmp_path / "s1", recipe="qformer-stage1", max_steps=3, **settings))
    assert stage1.steps == 3
    trained = load_file(Path(stage1.final_model) / "connector.safetensors")
    # Stage 1 trains the Q-Former alone: against the same seed's untrained connector, its weights moved and the
    # projection into the LLM did not. Its contrastive head is saved beside it.
    seed_everything(0)
    initial = build_model(_config(vision_dirs, llm_dirs, tmp_path, recipe="qformer-stage1", **settings))[0]
    initial = initial.connector.state_dict()
    assert trained.keys() == initial.keys()
    changed = {name for name in trained if not torch.equal(trained[name], initial[name])}
    assert changed and all(name.startswith("qformer.") for name in changed)
    assert (Path(stage1.final_model) / QFORMER_HEADS_FILE).is_file()
    # align starts from that connector: at learning rate 0 it saves exactly what it loaded.
    align = train(_config(vision_dirs, llm_dirs, tmp_path / "s2", recipe="align", init_connector=stage1.final_model,
                          max_steps=1, save_every=0, lr=0.0, **settings))
    saved = load_file(Path(align.final_model) / "connector.safetensors")
    assert all(torch.equal(saved[name], trained[name]) for name in trained)
    with pytest.raises(ValueError, match="needs the qformer strategy"):
        train(_config(vision_dirs, llm_dirs, tmp_path / "s3", recipe="qformer-stage1", max_steps=1))


@pytest.mark.parametrize("name", ["train_builtin.yaml", "train_llava_format.toml"])
def test_example_configs_parse(name):
    # Fails when an example drifts from TrainConfig: a setting renamed or removed, a value not of its field's type
    # (read_config_file checks both), a recipe or size TrainConfig refuses.
    settings = read_config_file(Path(__file__).parent.parent / "examples" / name)
    TrainConfig(**settings)


def test_config_file_values_are_checked_against_the_field_types(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1e-3\n")  # YAML 1.1: no dot, so a string
    with pytest.raises(ValueError, match=r"c.yaml: lr: expected float, found '1e-3' \(str\)"):
        read_config_file(tmp_path / "c.yaml")
    (tmp_path / "c.toml").write_text('feature_layer = [-2, "x"]\nmax_steps = 3\n')
    with pytest.raises(ValueError, match=r"feature_layer: expected int \| list\[int\], found \[-2, 'x'\]"):
        read_config_file(tmp_path / "c.toml")
    (tmp_path / "ok.toml").write_text("feature_layer = [-2, -1]\nlr = 1\nbf16 = false\n")
    assert read_config_file(tmp_path / "ok.toml") == {"feature_layer": [-2, -1], "lr": 1.0, "bf16": False}
    assert isinstance(read_config_file(tmp_path / "ok.toml")["lr"], float)  # an int where a float is due


# ------------------------------------------------------------------------------------ resume you can trust
# Issue 13's training defects 8-12, each against the behaviour an uninterrupted run has. One finished run of 4
# steps (checkpoints at 2 and 4) is made once and copied for each test.
def _short(vision_dirs, llm_dirs, tmp_path, **overrides) -> TrainConfig:
    return _config(vision_dirs, llm_dirs, tmp_path, **{"max_steps": 4, "builtin_eval_size": 1, **overrides})


@pytest.fixture(scope="module")
def finished_run(vision_dirs, llm_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    summary = train(_short(vision_dirs, llm_dirs, root))
    assert sorted(p.name for p in (root / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return root / "run", summary


@pytest.fixture
def run_copy(finished_run, tmp_path):
    shutil.copytree(finished_run[0], tmp_path / "run")
    return tmp_path / "run"


def _log_lines(capsys) -> list[str]:
    return [line.removeprefix("kopru train: ") for line in capsys.readouterr().err.splitlines()
            if line.startswith("kopru train: ")]


@pytest.mark.parametrize(("damage", "expected"), [
    # defect 10: a truncated safetensors file, a truncated trainer_state.json, flipped bits
    ("trainable.safetensors", r"checkpoint-4/trainable.safetensors: expected [\d,]+ bytes, found [\d,]+ \(truncated\)"),
    ("trainer_state.json", r"checkpoint-4/trainer_state.json: expected [\d,]+ bytes, found [\d,]+ \(truncated\)"),
    ("flip optimizer.safetensors", r"checkpoint-4/optimizer.safetensors: expected sha256 [0-9a-f]{64}, found"),
], ids=["truncated-safetensors", "truncated-trainer-state", "flipped-bit"])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_resumed(vision_dirs, llm_dirs, run_copy, finished_run,
                                                                     capsys, damage, expected):
    if damage.startswith("flip "):
        flip_bit(run_copy / "checkpoint-4" / damage.removeprefix("flip "))
    else:
        truncate(run_copy / "checkpoint-4" / damage)
    capsys.readouterr()
    resumed = train(_short(vision_dirs, llm_dirs, run_copy.parent, resume=True))
    lines = _log_lines(capsys)
    assert re.search(expected, lines[0]) and lines[0].startswith(str(run_copy))
    assert lines[1].startswith(f"resuming from {run_copy / 'checkpoint-2'}, the newest intact checkpoint")
    # Steps 3 and 4 again from checkpoint-2: the losses of the run that was never damaged.
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(finished_run[1].losses), rtol=0, atol=1e-6)


@pytest.mark.parametrize("pointer", ["checkpoint-6", "../elsewhere/checkpoint-20"])
def test_latest_missing_or_outside_falls_back_to_the_newest_intact_checkpoint(vision_dirs, llm_dirs, run_copy,
                                                                                finished_run, capsys, pointer):
    # defect 10: `latest` naming a missing checkpoint, or one outside the output folder (an intact copy of
    # checkpoint-2 waits there: following it would train steps 3 and 4 again)
    shutil.copytree(run_copy / "checkpoint-2", run_copy.parent / "elsewhere" / "checkpoint-20")
    (run_copy / "latest").write_text(pointer + "\n")
    capsys.readouterr()
    resumed = train(_short(vision_dirs, llm_dirs, run_copy.parent, resume=True))
    lines = _log_lines(capsys)
    assert lines[0].startswith(f"{run_copy / 'latest'}: expected ")
    assert ("found nothing there" if pointer == "checkpoint-6" else "not followed") in lines[0]
    assert lines[1].startswith(f"resuming from {run_copy / 'checkpoint-4'}")
    assert resumed.steps == 4 and resumed.losses == finished_run[1].losses  # nothing trained again


def test_partial_checkpoints_are_removed_at_the_next_start(vision_dirs, llm_dirs, run_copy, capsys):
    # defect 9: what a kill in the middle of writing checkpoint-6 leaves (atomic_directory's staging folder)
    partial = run_copy / ".checkpoint-6.k1ll3d"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"\0" * 100)
    capsys.readouterr()
    train(_short(vision_dirs, llm_dirs, run_copy.parent, resume=True))
    assert not partial.exists()
    assert f"removed {partial}, left by an interrupted checkpoint save" in _log_lines(capsys)


def test_keep_last_rotates_checkpoints(vision_dirs, llm_dirs, tmp_path):
    # defect 9: every checkpoint was kept forever
    train(_short(vision_dirs, llm_dirs, tmp_path, save_every=1, keep_last=2))
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-4"
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        _short(vision_dirs, llm_dirs, tmp_path, keep_last=0)


def test_skip_counts_are_the_same_after_a_resume(vision_dirs, llm_dirs, tmp_path, make_image):
    # defect 8: the saved counts were added to the counts collected again
    make_image(0).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:100])
    lines = [json.dumps({"image": "ok.png", "caption": f"a picture number {i}"}) for i in range(10)]
    lines[4] = json.dumps({"image": "cut.png", "caption": "unreadable, found when encoded"})
    lines += [json.dumps({"image": "missing.png", "caption": "gone"}), "{not json"]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    settings = dict(recipe="align", train_data=str(tmp_path / "data.jsonl"), eval_data=None, batch_size=4,
                    max_steps=6, save_every=2)
    whole = train(_config(vision_dirs, llm_dirs, tmp_path / "a", **settings))
    train(_config(vision_dirs, llm_dirs, tmp_path / "b", stop_after=5, **settings))
    resumed = train(_config(vision_dirs, llm_dirs, tmp_path / "b", resume=True, **settings))
    assert whole.skipped == {"corrupt_json": 1, "missing_image": 1, "unreadable_image": 1}
    assert resumed.skipped == whole.skipped


def test_a_resume_refuses_changed_settings_and_lists_them(vision_dirs, llm_dirs, run_copy):
    # defect 11: another --batch-size or --seed was accepted silently (losses diverge), another --lr ignored
    with pytest.raises(ValueError) as refused:
        train(_short(vision_dirs, llm_dirs, run_copy.parent, resume=True, batch_size=4, seed=1, lr=1e-3,
                     max_steps=5))
    message = str(refused.value)
    assert "--resume from" in message and "checkpoint-4 refused" in message
    assert "global batch (--batch-size x processes x --grad-accum): saved 8, given 4" in message
    assert "--seed: saved 0, given 1" in message and "--lr: saved 0.003, given 0.001" in message
    assert "training data (--train-data: its samples' fingerprint): saved builtin:shapes (192 samples" in message
    assert "--max-steps" not in message  # raising it is allowed
    assert "--resume-allow-changes true" in message


def _saved_lrs(checkpoint) -> list[tuple[float, float]]:
    groups = json.loads((checkpoint / "optimizer.json").read_text())["param_groups"]
    return [(group["initial_lr"], group["lr"]) for group in groups]


def test_raising_max_steps_recomputes_the_schedule(vision_dirs, llm_dirs, run_copy, capsys):
    capsys.readouterr()
    longer = train(_short(vision_dirs, llm_dirs, run_copy.parent, resume=True, max_steps=6, save_every=1))
    assert longer.steps == 6
    # At step 5 the cosine over 6 steps, not the finished one over 4 (which gives 0 from step 4 on).
    factor = warmup_cosine(2, 6)(5)
    assert factor > 0.1 and warmup_cosine(2, 4)(5) == 0
    assert _saved_lrs(run_copy / "checkpoint-5") == [(3e-3, pytest.approx(3e-3 * factor, rel=1e-12))] * 4
    assert any(line.startswith(f"resuming {run_copy / 'checkpoint-4'} at step 4 with changed settings: "
                               "--max-steps: saved 4, given 6") for line in _log_lines(capsys))


def test_resume_allow_changes_applies_the_given_learning_rate(vision_dirs, llm_dirs, run_copy):
    train(_short(vision_dirs, llm_dirs, run_copy.parent, resume=True, max_steps=6, save_every=1, lr=1e-3,
                 resume_allow_changes=True))
    # every parameter group (connector and LLM, with and without weight decay)
    assert _saved_lrs(run_copy / "checkpoint-5") == [(1e-3, pytest.approx(1e-3 * warmup_cosine(2, 6)(5)))] * 4


def _data_with_a_bad_sample_late(tmp_path, make_image):
    """12 captions, the one at index 9 with an unreadable image; batch 4 in a seeded order (returned)."""
    make_image(0).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:100])
    lines = [json.dumps({"id": f"s{i}", "image": "ok.png", "caption": "a caption of some length " * (1 + i % 3)})
             for i in range(12)]
    lines[9] = json.dumps({"id": "bad", "image": "cut.png", "caption": "never readable " * 2})
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    samples = [Sample([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": json.loads(x)["caption"]}],
                      ["x"]) for x in lines]
    return global_batches(EncodedDataset(samples, encoder=None), 4, seed=0, epoch=0, grouped=True)


def test_skip_policy_error_finds_a_bad_sample_before_step_1(vision_dirs, llm_dirs, tmp_path, make_image):
    # defect 12: the bad sample was found only when the run reached it
    order = _data_with_a_bad_sample_late(tmp_path, make_image)
    assert 9 not in order[0]  # training would reach it after at least one step
    with pytest.raises(ValueError, match=r"sample 'bad': expected a readable image.*\[unreadable_image\]"):
        train(_config(vision_dirs, llm_dirs, tmp_path, recipe="align", train_data=str(tmp_path / "data.jsonl"),
                      eval_data=None, batch_size=4, max_steps=3, save_every=1, skip_policy="error"))
    assert not (tmp_path / "run" / "checkpoint-1").exists()  # not one step was taken


def test_validate_data_counts_every_bad_sample_before_step_1(vision_dirs, llm_dirs, tmp_path, make_image, capsys):
    _data_with_a_bad_sample_late(tmp_path, make_image)
    with (tmp_path / "data.jsonl").open("a") as data:
        data.write(json.dumps({"image": "ok.png", "caption": "far too long " * 40}) + "\n{broken\n")
    capsys.readouterr()
    summary = train(_config(vision_dirs, llm_dirs, tmp_path, recipe="align", train_data=str(tmp_path / "data.jsonl"),
                            eval_data=None, batch_size=4, max_steps=1, save_every=0, max_length=100,
                            validate_data=True))
    # One step reaches 4 of the 13 samples; the check found both bad ones wherever they are.
    assert summary.skipped == {"corrupt_json": 1, "too_long": 1, "unreadable_image": 1}
    lines = _log_lines(capsys)
    assert re.fullmatch(r"data check before step 1, training data: 11 of 13 samples usable \([\d.]+ s\); skipped: "
                        r"too_long 1, unreadable_image 1; records refused when the data was read: corrupt_json 1",
                        lines[0])
    assert any("sample 'bad': expected a readable image" in line for line in lines[1:])


def test_log_every_sets_the_metrics_lines_and_the_progress_bar(vision_dirs, llm_dirs, tmp_path, capsys):
    capsys.readouterr()
    summary = train(_short(vision_dirs, llm_dirs, tmp_path, log_every=3, save_every=0))  # 4 steps
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [3, 4]  # every 3rd step, and the last
    assert lines[0]["loss"] == pytest.approx(sum(summary.losses[:3]) / 3, rel=1e-12)
    assert lines[1]["loss"] == pytest.approx(summary.losses[3], rel=1e-12)
    # The rate each logged step trained with: step N uses the schedule's factor N - 1 (it starts at 0).
    assert [line["lr"] for line in lines] == [pytest.approx(3e-3 * warmup_cosine(2, 4)(step - 1)) for step in (3, 4)]
    # The progress bar's loss changes only at those steps (tqdm redraws on each update, with the last postfix).
    shown = set(re.findall(r"loss=([\d.]+)", capsys.readouterr().err))
    assert shown == {f"{line['loss']:.4f}" for line in lines}

    train(_short(vision_dirs, llm_dirs, tmp_path / "quiet", log_every=0, save_every=0, max_steps=1))
    assert not (tmp_path / "quiet" / "run" / "metrics.jsonl").exists()
    assert "loss=" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="log_every must be >= 0"):
        _short(vision_dirs, llm_dirs, tmp_path, log_every=-1)


def test_a_resumed_run_rewrites_the_metrics_after_its_step(vision_dirs, llm_dirs, run_copy):
    finished = (run_copy / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in finished.splitlines()] == [4]  # log_every 10: the last step
    shutil.rmtree(run_copy / "checkpoint-4")
    (run_copy / "latest").write_text("checkpoint-2\n")
    train(_short(vision_dirs, llm_dirs, run_copy.parent, resume=True))  # steps 3 and 4 again
    again = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    # One line for step 4 (not two), its mean over steps 1-4 though the resumed process ran only 3 and 4.
    assert [line["step"] for line in again] == [4]
    assert again[0]["loss"] == pytest.approx(json.loads(finished)["loss"], abs=1e-6)
