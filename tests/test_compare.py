"""`kopru compare --preset micro` end to end: the report's structure, hand-counted image positions, accuracies
that are real measurements (an untrained connector scores at chance), and the verdict logic on constructed
results: a clear win, a clear loss and an overlap."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kopru import KopruConfig, KopruForConditionalGeneration, VisionTowerConfig
from kopru.backbones import default_backbones
from kopru.cli import main
from kopru.data.builtin import builtin_dataset
from kopru.data.encoding import SampleEncoder
from kopru.data.formats import load_samples, open_image
from kopru.data.synthetic import shapes_dataset
from kopru.evaluation import answer_accuracy
from kopru.lesson.compare import RunResult, aggregate, compare, quality_comparisons
from kopru.lesson.report import bar_misses, halfway_bar, most_frequent_answer_text, verdict_rows
from kopru.lesson.significance import FAILS, HOLDS, INCONCLUSIVE

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_micro_preset_writes_the_report_and_the_same_seed_reproduces_it(tmp_path, capsys, monkeypatch):
    output, json_path = tmp_path / "report", tmp_path / "results.json"
    assert main(["compare", "--preset", "micro", "--output", str(output), "--json", str(json_path)]) == 0
    printed = capsys.readouterr().out
    assert "| projection | projection-mlp |" in printed and "report.md" in printed
    for name in ("report.md", "results.json", "quality_vs_image_tokens.png", "quality_vs_trainable_params.png",
                 "accuracy_by_task.png", "latency.png", "loss_curves.png"):
        assert (output / name).stat().st_size > 0, name
    report = (output / "report.md").read_text()
    assert "## Verdict" in report and "| Quality: projection above Q-Former |" in report

    entries = {e["strategy"]: e for e in json.loads(json_path.read_text())}
    assert set(entries) == {"projection", "qformer", "cross_attention"}
    for entry in entries.values():
        assert {"strategy", "variant", "trainable_params", "image_positions", "accuracy"} <= set(entry)
        by_task = entry["accuracy_by_task"]
        en, tr = by_task["all/en"], by_task["all/tr"]
        # One seed: each accuracy is a count of right answers over its questions, the overall one the two
        # languages' pooled, and each language's questions are its tasks' questions.
        for cell in by_task.values():
            assert cell["mean"] * cell["n"] == pytest.approx(round(cell["mean"] * cell["n"]), abs=1e-9), cell
        assert entry["accuracy"] == pytest.approx((en["mean"] * en["n"] + tr["mean"] * tr["n"]) / (en["n"] + tr["n"]))
        for language in ("en", "tr"):
            tasks = [cell for key, cell in by_task.items() if key.endswith(f"/{language}") and not key.startswith("all/")]
            assert sum(cell["n"] for cell in tasks) == by_task[f"all/{language}"]["n"] > 0
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
        # Recall@k over 6 held-out pairs: a count of 6, never less at 5 than at 1; chance k / 6.
        assert recall["n"] == 6 and (recall["chance@1"], recall["chance@5"]) == pytest.approx((1 / 6, 5 / 6))
        for key in ("i2t@1", "i2t@5", "t2i@1", "t2i@5"):
            assert recall[key] * 6 == pytest.approx(round(recall[key] * 6), abs=1e-5), (key, recall[key])
        assert recall["i2t@5"] >= recall["i2t@1"] and recall["t2i@5"] >= recall["t2i@1"]
    assert "contrastive (ITC) head" in report

    # Every quality comparison and the speed rows carry an interval and a scale; micro skips the lesson's scale.
    results = json.loads((output / "results.json").read_text())
    rows = {row["claim"]: row for row in verdict_rows(results)}
    for claim in ("Quality: cross-attention above projection", "Quality: cross-attention above Q-Former",
                  "Quality: projection above Q-Former", "Time to first token", "Decode speed"):
        assert rows[claim]["interval"] and rows[claim]["scale"], claim
    # Each verdict follows its rule from the measured figures: a quality claim "a above b" holds when the 95%
    # interval of a - b is above 0, fails when below, else is inconclusive; a speed claim when every repeat of one
    # side is beyond every repeat of the other (for each pair it compares).
    differences = results["quality"]["differences"]
    accuracy = {e["strategy"]: e["accuracy"] for e in results["variants"] if not e["stage1"]}
    for claim, a, b in (("Quality: cross-attention above projection", "cross_attention", "projection"),
                        ("Quality: cross-attention above Q-Former", "cross_attention", "qformer"),
                        ("Quality: projection above Q-Former", "projection", "qformer")):
        low, high = ((d["low"], d["high"]) if (d := differences.get(f"{a} - {b}")) else
                     (-differences[f"{b} - {a}"]["high"], -differences[f"{b} - {a}"]["low"]))
        assert rows[claim]["verdict"] == (HOLDS if low > 0 else FAILS if high < 0 else INCONCLUSIVE), claim
        assert rows[claim]["measured"] == f"{accuracy[a]:.3f} vs {accuracy[b]:.3f}"

    def by_repeats(slow: str, fast: list[str], figure: str, faster_is_larger: bool) -> str:
        values = {s: results["speed"]["strategies"][s][figure]["values"] for s in (slow, *fast)}
        beyond = [min(values[slow]) > max(values[f]) for f in fast]  # every repeat of `slow` above `f`'s
        below = [max(values[slow]) < min(values[f]) for f in fast]
        if faster_is_larger:
            beyond, below = below, beyond
        return HOLDS if all(beyond) else FAILS if any(below) else INCONCLUSIVE

    others = ["qformer", "cross_attention"]
    assert rows["Time to first token"]["verdict"] == by_repeats("projection", others, "ttft_ms", False)
    assert rows["Decode speed"]["verdict"] == by_repeats("projection", others, "decode_tokens_per_s", True)
    assert rows["Structure at the lesson's scale"]["verdict"] == "not measured"
    speed = results["speed"]["strategies"]
    assert [speed[s]["llm_positions"] for s in ("projection", "qformer", "cross_attention")] == [18, 6, 3]

    # The same seed again (one run costs about 30 s, so both checks share the first): the same numbers. Peak memory
    # (half of a micro run: a fresh process per model) is not among them, so this run skips it.
    monkeypatch.setattr("kopru.lesson.compare.measure_peak_memory", lambda model_dir: None)
    again = compare("micro", tmp_path / "again")
    for a, b in zip(results["variants"], json.loads(json.dumps(again["variants"])), strict=True):
        assert a["variant"] == b["variant"]
        assert a["losses"] == b["losses"]
        assert a["accuracy_by_task"] == b["accuracy_by_task"]
    assert results["alignment"]["retrieval"] == json.loads(json.dumps(again["alignment"]["retrieval"]))
    assert results["alignment"]["itc_retrieval"] == json.loads(json.dumps(again["alignment"]["itc_retrieval"]))


@pytest.mark.trained
@pytest.mark.slow
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


# --- the verdict logic on constructed results -----------------------------------------------------------------

def _run(strategy: str, seed: int, correct: list[bool], given: list[str] | None = None) -> RunResult:
    """A run that answered len(correct) English questions q0, q1, ... of task "t" (chance 1/4) as given (the
    answers' texts: `given`, else "a" / "b" for right / wrong)."""
    given = given or ["a" if c else "b" for c in correct]
    answers = [{"id": f"q{i}", "task": "t", "language": "en", "answer": text, "correct": c, "chance": 0.25}
               for i, (c, text) in enumerate(zip(correct, given, strict=True))]
    accuracy = {key: {"accuracy": sum(correct) / len(correct), "chance": 0.25, "n": len(correct)}
                for key in ("t/en", "all/en")}
    return RunResult(variant=strategy, strategy=strategy, stage1=False, seed=seed, trainable_params=1,
                     total_params=2, image_positions=1, cross_attention_kv=0, train_seconds=1.0, ttft_ms=1.0,
                     decode_tokens_per_s=1.0, peak_memory_mb=None, accuracy=accuracy, losses=[1.0],
                     answers=answers)


def _constructed(correct: dict[str, list[list[bool]]], ttft: dict[str, list[float]]) -> dict:
    runs = [_run(strategy, seed, per_seed) for strategy, seeds in correct.items()
            for seed, per_seed in enumerate(seeds)]
    structure = {  # kopru explain's figures for the lesson presets (docs/explain.md)
        "projection": {"trainable_align": 4_198_400, "llm_positions": 578, "cross_attention_kv": 0,
                       "flops_per_image": 8.02e12, "kv_bytes_per_image": 578 * 524288, "dtype": "bfloat16"},
        "qformer": {"trainable_align": 104_773_120, "llm_positions": 34, "cross_attention_kv": 0,
                    "flops_per_image": 8.49e11, "kv_bytes_per_image": 34 * 524288, "dtype": "bfloat16"},
        "cross_attention": {"trainable_align": 1_623_267_344, "llm_positions": 3, "cross_attention_kv": 576,
                            "flops_per_image": 7.44e11, "kv_bytes_per_image": 3 * 524288 + 75497472,
                            "dtype": "bfloat16"},
    }
    speed = {"setup": {"name": "constructed", "repeats": 3}, "device": "cpu", "threads": 1, "strategies": {
        s: {"llm_positions": 1, "cross_attention_kv": 0,
            "ttft_ms": {"median": sorted(v)[1], "min": min(v), "max": max(v), "values": v},
            "decode_tokens_per_s": {"median": 10.0, "min": 9.0, "max": 11.0, "values": [9.0, 10.0, 11.0]}}
        for s, v in ttft.items()}}
    return {"preset": "constructed", "settings": {"seeds": [0, 1, 2], "eval_questions": 60},
            "variants": aggregate(runs), "quality": quality_comparisons(runs), "lesson_scale": structure,
            "speed": speed}


def _swap_two_each_way(correct: list[bool]) -> list[bool]:
    right = [i for i, c in enumerate(correct) if c][:2]
    wrong = [i for i, c in enumerate(correct) if not c][:2]
    return [not c if i in right + wrong else c for i, c in enumerate(correct)]


def test_verdicts_on_a_clear_win_a_clear_loss_and_an_overlap():
    rng = random.Random(0)
    noisy = [[rng.random() < 0.5 for _ in range(60)] for _ in range(3)]
    results = _constructed(
        correct={"projection": [[True] * 55 + [False] * 5] * 3,  # 0.92 on every seed
                 "qformer": noisy,  # about 0.5
                 "cross_attention": [_swap_two_each_way(seed) for seed in noisy]},  # as many better as worse
        ttft={"projection": [50.0, 52.0, 51.0], "qformer": [10.0, 11.0, 12.0], "cross_attention": [49.0, 53.0, 9.0]},
    )
    rows = {row["claim"]: row for row in verdict_rows(results)}
    assert rows["Quality: projection above Q-Former"]["verdict"] == HOLDS  # a clear win
    assert rows["Quality: cross-attention above projection"]["verdict"] == FAILS  # a clear loss
    assert rows["Quality: cross-attention above Q-Former"]["verdict"] == INCONCLUSIVE  # overlapping intervals
    # Projection's TTFT is clearly above Q-Former's but overlaps cross-attention's: not decisive.
    assert rows["Time to first token"]["verdict"] == INCONCLUSIVE
    for claim in ("Trainable parameters (stage 1)", "Image positions in the LLM context", "Compute per image",
                  "KV-cache memory per image"):
        assert rows[claim]["verdict"] == HOLDS and "Vicuna-7B" in rows[claim]["scale"], claim

    # The same numbers with the roles swapped flip the decisive verdicts, and only those.
    swapped = _constructed(
        correct={"projection": [[rng.random() < 0.5 for _ in range(60)] for _ in range(3)],
                 "qformer": [[True] * 55 + [False] * 5] * 3, "cross_attention": [[True] * 60] * 3},
        ttft={"projection": [5.0, 6.0, 7.0], "qformer": [10.0, 11.0, 12.0], "cross_attention": [20.0, 30.0, 40.0]},
    )
    rows = {row["claim"]: row for row in verdict_rows(swapped)}
    assert rows["Quality: projection above Q-Former"]["verdict"] == FAILS
    assert rows["Quality: cross-attention above projection"]["verdict"] == HOLDS
    assert rows["Time to first token"]["verdict"] == FAILS


def test_the_halfway_bar_names_every_cell_below_it():
    results = _constructed(correct={"projection": [[True] * 6 + [False] * 4] * 3,  # 0.6 < 0.625
                                    "qformer": [[True] * 7 + [False] * 3] * 3,  # 0.7
                                    "cross_attention": [[True] * 10] * 3},
                           ttft={s: [1.0, 2.0, 3.0] for s in ("projection", "qformer", "cross_attention")})
    assert halfway_bar(0.25) == 0.625
    misses = bar_misses(results)
    assert [(m["variant"], m["task"]) for m in misses] == [("projection", "t/en")]
    assert misses[0]["short_by"] == pytest.approx(0.025)


def test_a_cell_below_the_bar_names_the_answer_given_most_often():
    # Seeds 0 and 1 say "yes" to 9 and 7 of 10 questions, "no" to the rest: 16 of 20 answers are "yes".
    runs = [_run("projection", 0, [True] * 5 + [False] * 5, ["yes"] * 9 + ["no"]),
            _run("projection", 1, [True] * 5 + [False] * 5, ["yes"] * 7 + ["no"] * 3)]
    [entry] = aggregate(runs)
    assert entry["accuracy_by_task"]["t/en"]["most_frequent_answer"] == {"answer": "yes", "share": 0.8}
    assert "most_frequent_answer" not in entry["accuracy_by_task"]["all/en"]  # a task's answers, not a mixture
    [miss] = bar_misses({"variants": [entry]})
    assert most_frequent_answer_text(miss) == "; answers 'yes' to 80% of its questions"


@pytest.mark.slow
def test_jobs_run_side_by_side_in_order_with_one_thread_each(tmp_path):
    """`kopru compare` trains its runs in worker processes: results come back in the order given, from other
    processes, each with one torch thread, what they print to stderr in a log; a failing run's error reaches the
    caller."""
    import os
    import warnings

    from kopru.lesson.compare import run_jobs

    jobs = [(divmod, (7 * i, 4), {}) for i in range(5)] + [(os.getpid, (), {}), (torch.get_num_threads, (), {}),
                                                           (warnings.warn, ("a worker's warning",), {})]
    *quotients, pid, threads, _ = run_jobs(jobs, workers=2, desc="test", log_dir=tmp_path / "logs")
    assert quotients == [divmod(7 * i, 4) for i in range(5)]
    assert pid != os.getpid() and threads == 1
    logs = "".join(path.read_text() for path in (tmp_path / "logs").glob("worker-*.log"))
    assert "a worker's warning" in logs
    with pytest.raises(ZeroDivisionError):
        run_jobs([(divmod, (1, 0), {}), (divmod, (1, 1), {})], workers=2, desc="test")


def test_a_language_gap_over_two_points_is_explained_with_measurements():
    from kopru.lesson.report import language_gap_notes

    def entry(strategy, en_tr):
        by_task = {f"{task}/{lang}": {"mean": value} for task, pair in en_tr.items()
                   for lang, value in zip(("en", "tr"), pair, strict=True)}
        return {"strategy": strategy, "stage1": False, "accuracy_by_task": by_task}

    results = {
        "variants": [entry("qformer", {"shapes-count": (0.60, 0.70), "shapes-where": (0.5, 0.5)}),
                     entry("projection", {"shapes-count": (0.7, 0.7)})],
        "quality": {"language_gap": {"qformer": {"estimate": -0.05, "low": -0.09, "high": 0.03},
                                     "projection": {"estimate": 0.01, "low": -0.04, "high": 0.06}}},
        "alignment": {"fertility": {"en": {"tokens_per_word": 1.36}, "tr": {"tokens_per_word": 1.48}}},
    }
    (note,) = language_gap_notes(results)  # projection is within 2 points: nothing to explain
    assert note.startswith("qformer: English − Turkish -0.050") and "interval includes 0" in note
    assert "shapes-count (-0.10)" in note and "1.48 tokens against 1.36" in note
    results["quality"]["language_gap"]["qformer"].update(low=-0.09, high=-0.01)
    assert "interval excludes 0" in language_gap_notes(results)[0]


def test_compare_run_refuses_an_unknown_task_naming_the_known_ones(load_script, monkeypatch, capsys):
    script = load_script("scripts/compare_run.py")
    monkeypatch.setattr(sys, "argv", ["compare_run.py", "--train-tasks", "shapes-exists,shapes-size"])
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--train-tasks expects tasks from" in err and "shapes-colour" in err and "['shapes-size']" in err


def test_compare_run_writes_a_task_subset_that_reads_back_as_the_builtin_questions(load_script, tmp_path, monkeypatch):
    script = load_script("scripts/compare_run.py")
    path = script.write_task_subset(["shapes-exists", "shapes-where"], scenes=5, seed=3, folder=tmp_path / "data")
    loaded, report = load_samples(str(path))
    expected = [s for s in shapes_dataset(5, seed=3, split="train")
                if s.meta["task"] in ("shapes-exists", "shapes-where")]
    assert not report.counts
    assert [s.id for s in loaded] == [s.id for s in expected]
    assert [s.messages for s in loaded] == [s.messages for s in expected]
    for got, want in zip(loaded, expected, strict=True):
        assert np.array_equal(np.asarray(open_image(got.images[0])), np.asarray(want.images[0]))
    assert len(list((tmp_path / "data").glob("*.png"))) == 5  # one picture per scene, not per question
