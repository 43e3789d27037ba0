"""`kopru compare --preset micro` end to end: the report's structure, hand-counted image positions, and
accuracies that are real measurements (an untrained connector scores at chance)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kopru import KopruConfig, KopruForConditionalGeneration, VisionTowerConfig
from kopru.cli import main
from kopru.data.builtin import builtin_dataset
from kopru.data.encoding import SampleEncoder
from kopru.evaluation import answer_accuracy
from kopru.pretrain_tiny import default_backbones


def test_micro_preset_writes_the_report(tmp_path, capsys):
    output, json_path = tmp_path / "report", tmp_path / "results.json"
    assert main(["compare", "--preset", "micro", "--output", str(output), "--json", str(json_path)]) == 0
    printed = capsys.readouterr().out
    assert "| projection | projection-mlp |" in printed and "report.md" in printed
    for name in ("report.md", "results.json", "quality_vs_image_tokens.png", "quality_vs_trainable_params.png",
                 "latency.png", "loss_curves.png"):
        assert (output / name).stat().st_size > 0, name
    report = (output / "report.md").read_text()
    assert "## Verdict" in report and "| Trainable parameters |" in report

    entries = {e["strategy"]: e for e in json.loads(json_path.read_text())}
    assert set(entries) == {"projection", "qformer", "cross_attention"}
    for entry in entries.values():
        assert {"strategy", "variant", "trainable_params", "image_positions", "accuracy"} <= set(entry)
        assert 0.0 <= entry["accuracy"] <= 1.0
        assert entry["accuracy_by_task"]["all/en"]["chance"] > 0
    # 64 px / 8 px patches = 64 vision tokens (CLS dropped), markers <image_start>/<image_end> around them.
    assert entries["projection"]["image_positions"] == 64 + 2
    assert entries["qformer"]["image_positions"] == 32 + 2
    assert (entries["cross_attention"]["image_positions"], entries["cross_attention"]["cross_attention_kv"]) == (3, 64)
    assert entries["projection"]["trainable_params"] < entries["projection"]["total_params"]
    for entry in entries.values():  # a fresh process's peak: at least the weights, Python and torch
        assert entry["peak_memory_mb"] > 50

    # The Q-Former's contrastive head, trained by a stage-1 run, ranks the same held-out captions.
    itc = json.loads((output / "results.json").read_text())["alignment"]["itc_retrieval"]
    assert set(itc) == {"qformer-32"} and set(itc["qformer-32"]) == {"en", "tr"}
    for recall in itc["qformer-32"].values():
        assert recall["n"] == 6 and all(0.0 <= recall[k] <= 1.0 for k in ("i2t@1", "i2t@5", "t2i@1", "t2i@5"))
        assert recall["i2t@5"] >= recall["i2t@1"] and recall["t2i@5"] >= recall["t2i@1"]
    assert "contrastive (ITC) head" in report


@pytest.mark.trained
def test_an_untrained_connector_scores_at_chance(trained_seed, trained_figure):
    """The accuracy the report shows is measured: before any training the model answers from text alone."""
    backbones = default_backbones()
    torch.manual_seed(trained_seed)
    config = KopruConfig(vision=VisionTowerConfig(str(backbones["vision"])), llm=str(backbones["llm"]))
    model, processor = KopruForConditionalGeneration.from_backbones(config)
    questions = random.Random(0).sample(builtin_dataset("shapes", 60, "test"), 240)
    accuracy = answer_accuracy(model, SampleEncoder(processor, template="chat"), questions)
    for language in ("en", "tr"):
        found, chance = accuracy[f"all/{language}"]["accuracy"], accuracy[f"all/{language}"]["chance"]
        trained_figure(f"{language}/above_chance", found - chance)
        assert abs(found - chance) < 0.1, (language, found, chance)


def test_the_same_seed_reproduces_the_numbers(tmp_path):
    from kopru.compare import compare

    first = compare("micro", tmp_path / "a")
    second = compare("micro", tmp_path / "b")
    for a, b in zip(first["variants"], second["variants"], strict=True):
        assert a["variant"] == b["variant"]
        assert a["losses"] == b["losses"]
        assert a["accuracy_by_task"] == b["accuracy_by_task"]
    assert first["alignment"]["retrieval"] == second["alignment"]["retrieval"]
    assert first["alignment"]["itc_retrieval"] == second["alignment"]["itc_retrieval"]
