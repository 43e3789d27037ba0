"""`kopru serve`: an OpenAI-compatible HTTP server for a saved Köprü model, plus a small web demo page.

Endpoints: POST /v1/chat/completions (JSON or server-sent events), GET /v1/models, GET /v1/models/{id},
GET /health, GET /metrics (batching counters, JSON) and GET / (the web demo).

One background thread owns the model. It takes the queued requests, waits a short window for more to arrive,
and runs them as one batch through `GenerationEngine.stream`, handing each request its own events; the HTTP
side never touches the model or its tokenizer (a fast tokenizer changing its padding settings in one thread
while another encodes fails with "Already borrowed"), so the chat template is rendered there too. A client
that goes away cancels only its own request; a batch whose clients have all gone is stopped.

A request fails alone: every field is checked (types, finite numbers, ranges, encodable text, sizes) before it
reaches the worker, and whatever still goes wrong while one request is admitted, tokenized, batched or generated
answers that request, while the others go on. A batch that fails before its first token is retried one request
at a time, so that only the request at fault fails. Should the worker thread die all the same, /health answers
503 and a supervisor thread starts a new one.

Every error is answered with an OpenAI-style body, {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import errno
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import queue
import re
import stat
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image

from kopru.data.formats import lone_surrogate
from kopru.dtypes import torch_dtype
from kopru.generation import GenerationEngine, SamplingParams, StreamEvent, format_chat
from kopru.image_processing import ImageTooLargeError, load_image, scrub_object_reprs
from kopru.messages import MessageError, count_text_chars, validate_messages

DEMO_PAGE = "index.html"
DISCONNECT_CHECK_S = 0.1  # how often a non-streamed request checks that its client is still there
WORKER_RESTART_S = 1.0  # how long a dead worker is reported (/health 503) before a new one starts
SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit signed integer, as OpenAI's API and torch.Generator take it
logger = logging.getLogger("kopru.serve")


# ------------------------------------------------------------------------------------------------ limits
@dataclass
class ServerLimits:
    """What one request, and all of them together, may ask for; each field is also a `kopru serve` flag
    (--max-image-bytes, ...)."""

    max_image_bytes: int = 10 * 1024 * 1024  # one encoded image (after base64 decoding, or the file's size)
    max_image_pixels: int = 4096 * 4096  # width x height, read from the header before decoding
    max_images_per_request: int = 4  # image_url parts across all messages
    max_queued_image_pixels: int = 8 * 4096 * 4096  # decoded pixels held by all requests in progress together
    max_new_tokens: int = 512  # the most a request's max_tokens may ask for
    default_new_tokens: int = 256  # when the request names no max_tokens (less if the context is shorter)
    max_text_chars: int = 200_000  # characters of text (messages and stop strings), counted before tokenizing
    max_request_bytes: int = 32 * 1024 * 1024  # the JSON body (base64 images inflate by a third)
    max_pending_body_bytes: int = 128 * 1024 * 1024  # bodies being received or parsed, all requests together
    max_json_depth: int = 32  # nesting of the JSON body (a chat request needs 6)
    max_json_items: int = 250_000  # ',', '[' and '{' bytes in the body: a bound on the values it parses into
    max_batch_size: int = 8  # requests generated together in one batch
    batch_window_ms: float = 10.0  # how long the worker waits for more requests before starting a batch
    max_queued_requests: int = 64  # requests waiting for or in generation; more get 429
    read_timeout_s: float = 30.0  # for a request's headers and body, from the connection's opening (or last answer)
    max_connections: int = 256  # open connections (uvicorn's limit_concurrency); requests beyond get 503

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            kind = int if spec.type in ("int", int) else float
            if isinstance(value, bool) or not isinstance(value, kind | int) or not math.isfinite(value):
                raise ValueError(f"ServerLimits.{spec.name} must be a finite {kind.__name__}, found {value!r}")
            if value < (0 if spec.name == "batch_window_ms" else 1):
                raise ValueError(f"ServerLimits.{spec.name} must be positive, found {value!r}")
        if self.default_new_tokens > self.max_new_tokens:
            raise ValueError(f"ServerLimits.default_new_tokens ({self.default_new_tokens}) exceeds "
                             f"max_new_tokens ({self.max_new_tokens})")
        if self.max_json_items <= self.max_text_chars:  # or text within its limit could trip the count
            raise ValueError(f"ServerLimits.max_json_items ({self.max_json_items}) must exceed max_text_chars "
                             f"({self.max_text_chars}): text full of commas counts towards it")
        if self.max_pending_body_bytes < self.max_request_bytes:
            raise ValueError(f"ServerLimits.max_pending_body_bytes ({self.max_pending_body_bytes}) must hold one "
                             f"request's body: at least max_request_bytes ({self.max_request_bytes})")
        if self.max_queued_image_pixels < self.max_images_per_request * self.max_image_pixels:
            raise ValueError(f"ServerLimits.max_queued_image_pixels ({self.max_queued_image_pixels}) must hold one "
                             f"request's images: at least max_images_per_request x max_image_pixels = "
                             f"{self.max_images_per_request * self.max_image_pixels}")


LIMIT_HELP = {
    "max_image_bytes": "largest encoded image in bytes",
    "max_image_pixels": "largest image as width x height, checked before decoding",
    "max_images_per_request": "most image_url parts in one request",
    "max_queued_image_pixels": "decoded image pixels all requests in progress may hold together; beyond, 429",
    "max_new_tokens": "largest max_tokens a request may ask for",
    "default_new_tokens": "max_tokens when a request names none",
    "max_text_chars": "most characters of text in one request (messages and stop strings), checked before "
                      "tokenizing",
    "max_request_bytes": "largest request body in bytes",
    "max_pending_body_bytes": "bytes of request bodies being received or parsed at once, all requests together; "
                              "beyond, 429",
    "max_json_depth": "deepest nesting of the JSON body",
    "max_json_items": "most ',', '[' and '{' bytes in a body (they bound the number of JSON values parsed)",
    "max_batch_size": "most requests generated together",
    "batch_window_ms": "how long to wait for more requests before a batch starts",
    "max_queued_requests": "most requests admitted at once; more are answered 429",
    "read_timeout_s": "seconds a client has to send a whole request (headers and body); then the connection "
                      "is closed",
    "max_connections": "most open connections; requests beyond are answered 503",
}


# ---------------------------------------------------------------------------------------------- security
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine (localhost, 127.0.0.0/8, ::1)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServerSecurity:
    """Who may talk to the server. `allowed_hosts`: the Host header values accepted (names or addresses, no
    port; None or "*" accepts any), against DNS rebinding: a web page on evil.example whose name is made to resolve to
    127.0.0.1 sends "Host: evil.example". `cors_origins`: browser origins allowed to read the answers ("*" for
    any); none by default. `api_key`: required as "Authorization: Bearer KEY" on /v1/... and /metrics."""

    api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_NAMES
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("expected a non-empty API key, found an empty one")
        if self.api_key is not None and not self.api_key.isascii():
            raise ValueError("expected an API key of ASCII characters (it travels in an HTTP header)")
        if self.allowed_hosts is not None:
            self.allowed_hosts = tuple(host.strip("[]").lower() for host in self.allowed_hosts)
        self.cors_origins = tuple(self.cors_origins)

    @classmethod
    def for_bind(cls, host: str, api_key: str | None = None, allowed_hosts: list[str] | tuple[str, ...] = (),
                 cors_origins: list[str] | tuple[str, ...] = ()) -> ServerSecurity:
        """The defaults for a server listening on `host`: on a loopback address only the localhost names (and
        `allowed_hosts`) are accepted as Host; on any other address any Host is, unless `allowed_hosts` names
        some (then those and the localhost names)."""
        names = None if not is_loopback(host) and not allowed_hosts else (*LOOPBACK_NAMES, *allowed_hosts)
        return cls(api_key=api_key, allowed_hosts=names, cors_origins=tuple(cors_origins))

    def exposure_warning(self, host: str) -> str | None:
        """The warning for listening beyond this machine without an API key, or None."""
        if is_loopback(host) or self.api_key is not None:
            return None
        return (f"WARNING: kopru serve listens on {host}, reachable from other machines, and no API key is set: "
                "anyone who can reach this port can use the model. Set --api-key (or KOPRU_API_KEY), or listen "
                "on 127.0.0.1.")

    def host_allowed(self, host_header: str | None) -> bool:
        if self.allowed_hosts is None or "*" in self.allowed_hosts:
            return True
        if not host_header:
            return False
        host = host_header.strip().lower()
        if host.startswith("["):  # [::1]:8000
            host = host[1:host.find("]")] if "]" in host else host
        elif host.count(":") == 1:
            host = host.partition(":")[0]
        return host in self.allowed_hosts

    def key_matches(self, authorization: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, given = (authorization or "").strip().partition(" ")
        # Compared in constant time: a comparison that stops at the first wrong byte tells the key byte by byte.
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                                  self.api_key.encode())


# ------------------------------------------------------------------------------------------------ errors
class APIError(Exception):
    """An error answered to the client as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str | None = None) -> None:
        message = scrub_object_reprs(message, "an object")  # a client can do nothing with "<... at 0x7f...>"
        # A message may quote what the client sent; a lone surrogate in it could not be encoded into the answer.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        param = None if param is None else param.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _shown(value: Any, width: int = 60) -> str:
    """A client's value quoted in an error message, cut short (an int of 4300+ digits has no repr at all)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= width else text[:width] + "..."


# ------------------------------------------------------------------------------------------------ budget
class Budget:
    """A quantity the requests in progress hold together (decoded image pixels, request body bytes), against a
    limit: each takes its share before it allocates it and gives it back when it is done, so that what the server
    holds at once stays bounded however many requests arrive. Beyond the limit: 429, retry shortly."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, amount: int, where: str) -> None:
        with self._lock:
            if self.used + amount > self.limit:
                raise APIError(429, f"{where}: the server holds {self.used} {self.what} for other requests and this "
                               f"needs {amount} more; the limit is {self.limit} in all; retry shortly",
                               code="server_busy", kind="rate_limit_error")
            self.used += amount

    def release(self, amount: int) -> None:
        with self._lock:
            self.used -= amount


