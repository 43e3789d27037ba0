"""The one thread that owns the model: `BatchingWorker` collects jobs, checks each against the context window and
generates them as one batch through `GenerationEngine.stream`, handing each job its own events."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from kopru.generation.chat_format import format_chat
from kopru.generation.engine import GenerationEngine, StreamEvent
from kopru.generation.sampling import SamplingParams
from kopru.serve.errors import APIError
from kopru.serve.limits import ServerLimits

WORKER_RESTART_S = 1.0  # how long a dead worker is reported (/health 503) before a new one starts
logger = logging.getLogger("kopru.serve")


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
        # `failure` is set before the dying thread answers the jobs it held (503), and the thread is still alive
        # while it does: is_alive() alone said "ok" to a client that had just been told the worker died.
        return self.failure is None and self._thread.is_alive()

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
        self.failure = None  # before the new thread starts: a failure of that one must not be cleared here
        self._thread = self._start()

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
            # Counted once when each job was admitted (`_admit`): not tokenised again before the batch is encoded.
            events = self.engine.stream([job.prompt for job in jobs], [job.images for job in jobs],
                                        [job.params for job in jobs], [job.prompt_tokens for job in jobs])
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
