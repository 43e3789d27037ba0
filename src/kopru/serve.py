"""`kopru serve`: an OpenAI-compatible HTTP server for a saved Köprü model, plus a small web demo page.

Endpoints: POST /v1/chat/completions (JSON or server-sent events), GET /v1/models, GET /v1/models/{id},
GET /health, GET /metrics (batching counters, JSON) and GET / (the web demo).

One background thread owns the model. It takes the queued requests, waits a short window for more to arrive,
and runs them as one batch through `GenerationEngine.stream`, handing each request its own events; the HTTP
side never touches the model or its tokenizer (a fast tokenizer changing its padding settings in one thread
while another encodes fails with "Already borrowed"), so the chat template is rendered there too. A client
that goes away cancels only its own request; a batch whose clients have all gone is stopped.

Every error is answered with an OpenAI-style body, {"error": {"message", "type", "param", "code"}}, and the
server goes on serving the others.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import queue
import re
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

from PIL import Image, UnidentifiedImageError

from kopru.dtypes import torch_dtype
from kopru.generation import GenerationEngine, SamplingParams, StreamEvent, format_chat
from kopru.image_processing import ImageTooLargeError, load_image, scrub_object_reprs
from kopru.messages import MessageError, validate_messages

DEMO_PAGE = "index.html"
DISCONNECT_CHECK_S = 0.1  # how often a non-streamed request checks that its client is still there


# ------------------------------------------------------------------------------------------------ limits
@dataclass
class ServerLimits:
    """What one request may ask for; each field is also a `kopru serve` flag (--max-image-bytes, ...)."""

    max_image_bytes: int = 10 * 1024 * 1024  # one encoded image (after base64 decoding, or the file's size)
    max_image_pixels: int = 4096 * 4096  # width x height, read from the header before decoding
    max_images_per_request: int = 4  # image_url parts across all messages
    max_new_tokens: int = 512  # the most a request's max_tokens may ask for
    default_new_tokens: int = 256  # when the request names no max_tokens (less if the context is shorter)
    max_request_bytes: int = 32 * 1024 * 1024  # the JSON body (base64 images inflate by a third)
    max_batch_size: int = 8  # requests generated together in one batch
    batch_window_ms: float = 10.0  # how long the worker waits for more requests before starting a batch
    max_queued_requests: int = 64  # requests waiting for or in generation; more get 429

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            if getattr(self, spec.name) < (0 if spec.name == "batch_window_ms" else 1):
                raise ValueError(f"ServerLimits.{spec.name} must be positive, found {getattr(self, spec.name)}")
        if self.default_new_tokens > self.max_new_tokens:
            raise ValueError(f"ServerLimits.default_new_tokens ({self.default_new_tokens}) exceeds "
                             f"max_new_tokens ({self.max_new_tokens})")


LIMIT_HELP = {
    "max_image_bytes": "largest encoded image in bytes",
    "max_image_pixels": "largest image as width x height, checked before decoding",
    "max_images_per_request": "most image_url parts in one request",
    "max_new_tokens": "largest max_tokens a request may ask for",
    "default_new_tokens": "max_tokens when a request names none",
    "max_request_bytes": "largest request body in bytes",
    "max_batch_size": "most requests generated together",
    "batch_window_ms": "how long to wait for more requests before a batch starts",
    "max_queued_requests": "most requests admitted at once; more are answered 429",
}


# ------------------------------------------------------------------------------------------------ errors
class APIError(Exception):
    """An error answered to the client as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str | None = None) -> None:
        message = scrub_object_reprs(message, "an object")  # a client can do nothing with "<... at 0x7f...>"
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------ images
def decode_image(data: bytes, limits: ServerLimits, where: str) -> Image.Image:
    """Encoded bytes -> an RGB image (EXIF orientation applied, alpha and 16-bit modes converted as everywhere in
    Köprü: `kopru.image_processing.load_image`), refusing oversize or undecodable input with a 400 whose message
    starts with `where` (e.g. "image 2 of the request (messages[0].content[1])").

    The pixel count comes from the header, before the pixels are decoded (a small file can hold a huge image).
    """
    if len(data) > limits.max_image_bytes:
        raise APIError(400, f"{where}: the image is {len(data)} bytes; the limit is {limits.max_image_bytes}",
                       code="image_too_large", param="messages")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # the header only
            width, height = probe.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        pass  # load_image, below, refuses it with a message naming `where` (Pillow's names an anonymous stream)
    else:
        if width * height > limits.max_image_pixels:
            raise APIError(400, f"{where}: the image is {width}x{height} = {width * height} pixels; the limit is "
                           f"{limits.max_image_pixels}", code="image_too_large", param="messages")
    try:
        return load_image(data, max_pixels=limits.max_image_pixels, name=where)
    except ImageTooLargeError as error:  # Pillow's own ceiling, for limits set above it
        raise APIError(400, str(error), code="image_too_large", param="messages") from None
    except ValueError as error:
        raise APIError(400, str(error), code="invalid_image", param="messages") from None


