"""`kopru` command line: demo, convert, export, train, compare, pretrain-tiny, budget, chat, serve, explain."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import types
import typing
from typing import Any

import torch
import torch.distributed as dist

from kopru.budget import (
    SAMPLE_TEXTS,
    format_budget,
    load_kopru_model,
    load_preset,
    max_tokens_for_share,
    parse_image_size,
    plan_budget,
)
from kopru.chat import load_engine, read_image, run_chat, sampling_from_args
from kopru.config import coerce, type_name
from kopru.convert import CONVERTERS, convert
from kopru.dtypes import NAMES as DTYPE_NAMES
from kopru.dtypes import RUN_DTYPES
from kopru.explain import draw_diagram, explain, list_presets, summary_table
from kopru.export import TARGETS as EXPORT_TARGETS
from kopru.export import export
from kopru.image_processing import MAX_IMAGE_PIXELS
from kopru.lesson.compare import compare
from kopru.lesson.demo import format_results, run_demo
from kopru.lesson.pretrain_tiny import build_tiny_backbones, iter_report_lines
from kopru.lesson.report import results_table
from kopru.presets import preset_names
from kopru.serve import LIMIT_HELP, ServerLimits, ServerSecurity, load_server, run_server
from kopru.threads import configure_threads
from kopru.training import TrainConfig, read_config_file, train


def _demo(args: argparse.Namespace) -> int:
    print("Köprü demo: three strategies on tiny local backbones (a 2-layer CLIP-style ViT, a 4-layer Llama).")
    results = run_demo(args.workdir, steps=args.steps, seed=args.seed)
    print(format_results(results))
    if args.workdir:
        print(f"\nmodels saved under {args.workdir}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    report = convert(args.source_format, args.src, args.dst, verify=args.verify, seed=args.seed)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"converted {args.source_format} checkpoint {args.src} -> {args.dst} ({report['strategy']} strategy, "
              f"{report['image_positions']} LLM positions per image)")
        if args.verify:
            print(f"max |logit difference| against the source model on random inputs: {report['max_abs_diff']:.3e}")
            _print_user_path(report.get("user_path"))
    user_path = report.get("user_path") or {}
    if user_path.get("passed") is False:
        print(f"verify failed: {user_path['failure']}", file=sys.stderr)
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    report = export(args.target, args.src, args.dst, verify=args.verify, overwrite=args.overwrite,
                    new_tokens=args.new_tokens)
    verify = report.get("verify")
    if args.json:
        print(json.dumps(report))
    else:
        print(f"exported {report['strategy']} model {args.src} -> {args.dst} as {report['hf_class']} "
              f"({report['parameters']:,} parameters; {', '.join(report['files'])})")
        if verify is not None:
            print(f"verify: {verify['hf']['model_class']} + {verify['hf']['processor_class']} loaded by transformers "
                  f"alone (a separate process without Köprü); image placement: {verify['layout']}")
            _print_user_path({"checks": verify["checks"]}, sides="HF on DST, Köprü on SRC")
    if verify is not None and not verify["passed"]:
        print(f"verify failed: {verify['failure']} (the checkpoint is written at {args.dst})", file=sys.stderr)
        return 1
    return 0


def _print_user_path(user_path: dict | None, sides: str = "user's path") -> None:
    if user_path is None:
        return
    if user_path.get("skipped"):
        print(f"user's path not compared: {user_path['skipped']}")
        return
    for check in user_path["checks"]:
        width, height = check["image_size"]
        print(f"{sides}, {width}x{height} picture, '{check['template']}': input ids "
              f"{'equal' if check['input_ids_equal'] else 'DIFFER'}; max |pixel diff| {check['max_pixel_diff']:.3e} "
              f"over {check['pixels_compared']}; max |logit diff| {check['max_logit_diff']:.3e} "
              f"({check['logits_compared']}); greedy answer ({_tokens(len(check['hf_tokens']))} before the stop, "
              f"at most {check['new_tokens']}) {'identical' if check['tokens_equal'] else 'DIFFERS'}")


def _tokens(count: int) -> str:
    return f"{count} token" + ("" if count == 1 else "s")


def _train(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in _train_fields() if hasattr(args, name)}
    base = read_config_file(args.config) if args.config else {}
    summary = train(TrainConfig(**{**base, **overrides}))
    end_distributed()  # not on failure: a failing process must exit (torchrun stops the rest), not wait for them
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary
        print(format_summary(summary))
    return 0


def end_distributed() -> None:
    """Under torchrun: wait for every process, then tear the process group down. A process that exits with its
    group alive can abort (SIGABRT) in the group's destructor once its peers have closed their connections."""

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def format_summary(summary) -> str:
    lines = [
        f"steps: {summary.steps}   final loss: {summary.losses[-1]:.4f}" if summary.losses else "steps: 0",
        f"trainable parameters: {summary.trainable_params:,} of {summary.total_params:,}",
        f"throughput: {summary.tokens_per_second:,.0f} loss tokens/s over {summary.seconds:.1f} s",
        f"skipped samples: {summary.skipped or 'none'}",
    ]
    if summary.eval:
        last = summary.eval[-1]
        lines.append(f"held-out loss at step {last['step']}: {last['loss']:.4f}")
        for key, value in sorted(last.get("accuracy", {}).items()):
            lines.append(f"  accuracy {key}: {value['accuracy']:.3f} (chance {value['chance']:.3f}, n={value['n']})")
    lines.append(f"model: {summary.final_model or 'not saved (run stopped early)'}; summary: {summary.output_dir}/summary.json")
    return "\n".join(lines)


