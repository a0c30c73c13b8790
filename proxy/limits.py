"""Concurrency limit with a bounded queue: past both, a request is refused with 429.

Waiting costs the client nothing but time, so up to `max_queue` requests wait for a slot;
refusing beyond that keeps memory and latency bounded, and `Retry-After` tells well-behaved
clients (the openai SDK honours it) when to try again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from proxy.errors import ApiError
from proxy.timing import RequestClock


class ConcurrencyLimiter:
    def __init__(self, max_concurrency: int, max_queue: int, retry_after_s: int = 1) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self.num_waiting = 0

    @asynccontextmanager
    async def slot(self, clock: RequestClock | None = None) -> AsyncIterator[None]:
        """Hold a generation slot; time spent queueing is a wait on `clock` (not overhead)."""
        if self._semaphore.locked() and self.num_waiting >= self.max_queue:
            raise ApiError(
                429,
                f"server busy: {self.max_concurrency} turns running and {self.num_waiting} "
                "waiting; retry later",
                code="overloaded",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.num_waiting += 1
        if clock is not None:
            clock.wait_begin()
        try:
            await self._semaphore.acquire()
        finally:
            self.num_waiting -= 1
            if clock is not None:
                clock.wait_end()
        try:
            yield
        finally:
            self._semaphore.release()
