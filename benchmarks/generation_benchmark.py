"""Generation speed: Köprü's engine vs HF `generate` on the very same weights, in the same run.

For each strategy an HF reference model is built with random weights (LLaVA for projection, BLIP-2 for qformer,
Llama-3.2-Vision "Mllama" for cross_attention) and turned into a Köprü model by the converters in
`kopru.convert` (so both compute the same function). Each implementation generates from 1 image + 64 random
text tokens, greedy, a fixed number of new tokens (eos ignored), at batch 1 and 8:

    HF eager           generate() with its default dynamic cache
    HF static+compile  generate(cache_implementation="static") with torch.compile of the decode forward
    Köprü eager        GenerationEngine (static cache, one decode_step function)
    Köprü compiled     GenerationEngine(compile=True): decode_step under torch.compile (CUDA graphs on GPU)

TTFT = the fastest time of a 1-new-token call (images encoded, prompt prefilled, first token on the host);
decode tok/s = batch x (new tokens - 1) / (fastest full call - TTFT), all sequences together; peak memory =
the implementation's model weights + what a full call adds at its peak to the memory in use before it (CUDA's
allocator; on CPU the process's resident set, coarse). After a warm-up call (which also compiles), the `--repeats` take turns across the implementations. The GPU roofline is the bytes of
weights one decode step reads (LLM, plus the gated blocks for cross_attention) over the measured
device-to-device copy bandwidth.

    python benchmarks/generation_benchmark.py --preset tiny              # CPU, all three strategies, tiny
    python benchmarks/generation_benchmark.py --preset llava-7b          # one H100/H200, bf16, random weights
    python benchmarks/generation_benchmark.py --preset blip2-7b
    python benchmarks/generation_benchmark.py --preset mllama-11b
    python benchmarks/generation_benchmark.py --preset mllama-11b --tiny # same code path, tiny size, CPU

`--json PATH` also writes every printed row (with the device, torch / transformers versions, preset and date).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    BlipImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CompileConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MllamaConfig,
    MllamaForConditionalGeneration,
)

from kopru.convert import blip2 as blip2_converter
from kopru.convert import llava as llava_converter
from kopru.convert import mllama as mllama_converter
from kopru.generation import GenerationEngine, SamplingParams
from kopru.lesson.measure import peak_rss_mb, reset_peak_rss
from kopru.lesson.tiny import tiny_tokenizer
from kopru.run_info import environment, write_json

LLAMA_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
TINY_LLAMA = dict(vocab_size=2000, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096)


@dataclass
class Preset:
    family: str  # llava | blip2 | mllama
    config: Callable[[int], object]  # image token id -> the HF reference's config
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    text_tokens: int = 64
    new_tokens: int = 128
    batches: tuple[int, ...] = (1, 8)
    tiny: str | None = None  # the same family at tiny size (--tiny)
    notes: list[str] = field(default_factory=list)


def llava_config(vision: dict, text: dict) -> Callable[[int], LlavaConfig]:
    return lambda image_id: LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                                        image_token_id=image_id, vision_feature_layer=-2)


def blip2_config(vision: dict, qformer: dict, text: dict, queries: int) -> Callable[[int], Blip2Config]:
    return lambda image_id: Blip2Config(vision_config=vision, qformer_config=qformer,
                                        text_config=LlamaConfig(**text).to_dict(), num_query_tokens=queries,
                                        image_token_id=image_id)


def mllama_config(vision: dict, text: dict) -> Callable[[int], MllamaConfig]:
    return lambda image_id: MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id)


TINY_CPU = dict(device="cpu", dtype=torch.float32, new_tokens=64)
PRESETS = {
    "tiny-llava": Preset("llava", llava_config(
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56,
             patch_size=14, projection_dim=64), TINY_LLAMA), **TINY_CPU),
    "tiny-blip2": Preset("blip2", blip2_config(
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56,
             patch_size=14),
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128), TINY_LLAMA, 8),
        **TINY_CPU),
    "tiny-mllama": Preset("mllama", mllama_config(
        dict(hidden_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4, intermediate_size=128,
             vision_output_dim=64 * 3, image_size=28, patch_size=14, max_num_tiles=2,
             intermediate_layers_indices=[0, 1], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        dict(vocab_size=2000, hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=352, cross_attention_layers=[1, 4], bos_token_id=0, eos_token_id=1, pad_token_id=2)),
        **TINY_CPU),
    # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 image tokens) + a Llama-2-7B-sized LLM.
    "llava-7b": Preset("llava", llava_config(
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
             patch_size=14, projection_dim=768), LLAMA_7B), tiny="tiny-llava"),
    # BLIP-2-style: EVA ViT-g/14 at 224 px + a BERT-base-sized Q-Former (32 queries) + the same 7B LLM.
    "blip2-7b": Preset("blip2", blip2_config(
        dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224,
             patch_size=14),
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             cross_attention_frequency=2), LLAMA_7B, 32), tiny="tiny-blip2"),
    # Llama-3.2-11B-Vision-sized: HF's MllamaConfig defaults are the 11B model's.
    "mllama-11b": Preset("mllama", mllama_config({}, {}), tiny="tiny-mllama"),
}
SUITES = {"tiny": ["tiny-llava", "tiny-blip2", "tiny-mllama"]}
CONVERTERS = {"llava": llava_converter, "blip2": blip2_converter, "mllama": mllama_converter}
REFERENCE_CLASSES = {"llava": LlavaForConditionalGeneration, "blip2": Blip2ForConditionalGeneration,
                     "mllama": MllamaForConditionalGeneration}
STRATEGY = {"llava": "projection", "blip2": "qformer", "mllama": "cross_attention"}


def save_image_processor(family: str, vision_config, directory: str) -> None:
    """The family's HF image processor beside the reference, as a checkpoint has it (the converters read it)."""
    size = vision_config.image_size
    if family == "llava":
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    elif family == "blip2":
        processor = BlipImageProcessor(size={"height": size, "width": size})
    else:
        try:  # the PIL class needs no torchvision; older transformers have only MllamaImageProcessor
            from transformers.models.mllama.image_processing_pil_mllama import (
                MllamaImageProcessorPil as Mllama,
            )
        except ImportError:
            from transformers import MllamaImageProcessor as Mllama
        processor = Mllama(size={"height": size, "width": size}, max_image_tiles=vision_config.max_num_tiles)
    processor.save_pretrained(directory)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(preset: Preset, workdir: str):
    """The HF reference (random weights) and the Köprü model converted from it, both on the device."""
    tokenizer = tiny_tokenizer()
    image_token = mllama_converter.IMAGE_TOKEN if preset.family == "mllama" else "<image>"
    tokenizer.add_tokens([image_token], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(image_token)  # any id works for random weights
    tokenizer.save_pretrained(workdir)  # the converters read the tokenizer from the source directory
    device = torch.device(preset.device)
    torch.manual_seed(0)
    with torch.device(device), default_dtype(preset.dtype):
        reference = REFERENCE_CLASSES[preset.family](preset.config(image_id)).eval()
        save_image_processor(preset.family, reference.config.vision_config, workdir)
        if preset.family == "mllama":  # HF initialises the tanh gates at 0: open them so the images count
            with torch.no_grad():
                for name, param in reference.named_parameters():
                    if "gate" in name and param.numel() == 1:
                        param.fill_(0.5)
        model, processor = CONVERTERS[preset.family].to_kopru(reference, workdir)
    model = model.to(device, preset.dtype).eval()
    for generation_config in (reference.generation_config, model.llm.generation_config):
        generation_config.eos_token_id = None  # exactly `new_tokens` new tokens, whatever random weights say
        generation_config.pad_token_id = 0
    return reference, model, processor


def inputs_for(preset: Preset, reference, model, batch: int) -> tuple[dict, dict]:
    """1 image + `text_tokens` random text tokens per row: (HF inputs, Köprü inputs) on the device."""
    device = torch.device(preset.device)
    if preset.family == "mllama":
        hf, ours = mllama_converter.random_inputs(reference, model, 1, batch,
                                                  preset.text_tokens)
    else:
        image_id = model.config.image_token_id
        per_image = model.image_count.placeholders
        size = model.vision.image_size
        text = torch.randint(3, 300, (batch, preset.text_tokens))
        ids = torch.cat([torch.full((batch, per_image), image_id), text], dim=1)
        hf = ours = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                     "pixel_values": torch.randn(batch, 3, size, size)}
    move = {k: v.to(device, preset.dtype) if v.is_floating_point() else v.to(device) for k, v in hf.items()}
    return move, {k: v.to(device, preset.dtype) if v.is_floating_point() else v.to(device) for k, v in ours.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(call: Callable[[], int], device: torch.device) -> tuple[float, int]:
    synchronize(device)
    start = time.perf_counter()
    produced = call()
    synchronize(device)
    return time.perf_counter() - start, produced


def hf_runner(reference, inputs: dict, static: bool) -> Callable[[int], int]:
    options = {}
    if static:
        options = {"cache_implementation": "static",
                   "compile_config": CompileConfig(fullgraph=True, mode="reduce-overhead")}
        options["compile_config"]._compile_all_devices = True  # HF compiles on CUDA only, unless told

    def run(new_tokens: int) -> int:
        with torch.inference_mode():
            out = reference.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     **options)
        return out.shape[1] - inputs["input_ids"].shape[1]

    return run


