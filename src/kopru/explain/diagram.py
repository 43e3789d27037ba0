"""The data flow drawn as a column of boxes, one per stage (matplotlib, imported when a diagram is drawn)."""

from __future__ import annotations

from pathlib import Path

from kopru.explain.report import Explanation, Stage

_ROLE_COLOURS = {"vision": "#cfe2f3", "connector": "#fce5cd", "llm": "#d9ead3"}


def _stage_role(stage: Stage) -> str:
    name = stage.name.lower()
    if name.startswith(("llm", "logits")):
        return "llm"
    if any(word in name for word in ("pixels", "patch", "encoder", "selected", "vision features")):
        return "vision"
    return "connector"


def draw_diagram(e: Explanation, path: str | Path) -> Path:
    """The data flow as a column of boxes, one per stage, shapes written on them (PNG or SVG by suffix)."""
    import matplotlib  # lazily: a heavy import, needed only when a diagram is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise ValueError(f"expected a diagram path ending in .png or .svg, found {path.name!r}")
    count = len(e.stages)
    fig, ax = plt.subplots(figsize=(9, 1.05 * count + 1.4))
    ax.set_xlim(0, 10)
    ax.set_ylim(-0.6, count + 0.9)
    ax.axis("off")
    ax.text(5, count + 0.55, f"{e.name}: {e.strategy}", ha="center", fontsize=13, weight="bold")
    ax.text(5, count + 0.2, f"{e.total_params:,} parameters; {e.image.llm_positions:,} LLM position(s) per image"
            + (f", {e.image.cross_attention_kv:,} cross-attention K/V" if e.image.cross_attention_kv else ""),
            ha="center", fontsize=9)
    for index, stage in enumerate(e.stages):
        y = count - 1 - index
        role = _stage_role(stage)
        ax.add_patch(FancyBboxPatch((0.6, y - 0.36), 8.8, 0.72, boxstyle="round,pad=0.02",
                                    facecolor=_ROLE_COLOURS[role], edgecolor="#555555"))
        ax.text(0.8, y + 0.12, stage.name, fontsize=10, weight="bold", va="center")
        ax.text(9.2, y + 0.12, "[" + ", ".join(f"{d:,}" for d in stage.shape) + "]", fontsize=10, va="center",
                ha="right", family="monospace")
        ax.text(0.8, y - 0.18, stage.note[:110], fontsize=7.5, va="center", color="#333333")
        if index:
            ax.annotate("", xy=(5, y + 0.37), xytext=(5, y + 0.63), arrowprops={"arrowstyle": "->"})
    handles = [FancyBboxPatch((0, 0), 1, 1, facecolor=c, edgecolor="#555555") for c in _ROLE_COLOURS.values()]
    ax.legend(handles, ["vision encoder", "connector", "LLM"], loc="lower center", ncol=3, frameon=False,
              bbox_to_anchor=(0.5, -0.02), fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
