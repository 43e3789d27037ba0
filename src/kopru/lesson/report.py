"""The comparison report: markdown tables, PNG plots and the verdict (the lesson's table beside what was
measured, claim by claim, each at the scale it is about and with its interval)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from kopru.lesson.significance import FAILS, HOLDS, INCONCLUSIVE, all_of, judge, separated

STRATEGIES = ("projection", "qformer", "cross_attention")
NAMES = {"projection": "projection", "qformer": "Q-Former", "cross_attention": "cross-attention"}
COLOURS = {"projection": "tab:blue", "qformer": "tab:orange", "cross_attention": "tab:green"}
NOT_MEASURED = "not measured"


def halfway_bar(chance: float) -> float:
    """The accuracy the issue asks of every task and language: halfway from chance to perfect."""
    return chance + (1 - chance) / 2


def _pm(pair: tuple[float, float] | list[float], digits: int = 1) -> str:
    mean, spread = pair
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def _ci(interval: dict[str, float] | None, digits: int = 3, signed: bool = False) -> str:
    if not interval:
        return "n/a"
    sign = "+" if signed else ""
    return (f"{interval['estimate']:{sign}.{digits}f} [{interval['low']:{sign}.{digits}f}, "
            f"{interval['high']:{sign}.{digits}f}]")


def _count(value: float) -> str:
    for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f} {suffix}"
    return f"{value:.0f}"


def _bytes(value: float) -> str:
    for threshold, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= threshold:
            return f"{value / threshold:.1f} {suffix}"
    return f"{value:.0f} B"


def _languages(results: dict[str, Any]) -> list[str]:
    return sorted({key.split("/")[1] for entry in results["variants"] for key in entry["accuracy_by_task"]
                   if key.startswith("all/")})


def results_table(results: dict[str, Any]) -> str:
    languages = _languages(results)
    header = ["strategy", "variant", "trainable params", "total params", "LLM positions / image",
              "cross-attn K/V / image", "train s", "peak memory MB",
              *[f"accuracy {language} [95% CI]" for language in languages], "chance"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in results["variants"]:
        by_task = entry["accuracy_by_task"]
        accuracy = [_ci(by_task[f"all/{lang}"].get("interval")) if f"all/{lang}" in by_task else "" for lang in
                    languages]
        chance = next((v["chance"] for k, v in by_task.items() if k.startswith("all/")), float("nan"))
        memory = f"{entry['peak_memory_mb']:.0f}" if entry["peak_memory_mb"] else "n/a"
        lines.append("| " + " | ".join([
            entry["strategy"], entry["variant"], f"{entry['trainable_params']:,}", f"{entry['total_params']:,}",
            str(entry["image_positions"]), str(entry["cross_attention_kv"]), _pm(entry["train_seconds"]),
            memory, *accuracy, f"{chance:.3f}",
        ]) + " |")
    return "\n".join(lines)


def _tasks(results: dict[str, Any]) -> list[str]:
    return sorted({key for entry in results["variants"] for key in entry["accuracy_by_task"]
                   if not key.startswith("all/")})


def bar_misses(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (variant, task/language) whose mean accuracy over seeds is below `halfway_bar` of its chance."""
    misses = []
    for entry in results["variants"]:
        for key, value in sorted(entry["accuracy_by_task"].items()):
            if key.startswith("all/") or math.isnan(value["chance"]):
                continue
            bar = halfway_bar(value["chance"])
            if value["mean"] < bar:
                misses.append({"variant": entry["variant"], "task": key, "accuracy": value["mean"], "bar": bar,
                               "short_by": bar - value["mean"], "most_frequent_answer": value.get("most_frequent_answer")})
    return misses


def most_frequent_answer_text(miss: dict[str, Any]) -> str:
    top = miss.get("most_frequent_answer")
    return f"; answers {top['answer']!r} to {top['share']:.0%} of its questions" if top else ""


def task_table(results: dict[str, Any]) -> str:
    tasks = _tasks(results)
    lines = ["| task / language | " + " | ".join(e["variant"] for e in results["variants"]) + " | chance | bar |",
             "|" + "---|" * (len(results["variants"]) + 3)]
    for task in tasks:
        chance = next(e["accuracy_by_task"][task]["chance"] for e in results["variants"]
                      if task in e["accuracy_by_task"])
        cells = []
        for entry in results["variants"]:
            value = entry["accuracy_by_task"].get(task)
            if value is None:
                cells.append("")
                continue
            mark = "" if value["mean"] >= halfway_bar(chance) else " **below**"
            cells.append(_ci(value.get("interval"), 2) + mark if value.get("interval") else f"{value['mean']:.2f}")
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {chance:.2f} | {halfway_bar(chance):.2f} |")
    return "\n".join(lines)


