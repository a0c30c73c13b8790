"""A fake DeepSeek-V4 engine: a real aiohttp server on 127.0.0.1 replaying recorded output.

It speaks what `proxy.backends.upstream` expects of vLLM: `POST /v1/completions` (streaming
SSE `data: {"choices":[{"text":..., "finish_reason":...}]}` and non-streaming), `/v1/models`,
`/health`. A recorded completion is tokenized with the real V4 tokenizer and streamed one
SSE event per token through the real incremental detokenizer, so tags arrive split exactly
as an engine splits them. Like vLLM it ends at EOS without emitting EOS's text (set
`keep_eos=True` to emit it), applies `stop` strings (excluded from the output) and
`max_tokens` (finish_reason "length"), and says on the finishing choice which stop string
matched in `stop_reason` (null for EOS or length), as vLLM does; `report_stop_reason=False`
leaves the field out, like llama.cpp's and ds4's servers.

    async with FakeUpstream() as fake:
        fake.push("Hello<｜end▁of▁sentence｜>")      # or fake.responder = lambda body: Reply(...)
        backend = UpstreamBackend(fake.url)
        ...
        fake.requests[0]["prompt"]                    # what the proxy sent
        await asyncio.wait_for(fake.disconnected.wait(), 5)

Failures: `Reply(status=500)`, `Reply(close_after_tokens=3)` (drops the connection mid-
stream), `Reply(delay_before_s=2)` (silence before the headers), `Reply(token_delay_s=0.05)`;
`refused_url()` gives a port nobody listens on. With `token_delay_s=0` (the default) it
streams as fast as it can, which is what the benchmark uses.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from dsml.detokenizer import IncrementalDetokenizer
from dsml.markers import EOS
from dsml.tokenizer import V4Tokenizer, load_tokenizer


@dataclass
class Reply:
    text: str = ""
    finish_reason: str | None = None  # None: "stop" (or "length" if max_tokens cut it)
    status: int = 200
    token_delay_s: float | None = None  # None: the server's default
    delay_before_s: float = 0.0
    close_after_tokens: int | None = None


Responder = Callable[[dict[str, Any]], "Reply | str"]


class FakeUpstream:
    def __init__(self, *, token_delay_s: float = 0.0, keep_eos: bool = False,
                 tokenizer: V4Tokenizer | None = None, report_stop_reason: bool = True) -> None:
        self.token_delay_s = token_delay_s
        self.keep_eos = keep_eos
        self.report_stop_reason = report_stop_reason
        self.tokenizer = tokenizer or load_tokenizer()
        self.queue: deque[Reply | str] = deque()
        self.responder: Responder | None = None
        self.requests: list[dict[str, Any]] = []  # every /v1/completions body received
        self.model_ids = ["deepseek-ai/DeepSeek-V4-Flash"]  # what /v1/models lists
        self.models_status = 200
        self.disconnected = asyncio.Event()  # a client went away mid-stream
        self.num_active = 0
        self._runner: web.AppRunner | None = None
        self.url = ""
        self._pieces: dict[str, list[tuple[str, int]]] = {}

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)  # big prompts (issue 14)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def push(self, *replies: Reply | str) -> None:
        self.queue.extend(replies)

    def prompt_text(self, index: int = -1) -> str:
        """The prompt of a received request, as text (ids decoded with special tokens)."""
        prompt = self.requests[index]["prompt"]
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    # -- handlers ---------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        if self.models_status != 200:
            return web.json_response({"error": "loading"}, status=self.models_status)
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": "fake"} for name in self.model_ids]})

    def _next_reply(self, body: dict[str, Any]) -> Reply:
        if self.responder is not None:
            reply: Reply | str = self.responder(body)
        elif self.queue:
            reply = self.queue.popleft()
        else:
            reply = Reply(status=500, text="fake upstream: no scripted completion left")
        return Reply(text=reply) if isinstance(reply, str) else reply

    def pieces(self, text: str) -> list[tuple[str, int]]:
        """(text delta, tokens) per SSE event: one per token, empty deltas merged forward."""
        cached = self._pieces.get(text)
        if cached is not None:
            return cached
        detok = IncrementalDetokenizer(self.tokenizer)
        out: list[tuple[str, int]] = []
        pending = 0
        for token_id in self.tokenizer.encode_generated(text):
            pending += 1
            delta = detok.push(token_id)
            if delta:
                out.append((delta, pending))
                pending = 0
        tail = detok.flush()
        if tail or pending:
            out.append((tail, pending))
        if len(self._pieces) < 4096:
            self._pieces[text] = out
        return out

    def _script(self, reply: Reply, body: dict[str, Any]) -> tuple[list[tuple[str, int]], str]:
        """The events to send and the finish reason, after EOS, stop strings and max_tokens."""
        events, finish, _ = self._plan(reply, body)
        return events, finish

    def _plan(self, reply: Reply, body: dict[str, Any]
              ) -> tuple[list[tuple[str, int]], str, str | None]:
        """`_script` plus the stop string that ended it (vLLM's `stop_reason`), if one did."""
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        max_tokens = body.get("max_tokens")
        events: list[tuple[str, int]] = []
        emitted, num_tokens = "", 0
        finish = reply.finish_reason or "stop"
        for text, n in self.pieces(reply.text):
            if max_tokens is not None and num_tokens + n > max_tokens:
                return events, "length", None
            if not self.keep_eos and EOS in text:
                text = text[: text.index(EOS)]
                if text:
                    events.append((text, n))
                return events, "stop", None
            candidate = emitted + text
            hits = [(h, s) for s in stops
                    if (h := candidate.find(s, max(0, len(emitted) - len(s)))) >= 0]
            if hits:
                at, matched = min(hits, key=lambda hit: hit[0])  # the earliest match cuts
                cut = at - len(emitted)
                if cut > 0:
                    events.append((text[:cut], n))
                return events, "stop", matched
            events.append((text, n))
            emitted = candidate
            num_tokens += n
        return events, finish, None

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        reply = self._next_reply(body)
        if reply.delay_before_s:
            await asyncio.sleep(reply.delay_before_s)
        if reply.status != 200:
            return web.json_response({"error": {"message": reply.text, "type": "server_error"}},
                                     status=reply.status)
        events, finish, matched = self._plan(reply, body)
        num_tokens = sum(n for _, n in events)
        # vLLM puts `stop_reason` on every choice: null until the last, then the matched stop
        # string (or a stop token id; null for EOS).
        stop = {"stop_reason": matched} if self.report_stop_reason else {}
        if not body.get("stream"):
            return web.json_response({
                "id": "cmpl-fake", "object": "text_completion", "model": "fake",
                "choices": [{"index": 0, "text": "".join(t for t, _ in events),
                             "finish_reason": finish, **stop}],
                "usage": {"prompt_tokens": len(body.get("prompt") or ()),
                          "completion_tokens": num_tokens},
            })
        return await self._stream(request, reply, events, finish, body, stop)

    async def _stream(self, request: web.Request, reply: Reply, events: list[tuple[str, int]],
                      finish: str, body: dict[str, Any], stop: dict[str, Any] | None = None
                      ) -> web.StreamResponse:
        stop = stop or {}
        running = dict.fromkeys(stop)  # {"stop_reason": None} while reporting
        delay = self.token_delay_s if reply.token_delay_s is None else reply.token_delay_s
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.num_active += 1
        try:
            for k, (text, _) in enumerate(events):
                if reply.close_after_tokens is not None and k >= reply.close_after_tokens:
                    assert request.transport is not None
                    request.transport.close()  # a crashed engine: no finish, no [DONE]
                    return response
                if delay:
                    await asyncio.sleep(delay)
                last = k == len(events) - 1
                choice = {"index": 0, "text": text, "logprobs": fake_logprobs(body, k, text),
                          "finish_reason": finish if last else None, **(stop if last else running)}
                await response.write(b"data: " + json.dumps({"choices": [choice]}).encode()
                                     + b"\n\n")
            if not events:
                choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish,
                          **stop}
                await response.write(b"data: " + json.dumps({"choices": [choice]}).encode()
                                     + b"\n\n")
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": len(body.get("prompt") or ()),
                         "completion_tokens": sum(n for _, n in events)}
                await response.write(b"data: " + json.dumps({"choices": [], "usage": usage})
                                     .encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnected.set()
            raise
        finally:
            self.num_active -= 1


def fake_logprob(k: int) -> float:
    """The logprob the fake gives its k-th SSE event's token: distinct, so tests can match."""
    return -0.01 * (k + 1)


def fake_logprobs(body: dict[str, Any], k: int, text: str) -> dict[str, Any] | None:
    """Logprobs of the k-th event, in the asking engine's form: vLLM/SGLang's legacy
    completions form for `logprobs: N`, llama.cpp's chat form for `n_probs: N`; the top
    alternatives are the token itself and N-1 made-up ones ("alt1", ...), less likely."""
    lp = fake_logprob(k)
    if isinstance(body.get("logprobs"), int):
        top = {text: lp, **{f"alt{i}": lp - i for i in range(1, body["logprobs"])}}
        return {"tokens": [text], "token_logprobs": [lp], "top_logprobs": [top],
                "text_offset": [0]}
    if isinstance(body.get("n_probs"), int):
        top = [{"id": 0, "token": text, "logprob": lp, "bytes": list(text.encode())}]
        top += [{"id": i, "token": f"alt{i}", "logprob": lp - i, "bytes": []}
                for i in range(1, body["n_probs"])]
        return {"content": [{"id": 0, "token": text, "logprob": lp,
                             "bytes": list(text.encode()), "top_logprobs": top}]}
    return None


def refused_url() -> str:
    """A loopback URL with no listener (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def serve_completions(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> tuple[web.AppRunner, str]:
    """A one-route engine on 127.0.0.1 for tests that script `/v1/completions` byte by
    byte (what FakeUpstream cannot do). Returns the runner (call `cleanup()`) and its URL."""
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"