def engine_runner(engine: GenerationEngine, inputs: dict) -> Callable[[int], int]:
    def run(new_tokens: int) -> int:
        params = [SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)] * inputs["input_ids"].shape[0]
        steps = 0
        for _ in engine.stream_token_ids(inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"),
                                         params, image_sizes=inputs.get("image_sizes")):
            steps += 1
        return steps

    return run


def resident_bytes(device: torch.device) -> tuple[float, float]:
    """(memory in use now, peak since the last reset): CUDA's allocator, or on CPU the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return (int(status["VmRSS"].split()[0]) * 1024, (peak_rss_mb() or 0) * 2**20)


def measure_all(runners: dict[str, Callable[[int], int]], weights: dict[str, int], preset: Preset, batch: int,
                repeats: int) -> dict:
    """Per implementation: TTFT, decode tok/s, peak memory (its model's weights + what one full call adds on top
    of what was in use before it). The repeats take turns across implementations, so that load from other
    processes on a shared machine falls on all of them alike; fastest of `repeats`."""
    device = torch.device(preset.device)
    results: dict[str, dict] = {}
    for label, run in runners.items():  # warm-up (and compilation), then the peak memory of one full call
        try:
            run(preset.new_tokens)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            else:
                reset_peak_rss()
            before, _ = resident_bytes(device)
            produced = run(preset.new_tokens)
            if produced != preset.new_tokens:
                raise RuntimeError(f"expected {preset.new_tokens} new tokens per row, found {produced}")
            added = max(resident_bytes(device)[1] - before, 0)
            results[label] = {"ttft_s": float("inf"), "total_s": float("inf"),
                              "peak_mib": (weights[label] + added) / 2**20}
        except Exception as error:  # a reference that cannot run this way is reported, not fatal
            results[label] = {"error": f"{type(error).__name__}: {str(error)[:160]}"}
    for _ in range(repeats):
        for label, run in runners.items():
            if "error" in results[label]:
                continue
            result = results[label]
            result["ttft_s"] = min(result["ttft_s"], timed(lambda run=run: run(1), device)[0])
            result["total_s"] = min(result["total_s"], timed(lambda run=run: run(preset.new_tokens), device)[0])
    for result in results.values():
        if "error" not in result:
            result["ttft_ms"] = result["ttft_s"] * 1e3
            result["decode"] = batch * (preset.new_tokens - 1) / max(result["total_s"] - result["ttft_s"], 1e-9)
    return results


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), fastest of 10."""
    source = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = min(timed(lambda: target.copy_(source) and 0, device)[0] for _ in range(10))
    return 2 * source.numel() * source.element_size() / seconds


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def decode_weight_bytes(model) -> int:
    """What one decode step reads: the LLM's weights, and for cross_attention the gated blocks too."""
    modules = [model.llm] + ([model.connector.blocks] if hasattr(model.connector, "blocks") else [])
    return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())


