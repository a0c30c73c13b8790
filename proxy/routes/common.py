"""What every generation endpoint shares: body parsing and the SSE response lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any, Protocol, TypeVar

from aiohttp import web

from dsml.events import Event
from dsml.tokenizer import TokenBudgetExceeded, token_budget
from proxy import state
from proxy.errors import ApiError, to_api_error
from proxy.logs import ACCESS_LOGGER
from proxy.middleware import REQUEST_ID_HEADER
from proxy.timing import RequestClock
from proxy.turn import Turn

log = logging.getLogger(ACCESS_LOGGER)


# A `\uD800`-`\uDFFF` escape: the only way a lone surrogate gets into a str (the body is
# decoded as strict UTF-8, which refuses surrogates written as bytes).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Lists whose length bounds a request's work: (key, setting), in any endpoint's body.
_COUNTED = (("messages", "max_messages"), ("input", "max_messages"), ("tools", "max_tools"))
T = TypeVar("T")


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object: 413 past the body limit, 415 for another content type, 408
    for a body slower than `client_timeout_s`, 400 if it is not a JSON object (or nests too
    deep, holds an over-long number or a lone surrogate, or lists more messages or tools
    than the limits). A body over `offload_bytes` is decoded on a worker thread, and the
    request's later work too (`off_loop`)."""
    settings = request.app[state.SETTINGS]
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body of {request.content_length} bytes is over the "
                       f"limit of {limit} bytes", code="body_too_large")
    if "Content-Type" in request.headers and not _is_json(request.content_type):
        raise ApiError(415, f"the body must be JSON (Content-Type: application/json), not "
                       f"{request.content_type!r}", code="unsupported_media_type")
    clock = request[state.CLOCK]
    clock.wait_begin()  # receiving the body is the client's time, not ours
    try:
        async with asyncio.timeout(settings.client_timeout_s):
            raw = await request.read()
    except TimeoutError:
        # The rest of the body may still come: this connection cannot carry another request.
        raise ApiError(408, f"the body did not arrive within {settings.client_timeout_s} s",
                       code="request_timeout", headers={"Connection": "close"}) from None
    finally:
        clock.wait_end()
    request[state.OFFLOAD] = len(raw) > settings.offload_bytes
    body = await off_loop(request, _decode, raw, request[state.OFFLOAD])
    for key, setting in _COUNTED:
        value, bound = body.get(key), getattr(settings, setting)
        if isinstance(value, list) and len(value) > bound:
            raise ApiError(400, f"{key} holds {len(value)} entries; this server takes at most "
                           f"{bound} (setting {setting})", param=key, code="too_many_entries")
    return body


def _yield(obj: Any) -> Any:
    # Called by json's C decoder for every object (and `_int` for every integer): running
    # Python code there lets the event loop's thread take the GIL while a big body is
    # decoded on a worker (one C call over 10^5 tools would hold it for seconds).
    return obj


def _int(text: str) -> int:
    return int(text)


def _decode(raw: bytes, big: bool) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8-sig")  # strict: surrogates as bytes are refused
        body = json.loads(text, object_hook=_yield, parse_int=_int) if big else json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the body nests too deeply", code="invalid_json") from None
    except ValueError as exc:  # an integer past Python's digit limit
        raise ApiError(400, f"the body holds a number that cannot be read: {exc}",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    if _SURROGATE_ESCAPE.search(text):
        try:  # escapes of valid pairs (emoji) are common: only a lone one is refused
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "the body holds a lone UTF-16 surrogate (an unpaired "
                           "\\ud800-\\udfff escape), which is no text", code="invalid_json"
                           ) from None
    return body