def _difference(results: dict[str, Any], a: str, b: str) -> dict[str, float] | None:
    """The interval of accuracy(a) - accuracy(b), whichever order it was computed in."""
    differences = (results.get("quality") or {}).get("differences", {})
    if f"{a} - {b}" in differences:
        return differences[f"{a} - {b}"]
    if f"{b} - {a}" in differences:
        found = differences[f"{b} - {a}"]
        return {"estimate": -found["estimate"], "low": -found["high"], "high": -found["low"]}
    return None


def _row(claim: str, lesson: str, scale: str, measured: str, interval: str, verdict: str) -> dict[str, str]:
    return {"claim": claim, "lesson": lesson, "scale": scale, "measured": measured, "interval": interval,
            "verdict": verdict}


def verdict_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """The lesson's comparison table (section 8), claim by claim: structure at the lesson's scale (exact
    arithmetic), quality from the trained tiny models (95% intervals, decisive only when they exclude 0),
    speed on the mid-size model (decisive only when the repeated timings do not overlap)."""
    rows = []
    structure = results.get("lesson_scale")
    if structure:
        scale = "CLIP-L/336 + Vicuna-7B (kopru explain)"
        p, q, x = (structure[s] for s in STRATEGIES)
        trainable = [s["trainable_align"] for s in (p, q, x)]
        rows.append(_row("Trainable parameters (stage 1)", "linear ~10M < Q-Former ~150M < cross-attention ~1B",
                         scale, " / ".join(_count(v) for v in trainable), "exact",
                         HOLDS if trainable[0] < trainable[1] < trainable[2] else FAILS))
        positions = [s["llm_positions"] for s in (p, q, x)]
        rows.append(_row("Image positions in the LLM context", "576 / 32 / 0 (cross-attention)", scale,
                         f"{positions[0]} / {positions[1]} / {positions[2]} (+ {x['cross_attention_kv']} "
                         "cross-attention K/V)", "exact",
                         HOLDS if positions[0] > positions[1] > positions[2] else FAILS))
        flops = [s["flops_per_image"] for s in (p, q, x)]
        rows.append(_row("Compute per image", "projection costs the most (576 tokens through the LLM)", scale,
                         " / ".join(_count(v) + "FLOPs" for v in flops), "exact",
                         HOLDS if flops[0] > max(flops[1:]) else FAILS))
        kv = [s["kv_bytes_per_image"] for s in (p, q, x)]
        rows.append(_row("KV-cache memory per image", "projection holds the most (576 positions)",
                         f"{scale}, {p['dtype']}", " / ".join(_bytes(v) for v in kv), "exact",
                         HOLDS if kv[0] > max(kv[1:]) else FAILS))
    else:
        rows.append(_row("Structure at the lesson's scale", "trainable parameters, positions, FLOPs, KV cache",
                         "CLIP-L/336 + Vicuna-7B", NOT_MEASURED + f" (preset {results['preset']})", "", NOT_MEASURED))

    accuracy = {e["strategy"]: e for e in results["variants"] if not e["stage1"]}
    quality_scale = (f"trained tiny models, {len(results['settings']['seeds'])} seed(s) x "
                     f"{results['settings']['eval_questions']} held-out questions")

    def quality(claim: str, lesson: str, a: str, b: str) -> str:
        interval = _difference(results, a, b)
        verdict = judge(interval) if interval else NOT_MEASURED
        measured = (f"{accuracy[a]['accuracy']:.3f} vs {accuracy[b]['accuracy']:.3f}"
                    if a in accuracy and b in accuracy else NOT_MEASURED)
        rows.append(_row(claim, lesson, quality_scale, measured,
                         f"difference {_ci(interval, signed=True)}" if interval else "", verdict))
        return verdict

    lesson = "cross-attention best, projection good, Q-Former medium"
    quality("Quality: cross-attention above projection", lesson, "cross_attention", "projection")
    quality("Quality: cross-attention above Q-Former", lesson, "cross_attention", "qformer")
    quality("Quality: projection above Q-Former", lesson, "projection", "qformer")

    speed = results.get("speed")
    if speed:
        timings = speed["strategies"]
        scale = f"{speed['setup']['name']}: {speed['device']}, {speed['threads']} thread(s), " \
                f"{speed['setup']['repeats']} repeats"
        ttft = {s: timings[s]["ttft_ms"] for s in STRATEGIES}
        verdict = all_of([separated(ttft["projection"]["values"], ttft[s]["values"])
                          for s in ("qformer", "cross_attention")])
        rows.append(_row("Time to first token", "projection slow (576 tokens), Q-Former and cross-attention fast",
                         scale, " / ".join(f"{ttft[s]['median']:.0f} ms" for s in STRATEGIES),
                         "median [min, max]: " + " / ".join(f"[{ttft[s]['min']:.0f}, {ttft[s]['max']:.0f}]"
                                                             for s in STRATEGIES), verdict))
        decode = {s: timings[s]["decode_tokens_per_s"] for s in STRATEGIES}
        verdict = all_of([separated(decode[s]["values"], decode["projection"]["values"])
                          for s in ("qformer", "cross_attention")])
        rows.append(_row("Decode speed", "projection slow, Q-Former and cross-attention fast", scale,
                         " / ".join(f"{decode[s]['median']:.1f} tok/s" for s in STRATEGIES),
                         "median [min, max]: " + " / ".join(f"[{decode[s]['min']:.1f}, {decode[s]['max']:.1f}]"
                                                             for s in STRATEGIES), verdict))
    else:
        rows.append(_row("Inference speed", "projection slow, Q-Former and cross-attention fast", "mid-size model",
                         NOT_MEASURED, "", NOT_MEASURED))
    rows.append(_row("Ease of moving to a new LLM", "easy / medium / hard", "code",
                     "code needed per LLM: none / none / its decoder layers must pass keyword arguments on", "",
                     "not measurable here"))
    return rows


