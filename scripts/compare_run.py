"""One `kopru compare` training run with settings changed, printing held-out accuracy per task and language at
every evaluation: the tool behind the learning-rate and step sweeps noted in `kopru/lesson/compare.py`.

    python scripts/compare_run.py --variant projection-mlp --steps 900 --eval-every 150 --eval-questions 240 \\
        --set connector_lr=1e-3 --set 'feature_layer=[-2,-1]'
    python scripts/compare_run.py --variant qformer-32 --stage1-steps 150 --connector '{"num_layers": 3}'

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
from pathlib import Path

import torch

from kopru.lesson.compare import PRESETS, VARIANTS, run_stage1, train_settings
from kopru.training import TrainConfig, train


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


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
    parser.add_argument("--output", help="run folder (default: a temporary one)")
    args = parser.parse_args()
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
    started = time.perf_counter()
    init = run_stage1(variant, args.stage1_steps, output / "stage1", settings) if args.stage1_steps else None
    summary = train(TrainConfig(**settings, recipe="single-stage", max_steps=args.steps or preset.steps,
                                init_connector=init, output_dir=str(output / "single-stage")))
    for evaluation in summary.eval:
        cells = " ".join(f"{key}={value['accuracy']:.2f}" for key, value in sorted(evaluation["accuracy"].items()))
        print(f"step {evaluation['step']}: {cells}")
    print(f"{time.perf_counter() - started:.0f} s; model: {summary.final_model}")


if __name__ == "__main__":
    main()
