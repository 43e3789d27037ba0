"""Who may talk to the server: the Host allow-list, the API key, JSON-only POSTs and the warning for a server
listening beyond this machine without a key (`ServerSecurity`), applied by the ASGI middleware `SecurityGuard`."""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from starlette.responses import JSONResponse

from kopru.serve.errors import APIError, shown

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

        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        await JSONResponse(error.body(), status_code=error.status, headers=headers)(scope, receive, send)

    def check(self, scope) -> APIError | None:
        headers: dict[bytes, bytes] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.lower(), value)
        host = headers.get(b"host", b"").decode("latin-1")
        if "host" in self.checks and not self.security.host_allowed(host):
            return APIError(400, f"the Host header {shown(host)} is not one this server answers to; start it with "
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
                                f"{shown(media or 'no Content-Type')}", code="unsupported_media_type")
        return None
