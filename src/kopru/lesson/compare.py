"""`kopru compare`: the three strategies trained and evaluated side by side on the same data, backbones,
budget and seeds, with a report (markdown table, JSON, PNG plots) that ends with the lesson's claims next to
what was measured.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kopru.alignment import caption_retrieval, text_budget, tokenizer_fertility
from kopru.data.builtin import builtin_dataset
from kopru.lesson.jobs import run_jobs
from kopru.lesson.measure import measure_latency, measure_peak_memory
from kopru.lesson.report import write_report
from kopru.lesson.scale import default_speed_setup, lesson_structure, measure_speed
from kopru.lesson.significance import bootstrap_difference, bootstrap_mean
from kopru.llm import context_window
from kopru.model import KopruForConditionalGeneration
from kopru.training import QFORMER_HEADS_FILE, TrainConfig, train
from kopru.training.qformer_stage1 import QFormerPretrainer, retrieval_recall


@dataclass(frozen=True)
class Variant:
    name: str
    strategy: str
    connector: dict[str, Any] = field(default_factory=dict)


# Both layers read the image (BLIP-2 cross-attends every 2nd of 12 layers; with 2 layers that is one read): seed
# 0, 300 steps, held-out accuracy en / tr 0.36 / 0.36 with one read, 0.52 / 0.51 with two. A third layer did not
# help (0.50 / 0.40).
SMALL_QFORMER = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 256,
                 "cross_attention_frequency": 1}
VARIANTS = {
    "projection-linear": Variant("projection-linear", "projection", {"kind": "linear"}),
    "projection-mlp": Variant("projection-mlp", "projection", {"kind": "mlp", "depth": 2}),
    "qformer-32": Variant("qformer-32", "qformer", {"num_queries": 32, **SMALL_QFORMER}),
    "qformer-64": Variant("qformer-64", "qformer", {"num_queries": 64, **SMALL_QFORMER}),
    "xattn-every4": Variant("xattn-every4", "cross_attention", {"every_n_layers": 4}),
    "xattn-every2": Variant("xattn-every2", "cross_attention", {"every_n_layers": 2}),
    "xattn-every4-resampler": Variant("xattn-every4-resampler", "cross_attention",
                                      {"every_n_layers": 4, "resampler": {"num_latents": 16, "depth": 2,
                                                                           "num_heads": 4, "head_dim": 32}}),
    "xattn-every2-resampler": Variant("xattn-every2-resampler", "cross_attention",
                                      {"every_n_layers": 2, "resampler": {"num_latents": 16, "depth": 2,
                                                                           "num_heads": 4, "head_dim": 32}}),
}


@dataclass(frozen=True)
class Preset:
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    stage1_steps: int
    train_scenes: int
    eval_scenes: int
    eval_questions: int
    with_stage1: bool  # also run every variant with a stage-1 phase
    retrieval_captions: int = 20  # per language, for caption-likelihood retrieval (N x N scored pairs)
    # Q-Former stage-1 steps of a separate seed-0 run that trains the ITC head for retrieval, for presets
    # whose Q-Former variants do not already run stage 1.
    itc_steps: int = 150
    # Cross-lingual transfer: one seed-0 run per variant trained on each of these languages alone.
    transfer_languages: tuple[str, ...] = ("en",)
    # The lesson's structural claims at its own scale (kopru explain's arithmetic, about 15 s), and the speed
    # claim on a mid-size random-weight model (a name in kopru.lesson.scale.SPEED_SETUPS; "auto": the 7B on a GPU,
    # the 0.5B-shaped model on a CPU; None: not measured).
    lesson_scale: bool = True
    speed: str | None = "auto"
    batch_size: int = 16
    # Learning rates: the LLM's (when it trains) and, per strategy, the connector's (CONNECTOR_LR says why).
    lr: float = 1e-3
    connector_lr: tuple[tuple[str, float], ...] = ()


# Connector learning rates per strategy (the LLM's is Preset.lr). The gated cross-attention blocks start closed
# (tanh(0)) and their gates move by about one learning rate per Adam step: at the LLM's 1e-3 they had opened to
# |tanh(gate)| < 0.05 after 300 steps and its accuracy stayed near chance. Seed 0, 300 steps, held-out accuracy en / tr (single runs, about
# +-0.05 apart from seed noise): projection 0.64 / 0.58 at 3e-4, 0.70 / 0.62 at 1e-3, 0.61 / 0.61 at 3e-3; Q-Former
# (random init, no stage 1) 0.60 / 0.51 at 1e-3, 0.52 / 0.51 at 3e-3, 0.32 / 0.30 at 1e-2; cross-attention
# 0.61 / 0.61 at 5e-3, 0.59 / 0.56 at 1e-2.
CONNECTOR_LR = (("projection", 1e-3), ("qformer", 1e-3), ("cross_attention", 5e-3))

PRESETS = {
    "micro": Preset(("projection-mlp", "qformer-32", "xattn-every2"), (0,), steps=6, stage1_steps=0,
                    train_scenes=24, eval_scenes=4, eval_questions=16, with_stage1=False,
                    retrieval_captions=6, itc_steps=3, lesson_scale=False, speed="tiny"),
    "default": Preset(("projection-mlp", "qformer-32", "xattn-every2"), (0, 1, 2), steps=300, stage1_steps=0,
                      train_scenes=1200, eval_scenes=100, eval_questions=400, with_stage1=False,
                      retrieval_captions=12, batch_size=32, connector_lr=CONNECTOR_LR,
                      # English-only runs (cross-lingual transfer) would add a quarter to the 10-minute budget.
                      transfer_languages=()),
    "full": Preset(tuple(VARIANTS), (0, 1, 2), steps=600, stage1_steps=200, train_scenes=2000, eval_scenes=100,
                   eval_questions=480, with_stage1=True, batch_size=32, connector_lr=CONNECTOR_LR),
}


@dataclass
class RunResult:
    variant: str
    strategy: str
    stage1: bool
    seed: int
    trainable_params: int
    total_params: int
    image_positions: int
    cross_attention_kv: int
    train_seconds: float
    ttft_ms: float
    decode_tokens_per_s: float
    peak_memory_mb: float | None
    accuracy: dict[str, dict[str, float]]
    losses: list[float]
    model_dir: str = ""
    train_languages: tuple[str, ...] = ("en", "tr")
    stage1_dir: str = ""  # the connector after stage 1 (with the ITC head for the Q-Former)
    answers: list[dict[str, Any]] = field(default_factory=list)  # per held-out question (kopru.evaluation)


def run_variant(variant: Variant, seed: int, preset: Preset, workdir: Path, stage1: bool,
                vision: str | None = None, llm: str | None = None, train_data: str = "builtin:shapes",
                eval_data: str | None = None, train_languages: tuple[str, ...] = ("en", "tr")) -> RunResult:
    """Train one variant with one seed (optionally stage 1 first) and evaluate it; latency and memory are
    measured later by `measure_run`, once no other run shares the CPU."""
    common = train_settings(variant, seed, preset, vision, llm, train_data, eval_data, train_languages)
    run_dir = workdir / f"{variant.name}{'-stage1' if stage1 else ''}-{'+'.join(train_languages)}-seed{seed}"
    started = time.perf_counter()
    init = run_stage1(variant, preset.stage1_steps, run_dir / "stage1", common) if stage1 else None
    summary = train(TrainConfig(**common, recipe="single-stage", max_steps=preset.steps, init_connector=init,
                                output_dir=str(run_dir / "single-stage")))
    seconds = time.perf_counter() - started
    count = KopruForConditionalGeneration.from_pretrained(summary.final_model)[0].image_count
    return RunResult(
        variant=variant.name, strategy=variant.strategy, stage1=stage1, seed=seed,
        trainable_params=summary.trainable_params, total_params=summary.total_params,
        image_positions=count.llm_positions, cross_attention_kv=count.cross_attention_kv,
        train_seconds=seconds, ttft_ms=float("nan"), decode_tokens_per_s=float("nan"), peak_memory_mb=None,
        accuracy=summary.eval[-1]["accuracy"] if summary.eval else {}, losses=summary.losses,
        model_dir=summary.final_model, train_languages=tuple(train_languages), stage1_dir=init or "",
        answers=summary.eval[-1].get("answers", []) if summary.eval else [],
    )


def measure_run(run: RunResult, with_memory: bool) -> RunResult:
    """The saved model's TTFT and decode speed (in this process) and, with `with_memory`, its peak memory (in a
    fresh one)."""
    model, processor = KopruForConditionalGeneration.from_pretrained(run.model_dir)
    ttft, decode = measure_latency(model, processor)
    memory = measure_peak_memory(run.model_dir) if with_memory else None
    return dataclasses.replace(run, ttft_ms=ttft, decode_tokens_per_s=decode, peak_memory_mb=memory)


def train_settings(variant: Variant, seed: int, preset: Preset, vision: str | None, llm: str | None,
                    train_data: str, eval_data: str | None, train_languages: tuple[str, ...]) -> dict[str, Any]:
    """What every run of a comparison shares: data, budget, optimiser, evaluation."""
    return dict(vision=vision, llm=llm, strategy=variant.strategy, connector=dict(variant.connector),
                languages=list(train_languages), eval_languages=["en", "tr"],
                batch_size=preset.batch_size, lr=preset.lr,
                connector_lr=dict(preset.connector_lr).get(variant.strategy), warmup_steps=10, eval_every=0,
                save_every=0, seed=seed,
                # Not by length (TrainConfig.group_by_length says why), whatever the library's default becomes.
                group_by_length=False,
                train_data=train_data, eval_data=eval_data, builtin_train_size=preset.train_scenes,
                builtin_eval_size=preset.eval_scenes, eval_questions=preset.eval_questions)


def run_stage1(variant: Variant, steps: int, output_dir: Path, settings: dict[str, Any]) -> str:
    """Stage 1 (BLIP-2's for the Q-Former, LLaVA's align otherwise); returns the saved connector's directory."""
    recipe = "qformer-stage1" if variant.strategy == "qformer" else "align"
    return train(TrainConfig(**settings, recipe=recipe, max_steps=steps, output_dir=str(output_dir))).final_model