def verdict(results: dict[str, Any]) -> str:
    present = {e["strategy"] for e in results["variants"]}
    if not set(STRATEGIES) <= present:
        return "Verdict needs all three strategies; this run has " + ", ".join(sorted(present)) + "."
    lines = ["| claim | lesson | scale | measured (projection / Q-Former / cross-attention) | interval | verdict |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['claim']} | {r['lesson']} | {r['scale']} | {r['measured']} | {r['interval']} | {r['verdict']} |"
              for r in verdict_rows(results)]
    return "\n".join([*lines, "", f"Rules: structural rows are exact arithmetic ({HOLDS} / {FAILS}). A quality row "
                      f"says {HOLDS!r} only when the 95% interval of the accuracy difference (paired bootstrap over "
                      f"seeds and questions) lies above 0, {FAILS!r} when it lies below, {INCONCLUSIVE!r} "
                      f"otherwise. A speed row says {HOLDS!r} or {FAILS!r} only when every repeat of one side is "
                      "on the same side of every repeat of the other, for each pair it compares."])


# --- plots ----------------------------------------------------------------------------------------------------

def _error(interval: dict[str, float] | None, fallback: float) -> tuple[list[float], list[float]]:
    if not interval:
        return [fallback], [fallback]
    return [interval["estimate"] - interval["low"]], [interval["high"] - interval["estimate"]]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (shorter at the start), so that a curve of noisy per-step losses shows its trend."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(results: dict[str, Any], output: Path) -> list[Path]:
    import matplotlib  # lazily: a heavy import, needed only when the plots are drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    files = []

    def save(figure, name: str) -> None:
        figure.tight_layout()
        figure.savefig(output / name, dpi=120)
        plt.close(figure)
        files.append(output / name)

    chance = next((v["chance"] for e in variants for k, v in e["accuracy_by_task"].items() if k.startswith("all/")),
                  None)

    def reference_lines(axis) -> None:
        if chance is not None:
            axis.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
            axis.axhline(halfway_bar(chance), color="grey", linestyle=":", linewidth=1, label="halfway to perfect")

    # Accuracy against image cost: LLM positions and cross-attention K/V on separate axes.
    figure, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for axis, key, label in ((axes[0], "image_positions", "LLM context positions per image"),
                             (axes[1], "cross_attention_kv", "cross-attention K/V positions per image")):
        for entry in variants:
            x = entry[key]
            low, high = _error(entry.get("accuracy_interval"), entry["accuracy_spread"])
            axis.errorbar(x, entry["accuracy"], yerr=[low, high], fmt="o", color=COLOURS[entry["strategy"]],
                          capsize=3)
            axis.annotate(entry["variant"], (x, entry["accuracy"]), fontsize=7, xytext=(4, 4),
                          textcoords="offset points")
        reference_lines(axis)
        axis.set_xlabel(label)
    axes[0].set_ylabel("held-out accuracy (95% CI)")
    axes[0].legend(fontsize=7, loc="lower right")
    save(figure, "quality_vs_image_tokens.png")

    figure, axis = plt.subplots(figsize=(6, 4))
    for entry in variants:
        low, high = _error(entry.get("accuracy_interval"), entry["accuracy_spread"])
        axis.errorbar(entry["trainable_params"], entry["accuracy"], yerr=[low, high], fmt="o",
                      color=COLOURS[entry["strategy"]], capsize=3)
        axis.annotate(entry["variant"], (entry["trainable_params"], entry["accuracy"]), fontsize=7, xytext=(4, 4),
                      textcoords="offset points")
    reference_lines(axis)
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters (tiny models)")
    axis.set_ylabel("held-out accuracy (95% CI)")
    axis.legend(fontsize=7)
    save(figure, "quality_vs_trainable_params.png")

    # Accuracy per task and language, with intervals and each task's bar.
    tasks = _tasks(results)
    figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(tasks)), 4))
    width = 0.8 / max(len(variants), 1)
    for index, entry in enumerate(variants):
        xs, ys, lows, highs = [], [], [], []
        for position, task in enumerate(tasks):
            value = entry["accuracy_by_task"].get(task)
            if value is None:
                continue
            low, high = _error(value.get("interval"), value["spread"])
            xs.append(position + (index - (len(variants) - 1) / 2) * width)
            ys.append(value["mean"])
            lows += low
            highs += high
        axis.bar(xs, ys, width, yerr=[lows, highs], capsize=2, color=COLOURS[entry["strategy"]],
                 label=entry["variant"], alpha=0.85)
    for position, task in enumerate(tasks):
        task_chance = next(e["accuracy_by_task"][task]["chance"] for e in variants if task in e["accuracy_by_task"])
        axis.hlines(halfway_bar(task_chance), position - 0.45, position + 0.45, colors="black", linewidth=1)
        axis.hlines(task_chance, position - 0.45, position + 0.45, colors="grey", linestyles="--", linewidth=1)
    axis.set_xticks(range(len(tasks)), [t.removeprefix("shapes-") for t in tasks], rotation=30, fontsize=7)
    axis.set_ylabel("accuracy (95% CI)\nline: halfway bar; dashed: chance")
    axis.set_ylim(0, 1.05)
    axis.legend(fontsize=7)
    save(figure, "accuracy_by_task.png")

    speed = results.get("speed")
    if speed:
        figure, axes = plt.subplots(1, 2, figsize=(9, 4))
        for strategy, timing in speed["strategies"].items():
            for axis, key in ((axes[0], "ttft_ms"), (axes[1], "decode_tokens_per_s")):
                values = timing[key]
                x = timing["llm_positions"]
                axis.errorbar(x, values["median"], yerr=[[values["median"] - values["min"]],
                                                         [values["max"] - values["median"]]],
                              fmt="o", color=COLOURS[strategy], capsize=3)
                note = f"{NAMES[strategy]}" + (f" (+{timing['cross_attention_kv']} K/V)"
                                               if timing["cross_attention_kv"] else "")
                axis.annotate(note, (x, values["median"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        axes[0].set_ylabel("time to first token, ms (median, min-max)")
        axes[1].set_ylabel("decode tokens/s (median, min-max)")
        for axis in axes:
            axis.set_xscale("log")
            axis.set_xlabel("LLM context positions per image")
        figure.suptitle(f"{speed['setup']['name']}: batch 1, {speed['device']}", fontsize=9)
        save(figure, "latency.png")

    # Loss: a moving average per run, then the mean and the range over seeds per variant.
    figure, axis = plt.subplots(figsize=(6, 4))
    for entry in variants:
        curves = [smooth(losses, 20) for losses in entry["losses"] if losses]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        stacked = np.array([c[:length] for c in curves])
        steps = np.arange(1, length + 1)
        axis.plot(steps, stacked.mean(0), color=COLOURS[entry["strategy"]], label=entry["variant"])
        axis.fill_between(steps, stacked.min(0), stacked.max(0), color=COLOURS[entry["strategy"]], alpha=0.2)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss\n(20-step moving average; band: range over seeds)")
    axis.legend(fontsize=7)
    save(figure, "loss_curves.png")
    return files


# --- sections -------------------------------------------------------------------------------------------------

def _retrieval_table(title: str, recall: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = ["", f"### {title}", "",
             "| variant | language | N | image→text R@1 | R@5 | text→image R@1 | R@5 | chance R@1 / R@5 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, per_language in recall.items():
        for lang, r in per_language.items():
            lines.append(f"| {name} | {lang} | {r['n']} | {r['i2t@1']:.2f} | {r['i2t@5']:.2f} | {r['t2i@1']:.2f} | "
                         f"{r['t2i@5']:.2f} | {r['chance@1']:.2f} / {r['chance@5']:.2f} |")
    return lines


def language_section(results: dict[str, Any]) -> str:
    """English against Turkish per strategy (interval of the gap) and per task."""
    gaps = (results.get("quality") or {}).get("language_gap", {})
    if not gaps:
        return "Not measured in this run."
    lines = ["| strategy | English − Turkish accuracy [95% CI] | within 2 points |", "|---|---|---|"]
    for strategy, interval in gaps.items():
        lines.append(f"| {strategy} | {_ci(interval, signed=True)} | "
                     f"{'yes' if abs(interval['estimate']) <= 0.02 else 'no'} |")
    tasks = sorted({key.split("/")[0] for key in _tasks(results)})
    lines += ["", "Per task, English − Turkish (mean over seeds):", "",
              "| variant | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for entry in results["variants"]:
        by_task = entry["accuracy_by_task"]
        cells = [f"{by_task[f'{t}/en']['mean'] - by_task[f'{t}/tr']['mean']:+.2f}"
                 if f"{t}/en" in by_task and f"{t}/tr" in by_task else "" for t in tasks]
        lines.append(f"| {entry['variant']} | " + " | ".join(cells) + " |")
    lines += ["", *language_gap_notes(results)]
    return "\n".join(lines)


def language_gap_notes(results: dict[str, Any]) -> list[str]:
    """For each strategy whose English − Turkish gap exceeds 2 points: whether its interval tells it from no gap,
    the task that contributes most, and how many more tokens a Turkish word costs (the fertility measured in the
    alignment section)."""
    gaps = (results.get("quality") or {}).get("language_gap", {})
    fertility = (results.get("alignment") or {}).get("fertility", {})
    notes = []
    for strategy, interval in gaps.items():
        if abs(interval["estimate"]) <= 0.02:
            continue
        entry = next((e for e in results["variants"] if e["strategy"] == strategy and not e["stage1"]), None)
        if entry is None:
            continue
        by_task = entry["accuracy_by_task"]
        per_task = {key.split("/")[0]: by_task[key]["mean"] - by_task[key.replace("/en", "/tr")]["mean"]
                    for key in by_task if key.endswith("/en") and not key.startswith("all/")
                    and key.replace("/en", "/tr") in by_task}
        task, gap = max(per_task.items(), key=lambda item: abs(item[1]), default=("", 0.0))
        noise = ("its 95% interval includes 0, so seeds and questions alone could make it"
                 if interval["low"] <= 0 <= interval["high"] else "its 95% interval excludes 0")
        cost = ""
        if "en" in fertility and "tr" in fertility:
            cost = (f"; a Turkish word costs {fertility['tr']['tokens_per_word']:.2f} tokens against "
                    f"{fertility['en']['tokens_per_word']:.2f} in English")
        notes.append(f"{strategy}: English − Turkish {interval['estimate']:+.3f} is more than 2 points, but {noise}; "
                     f"the largest share is {task} ({gap:+.2f}){cost}.")
    return notes


def alignment_section(results: dict[str, Any]) -> str:
    """Turkish vision-text alignment: fertility and text budget, retrieval per language, cross-lingual transfer."""
    alignment = results.get("alignment")
    if not alignment:
        return "Not measured in this run."
    fertility = alignment["fertility"]
    lines = ["### Tokenizer fertility (the LLM's tokenizer, held-out questions and captions)", "",
             "| language | words | tokens | tokens per word | characters per token |", "|---|---|---|---|---|"]
    for lang, f in fertility.items():
        lines.append(f"| {lang} | {f['words']:.0f} | {f['tokens']:.0f} | {f['tokens_per_word']:.2f} | "
                     f"{f['chars_per_token']:.2f} |")
    lines += ["", f"Words of text that fit in the {alignment['context_tokens']}-token context beside one image:", "",
              "| variant | " + " | ".join(fertility) + " |", "|" + "---|" * (len(fertility) + 1)]
    for name, budget in alignment["text_budget"].items():
        lines.append(f"| {name} | " + " | ".join(str(budget[lang]) for lang in fertility) + " |")
    lines += _retrieval_table("Image-text retrieval by caption likelihood (held-out captions, seed 0 model)",
                              alignment["retrieval"])
    if alignment.get("itc_retrieval"):
        lines += _retrieval_table("Image-text retrieval with the Q-Former's contrastive (ITC) head after stage 1 "
                                  "(same captions, seed 0)", alignment["itc_retrieval"])
    lines += ["", retrieval_note(alignment)]
    lines += ["", "### Cross-lingual transfer (held-out accuracy, seed 0)", ""]
    if not any(len(per_training) > 1 for per_training in alignment["cross_lingual"].values()):
        lines.append("Not run by this preset (`--preset full` trains each variant on English alone as well).")
        return "\n".join(lines)
    lines += ["| variant | trained on | English | Turkish |", "|---|---|---|---|"]
    for name, per_training in alignment["cross_lingual"].items():
        for trained, accuracy in sorted(per_training.items()):
            lines.append(f"| {name} | {trained.removeprefix('train ')} | {accuracy.get('en', float('nan')):.3f} | "
                         f"{accuracy.get('tr', float('nan')):.3f} |")
    return "\n".join(lines)


def _mean_recall_at_1(per_language: dict[str, dict[str, float]]) -> tuple[float, float]:
    found = [(r["i2t@1"] + r["t2i@1"]) / 2 for r in per_language.values()]
    return sum(found) / len(found), next(iter(per_language.values()))["chance@1"]


def retrieval_note(alignment: dict[str, Any]) -> str:
    """Which strategies retrieve above chance by caption likelihood, and why the others cannot here."""
    at_chance = [name for name, per_language in alignment["retrieval"].items()
                 if _mean_recall_at_1(per_language)[0] <= _mean_recall_at_1(per_language)[1]]
    if not at_chance:
        return "Every strategy retrieves above chance by caption likelihood (R@1, both directions, mean of languages)."
    text = (f"At or below chance by caption likelihood (R@1, both directions, mean of languages): "
            f"{', '.join(at_chance)}. Caption likelihood ranks captions by how the model would continue the image "
            "with each caption in the plain (align) template; the runs here train on questions and one-word "
            "answers only (single-stage), never on captions, so that continuation is the text LLM's caption "
            "prior, moved by the image only as much as answering questions moved it.")
    itc = alignment.get("itc_retrieval") or {}
    if itc:
        name, per_language = next(iter(itc.items()))
        recall, chance = _mean_recall_at_1(per_language)
        text += (f" A method trained for it: the Q-Former's contrastive head, trained on captions in stage 1, ranks "
                 f"the same scenes at R@1 {recall:.2f} (chance {chance:.2f}; {name}, both directions, mean of "
                 "languages).")
    return text


def scale_section(results: dict[str, Any]) -> str:
    """Structure at the lesson's scale beside the tiny models', and the mid-size speed measurement."""
    lines = []
    structure = results.get("lesson_scale")
    tiny = {e["strategy"]: e for e in results["variants"] if not e["stage1"]}
    if structure:
        lines += ["| strategy | model | trainable, stage 1 | trainable, single stage | LLM positions / image | "
                  "cross-attn K/V / image | FLOPs / image | KV cache / image |", "|---|---|---|---|---|---|---|---|"]
        for strategy in STRATEGIES:
            s = structure[strategy]
            lines.append(f"| {strategy} | `{s['preset']}` | {s['trainable_align']:,} | {s['trainable_single_stage']:,}"
                         f" | {s['llm_positions']} | {s['cross_attention_kv']} | {_count(s['flops_per_image'])} | "
                         f"{_bytes(s['kv_bytes_per_image'])} ({s['dtype']}) |")
            if strategy in tiny:
                t = tiny[strategy]
                lines.append(f"| {strategy} | tiny `{t['variant']}` (trained here) | | {t['trainable_params']:,} | "
                             f"{t['image_positions']} | {t['cross_attention_kv']} | | |")
        lines += ["", "(Lesson scale: `kopru explain --preset NAME`, meta device, bfloat16, batch 1; the KV cache "
                  "of one image is its LLM positions' share of the cache plus the cross-attention K/V. Tiny: the "
                  "trained models' own counts, single-stage recipe.)"]
    else:
        lines.append(f"Structure at the lesson's scale: not measured (preset {results['preset']}).")
    speed = results.get("speed")
    if speed:
        setup = speed["setup"]
        lines += ["", f"Speed on `{setup['name']}`: {setup['description']}. One image and {setup['text_tokens']} "
                  f"question tokens, batch 1, greedy, {setup['new_tokens']} new tokens per decode call, "
                  f"{setup['repeats']} repeats taking turns across the strategies after a warm-up; "
                  f"{speed['device']}, {speed['threads']} thread(s); built in {speed['build_seconds']:.0f} s, "
                  f"measured in {speed['seconds'] - speed['build_seconds']:.0f} s.", "",
                  "| strategy | LLM positions / image | cross-attn K/V / image | TTFT ms, median [min, max] | "
                  "decode tok/s, median [min, max] |", "|---|---|---|---|---|"]
        for strategy, t in speed["strategies"].items():
            ttft, decode = t["ttft_ms"], t["decode_tokens_per_s"]
            lines.append(f"| {strategy} | {t['llm_positions']} | {t['cross_attention_kv']} | {ttft['median']:.0f} "
                         f"[{ttft['min']:.0f}, {ttft['max']:.0f}] | {decode['median']:.1f} [{decode['min']:.1f}, "
                         f"{decode['max']:.1f}] |")
    return "\n".join(lines)


def write_report(results: dict[str, Any], output: Path) -> Path:
    plots = plot(results, output)
    settings = results["settings"]
    misses = bar_misses(results)
    bar_text = ("Every variant reaches the halfway bar (chance + (1 − chance) / 2, mean over seeds) on every task "
                "and language." if not misses else "Below the halfway bar (chance + (1 − chance) / 2, mean over "
                "seeds): " + "; ".join(f"{m['variant']} {m['task']} {m['accuracy']:.3f} < {m['bar']:.3f} "
                                       f"(short by {m['short_by']:.3f}{most_frequent_answer_text(m)})" for m in misses) + ".")
    text = [
        f"# Köprü strategy comparison (preset `{results['preset']}`)", "",
        f"Same data (built-in shapes questions, English + Turkish), same tiny pretrained backbones, "
        f"{settings['steps']} steps of {settings['batch_size']} per run, seeds {list(settings['seeds'])}; accuracy is exact match on "
        f"{settings['eval_questions']} held-out questions per seed (scenes never seen in training; Turkish-aware "
        "normalisation), with 95% intervals from a bootstrap over seeds and questions.", "",
        results_table(results), "",
        _train_seconds_note(results.get("workers", 1)), "",
        "Peak memory: seed 0's saved model loaded in a fresh process generating 16 tokens (CUDA allocator peak on "
        "GPU; on CPU the process's peak resident set, which includes Python and torch, so compare strategies by "
        "their differences).", "",
        "## Accuracy per task and language", "", task_table(results), "", bar_text, "",
        "## Quality differences", "", _quality_table(results), "",
        "## English and Turkish", "", language_section(results), "",
        "## The lesson's scale: structure, and speed on a mid-size model", "", scale_section(results), "",
        "## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], "",
        "## Vision-text alignment for Turkish", "", alignment_section(results), "",
        "## Verdict: the lesson's table against the measurements", "", verdict(results), "",
    ]
    path = output / "report.md"
    path.write_text("\n".join(text))
    return path


def _train_seconds_note(workers: int) -> str:
    if workers > 1:
        return (f"Train s: the wall time of one run (training and its held-out evaluation), mean ± spread over seeds, "
                f"{workers} runs side by side, each in its own process with one thread.")
    return "Train s: the wall time of one run (training and its held-out evaluation), mean ± spread over seeds."


def _quality_table(results: dict[str, Any]) -> str:
    differences = (results.get("quality") or {}).get("differences", {})
    if not differences:
        return "Not measured in this run."
    lines = ["| difference in held-out accuracy | estimate [95% CI] | the first above the second |", "|---|---|---|"]
    lines += [f"| {name} | {_ci(interval, signed=True)} | {judge(interval)} |"
              for name, interval in differences.items()]
    return "\n".join(lines)
