"""A fast fake vLLM for bench/proxy.py: recorded DeepSeek-V4 output, pre-encoded, own process.

tests/fakes/upstream.py is the faithful fake (stop strings, max_tokens, failures); it builds
and json.dumps every SSE event per token while streaming, which would make the upstream, not
the proxy, the thing measured. This one does all of that once at start-up: every completion
is tokenized with the V4 tokenizer, detokenized incrementally (tags split as an engine splits
them) and turned into vLLM `/v1/completions` SSE bytes, one event per token. A request then
costs two writes: the first event alone (so time to first chunk means something), then the
rest of the stream in one buffer.

Which completion a request gets: `seed` modulo the number of cases. The proxy passes a chat
request's `seed` through to the engine unchanged, so a client knows what its stream holds
without the fake decoding the prompt. `stop` and `max_tokens` are ignored (the benchmark sends
neither). Like vLLM, generation ends at EOS without emitting EOS's text.

Runs in its own process (`start()`), so that the proxy's CPU time is measured on its own.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import socket
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "data" / "dsml" / "parse.jsonl"
EOS = "<｜end▁of▁sentence｜>"  # dsml.markers.EOS; not imported so the parent skips dsml
DONE = b"data: [DONE]\n\n"


def load_cases(limit: int | None = None) -> list[dict[str, Any]]:
    """The tool-call cases of the corpus (the parser has real work on every one), in order."""
    with open(CORPUS, encoding="utf-8") as f:
        cases = [c for c in map(json.loads, f) if c["expected"]["tool_calls"]]
    return cases[:limit] if limit else cases


@dataclass
class Stream:
    head: bytes  # the first SSE event
    rest: bytes  # every later token event (the last one carries finish_reason)
    num_events: int
    num_tokens: int


def _event(text: str, finish: str | None) -> bytes:
    # The fields vLLM sends (so the proxy decodes a realistically sized object).
    return b"data: " + json.dumps({
        "id": "cmpl-bench", "object": "text_completion", "created": 1700000000,
        "model": "deepseek-v4",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                     "stop_reason": None}],
        "usage": None,
    }, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def encode_stream(completion: str) -> Stream:
    from dsml.detokenizer import IncrementalDetokenizer
    from dsml.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    detok = IncrementalDetokenizer(tokenizer)
    texts: list[str] = []
    pending = ""  # a token that ends mid-character yields "": merged into the next event
    num_tokens = 0
    for token_id in tokenizer.encode_generated(completion):
        num_tokens += 1
        pending += detok.push(token_id)
        if not pending:
            continue
        if EOS in pending:
            pending = pending[: pending.index(EOS)]
            break
        texts.append(pending)
        pending = ""
    pending += detok.flush()
    if pending and EOS not in pending:
        texts.append(pending)
    events = [_event(t, None) for t in texts[:-1]] + [_event(texts[-1], "stop")]
    return Stream(events[0], b"".join(events[1:]), len(events), num_tokens)


def _usage(prompt_tokens: int, completion_tokens: int) -> bytes:
    return b"data: " + json.dumps({
        "id": "cmpl-bench", "object": "text_completion", "created": 1700000000,
        "model": "deepseek-v4", "choices": [],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }, separators=(",", ":")).encode() + b"\n\n"


def make_app(streams: list[Stream]) -> Any:
    from aiohttp import web

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        stream = streams[int(body.get("seed") or 0) % len(streams)]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(stream.head)
        tail = stream.rest
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt = body.get("prompt")
            tail += _usage(len(prompt) if isinstance(prompt, list) else 0, stream.num_tokens)
        await response.write(tail + DONE)
        await response.write_eof()
        return response

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "deepseek-v4", "object": "model", "owned_by": "bench"}]})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    return app


async def _serve(sock: socket.socket, conn: Connection, limit: int | None) -> None:
    from aiohttp import web

    # The socket listens already (connections wait in its backlog): the parent has started
    # the proxy while the corpus was being encoded here.
    streams = [encode_stream(c["completion"]) for c in load_cases(limit)]
    runner = web.AppRunner(make_app(streams), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    conn.send([s.num_events for s in streams])
    await watch_parent()
    await runner.cleanup()


async def watch_parent() -> None:
    """Return when the benchmark process is gone or asks us to stop (never outlive it)."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(0.5)


def _main(conn: Connection, limit: int | None) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    conn.send({"url": f"http://127.0.0.1:{sock.getsockname()[1]}", "pid": os.getpid()})
    asyncio.run(_serve(sock, conn, limit))


class Engine:
    """The fake engine's process: `url` and `pid` at once, `events()` when it serves."""

    def __init__(self, limit: int | None = None) -> None:
        ctx = mp.get_context("spawn")  # no inherited event loop, sockets or threads
        self._conn, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=_main, args=(child_end, limit), daemon=True,
                                name="bench-fake-engine")
        self.proc.start()
        info = self._recv(60)
        self.url: str = info["url"]
        self.pid: int = info["pid"]

    def _recv(self, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.2):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the fake engine died or did not answer ({timeout_s} s)")
        return self._conn.recv()

    def events(self) -> list[int]:
        """SSE events (tokens) of each case's stream, once the corpus is encoded."""
        return self._recv(300)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(5)
