"""Request parsing: a body to bounded JSON (`decode_json_body`), then to a validated `ChatRequest` (types, finite
numbers in range, encodable text, sizes, images decoded), every refusal an `APIError` naming the field."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from kopru.data.formats import lone_surrogate
from kopru.generation.sampling import SamplingParams
from kopru.messages import MessageError, count_text_chars, validate_messages
from kopru.serve.errors import APIError, shown
from kopru.serve.images import read_image_url
from kopru.serve.limits import Budget, Reservation, ServerLimits

SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit signed integer, as OpenAI's API and torch.Generator take it


@dataclass
class ChatRequest:
    """A validated chat completion request; `messages` has its images decoded (PIL) in place of the URLs, whose
    pixels `reservation` holds until the request is done."""

    messages: list[dict[str, Any]]
    params: SamplingParams
    max_tokens_given: bool
    stream: bool
    include_usage: bool
    reservation: Reservation = field(default_factory=lambda: Reservation(None))


# request field: (type, smallest, largest, whether the smallest is excluded); None = no bound there
_NUMBER_FIELDS: dict[str, tuple[type, float | None, float | None, bool]] = {
    "temperature": (float, 0.0, 2.0, False),
    "top_p": (float, 0.0, 1.0, True),
    "top_k": (int, 0, 2**31 - 1, False),  # and at most the vocabulary, where it is known
    # HF's definition: > 0, 1 = none. The bound is far beyond any useful value and keeps it finite in float32.
    "repetition_penalty": (float, 0.0, 100.0, True),
    "seed": (int, *SEED_RANGE, False),
    "max_tokens": (int, 1, None, False),
    "max_completion_tokens": (int, 1, None, False),
    "n": (int, 1, 1, False),
}


def _number(body: dict, name: str, high: float | None = None) -> float | int | None:
    """The field `name` of the request, checked: a finite number of the right kind within its range (`high`
    overrides the table's upper bound). None when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    kind, low, table_high, exclusive = _NUMBER_FIELDS[name]
    high = table_high if high is None else high
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, found {shown(value)}",
                       code="invalid_type", param=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a finite number, found {value!r}", code="invalid_value", param=name)
    below = low is not None and (value <= low if exclusive else value < low)
    if below or (high is not None and value > high):
        if low is None:
            bounds = f"at most {high}"
        elif high is None:
            bounds = f"{'above' if exclusive else 'at least'} {low}"
        else:
            bounds = f"{'above' if exclusive else 'at least'} {low} and at most {high}"
        raise APIError(400, f"'{name}' must be {bounds}, found {shown(value)}", code="invalid_value", param=name)
    return value


def _encodable(text: str, param: str) -> None:
    if (problem := lone_surrogate(text)) is not None:
        raise APIError(400, f"'{param}' must be text encodable as UTF-8, found {problem}", code="invalid_value",
                       param=param)


def parse_chat_request(body: Any, model_name: str, limits: ServerLimits, allow_local_dir: Path | None,
                       vocab_size: int | None = None, budget: Budget | None = None) -> ChatRequest:
    """Check the JSON body of POST /v1/chat/completions; decode its images (their pixels reserved in `budget`).
    `vocab_size` bounds top_k. Raises APIError, and nothing else, for any body."""
    if not isinstance(body, dict):
        raise APIError(400, f"expected a JSON object as the request body, found {type(body).__name__}",
                       code="invalid_json")
    for name in ("model", "messages"):
        if name not in body:
            raise APIError(400, f"Missing required parameter: '{name}'.", code="missing_required_parameter",
                           param=name)
    if body["model"] != model_name:
        raise APIError(404, f"The model {shown(body['model'])} does not exist; this server serves '{model_name}' "
                       "(GET /v1/models)", code="model_not_found", param="model")
    # The cheap checks first: images are decoded last.
    _number(body, "n")
    max_tokens = _number(body, "max_completion_tokens") or _number(body, "max_tokens")
    if max_tokens is not None and max_tokens > limits.max_new_tokens:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_new_tokens}",
                       code="invalid_value", param="max_tokens")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 4 of them", code="invalid_value",
                       param="stop")
    for text in stop:
        _encodable(text, "stop")
    temperature = _number(body, "temperature")
    top_p = _number(body, "top_p")
    repetition_penalty = _number(body, "repetition_penalty")
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens or limits.default_new_tokens,
            # OpenAI's default temperature is 1 (sampling); send 0 for greedy decoding.
            temperature=float(1.0 if temperature is None else temperature),
            top_k=_number(body, "top_k", high=vocab_size) or 0,
            top_p=float(1.0 if top_p is None else top_p),
            repetition_penalty=float(1.0 if repetition_penalty is None else repetition_penalty),
            stop=stop,
            seed=_number(body, "seed"),
        )
    except ValueError as error:  # the engine's own checks
        raise APIError(400, str(error), code="invalid_value") from None
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError(400, "'stream' must be true or false and 'stream_options' an object", code="invalid_type",
                       param="stream")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool | None):
        raise APIError(400, f"'stream_options.include_usage' must be true or false, found {shown(include_usage)}",
                       code="invalid_type", param="stream_options.include_usage")
    messages = body["messages"]
    try:
        # The one chat-message validator (`kopru.messages`); a typed "<image>" is refused: no image comes with it.
        # This first pass decodes nothing: the text is measured before any image is.
        canonical = validate_messages(messages, text_placeholders=False)
    except MessageError as error:
        raise APIError(400, str(error), code="invalid_value", param=error.param) from None
    chars = count_text_chars(canonical) + sum(len(text) for text in stop)
    if chars > limits.max_text_chars:
        raise APIError(400, f"the request holds {chars} characters of text; this server allows at most "
                       f"{limits.max_text_chars}", code="text_too_long", param="messages")
    images = sum(part["type"] == "image" for message in canonical if isinstance(message["content"], list)
                 for part in message["content"])
    if images > limits.max_images_per_request:  # before any is decoded
        raise APIError(400, f"too many images: {images} image parts; the limit is "
                       f"{limits.max_images_per_request} per request", code="too_many_images", param="messages")
    reservation = Reservation(budget)

    def resolve(url: Any, number: int, where: str) -> Image.Image:
        # `number` is 1-based across the request: how a client (or the web page) can tell images apart.
        if not isinstance(url, str):  # {"type": "image"} parts carry no URL a client could send
            raise APIError(400, f"{where}: expected an image_url part with {{'url': <string>}}, found an image "
                           "part without one", code="invalid_value", param=where)
        field_name = f"{where}.image_url"
        return read_image_url(url, limits, allow_local_dir, f"image {number} of the request ({field_name})",
                              reservation, field_name)

    try:
        decoded = validate_messages(messages, text_placeholders=False, resolve_image=resolve)
    except MessageError as error:
        reservation.release()
        raise APIError(400, str(error), code="invalid_value", param=error.param) from None
    except BaseException:
        reservation.release()
        raise
    return ChatRequest(decoded, params, max_tokens is not None, stream, bool(include_usage), reservation)




