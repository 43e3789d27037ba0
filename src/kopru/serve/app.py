"""The HTTP application: routes, their handlers and the state they share; `create_app` assembles them.

Endpoints: POST /v1/chat/completions (JSON or server-sent events), GET /v1/models, GET /v1/models/{id},
GET /health, GET /metrics (batching counters, JSON) and GET / (the web demo).

Each handler is a named function of the request; what they share (the worker, the limits, the budgets, the count
of requests in progress) is the `ServerState` at `request.app.state.kopru`. The HTTP side never touches the
model or its tokenizer: it parses and checks the request (`kopru.serve.parsing`), hands a `GenerationJob` to the
worker (`kopru.serve.worker`) and relays what comes back, as one JSON answer or as server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kopru.dtypes import torch_dtype
from kopru.generation.engine import GenerationEngine, StreamEvent
from kopru.model import KopruForConditionalGeneration
from kopru.serve.errors import APIError, shown
from kopru.serve.images import local_files_supported
from kopru.serve.limits import Budget, Reservation, ServerLimits
from kopru.serve.parsing import decode_json_body, parse_chat_request
from kopru.serve.security import SecurityGuard, ServerSecurity
from kopru.serve.worker import Admitted, BatchingWorker, Finished, GenerationJob

DEMO_PAGE = "index.html"
DISCONNECT_CHECK_S = 0.1  # how often a non-streamed request checks that its client is still there
logger = logging.getLogger("kopru.serve")


# ------------------------------------------------------------------------------------------------ state
@dataclass
class ServerState:
    """What the handlers share; one per app, at `app.state.kopru`."""

    worker: BatchingWorker
    model_name: str
    limits: ServerLimits
    allow_local_dir: Path | None
    security: ServerSecurity
    budget: Budget  # decoded image pixels
    body_budget: Budget  # request body bytes being received and parsed
    vocab_size: int | None
    page: str = ""  # the web demo
    created: int = field(default_factory=lambda: int(time.time()))
    active: int = 0

    def release(self, job: GenerationJob, reservation: Reservation) -> None:
        """The HTTP side is done with `job` (answered, failed or abandoned): stop its generation, free its slot
        and its images' pixels."""
        job.cancelled.set()
        reservation.release()
        if not job.released:
            job.released = True
            self.active -= 1

    def busy(self) -> APIError:
        return APIError(429, f"the server is busy: {self.active} requests in progress, the limit is "
                        f"{self.limits.max_queued_requests}; retry shortly", code="server_busy",
                        kind="rate_limit_error")

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "kopru"}


def _state(request: Request) -> ServerState:
    return request.app.state.kopru


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying `payload` as compact JSON."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ------------------------------------------------------------------------------------- chat completions
async def read_json(state: ServerState, request: Request) -> Any:
    """The body, within max_request_bytes and the bytes all bodies may hold together, parsed off the event loop."""
    limits = state.limits
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


async def chat_completions(request: Request) -> Response:
    """POST /v1/chat/completions: parsed and checked here, generated by the worker, answered whole or streamed."""
    state = _state(request)
    limits = state.limits
    if state.active >= limits.max_queued_requests:  # before reading and decoding anything
        return error_response(state.busy())
    try:
        body = await read_json(state, request)
        chat = await asyncio.to_thread(parse_chat_request, body, state.model_name, limits, state.allow_local_dir,
                                       state.vocab_size, state.budget)
    except APIError as error:
        return error_response(error)
    del body  # its data: URLs are decoded into `chat`: not kept for the whole generation
    if state.active >= limits.max_queued_requests:
        chat.reservation.release()
        return error_response(state.busy())
    job = GenerationJob(chat.messages, chat.params, chat.max_tokens_given, asyncio.get_running_loop(),
                        asyncio.Queue())
    state.active += 1
    state.worker.submit(job)
    try:
        admitted = await job.events.get()
    except BaseException:
        state.release(job, chat.reservation)
        raise
    if isinstance(admitted, APIError):
        state.release(job, chat.reservation)
        return error_response(admitted)
    identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    if chat.stream:
        return StreamingResponse(stream_events(state, job, chat.reservation, admitted, identity, chat.include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 # also when the client left before the first chunk was sent
                                 background=BackgroundTask(state.release, job, chat.reservation))
    return await whole_completion(state, request, job, chat.reservation, admitted, identity)


async def whole_completion(state: ServerState, request: Request, job: GenerationJob, reservation: Reservation,
                           admitted: Admitted, identity: dict) -> Response:
    """The answer as one JSON body, once the worker has finished; nothing when the client has gone."""
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
        state.release(job, reservation)


async def stream_events(state: ServerState, job: GenerationJob, reservation: Reservation, admitted: Admitted,
                        identity: dict, include_usage: bool) -> AsyncIterator[str]:
    """The answer as server-sent events, chunk by chunk as the worker delivers them."""
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
        state.release(job, reservation)


# ---------------------------------------------------------------------------------------- other routes
async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_state(request).model_card()]})


