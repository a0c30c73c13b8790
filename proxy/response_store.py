"""Server-held conversations, bounded in memory: Responses' `previous_response_id` (and
`GET`/`DELETE /v1/responses/{id}`, `/input_items`) and Anthropic's message threads
(`thread: {"type": "continue", "previous_message_id": …}`).

A stored Responses turn (`StoredResponse`) keeps the chat-shaped message list of its whole
conversation (input and output, without `instructions`, which OpenAI does not carry over),
the response object as it was returned, and its own input items. A follow-up request renders
`stored + its own input`. A stored Anthropic reply (`StoredThread`) keeps the Anthropic
messages up to and including that reply, with the thread's `system` and `tools`, which a
`continue` takes from the thread. Lists share their message dicts with their parents, so a
chain of N turns costs N list headers plus the messages once.

One store for both, bounded two ways: at most `max_entries` entries (oldest evicted first)
and each for at most `ttl_s` seconds after it was stored. Nothing survives a restart.
`store: false` puts nothing here. Values are typed: a `msg_` id sent as a
`previous_response_id` finds nothing, as an unknown id does.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy import state

Messages = list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class StoredResponse:
    messages: Messages  # the conversation so far, chat-shaped (what a follow-up renders)
    response: dict[str, Any]  # the response object as the client received it
    input_items: list[dict[str, Any]]  # this request's input, as OpenAI lists it


@dataclass(frozen=True, slots=True)
class StoredThread:
    messages: list[dict[str, Any]]  # Anthropic messages up to and including the reply
    system: Any  # the thread's `system` and `tools`: a `continue` takes them from here
    tools: Any


class ResponseStore:
    def __init__(self, max_entries: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()  # a big request's get runs on a worker thread

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: str, value: Any) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._expire()
            self._items.pop(key, None)  # a re-put goes to the back (expiry order)
            self._items[key] = (self._clock() + self.ttl_s, value)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def get(self, key: str) -> Any:
        with self._lock:
            self._expire()
            entry = self._items.get(key)
        return None if entry is None else entry[1]

    def delete(self, key: str) -> bool:
        with self._lock:
            self._expire()
            return self._items.pop(key, None) is not None

    def _expire(self) -> None:
        # Insertion order is expiry order (one TTL for all), so only the head can be stale.
        now = self._clock()
        while self._items:
            first = next(iter(self._items.values()))
            if first[0] > now:
                break
            self._items.popitem(last=False)


STORE = web.AppKey("response_store", ResponseStore)


def app_store(app: web.Application) -> ResponseStore:
    """The app's one store, created on first use from its settings."""
    store = app.get(STORE)
    if store is None:
        settings = app[state.SETTINGS]
        store = app[STORE] = ResponseStore(settings.response_store_size,
                                           settings.response_store_ttl_s)
    return store
