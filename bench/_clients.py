"""Plain aiohttp clients for bench/proxy.py: stream, count SSE events, time them, check them.

The openai SDK tops out near 6,000 chunks/s on these machines, so it would measure itself.
A timed request does the least a client can: read the body as it comes (`iter_any`), note
when the first bytes and the last arrive, and keep the bytes. Counting the events and
checking what they carry happens afterwards, outside the timings.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass
class Stream:
    case: int
    started: float
    first_at: float  # first body bytes (the first SSE event)
    ended: float
    body: bytes

    @property
    def ttfc(self) -> float:
        return self.first_at - self.started


def count_events(body: bytes) -> int:
    """SSE `data:` events, `[DONE]` not counted. Newlines inside JSON strings are escaped, so
    a raw blank line followed by `data: ` only ever starts an event."""
    n = body.startswith(b"data: ") + body.count(b"\n\ndata: ")
    return n - body.count(b"\n\ndata: [DONE]") - body.startswith(b"data: [DONE]")


async def stream_one(session: aiohttp.ClientSession, url: str, case: int, payload: bytes) -> Stream:
    started = time.perf_counter()
    first_at = 0.0
    parts = []
    async with session.post(url, data=payload, headers=JSON_HEADERS) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.text())[:300]}")
        async for data in resp.content.iter_any():
            if not parts:
                first_at = time.perf_counter()
            parts.append(data)
    return Stream(case, started, first_at, time.perf_counter(), b"".join(parts))


@dataclass
class Phase:
    streams: list[Stream]
    wall_s: float
    chunks: int

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.wall_s

    @property
    def busy_s(self) -> float:
        """The streams' time between first and last bytes, summed (no request setup)."""
        return sum(s.ended - s.first_at for s in self.streams)

    @property
    def in_stream_chunks_per_s(self) -> float:
        busy = self.busy_s
        return self.chunks / busy if busy > 0 else 0.0


async def run_phase(session: aiohttp.ClientSession, url: str, payloads: list[bytes], *,
                    concurrency: int, duration_s: float, min_requests: int) -> Phase:
    """`concurrency` workers stream requests back to back (cases in turn) for `duration_s`
    (and at least `min_requests` requests in all); then every stream is counted."""
    order = itertools.count()
    streams: list[Stream] = []
    start = time.perf_counter()
    deadline = start + duration_s

    async def worker() -> None:
        while True:
            i = next(order)
            if i >= min_requests and time.perf_counter() >= deadline:
                return
            case = i % len(payloads)
            streams.append(await stream_one(session, url, case, payloads[case]))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return Phase(streams, wall, sum(count_events(s.body) for s in streams))


# -- checking what came out --------------------------------------------------------------------


def events(body: bytes) -> list[dict[str, Any]]:
    out = []
    for block in body.split(b"\n\n"):
        if block.startswith(b"data: ") and block != b"data: [DONE]":
            out.append(json.loads(block[6:]))
    return out


def accumulate_chat(body: bytes) -> dict[str, Any]:
    """Rebuild the message from chat chunks the way the openai SDK's accumulator does."""
    calls: dict[int, dict[str, str]] = {}
    content, reasoning, finish, errors = [], [], None, []
    for chunk in events(body):
        if "error" in chunk:
            errors.append(chunk["error"])
            continue
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            content.append(delta.get("content") or "")
            reasoning.append(delta.get("reasoning_content") or "")
            for tc in delta.get("tool_calls") or ():
                call = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
                fn = tc.get("function") or {}
                call["name"] += fn.get("name") or ""
                call["arguments"] += fn.get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    return {"content": "".join(content), "reasoning_content": "".join(reasoning),
            "tool_calls": [calls[i] for i in sorted(calls)], "finish_reason": finish,
            "errors": errors}


def check_chat(body: bytes, expected: dict[str, Any]) -> str | None:
    """None when the streamed tool calls are the expected ones, else what differs."""
    message = accumulate_chat(body)
    if message["errors"]:
        return f"error event: {message['errors'][0]}"
    if message["finish_reason"] != "tool_calls":
        return f"finish_reason {message['finish_reason']!r}"
    got = []
    for call in message["tool_calls"]:
        try:
            got.append({"name": call["name"], "arguments": json.loads(call["arguments"])})
        except json.JSONDecodeError:
            return f"arguments are not JSON: {call['arguments'][:80]!r}"
    if got != expected["tool_calls"]:
        return f"tool calls differ: {json.dumps(got)[:160]}"
    return None


def check_completion(body: bytes) -> str | None:
    """The direct stream ends with a finish reason and [DONE]."""
    if not body.endswith(b"data: [DONE]\n\n"):
        return "no [DONE]"
    finished = any(c.get("finish_reason") for e in events(body) for c in e.get("choices") or ())
    return None if finished else "no finish_reason"
