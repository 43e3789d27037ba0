"""`kopru chat`: talk to a saved Köprü model, streaming each answer as it is generated.

One-shot: `kopru chat --model DIR --image PATH "prompt"`. Interactive (no prompt): one user turn per line;
`/image PATH` attaches an image to the next turn (repeatable), `/reset` forgets the conversation, `/quit` ends.
Turns are messages in Köprü's one chat format (`kopru.messages`), rendered by `format_chat`: the model's chat
template (a converted checkpoint carries its source's) in the content form it expects, or Köprü's fallback.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

import torch
from PIL import Image
from transformers.utils import logging as hf_logging

from kopru.data.formats import IMAGE_PLACEHOLDER
from kopru.dtypes import torch_dtype
from kopru.generation import GenerationEngine, SamplingParams, format_chat
from kopru.image_processing import load_image, scrub_object_reprs
from kopru.messages import Message
from kopru.model import KopruForConditionalGeneration

HELP = "commands: /image PATH (attach to the next message), /reset (new conversation), /quit"


def read_image(path: str) -> Image.Image:
    """An RGB image from `path`; a missing or unreadable file is a ValueError whose message starts with the path
    (load_image's, which says what it expected and what it found)."""
    if not Path(path).is_file():
        raise ValueError(f"expected an image file at {path!r}, found {'a directory' if Path(path).exists() else 'nothing'}")
    try:
        return load_image(path, name=path)
    except (OSError, Image.DecompressionBombError) as error:  # e.g. permission denied
        raise ValueError(f"{path}: expected a readable image file, found {type(error).__name__}: "
                         f"{scrub_object_reprs(str(error), path)}") from None


def user_message(text: str, images: list[Image.Image]) -> Message:
    """A user turn as text and image parts: images in front of the text, or where the text places them with
    `<image>` (each placeholder becomes the next image's part, so the images travel inside the message)."""
    placed = text.count(IMAGE_PLACEHOLDER)
    if not placed:
        parts = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
        return {"role": "user", "content": parts}
    if placed != len(images):
        raise ValueError(f"the message holds {placed} {IMAGE_PLACEHOLDER!r} placeholder(s) but {len(images)} "
                         "image(s) are attached; expected one image per placeholder")
    parts = []
    for number, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if number:
            parts.append({"type": "image", "image": images[number - 1]})
        if piece:
            parts.append({"type": "text", "text": piece})
    return {"role": "user", "content": parts}


class ChatSession:
    """A conversation with one engine: each `ask` renders the whole history and streams the answer to `out`."""

    def __init__(self, engine: GenerationEngine, params: SamplingParams, template: str = "chat",
                 system: str | None = None) -> None:
        self.engine = engine
        self.params = params
        self.template = template
        self.system = system
        self.messages: list[Message] = []

    def reset(self) -> None:
        self.messages = []

    def ask(self, text: str, images: list[Image.Image], out: TextIO) -> str:
        """Stream the answer to `out`; the turn joins the history only when it succeeds."""
        message = user_message(text, images)
        history = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages + [message]
        prompt, ordered = format_chat(self.engine.processor, history, self.template)
        pieces = []
        for event in self.engine.stream([prompt], [ordered], self.params):
            pieces.append(event.text)
            out.write(event.text)
            out.flush()
        out.write("\n")
        answer = "".join(pieces)
        self.messages += [message, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        return answer


def run_chat(engine: GenerationEngine, params: SamplingParams, prompt: str | None, images: list[Image.Image],
             stdin: TextIO, out: TextIO, err: TextIO, template: str = "chat", system: str | None = None) -> int:
    """One-shot when `prompt` is given (errors raise ValueError), otherwise an interactive loop on `stdin` in
    which a bad line is reported on `err` and the conversation goes on. `images` go with the first message."""
    session = ChatSession(engine, params, template, system)
    images = list(images)
    if prompt is not None:
        session.ask(prompt, images, out)
        return 0
    interactive = stdin.isatty()
    if interactive:
        err.write(f"Köprü chat ({engine.context_window} tokens of context). {HELP}\n")
    while True:
        if interactive:
            err.write(f"[{len(images)} image(s) attached] > " if images else "> ")
            err.flush()
        line = stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        try:
            if line in ("/quit", "/exit"):
                return 0
            if line == "/reset":
                session.reset()
                images = []
                err.write("conversation reset\n")
            elif line.startswith("/image"):
                path = line[len("/image"):].strip()
                if not path:
                    raise ValueError("expected /image PATH")
                images.append(read_image(path))
                err.write(f"attached {path} ({len(images)} image(s) for the next message)\n")
            elif line.startswith("/"):
                raise ValueError(f"unknown command {line.split()[0]!r}; {HELP}")
            else:
                session.ask(line, images, out)
                images = []
        except ValueError as error:
            err.write(f"error: {error}\n")
        err.flush()


def sampling_from_args(args) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=list(args.stop or []),
                          seed=args.seed)


def load_engine(model_dir: str, device: str | None = None, dtype: str | None = None, compile: bool = False,
                max_seq_len: int | None = None) -> GenerationEngine:
    hf_logging.disable_progress_bar()  # the answer streams to the terminal: no loading bars around it

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = KopruForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype(dtype))
    return GenerationEngine(model.to(device).eval(), processor, max_batch_size=1, max_seq_len=max_seq_len,
                            compile=compile)


__all__ = ["ChatSession", "load_engine", "read_image", "run_chat", "sampling_from_args", "user_message"]
