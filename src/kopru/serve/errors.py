"""The one error type of the server: an HTTP status and an OpenAI-style body."""

from __future__ import annotations

from typing import Any

from kopru.image_processing import scrub_object_reprs


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


def shown(value: Any, width: int = 60) -> str:
    """A client's value quoted in an error message, cut short (an int of 4300+ digits has no repr at all)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= width else text[:width] + "..."
