"""Tokens per image against resolution for each budget preset (docs/budget/tokens_vs_resolution.png), and a
table of LLM positions at common sizes (docs/budget/table.md). Pure arithmetic: seconds on a CPU.

    python scripts/plot_budget.py [--out docs/budget]

Every number comes from `kopru.budget` (the same code `kopru budget` runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kopru.budget import aspect_size, available_presets, format_bytes, load_preset, plan_budget

TABLE_SIZES = [(224, 224), (336, 336), (640, 480), (672, 672), (1280, 720), (1920, 1080), (3840, 2160)]
STYLES = {  # the presets drawn (one per resolution rule): preset -> (colour, strategy label)
    "llava-1.5-7b": ("tab:blue", "projection, fixed 336 px"),
    "llava-next-7b": ("tab:orange", "projection, anyres"),
    "qwen2-vl-7b": ("tab:green", "projection, dynamic"),
    "blip-2-opt-2.7b": ("tab:red", "qformer"),
    "llama-3.2-11b-vision": ("tab:purple", "cross_attention"),
}


def curves(aspect: tuple[int, int], long_sides: range) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """Per drawn preset: long sides, LLM positions, cross-attention K/V positions (0 where spliced)."""
    result = {}
    for name in STYLES:
        model = load_preset(name)
        sides, tokens, kv = [], [], []
        for side in long_sides:
            positions = model.image_positions(*aspect_size(side, *aspect))
            sides.append(side)
            tokens.append(positions.tokens)
            kv.append(positions.cross_attention_kv)
        result[name] = (sides, tokens, kv)
    return result


def plot(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for axis, aspect, title in ((axes[0], (1, 1), "square images"), (axes[1], (16, 9), "16:9 images")):
        for name, (sides, tokens, kv) in curves(aspect, range(28, 4097, 4)).items():
            colour, strategy = STYLES[name]
            axis.plot(sides, tokens, color=colour, label=f"{name} ({strategy}): LLM positions", linewidth=1.8)
            if any(kv):
                axis.plot(sides, kv, color=colour, linestyle="--", label=f"{name}: cross-attention K/V")
        axis.set_xscale("log", base=2)
        axis.set_xticks([32, 64, 128, 256, 512, 1024, 2048, 4096])
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_yscale("log")
        axis.set_xlabel("image width in pixels" if aspect[0] >= aspect[1] else "image height in pixels")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("positions per image (log)")
    axes[1].legend(fontsize=8, loc="lower right")
    figure.suptitle("Image cost against resolution (kopru budget presets)")
    figure.tight_layout()
    path = out / "tokens_vs_resolution.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def table() -> str:
    header = "| preset | context | " + " | ".join(f"{w}x{h}" for w, h in TABLE_SIZES) + " | KV cache, 1920x1080, bf16 |"
    lines = [header, "|" + "---|" * (len(TABLE_SIZES) + 3)]
    for name in available_presets():
        model = load_preset(name)
        cells = []
        for width, height in TABLE_SIZES:
            positions = model.image_positions(width, height)
            kv = f" + {positions.cross_attention_kv:,} K/V" if positions.cross_attention_kv else ""
            cells.append(f"{positions.tokens:,}{kv}")
        kv_bytes = plan_budget(model, [(1920, 1080)]).kv_cache_bytes
        lines.append(f"| {name} | {model.llm.context_window:,} | " + " | ".join(cells) + f" | {format_bytes(kv_bytes)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/budget", help="output folder (default docs/budget)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table()
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"\nplot: {plot(out)}")


if __name__ == "__main__":
    main()