async def get_model(request: Request) -> Response:
    state = _state(request)
    if request.path_params["model"] != state.model_name:
        return error_response(APIError(404, f"The model {shown(request.path_params['model'])} does not exist",
                                       code="model_not_found", param="model"))
    return JSONResponse(state.model_card())


async def health(request: Request) -> Response:
    state = _state(request)
    if not state.worker.alive:  # between a worker's death and its restart
        return JSONResponse({"status": "unavailable", "model": state.model_name,
                             "reason": f"the generation worker died ({state.worker.failure}); restarting"},
                            status_code=503)
    return JSONResponse({"status": "ok", "model": state.model_name})


async def metrics(request: Request) -> Response:
    state = _state(request)
    return JSONResponse({**state.worker.metrics(), "active_requests": state.active,
                         "image_pixels_held": state.budget.used, "body_bytes_held": state.body_budget.used,
                         "worker_alive": state.worker.alive})


async def demo_page(request: Request) -> Response:
    return HTMLResponse(_state(request).page)


async def http_error(request: Request, error: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    return error_response(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                   code=code))


async def server_error(request: Request, error: Exception) -> Response:
    logger.error("kopru serve: %s %s failed", request.method, request.url.path, exc_info=error)
    return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}", code="internal_error"))


ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/", demo_page, methods=["GET"]),
]


def security_middleware(security: ServerSecurity) -> list[Middleware]:
    """`SecurityGuard` first; with CORS on, the key and media type are checked inside CORS, so that a browser can
    read why it was refused."""
    if not security.cors_origins:
        return [Middleware(SecurityGuard, security=security)]
    return [Middleware(SecurityGuard, security=security, checks=("host",)),
            Middleware(CORSMiddleware, allow_origins=list(security.cors_origins),
                       allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]),
            Middleware(SecurityGuard, security=security, checks=("access",))]


# ------------------------------------------------------------------------------------------- assembly
def create_app(engine: GenerationEngine, model_name: str, limits: ServerLimits | None = None,
               allow_local_dir: str | Path | None = None, security: ServerSecurity | None = None) -> Starlette:
    """The Starlette application; `app.state.kopru` holds the worker (call `app.state.kopru.worker.close()`).
    `security` defaults to a server on localhost: localhost Host names only, no API key, no CORS."""
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
        page=resources.files("kopru").joinpath("web", DEMO_PAGE).read_text(encoding="utf-8"),
    )
    app = Starlette(routes=ROUTES, middleware=security_middleware(security),
                    exception_handlers={HTTPException: http_error, Exception: server_error})
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
                compile: bool = False, max_seq_len: int | None = None,
                security: ServerSecurity | None = None) -> Starlette:
    """Load a saved Köprü model (on `device`: default cuda when available, else cpu) and build the app around a
    GenerationEngine for it."""
    limits = limits or ServerLimits()
    if allow_local_dir is not None and not Path(allow_local_dir).is_dir():
        raise FileNotFoundError(f"--allow-local-dir: expected a directory, found nothing at {allow_local_dir}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = KopruForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype(dtype))
    engine = GenerationEngine(model.to(device).eval(), processor, max_batch_size=limits.max_batch_size,
                              max_seq_len=max_seq_len, compile=compile)
    name = model_name or served_model_name(model_dir, model.config.name)
    return create_app(engine, name, limits, allow_local_dir, security)
