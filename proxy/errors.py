"""One exception type for every client-visible error, mapped to the OpenAI error JSON here.

Handlers raise `ApiError` (or let `DsmlError`, pydantic's `ValidationError` and
`BackendError` escape); `error_middleware` turns each into `{"error": {...}}` with the right
status, so no handler formats an error body itself.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from dsml.errors import DsmlError
from proxy.backends.base import BackendError

# OpenAI's `type` values, by status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or _TYPES.get(status_code, "server_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def __repr__(self) -> str:
        return (
            f"ApiError(status_code={self.status_code}, type={self.type!r}, "
            f"param={self.param!r}, code={self.code!r}, message={self.message!r})"
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def from_validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return ApiError(400, message, param=param, code="invalid_value")


def from_backend_error(exc: BackendError) -> ApiError:
    if exc.reason == "timeout":
        return ApiError(504, f"upstream timed out: {exc.message}", code="upstream_timeout")
    if exc.status in (400, 413, 422):
        # The engine refused this request (prompt over its context, bad option): the client's
        # to fix, so not a 5xx the SDK would retry.
        return ApiError(400, f"the engine refused the request: {exc.message}",
                        code="upstream_rejected")
    if exc.status == 429:
        return ApiError(429, f"the engine is overloaded: {exc.message}", code="upstream_overloaded",
                        headers={"Retry-After": "1"})
    return ApiError(502, f"upstream failed ({exc.reason}): {exc.message}", code="upstream_error")


def to_api_error(exc: BaseException) -> ApiError | None:
    """The ApiError for a known exception, None for anything else (a bug: 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DsmlError):
        return ApiError(exc.status_code, exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, ValidationError):
        return from_validation_error(exc)
    if isinstance(exc, BackendError):
        return from_backend_error(exc)
    if isinstance(exc, RecursionError):
        # Only client data nests deep enough for this (a body that parsed, then went too
        # deep for a recursive step): the client's to fix, never a 500.
        return ApiError(400, "the request nests too deeply", code="too_deeply_nested")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return ApiError(413, "request body too large", code="body_too_large")
    if isinstance(exc, web.HTTPNotFound):
        return ApiError(404, "no such route", code="unknown_route")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return ApiError(405, f"method {exc.method} not allowed", code="method_not_allowed")
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        return ApiError(exc.status, exc.reason)
    return None


def error_response(err: ApiError) -> web.Response:
    return web.Response(
        status=err.status_code,
        body=json.dumps(err.body()).encode(),
        content_type="application/json",
        headers=err.headers,
    )


def sse_error_event(err: ApiError) -> bytes:
    """An error after a stream started: the openai SDK raises on a `data: {"error": ...}`."""
    return b"data: " + json.dumps(err.body()).encode() + b"\n\n"