def _train_fields():
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def flag_type(hint: Any) -> typing.Callable[[str], Any]:
    """An argparse `type=` for a dataclass field of type `hint` (from typing.get_type_hints): int, float, str,
    bool (true/false, yes/no, 1/0), Literal and Enum choices, Optional (`none`), unions such as int | list[int]
    (each member tried in turn) and list / tuple / dict given as JSON (`'[-2,-1]'`). A value that fits no member
    is refused with the type expected and the text found."""

    def scalar(member: Any, text: str) -> Any:
        if member is str or member is Any:
            return text
        if member is bool:
            if text.lower() in ("true", "yes", "1"):
                return True
            if text.lower() in ("false", "no", "0"):
                return False
            raise TypeError(text)
        if member is int:
            return int(text)
        if member is float:
            value = float(text)
            if value != value or value in (float("inf"), float("-inf")):
                raise TypeError(text)
            return value
        if member is type(None):
            if text.lower() in ("none", "null"):
                return None
            raise TypeError(text)
        try:  # containers, Literal, Enum: the text as JSON, else as a bare string (`--mode anyres`)
            value = json.loads(text)
        except ValueError:
            value = text
        return coerce(member, value)

    origin = typing.get_origin(hint)
    # None first, then scalars, then containers: `none` is None for any optional field (strings included), and
    # "-2" is an int before it is anything else.
    members = list(typing.get_args(hint)) if origin in (types.UnionType, typing.Union) else [hint]
    members.sort(key=lambda member: (member is not type(None), typing.get_origin(member) is not None))

    def parse(text: str) -> Any:
        for member in members:
            try:
                return scalar(member, text)
            except (TypeError, ValueError):
                continue
        example = " (JSON, e.g. '[-2,-1]')" if any(typing.get_origin(m) in (list, tuple) for m in members) else ""
        raise argparse.ArgumentTypeError(f"expected {type_name(hint)}{example}, found {text!r}")

    return parse


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, typed by the field's type; a given flag overrides the config file."""
    hints = typing.get_type_hints(TrainConfig)
    for name, field in _train_fields().items():
        explained = field.metadata.get("help")
        kind = type_name(hints[name])
        # SUPPRESS: a flag not given leaves no attribute, so an explicit `none` can still override the file.
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=flag_type(hints[name]),
                            default=argparse.SUPPRESS,
                            help=f"({kind}) {explained}; overrides the config file" if explained
                            else f"({kind}) overrides the config file")


def _compare(args: argparse.Namespace) -> int:
    data = {k: v for k, v in (("vision", args.vision), ("llm", args.llm), ("train_data", args.train_data),
                              ("eval_data", args.eval_data)) if v is not None}
    results = compare(args.preset, args.output, workers=args.workers, **data)
    print(results_table(results))
    if args.json:
        entries = [{k: v for k, v in e.items() if k != "losses"} for e in results["variants"]]
        with open(args.json, "w") as handle:
            json.dump(entries, handle, indent=1, ensure_ascii=False)
    print(f"\nreport: {args.output}/report.md (plots and results.json beside it)")
    return 0