def compare(preset_name: str = "default", output: str | Path = "runs/compare", workers: int | None = None,
            **data: Any) -> dict[str, Any]:
    """Run the preset, aggregate over seeds, write report.md, results.json and plots; return the results.

    workers: training runs side by side, each in its own process with one torch thread (None: the torch thread
    count this process was given, e.g. by --threads).
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; expected one of {sorted(PRESETS)}")
    preset = PRESETS[preset_name]
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    plan = [(VARIANTS[name], seed, stage1) for name in preset.variants for stage1 in
            ((False, True) if preset.with_stage1 else (False,)) for seed in preset.seeds]
    jobs: list[tuple[Callable[..., Any], tuple, dict[str, Any]]] = [
        (run_variant, (variant, seed, preset, output / "runs", stage1), data) for variant, seed, stage1 in plan]
    # BLIP-2's contrastive head exists only after stage 1: variants whose runs have none train one to use it.
    itc_names = [name for name in preset.variants if VARIANTS[name].strategy == "qformer"
                 and not (preset.with_stage1 and preset.stage1_steps)]
    for name in itc_names:
        settings = train_settings(VARIANTS[name], preset.seeds[0], preset, data.get("vision"), data.get("llm"),
                                   data.get("train_data", "builtin:shapes"), data.get("eval_data"), ("en", "tr"))
        jobs.append((run_stage1, (VARIANTS[name], preset.itc_steps,
                                  output / "runs" / f"{name}-itc-seed{preset.seeds[0]}", settings), {}))
    transfer_plan = [(name, language) for name in preset.variants for language in preset.transfer_languages]
    for name, language in transfer_plan:
        jobs.append((run_variant, (VARIANTS[name], preset.seeds[0], preset, output / "runs", False),
                     {**data, "train_languages": (language,)}))
    workers = min(workers or torch.get_num_threads(), len(jobs))
    done = run_jobs(jobs, workers, f"compare {preset_name} ({workers} at a time)", log_dir=output / "runs" / "logs")
    runs = done[:len(plan)]
    itc_stage1 = dict(zip(itc_names, done[len(plan):len(plan) + len(itc_names)], strict=True))
    itc_stage1.update({run.variant: run.stage1_dir for run in runs if run.stage1_dir and run.strategy == "qformer"
                       and run.seed == preset.seeds[0]})
    transfer = done[len(plan) + len(itc_names):]
    # Latency and memory with the CPU to itself (no training beside it), after every run has finished.
    runs = [measure_run(run, with_memory=run.seed == preset.seeds[0])
            for run in tqdm(runs, desc="latency and memory")]

    speed_setup = default_speed_setup() if preset.speed == "auto" else preset.speed
    results = {"preset": preset_name, "settings": dataclasses.asdict(preset), "workers": workers,
               "variants": aggregate(runs), "runs": [dataclasses.asdict(r) for r in runs],
               "quality": quality_comparisons(runs),
               "alignment": turkish_alignment(runs, transfer, preset, itc_stage1),
               "lesson_scale": lesson_structure() if preset.lesson_scale else None,
               "speed": measure_speed(speed_setup) if speed_setup else None}
    (output / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))

    write_report(results, output)
    return results


def _mean_spread(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _correct_by_seed(group: list[RunResult], key: str) -> dict[int, list[float]]:
    """{seed: 1.0 / 0.0 per held-out question} of the answers under `key` ("all/en", "shapes-count/tr", or
    "all" for every question)."""
    found = {}
    for run in group:
        values = [float(a["correct"]) for a in run.answers
                  if key == "all" or key in (f"{a['task']}/{a['language']}", f"all/{a['language']}")]
        if values:
            found[run.seed] = values
    return found


def _most_frequent_answer(group: list[RunResult], key: str) -> dict[str, Any] | None:
    """The answer given most often to the questions under `key` (a task/language), over all seeds, and its share:
    a model that ignores the picture gives one answer to every question of a task."""
    given = Counter(a["answer"] for run in group for a in run.answers
                    if "answer" in a and key == f"{a['task']}/{a['language']}")
    if not given:
        return None
    answer, count = given.most_common(1)[0]
    return {"answer": answer, "share": count / sum(given.values())}


def aggregate(runs: list[RunResult]) -> list[dict[str, Any]]:
    """One entry per (variant, stage1): means and spreads over seeds."""
    groups: dict[tuple[str, bool], list[RunResult]] = {}
    for run in runs:
        groups.setdefault((run.variant, run.stage1), []).append(run)
    entries = []
    for (name, stage1), group in groups.items():
        keys = sorted({key for run in group for key in run.accuracy})
        accuracy = {}
        for key in keys:
            mean, spread = _mean_spread([run.accuracy[key]["accuracy"] for run in group if key in run.accuracy])
            accuracy[key] = {"mean": mean, "spread": spread, "chance": group[0].accuracy[key]["chance"],
                             "n": sum(run.accuracy[key]["n"] for run in group if key in run.accuracy)}
            by_seed = _correct_by_seed(group, key)
            if by_seed:  # the 95% interval over seeds and questions
                accuracy[key]["interval"] = bootstrap_mean(by_seed)
            top = _most_frequent_answer(group, key)
            if top is not None:
                accuracy[key]["most_frequent_answer"] = top
        # Runs on data without reference answers (e.g. plain LLaVA conversations) have no accuracy.
        overall = _mean_spread([statistics.fmean(run.accuracy[k]["accuracy"] for k in run.accuracy
                                                 if k.startswith("all/")) for run in group
                                if any(k.startswith("all/") for k in run.accuracy)])
        first = group[0]
        entries.append({
            "strategy": first.strategy, "variant": name + (" +stage1" if stage1 else ""), "stage1": stage1,
            "seeds": [run.seed for run in group],
            "trainable_params": first.trainable_params, "total_params": first.total_params,
            "image_positions": first.image_positions, "cross_attention_kv": first.cross_attention_kv,
            "accuracy": overall[0], "accuracy_spread": overall[1], "accuracy_by_task": accuracy,
            "accuracy_interval": bootstrap_mean(_correct_by_seed(group, "all")) if group[0].answers else None,
            "train_seconds": _mean_spread([r.train_seconds for r in group]),
            "ttft_ms": _mean_spread([r.ttft_ms for r in group]),
            "decode_tokens_per_s": _mean_spread([r.decode_tokens_per_s for r in group]),
            "peak_memory_mb": next((r.peak_memory_mb for r in group if r.peak_memory_mb is not None), None),
            "losses": [r.losses for r in group],
        })
    return entries


def quality_comparisons(runs: list[RunResult]) -> dict[str, Any]:
    """Paired differences in held-out accuracy between every two strategies (each strategy's first variant
    without stage 1), and each strategy's English minus Turkish accuracy, with 95% intervals (kopru.lesson.significance).
    """
    variant_of: dict[str, str] = {}
    for run in runs:
        if not run.stage1 and run.answers:
            variant_of.setdefault(run.strategy, run.variant)
    chosen = {strategy: [run for run in runs if run.variant == variant and not run.stage1 and run.answers]
              for strategy, variant in variant_of.items()}
    pairs = {}
    strategies = list(chosen)
    for i, a in enumerate(strategies):
        for b in strategies[i + 1:]:
            left, right = _paired_answers(chosen[a], chosen[b])
            pairs[f"{a} - {b}"] = bootstrap_difference(left, right, paired=True)
    language_gap = {}
    for strategy, group in chosen.items():
        english, turkish = _correct_by_seed(group, "all/en"), _correct_by_seed(group, "all/tr")
        if english and turkish:
            language_gap[strategy] = bootstrap_difference(english, turkish, paired=False)
    return {"variants": {s: group[0].variant for s, group in chosen.items()}, "differences": pairs,
            "language_gap": language_gap}


def _paired_answers(a: list[RunResult], b: list[RunResult]) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
    """Both groups' correctness on the questions both answered, seed by seed, in the same order."""
    left, right = {}, {}
    others = {run.seed: {x["id"]: float(x["correct"]) for x in run.answers} for run in b}
    for run in a:
        if run.seed not in others:
            continue
        mine = {x["id"]: float(x["correct"]) for x in run.answers}
        common = [i for i in mine if i in others[run.seed]]
        if common:
            left[run.seed] = [mine[i] for i in common]
            right[run.seed] = [others[run.seed][i] for i in common]
    return left, right


