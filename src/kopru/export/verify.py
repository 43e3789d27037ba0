"""`kopru export --verify`: the exported checkpoint in transformers alone against the Köprü model it came from.

HF side: a separate Python process that cannot import Köprü (`sys.modules["kopru"] = None`: any import of it
fails) loads DST with `AutoProcessor` and `AutoModelForImageTextToText` (no trust_remote_code), renders a chat
question about each drawn non-square picture with the checkpoint's chat template, runs the processor, the
model (last-position logits) and greedy `generate`. Köprü side: the model reloaded from SRC on `kopru chat`'s
path (kopru.convert.verify.kopru_user_path: format_chat, Köprü's processor, GenerationEngine). Compared as
`kopru convert --verify` compares: input ids, pixels, the last-position logits, the greedy tokens.

BLIP-2's processor puts the query tokens in front of the whole prompt, not where the image part stands; its
Köprü side renders the same layout (the image placeholder first), and the report says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from kopru.convert import VERIFY_SIZES
from kopru.convert.verify import (
    QUESTION,
    UserPath,
    answer_tokens,
    compare_user_paths,
    kopru_user_path,
    verification_picture,
)
from kopru.model import KopruForConditionalGeneration

# Run as `python -c HF_SCRIPT DST QUESTION NEW_TOKENS THREADS OUT IMAGE...`; writes OUT/result.json and, per
# image k, OUT/k.safetensors (the processor's tensors and the last-position logits).
HF_SCRIPT = r"""
import json, sys
sys.modules["kopru"] = None  # transformers alone: any import of Köprü fails
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

dst, question, new_tokens, threads, out, *images = sys.argv[1:]
torch.set_num_threads(int(threads))
processor = AutoProcessor.from_pretrained(dst)
model = AutoModelForImageTextToText.from_pretrained(dst).eval()
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
# BLIP-2's processor drops a chat template handed to it; the tokenizer keeps it (as HF's docs render it then).
template = processor.chat_template or processor.tokenizer.chat_template
prompt = processor.apply_chat_template(messages, add_generation_prompt=True, chat_template=template)
result = {"model_class": type(model).__name__, "processor_class": type(processor).__name__, "prompt": prompt,
          "template": "the processor's" if processor.chat_template else "the tokenizer's", "tokens": [],
          "eos_token_id": model.generation_config.eos_token_id}
for index, path in enumerate(images):
    # Special tokens as apply_chat_template(tokenize=True) adds them: none to a prompt that starts with the bos
    # (kopru.convert.verify.hf_adds_special_tokens, restated: this process cannot import Köprü).
    bos = processor.tokenizer.bos_token
    special = not (bos is not None and prompt.startswith(bos))
    inputs = processor(images=[Image.open(path).convert("RGB")], text=prompt, return_tensors="pt",
                       add_special_tokens=special)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float()
        generated = model.generate(**inputs, max_new_tokens=int(new_tokens), do_sample=False)
    result["tokens"].append(generated[0, inputs["input_ids"].shape[1]:].tolist())
    tensors = {key: value.contiguous() for key, value in inputs.items() if isinstance(value, torch.Tensor)}
    save_file({**tensors, "last_logits": logits}, f"{out}/{index}.safetensors")
result["kopru_imported"] = any(name == "kopru" or name.startswith("kopru.") for name in sys.modules
                               if sys.modules[name] is not None)
with open(f"{out}/result.json", "w") as handle:
    json.dump(result, handle)
"""
# The processor's tensors compared as pixels (kopru.convert.verify.compare_pixels); the rest are text-side.
PIXEL_KEYS = ("pixel_values", "image_sizes", "aspect_ratio_ids", "aspect_ratio_mask")


def hf_user_paths(dst: Path, images: list, new_tokens: int) -> tuple[dict[str, Any], list[UserPath]]:
    """The HF side in its own process (module docstring): (what it reported, one UserPath per image)."""
    with tempfile.TemporaryDirectory(prefix="kopru-export-verify-") as folder:
        paths = []
        for index, image in enumerate(images):
            paths.append(f"{folder}/picture-{index}.png")  # PNG: both sides read the same pixels
            image.save(paths[-1])
        command = [sys.executable, "-c", HF_SCRIPT, str(dst), QUESTION, str(new_tokens), str(torch.get_num_threads()),
                   folder, *paths]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            last = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit status {run.returncode}"
            raise RuntimeError(f"transformers could not load and run the exported checkpoint {dst}: {last}")
        result = json.loads(Path(folder, "result.json").read_text())
        sides = []
        for index, tokens in enumerate(result["tokens"]):
            tensors = load_file(f"{folder}/{index}.safetensors")
            pixels = {key: tensors[key] for key in PIXEL_KEYS if key in tensors}
            sides.append(UserPath(tensors["input_ids"][0].tolist(), pixels, tensors["last_logits"],
                                  answer_tokens(tokens, result["eos_token_id"])))
    return result, sides


def verify_export(target: str, src: str | Path, dst: str | Path, new_tokens: int = 8,
                  sizes=VERIFY_SIZES) -> dict[str, Any]:
    """{"passed", "failure" (the first divergence, with its picture), "hf": what the HF process reported,
    "layout", "checks": one `Verification.as_dict()` per picture}."""

    images = [verification_picture(width, height) for width, height in sizes]
    hf, hf_sides = hf_user_paths(Path(dst), images, new_tokens)
    model, processor = KopruForConditionalGeneration.from_pretrained(src)
    image_first = target == "blip2"
    checks = []
    for image, hf_side in zip(images, hf_sides, strict=True):
        ours = kopru_user_path(model, processor, image, new_tokens, hf_keys=set(hf_side.pixels),
                               image_first=image_first)
        checks.append(compare_user_paths(hf_side, ours, image.size, "the exported chat template", new_tokens)
                      .as_dict())
    failed = next((check for check in checks if check["failure"] is not None), None)
    if hf["kopru_imported"] and failed is None:  # cannot happen while sys.modules["kopru"] is None; said if it does
        failed = {"image_size": [0, 0], "failure": "the HF process imported Köprü"}
    failure = None
    if failed is not None:
        width, height = failed["image_size"]
        failure = f"{width}x{height} image: {failed['failure']}"
    layout = ("the image's query tokens in front of the whole prompt (BLIP-2's processor; `kopru chat` puts them "
              "where the image part stands)" if image_first else "the image where the message's image part stands")
    return {"passed": failure is None, "failure": failure, "layout": layout, "hf": hf, "checks": checks}
