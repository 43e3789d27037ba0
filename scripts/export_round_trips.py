"""README figures of `kopru export`: for each family, the tiny HF checkpoint the tests build (tests/vlm_checkpoints.py,
tests/test_convert.py) converted into Köprü and exported back, with `--verify`.

    .venv/bin/python scripts/export_round_trips.py [--out DIR]

One markdown row per family: tensors given back under their names and their largest difference, whether
config.json is the same, then --verify's figures (HF on the export in its own process, Köprü on the conversion).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from kopru.convert import convert  # noqa: E402
from kopru.export import export  # noqa: E402

hf_logging.disable_progress_bar()
FAMILIES = ("llava", "llava_next", "blip2", "mllama")


def checkpoint(kind: str, path: Path) -> Path:
    if kind == "blip2":
        from vlm_checkpoints import build_blip2

        return build_blip2(path)[1]
    from vlm_checkpoints import build

    return build(kind, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="keep the checkpoints here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(args.out or tempfile.mkdtemp(prefix="kopru-export-"))
    print("| family | tensors given back | max diff | config.json | verify: input ids | max pixel diff | "
          "max logit diff | greedy answer |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in FAMILIES:
        src = checkpoint(kind, root / kind / "hf")
        convert(kind, src, root / kind / "kopru")
        report = export(kind, root / kind / "kopru", root / kind / "out", verify=True, overwrite=True)
        original, exported = load_file(src / "model.safetensors"), load_file(root / kind / "out" / "model.safetensors")
        same_names = sorted(original) == sorted(exported)
        diff = max(float((original[k].float() - exported[k].float()).abs().max()) for k in original if k in exported)
        config = json.loads((src / "config.json").read_text()) == json.loads(
            (root / kind / "out" / "config.json").read_text())
        checks = report["verify"]["checks"]
        print(f"| {kind} | {len(exported)} of {len(original)}{'' if same_names else ' (names differ)'} | {diff} | "
              f"{'same' if config else 'differs'} | "
              f"{'equal' if all(c['input_ids_equal'] for c in checks) else 'DIFFER'}"
              f" | {max(c['max_pixel_diff'] for c in checks)} | {max(c['max_logit_diff'] for c in checks)} | "
              f"{'identical' if all(c['tokens_equal'] for c in checks) else 'DIFFERS'} |")
    print(f"\ncheckpoints under {root}")


if __name__ == "__main__":
    main()
