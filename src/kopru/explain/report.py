"""What an explanation holds (stages, components, the image's positions, FLOPs, memory) and how it is written:
text, markdown or JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

RECIPES: tuple[str, ...] = ("align", "instruct", "single-stage", "lora")
FORMATS: tuple[str, ...] = ("text", "markdown", "json")
LORA_RANK, LORA_ALPHA = 128, 256  # LLaVA-1.5's LoRA recipe



@dataclass
class Stage:
    name: str
    shape: list[int]
    note: str = ""


@dataclass
class Component:
    name: str
    role: str  # "vision", "connector" or "llm"
    params: int
    trainable: dict[str, int | None]  # recipe -> trainable parameters (None: the recipe does not apply)


@dataclass
class ImageBudget:
    image_size: tuple[int, int]  # (width, height) the figures are for
    vision_tokens: int  # encoder tokens per image that reach the connector
    llm_positions: int  # positions one image occupies in the LLM context
    placeholders: int
    markers: int
    cross_attention_kv: int  # key/value positions per image behind cross-attention (0: spliced)
    context: int
    note: str = ""

    @property
    def context_share(self) -> float:
        return self.llm_positions / self.context


@dataclass
class Explanation:
    name: str
    description: str
    source: str
    strategy: str
    built_from: str
    dtype: str
    batch: int
    images_per_sample: int
    text_tokens: int
    stages: list[Stage]
    components: list[Component]
    image: ImageBudget
    flops: dict[str, float]
    memory: dict[str, float]
    notes: list[str]

    @property
    def total_params(self) -> int:
        return sum(c.params for c in self.components if c.role != "adapter")

    def trainable(self, recipe: str) -> int | None:
        values = [c.trainable.get(recipe) for c in self.components]
        return None if any(v is None for v in values) else sum(values)

    def component(self, role: str) -> int:
        return sum(c.params for c in self.components if c.role == role)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image"]["context_share"] = self.image.context_share
        data["total_params"] = self.total_params
        data["params_by_role"] = {role: self.component(role) for role in ("vision", "connector", "llm")}
        data["trainable"] = {recipe: self.trainable(recipe) for recipe in RECIPES}
        return data

    def format(self, fmt: str) -> str:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=1, ensure_ascii=False)
        return _render(self, markdown=fmt == "markdown")




def human(value: float, unit: str = "") -> str:
    """1234567 -> '1.23 M' style, for FLOPs and bytes."""
    for threshold, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f} {suffix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def human_bytes(value: float) -> str:
    for threshold, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= threshold:
            return f"{value / threshold:.2f} {suffix}"
    return f"{value:.0f} B"


def table_lines(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return lines + ["| " + " | ".join(row) + " |" for row in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in rows]


def count_cell(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def _render(e: Explanation, markdown: bool) -> str:
    h = (lambda text, level=2: f"{'#' * level} {text}") if markdown else (lambda text, level=2: f"\n{text}:")
    out = [f"# {e.name}" if markdown else e.name, "", e.description, f"configs: {e.source}",
           f"strategy: {e.strategy}; built from: {e.built_from} (meta device, nothing allocated)", ""]
    out.append(h("Data flow"))
    shape = (lambda s: "`[" + ", ".join(map(str, s)) + "]`") if markdown else (lambda s: str(s))
    out += table_lines(["stage", "shape", "note"], [[s.name, shape(s.shape), s.note] for s in e.stages], markdown)
    out += ["", h("Parameters")]
    rows = [[c.name, c.role, f"{c.params:,}", *(count_cell(c.trainable[r]) for r in RECIPES)] for c in e.components]
    rows.append(["total", "", f"{e.total_params:,}", *(count_cell(e.trainable(r)) for r in RECIPES)])
    out += table_lines(["component", "role", "params", *(f"trainable: {r}" for r in RECIPES)], rows, markdown)
    i = e.image
    out += ["", h("Image positions")]
    out += table_lines(["image", "encoder tokens", "LLM positions / image", "of which markers", "cross-attn K/V / image",
                   f"share of a {i.context:,} context"],
                  [[f"{i.image_size[0]}x{i.image_size[1]}", f"{i.vision_tokens:,}", f"{i.llm_positions:,}",
                    str(i.markers), f"{i.cross_attention_kv:,}", f"{100 * i.context_share:.2f}%"]], markdown)
    out += ["", i.note]
    f = e.flops
    out += ["", h("Forward FLOPs")]
    out += ["not computed (flops=False)"] if not f else table_lines(["quantity", "FLOPs"], [
        ["vision encoder per image", human(f["vision_per_image"])],
        ["connector per image", human(f["connector_per_image"])],
        ["LLM per image (its positions, dense)", human(f["llm_per_image"])],
        ["total per image", human(f["per_image"])],
        ["LLM per text token (dense)", human(f["llm_per_text_token_dense"])],
        [f"LLM per text token at context {i.context:,}", human(f["per_text_token_at_context"])],
    ], markdown)
    m = e.memory
    out += ["", h(f"Memory ({e.dtype}, batch {e.batch}, context {i.context:,})")]
    out += table_lines(["what", "bytes"], [
        ["weights", human_bytes(m["weights"])], ["KV cache (self-attention)", human_bytes(m["kv_cache"])],
        ["cross-attention K/V", human_bytes(m["cross_attention_kv"])], ["total", human_bytes(m["total"])],
    ], markdown)
    out += ["", h("Notes")] + [f"- {note}" for note in e.notes]
    return "\n".join(out) + "\n"
