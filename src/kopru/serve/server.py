"""Running the app under uvicorn: a read timeout of Köprü's own (h11), the connection limit, the exposure warning."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from kopru.serve.limits import ServerLimits

logger = logging.getLogger("kopru.serve")


def read_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline for reading each request. uvicorn itself times out only idle
    keep-alive connections (timeout_keep_alive): a connection that sends half a request line, headers or body and
    then nothing (or a byte now and then) stays open for ever. Here a request's headers and body must all arrive
    within `seconds` of the connection opening (or of the previous response's end); otherwise it is closed."""
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
    limits: ServerLimits = app.state.kopru.limits
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          **{"timeout_graceful_shutdown": 5, **options},
                          http=read_timeout_protocol(limits.read_timeout_s),
                          limit_concurrency=limits.max_connections)


def run_server(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `app` until interrupted, warning loudly first when it listens beyond this machine without a key."""
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
