"""Middlewares, outermost first: observe (request id, metrics, access log), errors, auth."""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy import state
from proxy.errors import ApiError, error_response, to_api_error
from proxy.logs import ACCESS_LOGGER
from proxy.timing import RequestClock

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger(ACCESS_LOGGER)

# Route -> the `endpoint` label (bounded); anything else is "other". Every value here is
# in proxy.metrics.ENDPOINTS, so its series exist at zero from the start.
ENDPOINT_BY_PATH = {
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
    "/v1/messages": "messages",
    # Claude Code calls it around every turn: its own label keeps those quick tokenizer-only
    # requests out of the messages latency figures, and out of "other".
    "/v1/messages/count_tokens": "messages_count_tokens",
    "/v1/responses": "responses",
    # stored responses read back or deleted: no generation, so not in the responses figures
    "/v1/responses/{response_id}": "responses_store",
    "/v1/responses/{response_id}/input_items": "responses_store",
    "/v1/models": "models",
    "/v1/models/{model_id}": "models",
    "/health": "health",
    "/ready": "ready",
    "/metrics": "metrics",
}
REQUEST_ID_HEADER = "X-Request-Id"
CLIENT_CLOSED = 499  # nginx's code for "client closed the request"


def endpoint_of(request: web.Request) -> str:
    route = request.match_info.route
    path = route.resource.canonical if route.resource is not None else ""
    return ENDPOINT_BY_PATH.get(path, "other")


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[state.METRICS]
    clock = RequestClock()
    request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    request_id = request_id[:128]
    request[state.REQUEST_ID] = request_id
    request[state.CLOCK] = clock
    request[state.STREAM] = False
    request[state.LOG_FIELDS] = {}
    endpoint = endpoint_of(request)
    inflight = metrics.inflight_of[endpoint]
    inflight.inc()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        inflight.dec()
        stream = "true" if request[state.STREAM] else "false"
        elapsed = clock.elapsed()
        overhead = max(0.0, elapsed - clock.waited)
        metrics.requests_of[endpoint, str(status)].inc()
        metrics.duration_of[endpoint, stream].observe(elapsed)
        metrics.overhead_of[endpoint].observe(overhead)
        if request.app[state.SETTINGS].log_requests:
            fields = {
                "request_id": request_id, "method": request.method, "path": request.path,
                "endpoint": endpoint, "status": status, "stream": request[state.STREAM],
                "duration_ms": round(elapsed * 1000, 3),
                "overhead_ms": round(overhead * 1000, 3),
                **request[state.LOG_FIELDS],
            }
            log.info("request", extra={"fields": fields})


def api_error_for(request: web.Request, exc: Exception) -> ApiError:
    """The ApiError a handler's exception becomes (a 500 for anything unexpected, logged)."""
    err = to_api_error(exc)
    if err is None:
        log.exception("unhandled error", extra={"fields": {
            "request_id": request.get(state.REQUEST_ID)}})
        err = ApiError(500, f"internal error ({type(exc).__name__})", code="internal_error")
    request[state.LOG_FIELDS]["error"] = err.message
    return err


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return error_response(api_error_for(request, exc))


def _presented_key(request: web.Request) -> bytes:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip().encode()
    return request.headers.get("x-api-key", "").encode()  # the Anthropic SDK's header


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[state.SETTINGS]
    keys = settings.api_key_values()
    if not keys:
        return await handler(request)
    endpoint = endpoint_of(request)
    if (endpoint in ("health", "ready") and settings.public_health) or (
        endpoint == "metrics" and settings.public_metrics
    ):
        return await handler(request)
    presented = _presented_key(request)
    # Compare against every key, without an early exit, in constant time per key.
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented, key)
    if not ok:
        raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                       code="invalid_api_key")
    return await handler(request)