def decode_json_body(data: bytes | bytearray, limits: ServerLimits) -> Any:
    """A request body -> its JSON value, within `limits` (max_json_items, max_json_depth); APIError 400 otherwise.

    Parsing holds the interpreter lock however it is threaded (a 32 MiB body of small values takes a second),
    so the number of values is bounded first, at memory speed: a value needs a ',', '[' or '{' before it, and
    counting those bytes, inside strings too, bounds it from above."""
    items = data.count(b",") + data.count(b"[") + data.count(b"{")
    if items > limits.max_json_items:
        raise APIError(400, f"the request body holds {items} ',', '[' and '{{' characters; this server parses at "
                       f"most {limits.max_json_items} (a chat request needs a few dozen)", code="invalid_json")
    try:
        value = json.loads(data)
    except RecursionError:
        raise APIError(400, f"the request body is nested too deeply; the limit is {limits.max_json_depth} levels",
                       code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    level, depth = [value], 0
    while level:  # breadth first, without recursion
        depth += 1
        if depth > limits.max_json_depth:
            raise APIError(400, f"the request body is nested deeper than {limits.max_json_depth} levels",
                           code="invalid_json")
        level = [child for node in level if isinstance(node, list | dict)
                 for child in (node.values() if isinstance(node, dict) else node) if isinstance(child, list | dict)]
    return value
