"""Translation between the Anthropic / Responses wire formats and what the turn runner takes.

Every endpoint renders through `dsml.render_chat`, so each protocol's request is translated
into the OpenAI-chat-shaped dict it reads (`anthropic.py`, `responses.py`). What both share
lives here: tool-call ids across protocols, and keep-alives while a turn is silent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from dsml.events import Event
from proxy.timing import RequestClock
from proxy.turn import Turn

_CALL = "call_"

# An image a tool returned (Claude Code's Read on a PNG) stays in the history for the rest of
# the session: refusing it would fail every later request, so the model reads this instead.
# An image the user sent is still a 400 (the renderer's), which the user can act on.
IMAGE_OMITTED = {"type": "text", "text": "[image omitted: this model reads text only]"}


def wire_call_id(call_id: str, prefix: str) -> str:
    """The parser's `call_…` id under a protocol's own prefix (`toolu_`): same suffix, so
    `chat_call_id` maps it back and the reasoning cache, keyed by `call_…`, still finds it."""
    return prefix + call_id[len(_CALL):] if call_id.startswith(_CALL) else call_id


def chat_call_id(wire_id: str, prefix: str) -> str:
    return _CALL + wire_id[len(prefix):] if wire_id.startswith(prefix) else wire_id


# -- keep-alive ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """Not a parser event: the turn produced nothing for a keep-alive interval."""


KEEPALIVE = KeepAlive()


class KeepAliveTurn:
    """A `Turn` whose `events()` also yields `KEEPALIVE` while the backend is silent.

    A long prompt's prefill, a DSML block held back inside reasoning or a forced tool choice's
    second phase can keep a stream silent for minutes; proxies and clients (Codex) drop idle
    connections. Everything else is the wrapped turn's, so `stream_turn` takes it as a Turn.
    """

    def __init__(self, turn: Turn, interval_s: float, clock: RequestClock) -> None:
        self._turn = turn
        self._interval_s = interval_s
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._turn, name)

    async def events(self) -> AsyncIterator[Event | KeepAlive]:
        async with aclosing(self._turn.events()) as events:
            pending: asyncio.Future[Event] | None = None
            try:
                while True:
                    if pending is None:
                        pending = asyncio.ensure_future(anext(events))
                    done, _ = await asyncio.wait({pending}, timeout=self._interval_s)
                    if not done:
                        # The turn is inside the clock's backend wait: close that wait before
                        # our own write is timed, and reopen it after, so the keep-alive does
                        # not count the silence as this process's overhead.
                        self._clock.wait_end()
                        yield KEEPALIVE
                        self._clock.wait_begin()
                        continue
                    task, pending = pending, None
                    try:
                        event = task.result()
                    except StopAsyncIteration:
                        return
                    yield event
            finally:
                if pending is not None:
                    # Closed early (client gone, or an error being written): stop the read of
                    # the turn; whatever it ended with is moot now.
                    pending.cancel()
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await pending
