"""`kopru` command line: demo, convert."""

from __future__ import annotations

import argparse
import json
import sys


def _demo(args: argparse.Namespace) -> int:
    from kopru.demo import format_results, run_demo

    print("Köprü demo: three strategies on tiny local backbones (a 2-layer CLIP-style ViT, a 4-layer Llama).")
    results = run_demo(args.workdir, steps=args.steps, seed=args.seed)
    print(format_results(results))
    if args.workdir:
        print(f"\nmodels saved under {args.workdir}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from kopru.convert import convert

    report = convert(args.source_format, args.src, args.dst, verify=args.verify, seed=args.seed)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"converted {args.source_format} checkpoint {args.src} -> {args.dst} ({report['strategy']} strategy, "
              f"{report['image_positions']} LLM positions per image)")
        if args.verify:
            print(f"max |logit difference| against the source model: {report['max_abs_diff']:.3e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kopru", description="Join a vision encoder to a causal LLM.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="every strategy end to end on tiny built-in backbones (no downloads)")
    demo.add_argument("--workdir", help="keep the tiny backbones and saved models here (default: a temp dir)")
    demo.add_argument("--steps", type=int, default=40, help="stage-1 training steps per strategy (default 40)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    convert = commands.add_parser(
        "convert", help="turn an HF LLaVA / BLIP-2 / Llama-3.2-Vision checkpoint into a Köprü model"
    )
    convert.add_argument("--from", dest="source_format", required=True, choices=["llava", "blip2", "mllama"])
    convert.add_argument("src", help="HF checkpoint directory (or hub id when online)")
    convert.add_argument("dst", help="output directory for the Köprü model")
    convert.add_argument("--verify", action="store_true",
                         help="run source and converted model on the same random inputs; print the max |logit diff|")
    convert.add_argument("--json", action="store_true", help="print one JSON object")
    convert.add_argument("--seed", type=int, default=0, help="seed of the verification inputs")
    convert.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError, TypeError) as error:
        print(f"kopru {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