@dataclass
class Reservation:
    """What one request holds in a Budget; `release` is safe to call more than once."""

    budget: Budget | None
    amount: int = 0

    def take(self, amount: int, where: str) -> None:
        if self.budget is not None:
            self.budget.reserve(amount, where)
            self.amount += amount

    def release(self) -> None:
        if self.budget is not None and self.amount:
            self.budget.release(self.amount)
            self.amount = 0


# ------------------------------------------------------------------------------------------------ images
def decode_image(data: bytes, limits: ServerLimits, where: str, reservation: Reservation | None = None,
                 param: str | None = None) -> Image.Image:
    """Encoded bytes -> an RGB image (EXIF orientation applied, alpha and 16-bit modes converted as everywhere in
    Köprü: `kopru.image_processing.load_image`), refusing oversize or undecodable input with a 400 whose message
    starts with `where` (e.g. "image 2 of the request (messages[0].content[1].image_url)") and whose param is
    `param` (the field). The pixel count comes from the header, before the pixels are decoded (a small file can
    hold a huge image); they are reserved in `reservation` before decoding.
    """
    param = param or "messages"
    if len(data) > limits.max_image_bytes:
        raise APIError(400, f"{where}: the image is {len(data)} bytes; the limit is {limits.max_image_bytes}",
                       code="image_too_large", param=param)
    pixels = None
    try:
        with Image.open(io.BytesIO(data)) as probe:  # the header only
            width, height = probe.size
            pixels = width * height
    except Exception:  # noqa: BLE001, S110 - load_image, below, refuses it with a message naming `where`
        pass
    if pixels is not None and pixels > limits.max_image_pixels:
        raise APIError(400, f"{where}: the image is {width}x{height} = {pixels} pixels; the limit is "
                       f"{limits.max_image_pixels}", code="image_too_large", param=param)
    if reservation is not None and pixels is not None:
        reservation.take(pixels, where)
    try:
        image = load_image(data, max_pixels=limits.max_image_pixels, name=where)
    except ImageTooLargeError as error:  # Pillow's own ceiling, for limits set above it
        raise APIError(400, str(error), code="image_too_large", param=param) from None
    except Exception as error:  # noqa: BLE001 - hostile bytes make Pillow's plugins raise anything
        text = str(error) if str(error).startswith(where) else f"{where}: expected an image Pillow can read, " \
            f"found data it cannot decode ({type(error).__name__}: {error})"
        raise APIError(400, text, code="invalid_image", param=param) from None
    if reservation is not None and pixels is None:  # the header could not be probed alone, but it decoded
        reservation.take(image.width * image.height, where)
    return image