def run_preset(name: str, repeats: int, skip_compiled: bool, batches: tuple[int, ...] | None,
               measured: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """The preset's rows; `measured` is called with the rows so far after each batch size."""
    preset = PRESETS[name]
    device = torch.device(preset.device)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        reference, model, processor = build(preset, workdir)
        implementations = [("HF eager", lambda inputs: hf_runner(reference, inputs, static=False))]
        if not skip_compiled:
            implementations.append(("HF static+compile", lambda inputs: hf_runner(reference, inputs, static=True)))
        engines = {"Köprü eager": GenerationEngine(model, processor, max_batch_size=8)}
        if not skip_compiled:
            engines["Köprü compiled"] = GenerationEngine(model, processor, max_batch_size=8, compile=True)
        implementations += [(label, lambda inputs, engine=engine: engine_runner(engine, inputs))
                            for label, engine in engines.items()]
        for batch in batches or preset.batches:
            hf_inputs, kopru_inputs = inputs_for(preset, reference, model, batch)
            runners = {label: make(hf_inputs if label.startswith("HF") else kopru_inputs)
                       for label, make in implementations}
            weights = {label: parameter_bytes(reference if label.startswith("HF") else model)
                       for label in runners}
            for label, result in measure_all(runners, weights, preset, batch, repeats).items():
                rows.append({"preset": name, "strategy": STRATEGY[preset.family], "batch": batch,
                             "implementation": label, **result})
                print(format_row(rows[-1]), flush=True)
            measured(rows)
        roofline = None
        if device.type == "cuda":
            roofline = copy_bandwidth(device) / decode_weight_bytes(model)
        for row in rows:
            row["roofline"] = roofline
    return rows


def format_row(row: dict) -> str:
    head = f"{row['strategy']:<16} {row['batch']:>5}  {row['implementation']:<18}"
    if "error" in row:
        return f"{head} failed: {row['error']}"
    return f"{head} {row['ttft_ms']:>9.1f} {row['decode']:>11.1f} {row['peak_mib']:>9.0f}"


def summary(rows: list[dict]) -> list[str]:
    """Ratios against the targets: decode vs HF's best and vs HF eager, TTFT vs HF's best, and the roofline."""
    lines = []
    for (strategy, batch) in dict.fromkeys((r["strategy"], r["batch"]) for r in rows):
        group = {r["implementation"]: r for r in rows if (r["strategy"], r["batch"]) == (strategy, batch)
                 and "error" not in r}
        hf = [r for label, r in group.items() if label.startswith("HF")]
        ours = [r for label, r in group.items() if label.startswith("Köprü")]
        if not hf or not ours:
            continue
        best_ours = max(ours, key=lambda r: r["decode"])
        best_hf = max(hf, key=lambda r: r["decode"])
        line = (f"{strategy} batch {batch}: Köprü best decode {best_ours['decode']:.1f} tok/s "
                f"({best_ours['implementation']}) = {best_ours['decode'] / best_hf['decode']:.2f}x HF's best "
                f"({best_hf['implementation']})")
        if "HF eager" in group:
            line += f", {best_ours['decode'] / group['HF eager']['decode']:.2f}x HF eager"
        line += (f"; TTFT {min(r['ttft_ms'] for r in ours):.1f} ms vs HF's best "
                 f"{min(r['ttft_ms'] for r in hf):.1f} ms")
        roofline = best_ours.get("roofline")
        if roofline and batch == 1:
            line += f"; roofline {roofline:.0f} tok/s, reached {best_ours['decode'] / roofline:.0%}"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=[*SUITES, *PRESETS])
    parser.add_argument("--tiny", action="store_true",
                        help="run a GPU preset's family at tiny size on CPU (checks the code path without a GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, action="append", help="batch size(s) (default 1 and 8)")
    parser.add_argument("--skip-compiled", action="store_true",
                        help="leave out the torch.compile variants (compiling takes minutes on a small CPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write every row (TTFT, decode tok/s, peak memory, roofline, per implementation "
                             "and batch), the summary, the device, torch / transformers versions, preset and date "
                             "as JSON to PATH")
    args = parser.parse_args(argv)
    names = SUITES.get(args.preset, [args.preset])
    if args.tiny:
        names = [PRESETS[name].tiny or name for name in names]
    for name in names:
        if PRESETS[name].device == "cuda" and not torch.cuda.is_available():
            print(f"preset {name} needs a CUDA GPU and none is available; use --tiny to run it at tiny size on CPU",
                  file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}; device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}"
          f"; {torch.get_num_threads()} CPU thread(s); fastest of {args.repeats}")
    print(f"{'strategy':<16} {'batch':>5}  {'implementation':<18} {'TTFT ms':>9} {'decode t/s':>11} {'peak MiB':>9}")
    about = {"benchmark": "generation", **environment(args.preset), "tiny": args.tiny, "presets": names,
             "repeats": args.repeats, "new_tokens": {name: PRESETS[name].new_tokens for name in names},
             "text_tokens": {name: PRESETS[name].text_tokens for name in names},
             "dtype": {name: str(PRESETS[name].dtype) for name in names}}

    def save(rows: list[dict], complete: bool) -> None:
        # Written after every batch size too, so that a run stopped part way (a time limit on a lent GPU)
        # leaves what it measured; "complete" says whether it got to the end.
        if args.json:
            write_json(args.json, {**about, "complete": complete, "rows": rows, "summary": summary(rows)})

    rows: list[dict] = []
    for name in names:
        rows += run_preset(name, args.repeats, args.skip_compiled, tuple(args.batch) if args.batch else None,
                           measured=lambda preset_rows, done=tuple(rows): save([*done, *preset_rows], False))
    print()
    print("\n".join(summary(rows)))
    save(rows, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
