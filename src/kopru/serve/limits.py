"""What requests may ask for (`ServerLimits`, each a `kopru serve` flag) and what all requests in progress
may hold together (`Budget`, `Reservation`)."""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass

from kopru.serve.errors import APIError


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
