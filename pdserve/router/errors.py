"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

from __future__ import annotations

import json

_TYPE_BY_STATUS = {
    400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
    405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
    500: "server_error", 503: "server_error", 504: "server_error",
}


class APIError(Exception):
    """Raised anywhere in the request path; the app turns it into the JSON body and status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def sse(self) -> bytes:
        """The error as one SSE event (used once a stream has started)."""
        return f"data: {json.dumps(self.body())}\n\n".encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str = "no prefill/decode pair or colocated node is available") -> APIError:
    return APIError(503, message, code="service_unavailable")


def from_value_error(exc: ValueError, rename: dict[str, str] | None = None) -> APIError:
    """``ValueError("field: message")`` (config/sampling validation) -> 400 naming the field."""
    text = str(exc)
    field, sep, rest = text.partition(": ")
    if not sep or " " in field:
        return bad_request(text)
    param = (rename or {}).get(field, field)
    return bad_request(f"{param}: {rest}", param=param)
