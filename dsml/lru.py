"""A thread-safe LRU bounded by entries and by a total size, for the request-path caches
(checked tools, rendered tools sections, tokenized prompt prefixes): each is keyed by
content that clients control, so each needs both bounds."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class SizedLRU(Generic[K, V]):
    """`put(key, value, size)` with the entry's size in the caller's unit (characters,
    bytes); the least recently used entries go first when either bound is passed. An entry
    larger than `max_size` alone, or any entry when `max_entries` is 0, is not kept."""

    def __init__(self, max_entries: int, max_size: int) -> None:
        self.max_entries = max_entries
        self.max_size = max_size
        self.size = 0  # over all entries
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: K, value: V, size: int) -> None:
        if size > self.max_size or self.max_entries <= 0:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (value, size)
            self.size += size
            self._evict()

    def replace(self, key: K, value: V, size: int) -> None:
        """A new value and size for an entry still held (nothing if it is gone): it becomes
        the most recent, and other entries go if the bounds are passed."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            self._entries[key] = (value, size)
            self._entries.move_to_end(key)
            self.size += size - entry[1]
            self._evict()

    def _evict(self) -> None:
        while len(self._entries) > self.max_entries or self.size > self.max_size:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.size -= evicted

    def oldest_first(self) -> list[K]:
        """The keys, least recently used first (what a test of the eviction order reads)."""
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.size = 0

    def __len__(self) -> int:
        return len(self._entries)


__all__ = ["SizedLRU"]
