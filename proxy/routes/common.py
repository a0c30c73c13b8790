"""What every generation endpoint shares: body parsing and the SSE response lifecycle."""

from __future__ import annotations

import json
import logging
from contextlib import aclosing
from typing import Any, Protocol

from aiohttp import web

from dsml.events import Event
from proxy import state
from proxy.errors import ApiError, to_api_error
from proxy.logs import ACCESS_LOGGER
from proxy.middleware import REQUEST_ID_HEADER
from proxy.turn import Turn

log = logging.getLogger(ACCESS_LOGGER)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object (413 past the body limit, 400 if not a JSON object)."""
    limit = request.app[state.SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body of {request.content_length} bytes is over the "
                       f"limit of {limit} bytes", code="body_too_large")
    clock = request[state.CLOCK]
    clock.wait_begin()  # receiving the body is the client's time, not ours
    try:
        raw = await request.read()
    finally:
        clock.wait_end()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body


class StreamEncoder(Protocol):
    """What an endpoint's streaming encoder provides (chat now; messages, responses later)."""

    def start(self) -> bytes: ...
    def encode(self, event: Event) -> bytes: ...
    def finish(self, turn: Turn) -> bytes: ...
    def error(self, err: ApiError) -> bytes: ...


async def drain(request: web.Request, turn: Turn) -> None:
    """Run a turn to its end without streaming (non-streaming responses)."""
    async with aclosing(turn.events()) as events:
        async for _ in events:
            pass
    log_turn(request, turn)


async def stream_turn(request: web.Request, turn: Turn, encoder: StreamEncoder) -> web.StreamResponse:
    """SSE: prepare, one write per event, finish, write_eof.

    The first event is awaited before the response is prepared, so a backend that is down or
    a request the backend refuses still gets a proper HTTP status (502/504). After that,
    failures become an SSE error event. A client disconnect cancels this task (the runner
    uses `handler_cancellation`), which closes the backend stream at once.
    """
    request[state.STREAM] = True
    clock = request[state.CLOCK]
    async with aclosing(turn.events()) as events:
        first: Event | None
        try:
            first = await anext(events)
        except StopAsyncIteration:
            first = None
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
            REQUEST_ID_HEADER: request[state.REQUEST_ID],
        })
        await response.prepare(request)
        try:
            head = encoder.start()
            if first is not None:
                head += encoder.encode(first)
            await _write(response, head, clock)
            async for event in events:
                data = encoder.encode(event)
                if data:
                    await _write(response, data, clock)
            await _write(response, encoder.finish(turn), clock)
        except Exception as exc:  # the status line is gone: the error becomes an SSE event
            err = to_api_error(exc)
            if err is None:
                log.exception("unhandled error mid-stream", extra={"fields": {
                    "request_id": request[state.REQUEST_ID]}})
                err = ApiError(500, f"internal error ({type(exc).__name__})",
                               code="internal_error")
            request[state.LOG_FIELDS]["error"] = err.message
            await _write(response, encoder.error(err), clock)
    await response.write_eof()
    log_turn(request, turn)
    return response


def log_turn(request: web.Request, turn: Turn) -> None:
    fields = request[state.LOG_FIELDS]
    fields.update(prompt_tokens=turn.prompt_tokens, completion_tokens=turn.completion_tokens,
                  reasoning_tokens=turn.reasoning_tokens, finish_reason=turn.finish_reason)
    if turn.result is not None and turn.result.turn_outcome is not None:
        fields["turn_outcome"] = turn.result.turn_outcome.value


async def _write(response: web.StreamResponse, data: bytes, clock: Any) -> None:
    clock.wait_begin()
    await response.write(data)
    clock.wait_end()