async def off_loop(request: web.Request, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a worker thread for a big request (read_json decides), else here.

    A big request (10^5 tools, 30 MB of text) costs seconds of rendering and tokenizing;
    on the event loop that would stop every other request, /health included. The
    `tokenizers` library releases the GIL in its batch calls (dsml.tokenizer uses them for
    long texts), and Python code gives it up every few ms, so the loop keeps answering."""
    if not request.get(state.OFFLOAD):
        return fn(*args)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app[state.WORKERS], fn, *args)


def check_prompt_tokens(request: web.Request, num_tokens: int) -> None:
    """A 400 for a prompt over `max_prompt_tokens` (the model's context), before the engine."""
    bound = request.app[state.SETTINGS].max_prompt_tokens
    if num_tokens > bound:
        raise ApiError(400, f"the prompt has {num_tokens} tokens; this model's context is "
                       f"{bound} (setting max_prompt_tokens)", code="context_length_exceeded")


async def prepare_turn(request: web.Request, turn: Turn) -> None:
    """Tokenize the turn's prompt (off the loop for a big request) and check its length;
    tokenizing stops early once the prompt is surely over the bound (dsml.tokenizer's
    token_budget)."""
    bound = request.app[state.SETTINGS].max_prompt_tokens
    await off_loop(request, tokenize_within, bound, turn.tokenize)
    check_prompt_tokens(request, turn.prompt_tokens)


def tokenize_within(bound: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` under a token budget of `bound`: over it, the 400 of check_prompt_tokens."""
    try:
        with token_budget(bound):
            return fn(*args)
    except TokenBudgetExceeded:
        raise ApiError(400, f"the prompt has more than {bound} tokens, this model's context "
                       "(setting max_prompt_tokens)", code="context_length_exceeded") from None


class StreamEncoder(Protocol):
    """What an endpoint's streaming encoder provides (chat, messages, responses)."""

    def start(self) -> bytes: ...
    def encode(self, event: Event) -> bytes: ...
    def finish(self, turn: Turn) -> bytes: ...
    def error(self, err: ApiError) -> bytes: ...
    def keepalive(self) -> bytes: ...  # what goes out while the turn is silent


async def drain(request: web.Request, turn: Turn) -> None:
    """Run a turn to its end without streaming (non-streaming responses)."""
    async with aclosing(turn.events()) as events:
        async for _ in events:
            pass
    log_turn(request, turn)


async def stream_turn(request: web.Request, turn: Turn, encoder: StreamEncoder, *,
                      keepalive_s: float | None = None) -> web.StreamResponse:
    """SSE: prepare, one write per backend delta (its events together), finish, write_eof.

    The first batch is awaited before the response is prepared, so a backend that is down
    or a request the backend refuses still gets a proper HTTP status (502/504). It comes
    with the engine's first token (empty when the parser holds that token, see
    `Turn.batches`). After that, failures become an SSE error event. A client disconnect
    cancels this task (the runner uses `handler_cancellation`), which closes the backend
    stream at once.

    With `keepalive_s`, `encoder.keepalive()` goes out whenever nothing was written for that
    long: a long prefill, reasoning held back by the parser, a forced tool choice's second
    phase can keep a turn silent for minutes, and proxies and clients (Codex) drop idle
    connections. Silence before the first event opens the stream early (status 200 and the
    encoder's start), so a backend failure after that is an SSE error event too.
    """
    request[state.STREAM] = True
    out = _SseStream(request, encoder)
    encode = encoder.encode
    # The events of one backend delta go out in one write.
    async with aclosing(turn.batches()) as events:
        if keepalive_s is not None:
            # A timer beside this task, so events are still read here directly (their
            # per-event cost is what the benchmark counts); it only acts when the stream is
            # silent (then a task writes the keep-alive).
            out.start_keepalive(keepalive_s)
        try:
            first: list[Event] | Exception | None
            try:
                first = await anext(events, None)
            except Exception as exc:
                if not out.opened:
                    raise  # nothing sent yet: a proper HTTP status
                first = exc
            try:
                if isinstance(first, Exception):
                    await out.open()
                    raise first
                await out.open(first)
                async for batch in events:
                    data = (encode(batch[0]) if len(batch) == 1
                            else b"".join([encode(event) for event in batch]))  # b"" if empty
                    if data:
                        await out.write(data)
                await out.write(encoder.finish(turn))
            except Exception as exc:  # the status line is gone: the error becomes an SSE event
                err = to_api_error(exc)
                if err is None:
                    log.exception("unhandled error mid-stream", extra={"fields": {
                        "request_id": request[state.REQUEST_ID]}})
                    err = ApiError(500, f"internal error ({type(exc).__name__})",
                                   code="internal_error")
                request[state.LOG_FIELDS]["error"] = err.message
                await out.write(encoder.error(err))
        finally:
            # Done, failed or the client is gone: no keep-alive after this (write_eof).
            await out.stop_keepalive()
    await out.response.write_eof()
    log_turn(request, turn)
    return out.response


def log_turn(request: web.Request, turn: Turn) -> None:
    fields = request[state.LOG_FIELDS]
    fields.update(prompt_tokens=turn.prompt_tokens, completion_tokens=turn.completion_tokens,
                  reasoning_tokens=turn.reasoning_tokens, finish_reason=turn.finish_reason)
    if turn.result is not None and turn.result.turn_outcome is not None:
        fields["turn_outcome"] = turn.result.turn_outcome.value


class _EventStreamResponse(web.StreamResponse):
    """A StreamResponse whose status line and headers go out with its first body bytes (one
    send, one segment, one wake-up of the client), as aiohttp's `web.Response` does, instead
    of alone at prepare(). `_SseStream.open` writes at once after prepare(), so nothing
    waits on this."""

    _send_headers_immediately = False


class _SseStream:
    """The SSE response of one turn: opened once (by the handler or the keep-alive task),
    writes timed as waits on the client, and the time of the last write."""

    def __init__(self, request: web.Request, encoder: StreamEncoder) -> None:
        self.request = request
        self.encoder = encoder
        self.response = _EventStreamResponse(headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
            REQUEST_ID_HEADER: request[state.REQUEST_ID],
        })
        self.opened = False
        self._clock: RequestClock = request[state.CLOCK]
        self._lock = asyncio.Lock()  # the open, against the keep-alive task's
        self._loop = asyncio.get_running_loop()
        self.last_write = self._loop.time()
        self._interval = 0.0  # keep-alive interval and bytes (start_keepalive)
        self._keepalive_data = b""
        self._timer: asyncio.TimerHandle | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._keepalive_stopped = False

    async def open(self, first: list[Event] | None = None, *, then: bytes = b"",
                   timed: bool = True) -> None:
        """Prepare the response and write the encoder's start (once), then the events of
        `first` encoded (after the start: encoders number their events), then `then`."""
        async with self._lock:
            if not self.opened:
                self.opened = True
                await self.response.prepare(self.request)
                data = self.encoder.start()
                if first is not None:
                    data += b"".join([self.encoder.encode(event) for event in first])
                # Under the lock: the start goes out before anything the other side writes.
                await self._write(data + then, timed)
                return
        data = (b"".join([self.encoder.encode(event) for event in first])
                if first is not None else b"")
        if data or then:
            await self._write(data + then, timed)

    def _write(self, data: bytes, timed: bool) -> Awaitable[None]:
        return self.write(data) if timed else self._write_untimed(data)

    async def write(self, data: bytes) -> None:
        self.last_write = self._loop.time()
        self._clock.wait_begin()
        await self.response.write(data)
        self._clock.wait_end()

    async def _write_untimed(self, data: bytes) -> None:
        self.last_write = self._loop.time()
        await self.response.write(data)

    def start_keepalive(self, interval_s: float) -> None:
        """Write the encoder's keep-alive whenever nothing was written for `interval_s`
        (opening the stream first if need be), until `stop_keepalive()`.

        A timer checks when the interval would be up; only when the stream was really silent
        for that long does a task write the keep-alive. That task runs only while the handler
        is suspended, which is inside a clock wait (the backend's, or a write's): its writes
        are untimed, or they would break that wait. aiohttp writes each call's bytes at once,
        so a keep-alive never splits an event.
        """
        self._interval = interval_s
        self._keepalive_data = self.encoder.keepalive()
        self._timer = self._loop.call_at(self.last_write + interval_s, self._keepalive_due)

    def _keepalive_due(self) -> None:
        self._timer = None
        if self._keepalive_stopped:
            return
        due = self.last_write + self._interval
        if self._loop.time() < due:  # something was written meanwhile
            self._timer = self._loop.call_at(due, self._keepalive_due)
        else:
            self._keepalive_task = self._loop.create_task(self._write_keepalive())

    async def _write_keepalive(self) -> None:
        await self.open(then=self._keepalive_data, timed=False)
        self._keepalive_task = None
        if not self._keepalive_stopped:
            self._timer = self._loop.call_at(self.last_write + self._interval,
                                             self._keepalive_due)

    async def stop_keepalive(self) -> None:
        self._keepalive_stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._keepalive_task
        if task is not None:  # a keep-alive being written (or one that failed)
            task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
