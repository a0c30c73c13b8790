"""Conversations behind `previous_response_id` (Responses API), bounded in memory.

Each stored response keeps the chat-shaped message list of its whole conversation (input and
output, without `instructions`, which OpenAI does not carry over). A follow-up request
renders `stored + its own input`. Lists share their message dicts with their parents, so a
chain of N turns costs N list headers plus the messages once.

Bounded two ways: at most `max_entries` responses (oldest evicted first) and each for at
most `ttl_s` seconds after it was stored. Nothing survives a restart. `store: false` puts
nothing here.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

Messages = list[dict[str, Any]]


class ResponseStore:
    def __init__(self, max_entries: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, Messages]] = OrderedDict()
        self._lock = threading.Lock()  # a big request's get runs on a worker thread

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response_id: str, messages: Messages) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._expire()
            self._items[response_id] = (self._clock() + self.ttl_s, messages)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> Messages | None:
        with self._lock:
            self._expire()
            entry = self._items.get(response_id)
        return None if entry is None else entry[1]

    def _expire(self) -> None:
        # Insertion order is expiry order (one TTL for all), so only the head can be stale.
        now = self._clock()
        while self._items:
            first = next(iter(self._items.values()))
            if first[0] > now:
                break
            self._items.popitem(last=False)
