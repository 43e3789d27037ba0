"""Where the built-in default backbones are: the tiny pretrained vision encoder and LLM shipped in the package
(`kopru/assets/tiny`, seed 0), which `kopru train` uses when it is given no --vision / --llm.

Building them, or other seeds of them, is the lesson's job (`kopru pretrain-tiny`, `kopru.lesson.pretrain_tiny`);
the library only finds the shipped copy and says so plainly when it is missing.
"""

from __future__ import annotations

from pathlib import Path

from kopru.image_processing import CONFIG_NAME as PREPROCESSOR_CONFIG

ASSETS_DIR = Path(__file__).parent / "assets" / "tiny"
# What a backbone directory holds once fully written (`kopru pretrain-tiny` writes these, and reports besides).
BACKBONE_FILES = {
    "vision": ("config.json", "model.safetensors", PREPROCESSOR_CONFIG),
    "llm": ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"),
}


def backbone_paths(root: str | Path) -> dict[str, Path]:
    """{"vision": root/vision, "llm": root/llm}: the layout `kopru pretrain-tiny --out root` writes."""
    root = Path(root)
    return {role: root / role for role in BACKBONE_FILES}


def missing_backbone_files(root: str | Path) -> list[Path]:
    """The files of `BACKBONE_FILES` that `root` lacks (empty: both backbones are complete)."""
    return [path / name for role, path in backbone_paths(root).items() for name in BACKBONE_FILES[role]
            if not (path / name).is_file()]


def default_backbones() -> dict[str, Path]:
    """The built-in tiny pretrained backbones shipped in the package: {"vision": path, "llm": path}.

    Raises FileNotFoundError naming what is missing and how to build them, when the package was installed
    without its assets (the library does not train backbones on its own: that takes minutes, and is the lesson's
    `kopru pretrain-tiny`)."""
    missing = missing_backbone_files(ASSETS_DIR)
    if missing:
        shown = ", ".join(str(path.relative_to(ASSETS_DIR)) for path in missing)
        raise FileNotFoundError(
            f"expected the built-in tiny backbones in {ASSETS_DIR}, found {shown} missing (an installation "
            "without the package's assets). Reinstall Köprü, or build them with `kopru pretrain-tiny --out DIR` "
            "and pass --vision DIR/vision --llm DIR/llm (TrainConfig.vision / .llm)")
    return backbone_paths(ASSETS_DIR)


__all__ = ["ASSETS_DIR", "BACKBONE_FILES", "backbone_paths", "default_backbones", "missing_backbone_files"]