def read_image_url(url: str, limits: ServerLimits, allow_local_dir: Path | None, where: str) -> Image.Image:
    """A data: URL with base64 content, or a local file (file:// URL or path) under `allow_local_dir`."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or ";base64" not in header:
            raise APIError(400, f"{where}: expected a data URL like 'data:image/png;base64,<data>', found "
                           f"{url[:40]!r}...", code="invalid_image_url", param="messages")
        if len(payload) > 4 * (limits.max_image_bytes // 3 + 1) + 4:  # before decoding anything large
            raise APIError(400, f"{where}: the encoded image exceeds the limit of {limits.max_image_bytes} bytes",
                           code="image_too_large", param="messages")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the data URL's content is not valid base64", code="invalid_image_url",
                           param="messages") from None
        return decode_image(data, limits, where)
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        raise APIError(400, f"{where}: remote image URLs are not fetched by this server; send the image as a "
                       "data: URL (base64)", code="invalid_image_url", param="messages")
    if scheme not in ("", "file"):
        raise APIError(400, f"{where}: expected a data: URL, a file:// URL or a path, found scheme {scheme!r}",
                       code="invalid_image_url", param="messages")
    if allow_local_dir is None:
        raise APIError(400, f"{where}: local image files are refused; start the server with --allow-local-dir DIR "
                       "to serve files under DIR", code="local_files_refused", param="messages")
    path = Path(unquote(urlparse(url).path) if scheme == "file" else url).expanduser()
    resolved = path.resolve()  # symlinks and '..' resolved before the containment check
    root = allow_local_dir.resolve()
    if not resolved.is_relative_to(root):
        raise APIError(400, f"{where}: {str(path)!r} is outside the allowed directory {str(root)!r}",
                       code="local_files_refused", param="messages")
    if not resolved.is_file():
        raise APIError(400, f"{where}: no file at {str(path)!r}", code="invalid_image_url", param="messages")
    if resolved.stat().st_size > limits.max_image_bytes:
        raise APIError(400, f"{where}: the file is {resolved.stat().st_size} bytes; the limit is "
                       f"{limits.max_image_bytes}", code="image_too_large", param="messages")
    return decode_image(resolved.read_bytes(), limits, where)


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class ChatRequest:
    """A validated chat completion request; `messages` has its images decoded (PIL) in place of the URLs."""

    messages: list[dict[str, Any]]
    params: SamplingParams
    max_tokens_given: bool
    stream: bool
    include_usage: bool


_NUMBER_FIELDS: dict[str, tuple[type, float | None, float | None]] = {
    # request field: (type, smallest, largest); None = unbounded
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "top_k": (int, 0, None),
    "repetition_penalty": (float, 0.0, None),
    "seed": (int, None, None),
    "max_tokens": (int, 1, None),
    "max_completion_tokens": (int, 1, None),
    "n": (int, 1, 1),
}


def _number(body: dict, name: str) -> float | int | None:
    value = body.get(name)
    if value is None:
        return None
    kind, low, high = _NUMBER_FIELDS[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, found {value!r}",
                       code="invalid_type", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}" if low is not None else ""
        raise APIError(400, f"'{name}' must be {bounds}, found {value!r}", code="invalid_value", param=name)
    return value


def parse_chat_request(body: Any, model_name: str, limits: ServerLimits,
                       allow_local_dir: Path | None) -> ChatRequest:
    """Check the JSON body of POST /v1/chat/completions; decode its images. Raises APIError."""
    if not isinstance(body, dict):
        raise APIError(400, f"expected a JSON object as the request body, found {type(body).__name__}",
                       code="invalid_json")
    for name in ("model", "messages"):
        if name not in body:
            raise APIError(400, f"Missing required parameter: '{name}'.", code="missing_required_parameter",
                           param=name)
    if body["model"] != model_name:
        raise APIError(404, f"The model '{body['model']}' does not exist; this server serves '{model_name}' "
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
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens or limits.default_new_tokens,
            # OpenAI's default temperature is 1 (sampling); send 0 for greedy decoding.
            temperature=float(_number(body, "temperature") if body.get("temperature") is not None else 1.0),
            top_k=_number(body, "top_k") or 0,
            top_p=float(_number(body, "top_p") if body.get("top_p") is not None else 1.0),
            repetition_penalty=float(_number(body, "repetition_penalty") or 1.0),
            stop=stop,
            seed=_number(body, "seed"),
        )
    except ValueError as error:  # the engine's own checks (e.g. top_p must be above 0)
        raise APIError(400, str(error), code="invalid_value") from None
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError(400, "'stream' must be true or false and 'stream_options' an object", code="invalid_type",
                       param="stream")
    messages = body["messages"]
    images = sum(isinstance(part, dict) and part.get("type") in ("image_url", "image")
                 for message in (messages if isinstance(messages, list) else [])
                 if isinstance(message, dict) and isinstance(message.get("content"), list)
                 for part in message["content"])
    if images > limits.max_images_per_request:  # before any is decoded
        raise APIError(400, f"too many images: {images} image parts; the limit is "
                       f"{limits.max_images_per_request} per request", code="too_many_images", param="messages")

    def resolve(url: Any, number: int, where: str) -> Image.Image:
        # `number` is 1-based across the request: how a client (or the web page) can tell images apart.
        if not isinstance(url, str):  # {"type": "image"} parts carry no URL a client could send
            raise APIError(400, f"{where}: expected an image_url part with {{'url': <string>}}, found an image "
                           "part without one", code="invalid_value", param=where)
        return read_image_url(url, limits, allow_local_dir, f"image {number} of the request ({where})")

    try:
        # The one chat-message validator (`kopru.messages`); a typed "<image>" is refused: no image comes with it.
        decoded = validate_messages(messages, text_placeholders=False, resolve_image=resolve)
    except MessageError as error:
        raise APIError(400, str(error), code="invalid_value", param=error.param) from None
    return ChatRequest(decoded, params, max_tokens is not None, stream, bool(options.get("include_usage")))


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

    def deliver(self, item: Admitted | StreamEvent | Finished | APIError) -> None:
        if not self.cancelled.is_set():
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)


_STOP = object()


class BatchingWorker:
    """The one thread that uses the engine: collects jobs for `batch_window_ms`, checks each against the
    context window, and generates them as one batch, each with its own sampling settings."""

    def __init__(self, engine: GenerationEngine, limits: ServerLimits) -> None:
        self.engine = engine
        self.limits = limits
        self.batch_sizes: Counter[int] = Counter()
        self.requests_done = 0
        self.requests_cancelled = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kopru-generation", daemon=True)
        self._thread.start()

    def submit(self, job: GenerationJob) -> None:
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def metrics(self) -> dict[str, Any]:
        return {"batches": sum(self.batch_sizes.values()),
                "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())},
                "largest_batch": max(self.batch_sizes, default=0),
                "requests_done": self.requests_done, "requests_cancelled": self.requests_cancelled,
                "queued": self._queue.qsize()}

    def _run(self) -> None:
        pending: list[GenerationJob] = []  # admitted, waiting for a batch with room for them
        while True:
            new = []
            if not pending:
                first = self._queue.get()
                if first is _STOP:
                    return
                new.append(first)
            # Jobs already waiting do not wait a window more: take only what is queued now.
            stopping = self._collect(new, room=self.limits.max_batch_size - len(pending), wait=not pending)
            pending += [job for job in new if self._admit(job)]
            self.requests_cancelled += sum(job.cancelled.is_set() for job in pending)
            pending = [job for job in pending if not job.cancelled.is_set()]
            batch = self._fit(pending)
            pending = [job for job in pending if job not in batch]
            if batch:
                self._generate(batch)
            if stopping:
                for job in pending:
                    job.deliver(APIError(503, "the server is shutting down", code="shutting_down"))
                return

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

    def _generate(self, jobs: list[GenerationJob]) -> None:
        self.batch_sizes[len(jobs)] += 1
        events = None
        try:
            events = self.engine.stream([job.prompt for job in jobs], [job.images for job in jobs],
                                        [job.params for job in jobs])
            for event in events:
                job = jobs[event.index]
                job.deliver(event)
                if event.finish_reason is not None:
                    job.finish_reason = event.finish_reason
                    job.deliver(Finished(event.completion_tokens))
                    self.requests_done += 1
                if all(job.cancelled.is_set() for job in jobs):
                    break  # nobody is listening: stop the batch
        except Exception as error:  # noqa: BLE001 - one failing batch must not stop the server
            for job in jobs:
                job.deliver(APIError(500, f"generation failed: {type(error).__name__}: {error}", code="engine_error"))
        finally:
            if events is not None:
                events.close()  # ends the engine's generator now, releasing its lock
            self.requests_cancelled += sum(job.cancelled.is_set() and job.finish_reason is None for job in jobs)


# --------------------------------------------------------------------------------------------------- app
def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying `payload` as compact JSON."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


@dataclass
class ServerState:
    worker: BatchingWorker
    model_name: str
    limits: ServerLimits
    allow_local_dir: Path | None
    created: int = field(default_factory=lambda: int(time.time()))
    active: int = 0


def create_app(engine: GenerationEngine, model_name: str, limits: ServerLimits | None = None,
               allow_local_dir: str | Path | None = None):
    """The Starlette application; `app.state.kopru` holds the worker (call `app.state.kopru.worker.close()`)."""
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    limits = limits or ServerLimits()
    state = ServerState(
        worker=BatchingWorker(engine, limits),
        model_name=model_name, limits=limits,
        allow_local_dir=Path(allow_local_dir) if allow_local_dir is not None else None,
    )
    page = resources.files("kopru").joinpath("web", DEMO_PAGE).read_text(encoding="utf-8")

    def release(job: GenerationJob) -> None:
        """The HTTP side is done with `job` (answered, failed or abandoned): stop its generation, free its slot."""
        job.cancelled.set()
        if not job.released:
            job.released = True
            state.active -= 1

    def error_response(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
            raise APIError(413, f"the request body is {declared} bytes; the limit is {limits.max_request_bytes}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_request_bytes:
                raise APIError(413, f"the request body exceeds the limit of {limits.max_request_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None

    async def chat_completions(request: Request):
        try:
            body = await read_json(request)
            chat = await asyncio.to_thread(parse_chat_request, body, model_name, limits, state.allow_local_dir)
        except APIError as error:
            return error_response(error)
        if state.active >= limits.max_queued_requests:
            return error_response(APIError(429, f"the server is busy: {state.active} requests in progress, the "
                                           f"limit is {limits.max_queued_requests}; retry shortly",
                                           code="server_busy", kind="rate_limit_error"))
        job = GenerationJob(chat.messages, chat.params, chat.max_tokens_given, asyncio.get_running_loop(),
                            asyncio.Queue())
        state.active += 1
        state.worker.submit(job)
        try:
            admitted = await job.events.get()
        except BaseException:
            release(job)
            raise
        if isinstance(admitted, APIError):
            release(job)
            return error_response(admitted)
        identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if chat.stream:
            return StreamingResponse(stream_events(job, admitted, identity, chat.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     # also when the client left before the first chunk was sent
                                     background=BackgroundTask(release, job))
        return await whole_completion(request, job, admitted, identity)

    async def whole_completion(request: Request, job: GenerationJob, admitted: Admitted, identity: dict):
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
            release(job)

    async def stream_events(job: GenerationJob, admitted: Admitted, identity: dict,
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
            release(job)

    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": state.created, "owned_by": "kopru"}

    async def list_models(request: Request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request: Request):
        if request.path_params["model"] != model_name:
            return error_response(APIError(404, f"The model '{request.path_params['model']}' does not exist",
                                           code="model_not_found", param="model"))
        return JSONResponse(model_card())

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": model_name})

    async def metrics(request: Request):
        return JSONResponse({**state.worker.metrics(), "active_requests": state.active})

    async def demo_page(request: Request):
        return HTMLResponse(page)

    async def http_error(request: Request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                       code=code))

    async def server_error(request: Request, error: Exception):
        return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}", code="internal_error"))

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", get_model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/", demo_page, methods=["GET"]),
        ],
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
                compile: bool = False, max_seq_len: int | None = None):
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
    return create_app(engine, name, limits, allow_local_dir)


def run_server(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        app.state.kopru.worker.close()


__all__ = ["APIError", "BatchingWorker", "ServerLimits", "create_app", "decode_image", "load_server",
           "parse_chat_request", "read_image_url", "run_server", "served_model_name"]
