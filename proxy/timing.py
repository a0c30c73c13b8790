"""Per-request clock: wall time, minus the time spent waiting on the backend or the client.

What is left is the proxy's overhead (dsml_proxy_overhead_seconds): rendering, tokenizing,
parsing, encoding and the event loop's own work for this request.
"""

from __future__ import annotations

import time


class RequestClock:
    __slots__ = ("_wait_started", "first_token_at", "started", "waited")

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.waited = 0.0
        self.first_token_at: float | None = None
        self._wait_started = 0.0

    def wait_begin(self) -> None:
        self._wait_started = time.perf_counter()

    def wait_end(self) -> float:
        now = time.perf_counter()
        self.waited += now - self._wait_started
        return now

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def overhead(self) -> float:
        return max(0.0, self.elapsed() - self.waited)