_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_OPEN_FILE = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def local_files_supported() -> bool:
    """Whether this platform can open files one path component at a time without following links."""
    return hasattr(os, "O_NOFOLLOW") and os.open in os.supports_dir_fd


def read_local_file(text: str, root: Path, limit: int, where: str, param: str) -> bytes:
    """The bytes of the file `text` names (a path, absolute or relative to the working directory), which must lie
    under `root`, read without a check-then-read race: each component is opened relative to the one before it
    (openat) with O_NOFOLLOW, so no symbolic link is followed at any level, and the file is checked after it is
    opened (a regular file, at most `limit` bytes). Every refusal is an APIError 400."""
    def refuse(message: str, code: str = "invalid_image_url") -> APIError:
        return APIError(400, f"{where}: {message}", code=code, param=param)

    if "\x00" in text:
        raise refuse("expected a file path, found a NUL byte in it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise refuse("expected a file path of encodable characters, found a lone surrogate in it") from None
    path = Path(os.path.abspath(os.path.expanduser(text)))
    if ".." in Path(os.path.expanduser(text)).parts:
        raise refuse(f"expected a path without '..', found {_shown(text)}", "local_files_refused")
    relative = None
    for base in (Path(os.path.abspath(root)), root.resolve()):  # as given, and with its own links resolved
        if path.is_relative_to(base):
            relative = path.relative_to(base).parts
            break
    if relative is None:
        raise refuse(f"{_shown(str(path), 200)} is outside the allowed directory {str(root.resolve())!r}",
                     "local_files_refused")
    if not relative:
        raise refuse(f"expected a file, found the allowed directory itself ({str(root.resolve())!r})")
    descriptor = os.open(root.resolve(), _OPEN_DIRECTORY)  # the root is the server's own setting: links allowed
    try:
        for depth, name in enumerate(relative):
            last = depth == len(relative) - 1
            try:
                child = os.open(name, _OPEN_FILE if last else _OPEN_DIRECTORY, dir_fd=descriptor)
            except OSError as error:
                raise _open_refusal(error, name, descriptor, refuse) from None
            os.close(descriptor)
            descriptor = child
        info = os.fstat(descriptor)  # of what was opened: no other file can take its place now
        if not stat.S_ISREG(info.st_mode):
            raise refuse(f"expected a regular file at {_shown(str(path), 200)}, found something else (a directory, "
                         "a device or a pipe)")
        if info.st_size > limit:
            raise APIError(400, f"{where}: the file is {info.st_size} bytes; the limit is {limit}",
                           code="image_too_large", param=param)
        os.set_blocking(descriptor, True)
        chunks, size = [], 0
        while size <= limit:  # the file may grow after fstat: never read more than the limit
            chunk = os.read(descriptor, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise APIError(400, f"{where}: the file grew past the limit of {limit} bytes while it was read",
                           code="image_too_large", param=param)
        return b"".join(chunks)
    finally:
        os.close(descriptor)


def _open_refusal(error: OSError, name: str, directory: int, refuse) -> APIError:
    shown = _shown(name, 80)
    is_link = False
    with contextlib.suppress(OSError):  # only for the message: the refusal does not depend on it
        is_link = stat.S_ISLNK(os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode)
    if error.errno == errno.ELOOP or is_link:
        return refuse(f"{shown} is a symbolic link; links are not followed under the allowed directory",
                      "local_files_refused")
    if error.errno == errno.ENOENT:
        return refuse(f"no file or directory named {shown} there")
    if error.errno == errno.ENOTDIR:
        return refuse(f"expected {shown} to be a directory, found a file")
    if error.errno == errno.ENAMETOOLONG:
        return refuse(f"a name in the path is longer than the file system allows ({len(name)} characters)")
    if error.errno in (errno.EACCES, errno.EPERM):
        return refuse(f"{shown} is not readable by the server")
    return refuse(f"cannot open {shown}: {os.strerror(error.errno or 0)}")


def read_image_url(url: str, limits: ServerLimits, allow_local_dir: Path | None, where: str,
                   reservation: Reservation | None = None, param: str | None = None) -> Image.Image:
    """A data: URL with base64 content, or a local file (file:// URL or path) under `allow_local_dir`."""
    param = param or "messages"
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or ";base64" not in header:
            raise APIError(400, f"{where}: expected a data URL like 'data:image/png;base64,<data>', found "
                           f"{_shown(url, 40)}", code="invalid_image_url", param=param)
        if len(payload) > 4 * (limits.max_image_bytes // 3 + 1) + 4:  # before decoding anything large
            raise APIError(400, f"{where}: the encoded image exceeds the limit of {limits.max_image_bytes} bytes",
                           code="image_too_large", param=param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the data URL's content is not valid base64", code="invalid_image_url",
                           param=param) from None
        return decode_image(data, limits, where, reservation, param)
    try:
        scheme = urlparse(url).scheme
    except ValueError as error:  # e.g. an unbalanced '[' in what would be the host
        raise APIError(400, f"{where}: expected a data: URL, a file:// URL or a path, found {_shown(url)} "
                       f"({error})", code="invalid_image_url", param=param) from None
    if scheme in ("http", "https"):
        raise APIError(400, f"{where}: remote image URLs are not fetched by this server; send the image as a "
                       "data: URL (base64)", code="invalid_image_url", param=param)
    if scheme not in ("", "file"):
        raise APIError(400, f"{where}: expected a data: URL, a file:// URL or a path, found scheme {scheme!r}",
                       code="invalid_image_url", param=param)
    if allow_local_dir is None:
        raise APIError(400, f"{where}: local image files are refused; start the server with --allow-local-dir DIR "
                       "to serve files under DIR", code="local_files_refused", param=param)
    path = unquote(urlparse(url).path) if scheme == "file" else url
    data = read_local_file(path, allow_local_dir, limits.max_image_bytes, where, param)
    return decode_image(data, limits, where, reservation, param)


# ---------------------------------------------------------------------------------------------- requests
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
        raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, found {_shown(value)}",
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
        raise APIError(400, f"'{name}' must be {bounds}, found {_shown(value)}", code="invalid_value", param=name)
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
        raise APIError(404, f"The model {_shown(body['model'])} does not exist; this server serves '{model_name}' "
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
        raise APIError(400, f"'stream_options.include_usage' must be true or false, found {_shown(include_usage)}",
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


# ------------------------------------------------------------------------------------------------ worker
@dataclass
class Admitted:
    """The worker accepted the job: its prompt fits the context window."""

    prompt_tokens: int
    max_new_tokens: int


@dataclass
class Finished:
    completion_tokens: int


@dataclass
class GenerationJob:
    """One request on its way through the worker; items for it arrive on `events` (an asyncio.Queue)."""

    messages: list[dict[str, Any]]  # as parse_chat_request leaves them: images decoded
    params: SamplingParams
    max_tokens_given: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    prompt: str = ""  # set by the worker: the chat template renders through the tokenizer
    images: list[Image.Image] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    released: bool = False  # the HTTP side is done with it (set once, on the event loop)
    prompt_tokens: int = 0  # set by the worker when it admits the job
    finish_reason: str | None = None  # set by the worker when the engine finishes the request
    answered: bool = False  # the worker has sent its last item (Finished or an error)

    def deliver(self, item: Admitted | StreamEvent | Finished | APIError) -> None:
        if isinstance(item, Finished | APIError):
            self.answered = True
        if not self.cancelled.is_set():
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, item)
            except RuntimeError:  # the event loop is closed: the server is gone, nobody to tell
                self.cancelled.set()


_STOP = object()


class BatchingWorker:
    """The one thread that uses the engine: collects jobs for `batch_window_ms`, checks each against the
    context window, and generates them as one batch, each with its own sampling settings.

    Whatever goes wrong with one job answers that job: an error while its prompt is rendered or counted answers
    it alone, a batch that fails before its first token is run again one job at a time, and an error anywhere
    else in the loop answers the jobs the worker holds then (500) and the loop goes on. A supervisor thread
    starts a new worker thread if this one ever ends otherwise (`failure` says why meanwhile)."""

    def __init__(self, engine: GenerationEngine, limits: ServerLimits) -> None:
        self.engine = engine
        self.limits = limits
        self.batch_sizes: Counter[int] = Counter()
        self.requests_done = 0
        self.requests_cancelled = 0
        self.requests_failed = 0
        self.restarts = 0
        self.failure: str | None = None  # why the worker thread died, until a new one runs
        self._queue: queue.Queue = queue.Queue()
        self._held: list[GenerationJob] = []  # taken from the queue, not yet answered
        self._closing = threading.Event()
        self._thread = self._start()
        self._supervisor = threading.Thread(target=self._supervise, name="kopru-generation-supervisor", daemon=True)
        self._supervisor.start()

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="kopru-generation", daemon=True)
        thread.start()
        return thread

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: GenerationJob) -> None:
        self._queue.put(job)

    def close(self) -> None:
        self._closing.set()
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def metrics(self) -> dict[str, Any]:
        return {"batches": sum(self.batch_sizes.values()),
                "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())},
                "largest_batch": max(self.batch_sizes, default=0),
                "requests_done": self.requests_done, "requests_cancelled": self.requests_cancelled,
                "requests_failed": self.requests_failed, "worker_restarts": self.restarts,
                "queued": self._queue.qsize()}

    # ------------------------------------------------------------------------------------------ supervision
    def _supervise(self) -> None:
        while True:
            self._thread.join()
            if self._closing.is_set():
                return
            time.sleep(WORKER_RESTART_S)  # /health says 503 meanwhile: a supervisor outside can see it happened
            if self._closing.is_set():
                return
            self.restart()

    def restart(self) -> None:
        """Start a new worker thread after the last one died; queued jobs are kept."""
        logger.error("kopru serve: the generation worker died (%s); starting a new one", self.failure)
        self.restarts += 1
        self._thread = self._start()
        self.failure = None

    def _run(self) -> None:
        try:
            pending: list[GenerationJob] = []  # admitted, waiting for a batch with room for them
            while True:
                try:
                    if self._step(pending):
                        return
                except Exception as error:  # noqa: BLE001 - a fault in the loop itself answers the jobs held now
                    logger.exception("kopru serve: the generation loop failed")
                    self._fail_held(APIError(500, f"the generation worker failed: {type(error).__name__}: {error}",
                                             code="worker_error"))
                    pending.clear()
        except BaseException as error:  # noqa: BLE001 - the thread ends here; the supervisor starts another
            self.failure = f"{type(error).__name__}: {error}"
            logger.critical("kopru serve: the generation worker died", exc_info=error)
            self._fail_held(APIError(503, f"the generation worker stopped ({self.failure}); it is being restarted, "
                                     "retry shortly", code="worker_restarting"))

    def _fail_held(self, error: APIError) -> None:
        for job in self._held:
            if not job.answered:
                job.deliver(error)
                self.requests_failed += 1
        self._held.clear()

    def _step(self, pending: list[GenerationJob]) -> bool:
        """One round: take new jobs, admit them, generate one batch. True when the server is stopping."""
        new: list[GenerationJob] = []
        if not pending:
            first = self._queue.get()
            if first is _STOP:
                return True
            new.append(first)
            self._held.append(first)
        # Jobs already waiting do not wait a window more: take only what is queued now.
        stopping = self._collect(new, room=self.limits.max_batch_size - len(pending), wait=not pending)
        pending += [job for job in new if self._admit(job)]
        self.requests_cancelled += sum(job.cancelled.is_set() for job in pending)
        pending[:] = [job for job in pending if not job.cancelled.is_set()]
        batch = self._fit(pending)
        pending[:] = [job for job in pending if job not in batch]
        if batch:
            self._generate(batch)
        self._held[:] = [job for job in self._held if not job.answered and not job.cancelled.is_set()]
        if stopping:
            for job in pending:
                job.deliver(APIError(503, "the server is shutting down", code="shutting_down"))
            return True
        return False

    def _collect(self, jobs: list[GenerationJob], room: int, wait: bool) -> bool:
        """Add queued jobs (those arriving within the batch window too, if `wait`) until `room` is taken; True
        when the server is stopping."""
        deadline = time.monotonic() + (self.limits.batch_window_ms / 1000 if wait else 0.0)
        while len(jobs) < room:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if job is _STOP:
                return True
            jobs.append(job)
            self._held.append(job)
        return False

    def _fit(self, pending: list[GenerationJob]) -> list[GenerationJob]:
        """The jobs, in order, that can share one batch. A batch is left padded to its longest prompt, and each
        row may generate only up to the context window from there: a job joins only if every member keeps its
        whole max_new_tokens (so an answer never depends on which other requests it was batched with)."""
        batch: list[GenerationJob] = []
        for job in pending:
            if len(batch) == self.limits.max_batch_size:
                break
            members = [*batch, job]
            longest = max(member.prompt_tokens for member in members)
            if longest + max(member.params.max_new_tokens for member in members) <= self.engine.context_window:
                batch.append(job)
        return batch

    def _admit(self, job: GenerationJob) -> bool:
        """Render the prompt, check it against the context window, settle max_new_tokens; tell the HTTP side."""
        if job.cancelled.is_set():
            self.requests_cancelled += 1
            return False
        try:
            job.prompt, job.images = format_chat(self.engine.processor, job.messages)
            prompt_tokens = self.engine.count_prompt_tokens(job.prompt, job.images)
        except ValueError as error:  # e.g. a message order the model's chat template refuses
            job.deliver(APIError(400, f"the messages do not fit the model: {error}", code="invalid_value",
                                 param="messages"))
            return False
        except Exception as error:  # noqa: BLE001 - the request was checked: what is left is the server's fault
            logger.exception("kopru serve: preparing a request failed")
            self.requests_failed += 1
            job.deliver(APIError(500, f"preparing the request failed: {type(error).__name__}: {error}",
                                 code="internal_error"))
            return False
        window = self.engine.context_window
        room = window - prompt_tokens
        if room < 1 or (job.max_tokens_given and job.params.max_new_tokens > room):
            asked = job.params.max_new_tokens if job.max_tokens_given else 1
            job.deliver(APIError(
                400, f"This model's maximum context length is {window} tokens. However, you requested "
                f"{prompt_tokens + asked} tokens ({prompt_tokens} in the messages, {asked} in the completion). "
                "Please reduce the length of the messages or completion.",
                code="context_length_exceeded", param="messages"))
            return False
        if not job.max_tokens_given:
            job.params = dataclasses.replace(job.params, max_new_tokens=min(job.params.max_new_tokens, room))
        job.prompt_tokens = prompt_tokens
        job.deliver(Admitted(prompt_tokens, job.params.max_new_tokens))
        return True

    def _generate(self, jobs: list[GenerationJob], counted: bool = False) -> None:
        if not counted:
            self.batch_sizes[len(jobs)] += 1
        events = None
        started = False  # an event has reached a client: the batch cannot be run again unseen
        alone = False  # the batch failed before its first token and is run again one job at a time
        try:
            events = self.engine.stream([job.prompt for job in jobs], [job.images for job in jobs],
                                        [job.params for job in jobs])
            for event in events:
                started = True
                job = jobs[event.index]
                job.deliver(event)
                if event.finish_reason is not None:
                    job.finish_reason = event.finish_reason
                    job.deliver(Finished(event.completion_tokens))
                    self.requests_done += 1
                if all(job.cancelled.is_set() for job in jobs):
                    break  # nobody is listening: stop the batch
        except Exception as error:  # noqa: BLE001 - one failing batch must not stop the server
            if not started and len(jobs) > 1:
                # Before the first token nothing is lost: each request alone, so that only the one at fault fails.
                logger.warning("kopru serve: a batch of %d failed before its first token (%s: %s); running its "
                               "requests one at a time", len(jobs), type(error).__name__, error)
                alone = True
            else:
                logger.exception("kopru serve: generation failed")
                for job in jobs:
                    if job.finish_reason is None:
                        self.requests_failed += 1
                        job.deliver(APIError(500, f"generation failed: {type(error).__name__}: {error}",
                                             code="engine_error"))
        finally:
            if events is not None:
                try:
                    events.close()  # ends the engine's generator now, releasing its lock
                except Exception:  # noqa: BLE001 - closing a failed generator must not hide the first error
                    logger.exception("kopru serve: closing a generation failed")
            if not alone:
                self.requests_cancelled += sum(job.cancelled.is_set() and job.finish_reason is None
                                               and not job.answered for job in jobs)
        if alone:
            for job in jobs:
                if job.cancelled.is_set():
                    self.requests_cancelled += 1
                else:
                    self._generate([job], counted=True)


# --------------------------------------------------------------------------------------------------- app
def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying `payload` as compact JSON."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


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


class SecurityGuard:
    """ASGI middleware applying `ServerSecurity` before anything else runs: the Host header (400), the API key on
    /v1/... and /metrics (401), and JSON as the only body a POST may carry (415, so that a web page cannot post
    a "simple" text/plain request past the browser's preflight). Answers carry OpenAI-style bodies."""

    def __init__(self, app, security: ServerSecurity, checks: tuple[str, ...] = ("host", "access")) -> None:
        self.app = app
        self.security = security
        self.checks = checks

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self.check(scope)
        if error is None:
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        await JSONResponse(error.body(), status_code=error.status, headers=headers)(scope, receive, send)

    def check(self, scope) -> APIError | None:
        headers: dict[bytes, bytes] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.lower(), value)
        host = headers.get(b"host", b"").decode("latin-1")
        if "host" in self.checks and not self.security.host_allowed(host):
            return APIError(400, f"the Host header {_shown(host)} is not one this server answers to; start it with "
                            "--allowed-host NAME to add a name", code="invalid_host")
        path, method = scope["path"], scope["method"]
        if "access" not in self.checks:
            return None
        if method != "OPTIONS" and (path.startswith("/v1/") or path == "/metrics") and \
                not self.security.key_matches(headers.get(b"authorization", b"").decode("latin-1")):
            return APIError(401, "expected the API key as 'Authorization: Bearer KEY'; it is missing or wrong",
                            code="invalid_api_key")
        if method == "POST":
            media = headers.get(b"content-type", b"").decode("latin-1").partition(";")[0].strip().lower()
            if media != "application/json":
                return APIError(415, f"expected a JSON body with 'Content-Type: application/json', found "
                                f"{_shown(media or 'no Content-Type')}", code="unsupported_media_type")
        return None


@dataclass
class ServerState:
    worker: BatchingWorker
    model_name: str
    limits: ServerLimits
    allow_local_dir: Path | None
    security: ServerSecurity
    budget: Budget  # decoded image pixels
    body_budget: Budget  # request body bytes being received and parsed
    vocab_size: int | None
    created: int = field(default_factory=lambda: int(time.time()))
    active: int = 0


def create_app(engine: GenerationEngine, model_name: str, limits: ServerLimits | None = None,
               allow_local_dir: str | Path | None = None, security: ServerSecurity | None = None):
    """The Starlette application; `app.state.kopru` holds the worker (call `app.state.kopru.worker.close()`).
    `security` defaults to a server on localhost: localhost Host names only, no API key, no CORS."""
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    limits = limits or ServerLimits()
    security = security or ServerSecurity()
    if allow_local_dir is not None and not local_files_supported():
        raise ValueError("--allow-local-dir needs a platform that opens files without following links (openat "
                         "with O_NOFOLLOW); this one does not")
    state = ServerState(
        worker=BatchingWorker(engine, limits),
        model_name=model_name, limits=limits,
        allow_local_dir=Path(allow_local_dir).absolute() if allow_local_dir is not None else None,
        security=security, budget=Budget(limits.max_queued_image_pixels, "decoded image pixels"),
        body_budget=Budget(limits.max_pending_body_bytes, "bytes of request bodies"),
        vocab_size=getattr(engine, "vocab_size", None),
    )
    page = resources.files("kopru").joinpath("web", DEMO_PAGE).read_text(encoding="utf-8")

    def release(job: GenerationJob, reservation: Reservation) -> None:
        """The HTTP side is done with `job` (answered, failed or abandoned): stop its generation, free its slot
        and its images' pixels."""
        job.cancelled.set()
        reservation.release()
        if not job.released:
            job.released = True
            state.active -= 1

    def error_response(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    def busy() -> APIError:
        return APIError(429, f"the server is busy: {state.active} requests in progress, the limit is "
                        f"{limits.max_queued_requests}; retry shortly", code="server_busy", kind="rate_limit_error")

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
            raise APIError(413, f"the request body is {declared} bytes; the limit is {limits.max_request_bytes}",
                           code="request_too_large")
        body = bytearray()
        held = Reservation(state.body_budget)  # bodies being received, across requests
        try:
            async for chunk in request.stream():
                if len(body) + len(chunk) > limits.max_request_bytes:
                    raise APIError(413, f"the request body exceeds the limit of {limits.max_request_bytes} bytes",
                                   code="request_too_large")
                held.take(len(chunk), "the request body")
                body += chunk
            return await asyncio.to_thread(decode_json_body, body, limits)  # off the event loop
        except ClientDisconnect:
            raise APIError(400, "the client closed the connection before the whole body arrived",
                           code="incomplete_body") from None
        finally:
            held.release()

    async def chat_completions(request: Request):
        if state.active >= limits.max_queued_requests:  # before reading and decoding anything
            return error_response(busy())
        try:
            body = await read_json(request)
            chat = await asyncio.to_thread(parse_chat_request, body, model_name, limits, state.allow_local_dir,
                                           state.vocab_size, state.budget)
        except APIError as error:
            return error_response(error)
        del body  # its data: URLs are decoded into `chat`: not kept for the whole generation
        if state.active >= limits.max_queued_requests:
            chat.reservation.release()
            return error_response(busy())
        job = GenerationJob(chat.messages, chat.params, chat.max_tokens_given, asyncio.get_running_loop(),
                            asyncio.Queue())
        state.active += 1
        state.worker.submit(job)
        try:
            admitted = await job.events.get()
        except BaseException:
            release(job, chat.reservation)
            raise
        if isinstance(admitted, APIError):
            release(job, chat.reservation)
            return error_response(admitted)
        identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if chat.stream:
            return StreamingResponse(stream_events(job, chat.reservation, admitted, identity, chat.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     # also when the client left before the first chunk was sent
                                     background=BackgroundTask(release, job, chat.reservation))
        return await whole_completion(request, job, chat.reservation, admitted, identity)

    async def whole_completion(request: Request, job: GenerationJob, reservation: Reservation, admitted: Admitted,
                               identity: dict):
        text, finish_reason = "", None
        checked = time.monotonic()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_CHECK_S)
                except TimeoutError:
                    item = None
                if time.monotonic() - checked >= DISCONNECT_CHECK_S:  # events may never pause: check on a clock
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)  # nobody reads it; `release` stops the job
                if item is None:
                    continue
                if isinstance(item, APIError):
                    return error_response(item)
                if isinstance(item, StreamEvent):
                    text += item.text
                    finish_reason = item.finish_reason or finish_reason
                elif isinstance(item, Finished):
                    return JSONResponse({
                        **identity, "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "logprobs": None, "finish_reason": finish_reason}],
                        "usage": usage(admitted.prompt_tokens, item.completion_tokens),
                    })
        finally:
            release(job, reservation)

    async def stream_events(job: GenerationJob, reservation: Reservation, admitted: Admitted, identity: dict,
                            include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            payload = {**identity, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            return sse(payload)

        try:
            yield chunk({"role": "assistant", "content": ""})
            finish_reason = None
            while True:
                item = await job.events.get()
                if isinstance(item, APIError):  # headers are gone: the error travels as an event
                    yield sse(item.body())
                    break
                if isinstance(item, StreamEvent):
                    if item.text:
                        yield chunk({"content": item.text})
                    finish_reason = item.finish_reason or finish_reason
                elif isinstance(item, Finished):
                    yield chunk({}, finish_reason)
                    if include_usage:
                        payload = {**identity, "object": "chat.completion.chunk", "choices": [],
                                   "usage": usage(admitted.prompt_tokens, item.completion_tokens)}
                        yield sse(payload)
                    break
            yield "data: [DONE]\n\n"
        finally:  # runs when the client disconnects too (the response task is cancelled)
            release(job, reservation)

    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": state.created, "owned_by": "kopru"}

    async def list_models(request: Request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request: Request):
        if request.path_params["model"] != model_name:
            return error_response(APIError(404, f"The model {_shown(request.path_params['model'])} does not exist",
                                           code="model_not_found", param="model"))
        return JSONResponse(model_card())

    async def health(request: Request):
        if not state.worker.alive:  # between a worker's death and its restart
            return JSONResponse({"status": "unavailable", "model": model_name,
                                 "reason": f"the generation worker died ({state.worker.failure}); restarting"},
                                status_code=503)
        return JSONResponse({"status": "ok", "model": model_name})

    async def metrics(request: Request):
        return JSONResponse({**state.worker.metrics(), "active_requests": state.active,
                             "image_pixels_held": state.budget.used, "body_bytes_held": state.body_budget.used,
                             "worker_alive": state.worker.alive})

    async def demo_page(request: Request):
        return HTMLResponse(page)

    async def http_error(request: Request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                       code=code))

    async def server_error(request: Request, error: Exception):
        logger.error("kopru serve: %s %s failed", request.method, request.url.path, exc_info=error)
        return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}", code="internal_error"))

    middleware = [Middleware(SecurityGuard, security=security)]
    if security.cors_origins:  # the key and media type are checked inside CORS: a browser can read why it was refused
        middleware = [Middleware(SecurityGuard, security=security, checks=("host",)),
                      Middleware(CORSMiddleware, allow_origins=list(security.cors_origins),
                                 allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]),
                      Middleware(SecurityGuard, security=security, checks=("access",))]
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", get_model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/", demo_page, methods=["GET"]),
        ],
        middleware=middleware,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    app.state.kopru = state
    return app


