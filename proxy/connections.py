"""Client connections, bounded: how many may be open, and how long a request may take to come.

aiohttp closes a connection that idles between requests after its keep-alive timeout, but
gives a request as long as it likes to arrive, and takes any number of connections: a client
that connects and says nothing, or sends a header byte a minute, holds its socket for good,
and enough of them hold every file descriptor. So each connection's protocol is wrapped:

- past `max_connections` open ones, a new connection gets a 503 and is closed at once;
- a connection that has not delivered a request's headers `timeout_s` after it opened, or
  after the first bytes of its next request, is closed (the handler's start disarms the
  timer: `request_started`, from `guard_middleware`; a slow body is `read_json`'s 408).

Only the asyncio Protocol interface is used: the wrapper forwards every callback to aiohttp's
own protocol, which keeps the real transport.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

_BUSY_BODY = json.dumps({"error": {
    "message": "too many open connections; retry later", "type": "service_unavailable",
    "param": None, "code": "too_many_connections"}}).encode()
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
         + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class ConnectionGuard:
    def __init__(self, max_connections: int, timeout_s: float) -> None:
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.num_open = 0
        self.num_refused = 0  # over the limit
        self.num_timed_out = 0  # no complete request in time
        self._by_transport: dict[Any, _GuardedProtocol] = {}

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _GuardedProtocol(factory(), self)

    def request_started(self, transport: Any) -> None:
        conn = self._by_transport.get(transport)
        if conn is not None:
            conn.busy += 1
            conn.disarm()

    def request_done(self, transport: Any) -> None:
        conn = self._by_transport.get(transport)
        if conn is not None:
            conn.busy -= 1


class _GuardedProtocol(asyncio.Protocol):
    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        self.busy = 0  # requests being handled

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        guard = self._guard
        if guard.num_open >= guard.max_connections:
            self._refused = True
            guard.num_refused += 1
            transport.write(_BUSY)
            transport.close()
            return
        self._transport = transport
        guard.num_open += 1
        guard._by_transport[transport] = self
        self._inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if not self.busy and self._timer is None:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self._refused else self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self.disarm()
        self._guard.num_open -= 1
        self._guard._by_transport.pop(self._transport, None)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._guard.timeout_s, self._expire)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if not self.busy and self._transport is not None:
            self._guard.num_timed_out += 1
            self._transport.close()


GUARD = web.AppKey("connection_guard", ConnectionGuard)


@web.middleware
async def guard_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Tells the guard a request's headers are in (its timer stops) and when it is done."""
    guard = request.app.get(GUARD)
    transport = request.transport
    if guard is None or transport is None:
        return await handler(request)  # type: ignore[no-any-return]
    guard.request_started(transport)
    try:
        return await handler(request)  # type: ignore[no-any-return]
    finally:
        guard.request_done(transport)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose sites serve through the app's ConnectionGuard."""

    @property
    def server(self) -> Any:
        server = super().server
        guard = self.app.get(GUARD)
        return server if server is None or guard is None else guard.wrap(server)