def turkish_alignment(runs: list[RunResult], transfer: list[RunResult], preset: Preset,
                      itc_stage1: dict[str, str] | None = None) -> dict[str, Any]:
    """Tokenizer fertility and its cost in text budget, caption retrieval per language (caption likelihood for
    every variant; the Q-Former's ITC head for the stage-1 connectors in `itc_stage1`), cross-lingual transfer."""

    first = {run.variant: run for run in runs if run.seed == runs[0].seed and not run.stage1}
    captions = builtin_dataset("shapes", max(preset.retrieval_captions, 2), split="test", kind="caption")
    by_language = {lang: [s for s in captions if s.meta["language"] == lang][: preset.retrieval_captions]
                   for lang in ("en", "tr")}
    questions = builtin_dataset("shapes", preset.eval_scenes, split="test")
    retrieval, fertility, budget = {}, {}, {}
    for name, run in first.items():
        model, processor = KopruForConditionalGeneration.from_pretrained(run.model_dir)
        retrieval[name] = {lang: caption_retrieval(model, processor, samples) for lang, samples in by_language.items()}
        if not fertility:
            texts = {lang: [m["content"].replace("<image>", "").strip() for s in questions + captions
                            if s.meta["language"] == lang for m in s.messages] for lang in ("en", "tr")}
            fertility = tokenizer_fertility(processor.tokenizer, texts)
            context = context_window(model.llm.config) or 2048  # 2048 for an LLM that declares no window
        budget[name] = text_budget(fertility, context, run.image_positions)
    itc = {name: {lang: itc_retrieval(first[name].model_dir, stage1_dir, samples)
                  for lang, samples in by_language.items()}
           for name, stage1_dir in (itc_stage1 or {}).items() if name in first}
    cross = {}
    for run in transfer:
        trained = "+".join(run.train_languages)
        cross.setdefault(run.variant, {})[f"train {trained}"] = {
            lang: run.accuracy[f"all/{lang}"]["accuracy"] for lang in ("en", "tr") if f"all/{lang}" in run.accuracy}
    for name, run in first.items():
        cross.setdefault(name, {})["train en+tr"] = {
            lang: run.accuracy[f"all/{lang}"]["accuracy"] for lang in ("en", "tr") if f"all/{lang}" in run.accuracy}
    return {"fertility": fertility, "text_budget": budget, "retrieval": retrieval, "itc_retrieval": itc,
            "cross_lingual": cross, "context_tokens": context}


def itc_retrieval(model_dir: str, stage1_dir: str, samples: list) -> dict[str, float]:
    """Recall@1/5 with the Q-Former's contrastive head: the stage-1 Q-Former and heads put onto the backbones of
    the saved model at `model_dir`, scored over the same caption samples as the caption-likelihood ranking."""

    model, processor = KopruForConditionalGeneration.from_pretrained(model_dir)
    model.load_connector(stage1_dir)
    pretrainer = QFormerPretrainer(model, processor.tokenizer)
    pretrainer.load_heads(Path(stage1_dir) / QFORMER_HEADS_FILE)
    recall = retrieval_recall(model, pretrainer, processor, samples)
    images, texts = int(recall.pop("images")), int(recall.pop("texts"))
    return {**recall, "n": texts, "chance@1": min(1.0, 1 / images), "chance@5": min(1.0, 5 / images)}