# Folders that name a stage of a run rather than the model: `kopru train` writes runs/NAME/final, checkpoints
# runs/NAME/checkpoint-N and runs/NAME/latest.
_GENERIC_FOLDER = re.compile(r"final|latest|checkpoint-\d+")


def served_model_name(model_dir: str | Path, config_name: str | None = None) -> str:
    """The id a saved model is served under when none is given: its folder's name, unless that folder is named
    after a stage of a run (final, latest, checkpoint-N); then the name stored in its config (`config_name`,
    KopruConfig.name), else the run folder's name, so that runs/my-vlm/final is served as "my-vlm"."""
    folder = Path(model_dir).resolve()
    if not _GENERIC_FOLDER.fullmatch(folder.name):
        return folder.name
    return config_name or folder.parent.name or folder.name


def load_server(model_dir: str | Path, model_name: str | None = None, limits: ServerLimits | None = None,
                allow_local_dir: str | Path | None = None, device: str | None = None, dtype: str | None = None,
                compile: bool = False, max_seq_len: int | None = None, security: ServerSecurity | None = None):
    """Load a saved Köprü model (on `device`: default cuda when available, else cpu) and build the app around a
    GenerationEngine for it."""
    import torch

    from kopru.model import KopruForConditionalGeneration

    limits = limits or ServerLimits()
    if allow_local_dir is not None and not Path(allow_local_dir).is_dir():
        raise FileNotFoundError(f"--allow-local-dir: expected a directory, found nothing at {allow_local_dir}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = KopruForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype(dtype))
    engine = GenerationEngine(model.to(device).eval(), processor, max_batch_size=limits.max_batch_size,
                              max_seq_len=max_seq_len, compile=compile)
    name = model_name or served_model_name(model_dir, model.config.name)
    return create_app(engine, name, limits, allow_local_dir, security)


def read_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline for reading each request. uvicorn itself times out only idle
    keep-alive connections (timeout_keep_alive): a connection that sends half a request line, headers or body and
    then nothing (or a byte now and then) stays open for ever. Here a request's headers and body must all arrive
    within `seconds` of the connection opening (or of the previous response's end); otherwise it is closed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ReadTimeoutH11Protocol(H11Protocol):
        read_timeout_s = seconds
        _read_deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._read_deadline = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _read_timed_out(self) -> None:
            self._read_deadline = None
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                logger.info("kopru serve: closing a connection from %s that sent no whole request within %s s",
                            self.client, self.read_timeout_s)
                self.transport.close()  # a handler waiting for the body sees the client disconnect

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # the whole request is in (or it ended)
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request on this keep-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return ReadTimeoutH11Protocol


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **options: Any):
    """uvicorn's settings for `app`: its ServerLimits' read timeout and connection limit applied (`options`: more
    uvicorn.Config settings)."""
    import uvicorn

    limits: ServerLimits = app.state.kopru.limits
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          **{"timeout_graceful_shutdown": 5, **options},
                          http=read_timeout_protocol(limits.read_timeout_s),
                          limit_concurrency=limits.max_connections)


def run_server(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `app` until interrupted, warning loudly first when it listens beyond this machine without a key."""
    import uvicorn

    warning = app.state.kopru.security.exposure_warning(host)
    if warning:
        bar = "!" * 100
        print(f"{bar}\n{warning}\n{bar}", file=sys.stderr, flush=True)
        logger.warning(warning)
    server = uvicorn.Server(uvicorn_config(app, host, port))
    try:
        server.run()
    finally:
        app.state.kopru.worker.close()
    if not server.started:  # e.g. the port is taken: uvicorn has said why; exit as uvicorn.run does
        raise SystemExit(3)


__all__ = ["APIError", "BatchingWorker", "Budget", "ServerLimits", "ServerSecurity", "create_app", "decode_image",
           "decode_json_body", "load_server", "parse_chat_request", "read_image_url", "read_local_file",
           "run_server", "served_model_name", "uvicorn_config"]
