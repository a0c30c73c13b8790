"""Reasoning this server produced, remembered by tool-call id, to put back into history.

Many clients drop `reasoning_content` from the assistant messages they send back. With tools
in the request every turn keeps its reasoning in the prompt (dsml.md section 3 item 12), so a
dropped one renders as an empty `<think></think>` and, after a few such turns, the model stops
reasoning. Backfilling what this server itself generated restores the prompt the model saw.
Bounded LRU: the memory stays flat however long the server runs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class ReasoningCache:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, str] = OrderedDict()
        # A big request's rendering (backfill) runs on a worker thread (proxy.routes.common).
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, call_id: str, reasoning: str) -> None:
        if self.max_entries <= 0 or not reasoning:
            return
        with self._lock:
            self._items[call_id] = reasoning
            self._items.move_to_end(call_id)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def get(self, call_id: str) -> str | None:
        with self._lock:
            reasoning = self._items.get(call_id)
            if reasoning is not None:
                self._items.move_to_end(call_id)
        return reasoning

    def backfill(self, messages: list[dict[str, Any]]) -> int:
        """Fill `reasoning_content` of assistant tool-call messages that lack it, in place.

        Returns how many messages were filled. Messages are OpenAI-style dicts (the shape
        every endpoint translates into before rendering).
        """
        filled = 0
        for message in messages:
            if message.get("role") != "assistant" or not message.get("tool_calls"):
                continue
            if message.get("reasoning_content") or message.get("reasoning"):
                continue
            for call in message["tool_calls"]:
                call_id = call.get("id") if isinstance(call, dict) else None
                reasoning = self.get(call_id) if call_id else None
                if reasoning is not None:
                    message["reasoning_content"] = reasoning
                    filled += 1
                    break
        return filled