def _pretrain_tiny(args: argparse.Namespace) -> int:
    start = time.perf_counter()

    # `main` chose the thread count (--threads, OMP_NUM_THREADS or the default rule): keep it while training.
    paths = build_tiny_backbones(args.out, seed=args.seed, num_threads=torch.get_num_threads())
    print("\n".join(iter_report_lines(args.out)))
    print(f"built in {time.perf_counter() - start:.0f} s: vision encoder {paths['vision']}, LLM {paths['llm']}")
    return 0


def _budget(args: argparse.Namespace) -> int:
    model = load_preset(args.preset) if args.preset else load_kopru_model(args.model)
    sizes = [parse_image_size(text, args.max_image_pixels) for text in args.image]
    max_tokens = args.max_tokens
    if args.max_context_share is not None:
        max_tokens = max_tokens_for_share(model, args.max_context_share)
    texts = {**SAMPLE_TEXTS, **{k: v for k, v in (("en", args.text_en), ("tr", args.text_tr)) if v is not None}}
    budget = plan_budget(model, sizes, args.dtype, args.batch, texts, max_tokens, args.prompt_tokens,
                         args.max_new_tokens, args.max_image_pixels)
    print(json.dumps(budget.to_dict(), ensure_ascii=False) if args.json else format_budget(budget))
    return 0 if budget.fits else 1


def _chat(args: argparse.Namespace) -> int:
    params = sampling_from_args(args)  # bad settings and unreadable images are refused before the model loads
    images = [read_image(path) for path in args.image or []]
    engine = load_engine(args.model, args.device, args.dtype, args.compile, args.max_seq_len)
    try:
        return run_chat(engine, params, args.prompt, images, sys.stdin, sys.stdout, sys.stderr,
                        template=args.template, system=args.system)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _serve(args: argparse.Namespace) -> int:
    limits = ServerLimits(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(ServerLimits)})
    api_key = args.api_key if args.api_key is not None else os.environ.get("KOPRU_API_KEY") or None
    security = ServerSecurity.for_bind(args.host, api_key=api_key, allowed_hosts=args.allowed_host or (),
                                       cors_origins=args.cors_origin or ())
    app = load_server(args.model, model_name=args.served_model_name, limits=limits, allow_local_dir=args.allow_local_dir,
                      device=args.device, dtype=args.dtype, compile=args.compile, max_seq_len=args.max_seq_len,
                      security=security)
    print(f"serving {app.state.kopru.model_name!r} on http://{args.host}:{args.port} "
          f"(OpenAI API under /v1, web demo at /)", flush=True)
    run_server(app, host=args.host, port=args.port)
    return 0


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved Köprü model directory")
    parser.add_argument("--served-model-name", "--model-name", dest="served_model_name",
                        help="the id clients send as 'model' (vLLM's flag; default: the model folder's name, or for a "
                             "folder named final, latest or checkpoint-N the name kopru train stored in the model's "
                             "config, else the run folder's: runs/my-vlm/final is served as my-vlm)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; another address without an API key is warned "
                             "about loudly)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=RUN_DTYPES, help="weights dtype (default: as saved)")
    parser.add_argument("--max-seq-len", type=int, help="context window (default: the LLM's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    parser.add_argument("--allow-local-dir",
                        help="serve image_url file:// URLs and paths under this directory (default: refuse local "
                             "files, since any client could otherwise read images anywhere the server can); symbolic "
                             "links under it are never followed")
    parser.add_argument("--api-key",
                        help="require 'Authorization: Bearer KEY' on /v1/... and /metrics, else 401 (default: the "
                             "environment variable KOPRU_API_KEY, which keeps the key out of the process list; "
                             "without either, no key)")
    parser.add_argument("--allowed-host", action="append", metavar="NAME",
                        help="a Host header value (name or address, no port) to answer besides localhost, 127.0.0.1 "
                             "and ::1, against DNS rebinding; repeatable; '*' for any. Listening on a loopback "
                             "address only those are answered; on another address any Host is, unless this names "
                             "some")
    parser.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                        help="a browser origin (e.g. https://app.example) allowed to call the API from its pages, "
                             "'*' for any; repeatable (default: none, CORS off)")
    hints = typing.get_type_hints(ServerLimits)
    for spec in dataclasses.fields(ServerLimits):
        parser.add_argument(f"--{spec.name.replace('_', '-')}", dest=spec.name, type=flag_type(hints[spec.name]),
                            default=spec.default, help=f"{LIMIT_HELP[spec.name]} (default {spec.default})")


