"""One `kopru compare` training run with settings changed, printing held-out accuracy per task and language at
every evaluation: the tool behind the learning-rate and step sweeps noted in `kopru/lesson/compare.py`.

    python scripts/compare_run.py --variant projection-mlp --steps 900 --eval-every 150 --eval-questions 240 \\
        --set connector_lr=1e-3 --set 'feature_layer=[-2,-1]'
    python scripts/compare_run.py --variant qformer-32 --stage1-steps 150 --connector '{"num_layers": 3}'
    python scripts/compare_run.py --variant xattn-every2 --train-tasks shapes-exists --steps 900

--train-tasks trains on some of the built-in tasks only (written as a LLaVA JSONL file with PNG images into the run
folder, the way a user's data comes in); the held-out questions still cover every task. After the last evaluation
the most frequent answers per task and language are printed: a model that ignores the picture answers one word.

--set takes TrainConfig fields (values as JSON, else text), --connector updates the variant's connector settings.
One torch thread (runs beside each other on a busy machine stay comparable); the default preset's seed, data,
batch and learning rates unless changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from kopru.data.synthetic import SHAPE_TASKS, shapes_dataset
from kopru.lesson.compare import PRESETS, VARIANTS, run_stage1, train_settings
from kopru.training import TrainConfig, train


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def write_task_subset(tasks: list[str], scenes: int, seed: int, folder: Path) -> Path:
    """The built-in training questions of `tasks` as LLaVA JSONL records with one PNG per scene."""
    folder.mkdir(parents=True, exist_ok=True)
    names: dict[int, str] = {}
    with (folder / "train.jsonl").open("w") as lines:
        for sample in shapes_dataset(scenes, seed=seed, split="train"):
            if sample.meta["task"] not in tasks:
                continue
            image = sample.images[0]
            if id(image) not in names:  # a scene's questions share one image object
                names[id(image)] = f"scene-{len(names):05d}.png"
                image.save(folder / names[id(image)])
            turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                     for m in sample.messages]
            lines.write(json.dumps({"id": sample.id, "image": names[id(image)], "conversations": turns}) + "\n")
    return folder / "train.jsonl"


def print_answers(records: list[dict]) -> None:
    answers: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        answers[f"{record['task']}/{record['language']}"][record["answer"]] += 1
    for key, counts in sorted(answers.items()):
        total = sum(counts.values())
        print(f"  {key}: " + ", ".join(f"{answer!r} {n / total:.0%}" for answer, n in counts.most_common(3)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="projection-mlp")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="single-stage steps (default: the preset's)")
    parser.add_argument("--stage1-steps", type=int, default=0, help="align / Q-Former stage 1 first (default 0)")
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: at the end)")
    parser.add_argument("--eval-questions", type=int, help="held-out questions (default: the preset's)")
    parser.add_argument("--connector", type=json.loads, default={}, help="JSON: connector settings to change")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a TrainConfig field")
    parser.add_argument("--train-tasks", help=f"comma-separated, from {', '.join(SHAPE_TASKS)} (default: all)")
    parser.add_argument("--output", help="run folder (default: a temporary one)")
    args = parser.parse_args()
    train_tasks = args.train_tasks.split(",") if args.train_tasks else None
    if train_tasks and not set(train_tasks) <= set(SHAPE_TASKS):
        parser.error(f"--train-tasks expects tasks from {SHAPE_TASKS}, found {sorted(set(train_tasks) - set(SHAPE_TASKS))}")
    torch.set_num_threads(1)

    preset = PRESETS[args.preset]
    variant = VARIANTS[args.variant]
    variant = dataclasses.replace(variant, connector={**variant.connector, **args.connector})
    settings = train_settings(variant, args.seed, preset, None, None, "builtin:shapes", None, ("en", "tr"))
    settings["eval_every"] = args.eval_every
    if args.eval_questions is not None:
        settings["eval_questions"] = args.eval_questions
    for item in args.set:
        name, _, text = item.partition("=")
        if name not in {f.name for f in dataclasses.fields(TrainConfig)}:
            parser.error(f"--set expects a TrainConfig field, found {name!r}")
        settings[name] = _value(text)
    output = Path(args.output or tempfile.mkdtemp(prefix="compare-run-"))
    if train_tasks:
        settings["train_data"] = str(write_task_subset(train_tasks, settings["builtin_train_size"], args.seed,
                                                       output / "train-data"))
        settings["eval_data"] = "builtin:shapes"  # its held-out split, every task
    started = time.perf_counter()
    init = run_stage1(variant, args.stage1_steps, output / "stage1", settings) if args.stage1_steps else None
    summary = train(TrainConfig(**settings, recipe="single-stage", max_steps=args.steps or preset.steps,
                                init_connector=init, output_dir=str(output / "single-stage")))
    for evaluation in summary.eval:
        cells = " ".join(f"{key}={value['accuracy']:.2f}" for key, value in sorted(evaluation["accuracy"].items()))
        print(f"step {evaluation['step']}: {cells}")
    if summary.eval:
        print("most frequent answers:")
        print_answers(summary.eval[-1]["answers"])
    print(f"{time.perf_counter() - started:.0f} s; model: {summary.final_model}")


if __name__ == "__main__":
    main()