def _explain(args: argparse.Namespace) -> int:
    if args.list:
        print(list_presets())
        return 0
    if args.summary:
        print(summary_table(dtype=args.dtype, batch=args.batch, context=args.context, flops=not args.no_flops),
              end="")
        return 0
    image = parse_image_size(args.image) if args.image else None
    explanation = explain(preset=args.preset, config=args.config, model_dir=args.model, dtype=args.dtype,
                          batch=args.batch, context=args.context, image=image, images_per_sample=args.images,
                          text_tokens=args.text_tokens, flops=not args.no_flops)
    print(explanation.format(args.format), end="")
    if args.diagram:
        path = draw_diagram(explanation, args.diagram)
        print(f"diagram: {path}", file=sys.stderr if args.format == "json" else sys.stdout)
    return 0


def _positive(what: str):
    """An argparse type: a positive whole number of `what`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected a positive whole number of {what}, found {text!r}")
        return value

    return parse


def _threads_flag() -> argparse.ArgumentParser:
    """The --threads flag of every command that runs a model (a parent parser; `main` applies it)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--threads", type=_positive("threads"), default=None,
                        help="torch CPU threads (default: OMP_NUM_THREADS when set, else the idle CPUs: the CPUs less "
                             "the load average, at least 1; on a busy machine more threads only slow a model down)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kopru", description="Join a vision encoder to a causal LLM.")
    commands = parser.add_subparsers(dest="command", required=True)
    computes = [_threads_flag()]  # parents= of the commands that run a model

    demo = commands.add_parser("demo", help="every strategy end to end on tiny built-in backbones (no downloads)",
                              parents=computes)
    demo.add_argument("--workdir", help="keep the tiny backbones and saved models here (default: a temp dir)")
    demo.add_argument("--steps", type=int, default=40, help="stage-1 training steps per strategy (default 40)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    convert = commands.add_parser(
        "convert", help="turn an HF LLaVA / BLIP-2 / Llama-3.2-Vision checkpoint into a Köprü model",
        parents=computes,
    )
    convert.add_argument("--from", dest="source_format", required=True, choices=sorted(CONVERTERS))
    convert.add_argument("src", help="HF checkpoint directory (or hub id when online)")
    convert.add_argument("dst", help="output directory for the Köprü model")
    convert.add_argument("--verify", action="store_true",
                         help="compare HF's processor + chat template (BLIP-2, which has none: 'Question: ... Answer:') + "
                              "model with the reloaded conversion on drawn pictures and a chat question (input ids, "
                              "pixels, logits, greedy tokens); exit 1 on a difference")
    convert.add_argument("--json", action="store_true", help="print one JSON object")
    convert.add_argument("--seed", type=int, default=0, help="seed of the verification inputs")
    convert.set_defaults(run=_convert)

    export = commands.add_parser(
        "export", help="write a Köprü model as an HF LLaVA / LLaVA-NeXT / BLIP-2 / Llama-3.2-Vision checkpoint",
        description="The inverse of convert: a complete Hugging Face checkpoint (config, safetensors weights, "
                    "tokenizer, processor, image processor, chat template) that transformers loads alone "
                    "(AutoProcessor + AutoModelForImageTextToText), in the format vLLM and SGLang read (not run "
                    "here). projection at fixed resolution "
                    "-> llava; projection with anyres -> llava_next; qformer on a BLIP-2 vision tower -> blip2; "
                    "cross_attention on an Mllama vision tower with a Llama -> mllama. What the target cannot "
                    "express is refused (exit 2) before anything is written.",
        parents=computes,
    )
    export.add_argument("--to", dest="target", required=True, choices=sorted(EXPORT_TARGETS))
    export.add_argument("src", help="a saved Köprü model directory (save_pretrained, kopru train's final/)")
    export.add_argument("dst", help="output directory for the HF checkpoint (new or empty)")
    export.add_argument("--verify", action="store_true",
                        help="load DST with transformers alone in a separate process and run drawn pictures and a chat "
                             "question through HF's processor, chat template and generate, and the same through Köprü "
                             "on SRC (input ids, pixels, logits, greedy tokens); exit 1 on a difference")
    export.add_argument("--new-tokens", type=_positive("tokens"), default=8,
                        help="greedy tokens --verify generates on each side (default 8)")
    export.add_argument("--json", action="store_true", help="print one JSON object")
    export.add_argument("--overwrite", action="store_true", help="replace DST when it exists and is not empty")
    export.set_defaults(run=_export)

    train = commands.add_parser(
        "train", help="train with a recipe (align / instruct / single-stage); config file + flags",
        description="Train a Köprü model. Settings come from --config (YAML or TOML) and any flag below, "
                    "flags winning. Run under `torchrun --nproc-per-node N` for data parallelism.",
        parents=computes,
    )
    train.add_argument("--config", help="YAML or TOML file with TrainConfig settings")
    _add_train_flags(train)
    train.set_defaults(run=_train)

    compare = commands.add_parser(
        "compare", help="train and evaluate the strategies side by side; write a report with plots and a verdict",
        description="Train the three strategies on the same data, backbones, budget and seeds, and judge the "
                    "lesson's claims each at its scale: structure (trainable parameters, image positions, FLOPs, "
                    "KV cache) at CLIP-L/336 + Vicuna-7B from kopru explain's arithmetic; speed (TTFT, decode) "
                    "on a mid-size random-weight model (CLIP-B/14-336 + Qwen2-0.5B shapes on a CPU, the 7B on a "
                    "GPU); quality from the trained tiny models with 95% bootstrap intervals over seeds and "
                    "questions (holds / does not hold only when the interval excludes the other side).",
        parents=computes,
    )
    compare.add_argument("--preset", choices=["micro", "default", "full"], default="default",
                         help="micro: < 1 min; default: one variant per strategy x 3 seeds; full: every variant")
    compare.add_argument("--output", default="runs/compare", help="report folder (default runs/compare)")
    compare.add_argument("--json", help="also write the per-variant results here")
    compare.add_argument("--workers", type=_positive("workers"), default=None,
                         help="training runs side by side, each in its own process with one thread (default: the "
                              "thread count, see --threads); 1 runs them one after another in this process")
    compare.add_argument("--vision", help="vision encoder path / hub id (default: the built-in tiny one)")
    compare.add_argument("--llm", help="causal LM path / hub id (default: the built-in tiny one)")
    compare.add_argument("--train-data", help="training data file (default: builtin:shapes)")
    compare.add_argument("--eval-data", help="held-out data file (default: the built-in held-out split)")
    compare.set_defaults(run=_compare)

    explain = commands.add_parser(
        "explain", help="shapes, parameters per recipe, FLOPs, image positions and memory of a model (meta device)",
        description="Explain a model's architecture mathematics without downloading or allocating weights: "
                    "one of --preset, --config or --model.",
        parents=computes,
    )
    source = explain.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=preset_names(),
                        help="a published model's configuration (--list describes them; the same names as "
                             "kopru budget --preset)")
    source.add_argument("--config", help="a Köprü config JSON file (kopru_config.json); backbones' config.json read")
    source.add_argument("--model", help="a saved Köprü model directory")
    source.add_argument("--list", action="store_true", help="list the presets")
    source.add_argument("--summary", action="store_true", help="one markdown row per preset (counts, positions, ...)")
    explain.add_argument("--format", choices=["text", "markdown", "json"], default="text")
    explain.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES,
                         help="weights and KV cache dtype (default bfloat16)")
    explain.add_argument("--batch", type=int, default=1, help="sequences in the batch (KV cache, shapes)")
    explain.add_argument("--context", type=int, default=None,
                         help="context length (default: the LLM's max_position_embeddings)")
    explain.add_argument("--image", help="image size WIDTHxHEIGHT (or an image file) for anyres / dynamic / tiled presets and models "
                                         "(default: the encoder's base size; 336x336 for qwen2-vl-7b)")
    explain.add_argument("--images", type=int, default=1, help="images per sample (default 1)")
    explain.add_argument("--text-tokens", type=int, default=64, help="text tokens in the shape table (default 64)")
    explain.add_argument("--diagram", help="also draw the data flow with shapes to this .png or .svg")
    explain.add_argument("--no-flops", action="store_true",
                         help="skip the FLOP counting (the slow part): shapes, counts, positions and memory only")
    explain.set_defaults(run=_explain)

    pretrain = commands.add_parser(
        "pretrain-tiny", help="pretrain the tiny vision encoder and LLM of the built-in tasks (CPU, minutes)",
        parents=computes,
    )
    pretrain.add_argument("--out", required=True, help="output directory (gets vision/ and llm/)")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.set_defaults(run=_pretrain_tiny)

    budget = commands.add_parser(
        "budget", help="LLM positions, context share and KV-cache memory per image; the largest size that fits",
        description="Token budget of images on a published model (--preset) or a Köprü model (--model). KV-cache "
                    "memory counts the cross-attention K/V the cache holds, shown as 'cached' beside the image's own "
                    "(Llama-3.2-Vision and its conversions keep all 4 tiles, padding included). Exit "
                    "status 1 when the images, --prompt-tokens and --max-new-tokens do not fit the context window.",
    )
    source = budget.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=preset_names(),
                        help="a published model's configuration (the same names as kopru explain --preset)")
    source.add_argument("--model", help="a Köprü model directory or kopru_config.json (reads configs, no weights)")
    budget.add_argument("--image", action="append", required=True,
                        help="WIDTHxHEIGHT (e.g. 640x480) or an image file; repeat for several images")
    budget.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="KV-cache dtype")
    budget.add_argument("--batch", type=int, default=1, help="sequences in the batch (KV-cache memory)")
    limit = budget.add_mutually_exclusive_group()
    limit.add_argument("--max-tokens", type=int, help="plan each image's largest same-aspect size within this")
    limit.add_argument("--max-context-share", type=float, help="as --max-tokens, a share of the context window")
    budget.add_argument("--prompt-tokens", type=int, default=0, help="text tokens of the prompt (fit check)")
    budget.add_argument("--max-new-tokens", type=int, default=0, help="tokens to generate (fit check)")
    budget.add_argument("--text-en", help="English sample text to count (models with a tokenizer)")
    budget.add_argument("--text-tr", help="Turkish sample text to count (models with a tokenizer)")
    budget.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                        help=f"refuse larger images (default {MAX_IMAGE_PIXELS:,}, the decompression-bomb guard)")
    budget.add_argument("--json", action="store_true",
                        help='print one JSON object; "images" lists width, height and tokens per image')
    budget.set_defaults(run=_budget)

    chat = commands.add_parser(
        "chat", help="talk to a saved model: one-shot with a prompt, interactive without (streams the answer)",
        description="One-shot: kopru chat --model DIR --image PATH \"prompt\". Without a prompt, an interactive "
                    "conversation on stdin: /image PATH attaches an image to the next message, /reset, /quit.",
        parents=computes,
    )
    chat.add_argument("prompt", nargs="?", help="the question; omit it for an interactive conversation")
    chat.add_argument("--model", required=True, help="a Köprü model directory (save_pretrained / kopru train)")
    chat.add_argument("--image", action="append", help="image file for the (first) message; repeat for several")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy")
    chat.add_argument("--top-k", type=int, default=0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--repetition-penalty", type=float, default=1.0)
    chat.add_argument("--stop", action="append", help="stop string (repeatable)")
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--template", choices=["chat", "plain"], default="chat",
                      help="chat: the tokenizer's chat template or Köprü's fallback; plain: the align recipe's")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--device", help="default: cuda when available, else cpu")
    chat.add_argument("--dtype", choices=RUN_DTYPES, help="default: as saved")
    chat.add_argument("--max-seq-len", type=int, help="context window (default: the LLM's)")
    chat.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    chat.set_defaults(run=_chat)

    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (chat completions, streaming) with a web demo page",
        description="Serve a saved Köprü model: POST /v1/chat/completions (OpenAI format, images as data: URLs), "
                    "GET /v1/models, GET /health, GET /metrics, and a web demo at /. Concurrent requests are "
                    "generated together in batches. Every request is checked against the limits below before it "
                    "reaches the model, and fails alone: a bad request is answered 4xx, a failure of the server "
                    "5xx, and the others are served on.",
        parents=computes,
    )
    _add_serve_flags(serve)
    serve.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "threads"):  # a command that runs a model: before any of it runs

            configure_threads(args.threads)
        return args.run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"kopru {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
