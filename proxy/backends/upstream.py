"""An engine behind HTTP: any server with an OpenAI-style streaming `/v1/completions`.

The proxy renders and tokenizes itself and only asks the engine for raw text, special tokens
kept, so that one renderer and one parser serve every engine. What differs per engine:

| kind     | prompt sent       | keeping special tokens in the output                          |
|----------|-------------------|---------------------------------------------------------------|
| vllm     | token ids         | `skip_special_tokens: false`, `spaces_between_special_tokens: false` |
| sglang   | token ids         | the same two fields                                           |
| llamacpp | text              | start `llama-server` with `--special` (no per-request switch) |
| ds4      | text              | always kept                                                   |

Sampling fields go to each engine in its own spelling of its `/v1/completions` request, and
a field the engine does not take is a 400 naming it (api.md: never silently dropped):

| field              | vllm, sglang            | llamacpp                | ds4     |
|--------------------|-------------------------|-------------------------|---------|
| logprobs (top N)   | `logprobs: N`           | `n_probs: max(N, 1)`    | refused |
| frequency/presence | `frequency_penalty` ... | the same                | refused |
| repetition_penalty | `repetition_penalty`    | `repeat_penalty`        | refused |
| logit_bias         | `{"<id>": bias}`        | `[[id, bias], ...]`     | refused |
| top_k, min_p, seed | the same names          | the same names          | the same |

(vLLM: `vllm/entrypoints/openai/completion/protocol.py`; SGLang:
`sglang/srt/entrypoints/openai/protocol.py`, its CompletionRequest; llama.cpp:
`tools/server/README.md`, whose `n_probs: 0` means none, hence at least 1; ds4-server
documents only the standard sampling fields.) Their logprobs come back per SSE event in the
legacy completions form (`tokens`, `token_logprobs`, `top_logprobs` dicts: vLLM, SGLang) or
the chat form (`content: [{token, logprob, top_logprobs}]`: llama.cpp); both are read.

Token ids are preferred (dsml.md section 4): a text prompt is re-tokenized by the engine,
which matches control strings inside client text. `upstream_prompt = "ids"` sends ids to
llama.cpp too (its `/completion` endpoints accept arrays of token ids).

The engine is always asked to stream, also for non-streaming client requests: one code path,
and a client disconnect closes the upstream connection at once (the engine aborts the
request when its socket closes). HTTP is `proxy.backends.http1`'s (not aiohttp's client: it
costs ~0.2 ms more on the way to the first token).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from dsml.markers import THINK_CLOSE
from proxy.backends.base import (
    BackendError,
    GenerateDelta,
    GenerateRequest,
    TokenLogprob,
    check_sampling,
)
from proxy.backends.constraints import upstream_fields
from proxy.backends.http1 import Http1Client, HttpError, Response
from proxy.settings import Settings, UpstreamKind

log = logging.getLogger("dsml_proxy.backend")

_IDS_BY_DEFAULT = {UpstreamKind.VLLM, UpstreamKind.SGLANG}
_SPECIAL_TOKEN_FIELDS = {"skip_special_tokens": False, "spaces_between_special_tokens": False}
# After `data: [DONE]`, how long the rest of the response (the end of its chunked body) may
# take, and how much it may hold, for its connection to go back to the pool.
_DRAIN_TIMEOUT_S = 5.0
_DRAIN_MAX_BYTES = 65536
_MAX_MODEL_IDS = 64
_OPENAI_SAMPLING = frozenset({"top_k", "seed", "frequency_penalty", "presence_penalty",
                              "repetition_penalty", "min_p", "logit_bias", "logprobs"})
SAMPLING_FIELDS = {  # what each kind takes (see the table above)
    UpstreamKind.VLLM: _OPENAI_SAMPLING,
    UpstreamKind.SGLANG: _OPENAI_SAMPLING,
    UpstreamKind.LLAMACPP: _OPENAI_SAMPLING,
    UpstreamKind.DS4: frozenset({"top_k", "seed", "min_p"}),
}
_SPELLING = {UpstreamKind.LLAMACPP: {"repetition_penalty": "repeat_penalty", "logprobs": "n_probs"}}
# What an event the engine should not have sent raises while it is decoded: bad JSON or
# UTF-8 (ValueError), a wrong shape, `Infinity` in a count (OverflowError), JSON nested
# deeper than the decoder can go (RecursionError). Each is a 502, never a 500.
_BAD_EVENT = (ValueError, AttributeError, TypeError, OverflowError, RecursionError)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _matched_stop(choice: dict[str, Any]) -> str | None:
    """The stop string that ended a choice, where the engine says: vLLM's `stop_reason` and
    SGLang's `matched_stop` hold the matched stop string, a stop token id (an int: EOS
    included, for SGLang) or null. llama.cpp's and ds4's /v1/completions do not say."""
    stop = choice.get("stop_reason", choice.get("matched_stop"))
    return stop if isinstance(stop, str) else None


class UpstreamBackend:
    def __init__(
        self,
        base_url: str,
        kind: UpstreamKind = UpstreamKind.VLLM,
        *,
        model: str | None = None,  # None: the first of the engine's /v1/models
        prompt_format: str | None = None,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 600.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # Users copy OpenAI-style base URLs, which end in /v1; the engine's paths are added
        # here (/v1/completions, /v1/models, /health), so a trailing /v1 would double.
        self.base_url = self.base_url.removesuffix("/v1")
        self.kind = UpstreamKind(kind)
        self.name = f"upstream:{self.kind.value}"
        self.sampling_fields = SAMPLING_FIELDS[self.kind]
        self.model = model
        self.send_ids = (prompt_format or ("ids" if self.kind in _IDS_BY_DEFAULT else "text")) == "ids"
        # A bad URL raises ValueError here, when the proxy starts.
        self._client = Http1Client(self.base_url, connect_timeout_s=connect_timeout_s,
                                   read_timeout_s=read_timeout_s)
        self._model_checked = model is not None
        # Set once the engine refused a grammar and took the same request without it: it
        # is not running llguidance (proxy.backends.constraints), so none is sent again.
        self._grammar_refused = False
        self._model_configured = model is not None
        # The engine's own model ids, as its /v1/models last listed them: served under these
        # names too (proxy.models), so clients that talked to the engine keep their `model`.
        self.model_ids: list[str] = []
        self._draining: set[asyncio.Task[None]] = set()  # see _release_when_done

    @classmethod
    def from_settings(cls, settings: Settings) -> UpstreamBackend:
        if not settings.upstream:
            raise ValueError("UpstreamBackend needs settings.upstream (a base URL)")
        return cls(
            settings.upstream,
            settings.upstream_kind,
            model=settings.upstream_model,
            prompt_format=settings.upstream_prompt,
            connect_timeout_s=settings.upstream_connect_timeout_s,
            read_timeout_s=settings.upstream_read_timeout_s,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """List the engine's model ids once (an engine still loading is asked again later:
        `ready()`, an unknown model name). Connections open on first use (no limit on their
        number: the proxy's own concurrency limit bounds the requests)."""
        await self.refresh_models()

    async def close(self) -> None:
        for task in list(self._draining):
            task.cancel()
        await self._client.close()

    async def _get(self, path: str) -> tuple[int, bytes]:
        async with asyncio.timeout(5):
            resp = await self._client.request("GET", path, timeout_s=5)
            try:
                body = await resp.read(1 << 20)
            except BaseException:
                resp.close()
                raise
        resp.release()
        return resp.status, body

    async def ready(self) -> bool:
        """The engine lists its models (which refreshes `model_ids`) or answers /health."""
        if await self.refresh_models():
            return True
        try:
            status, _ = await self._get("/health")
        except (OSError, TimeoutError, HttpError):
            return False
        return status == 200

    async def refresh_models(self) -> bool:
        """Ask the engine's /v1/models for its ids: True when it listed them. The first id is
        also the `model` sent upstream unless one was configured (vLLM and SGLang want the
        served model's name)."""
        try:
            status, body = await self._get("/v1/models")
            if status != 200:
                # 404: an engine without /v1/models, not asked again on use; anything else
                # (503 while loading) is asked again.
                self._model_checked = self._model_checked or status == 404
                return False
            data = json.loads(body).get("data") or []
            ids = [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except (OSError, TimeoutError, HttpError, ValueError, AttributeError, TypeError):
            return False
        # Bounded: the names end up in every /v1/models answer and every 404 message.
        self.model_ids = [name for name in ids if 0 < len(name) <= 256][:_MAX_MODEL_IDS]
        if not self._model_configured and self.model_ids:
            self.model = self.model_ids[0]
        self._model_checked = True
        return True

    # -- generation -----------------------------------------------------------------------------

    def build_body(self, req: GenerateRequest) -> dict[str, Any]:
        if self.send_ids and req.prompt_ids is not None:
            prompt: Any = req.prompt_ids
        elif req.prompt_text is not None:
            prompt = req.prompt_text
        else:
            raise ValueError("GenerateRequest has neither prompt_ids nor prompt_text")
        s = req.sampling
        body: dict[str, Any] = {"prompt": prompt, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.model:
            body["model"] = self.model
        spelling = _SPELLING.get(self.kind, {})
        for key in ("max_tokens", "temperature", "top_p", "top_k", "seed", "min_p",
                    "frequency_penalty", "presence_penalty", "repetition_penalty"):
            value = getattr(s, key)
            if value is not None:
                body[spelling.get(key, key)] = value
        if s.logit_bias is not None:
            body["logit_bias"] = ([[tid, bias] for tid, bias in s.logit_bias.items()]
                                  if self.kind is UpstreamKind.LLAMACPP
                                  else {str(tid): bias for tid, bias in s.logit_bias.items()})
        if s.logprobs is not None:
            body[spelling.get("logprobs", "logprobs")] = (
                max(1, s.logprobs) if self.kind is UpstreamKind.LLAMACPP else s.logprobs)
        if s.stop:
            body["stop"] = list(s.stop)
        if self.kind in _IDS_BY_DEFAULT:
            body.update(_SPECIAL_TOKEN_FIELDS)
            if req.return_token_ids:
                # vLLM and SGLang then put the ids of each event's tokens in the choice's
                # `token_ids` (vLLM also echoes the prompt's in the first event).
                body["return_token_ids"] = True
        if self.kind is UpstreamKind.VLLM and isinstance(prompt, str):
            # vLLM's /v1/completions adds the tokenizer's BOS to a text prompt by default; the
            # rendered prompt already starts with it (text goes out for dialects whose
            # tokenizer the proxy lacks, proxy.turn.sends_ids, or with upstream_prompt=text).
            body["add_special_tokens"] = False
        grammar = None if self._grammar_refused else req.grammar
        body.update(upstream_fields(self.kind, grammar))  # constrained decoding
        return body

    def encode_body(self, req: GenerateRequest) -> bytes:
        """`build_body(req)` as JSON bytes; prompt ids go in as `req.prompt_ids_json` where
        the request carries them so (the same array, not serialized again)."""
        body = self.build_body(req)
        ids_json = req.prompt_ids_json
        if ids_json is not None and body["prompt"] is req.prompt_ids:
            del body["prompt"]
            return ('{"prompt":' + ids_json + "," + json.dumps(body)[1:]).encode()
        return json.dumps(body).encode()

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        check_sampling(self.name, self.sampling_fields, req.sampling)
        if not self._model_checked:
            # The engine was not listing models at start (still loading): ask on first use.
            # No answer: asked again next time, and generate reports the failure.
            await self.refresh_models()
        resp = await self._post(req)
        if resp.status == 400 and req.grammar is not None and not self._grammar_refused:
            # An engine not set up for llguidance grammars refuses them: the turn goes on
            # unconstrained (a drop-in proxy must not break a working engine), and if the
            # engine takes the request without the grammar, none is sent to it again.
            refusal = await self._error_text(resp)
            resp.close()
            self._grammar_refused = True
            resp = await self._post(req)
            if resp.status == 200:
                log.warning("the engine refused the constrained-decoding grammar, so turns go "
                            "to it unconstrained (start it with llguidance, see the README, or "
                            "set constrained_decoding = off): %s", refusal)
            else:
                self._grammar_refused = False  # the refusal was about something else
        finished = False
        try:
            if resp.status != 200:
                raise BackendError("status", f"the engine answered HTTP {resp.status}",
                                   status=resp.status, detail=await self._error_text(resp))
            async for delta in self._read_stream(resp, req.sampling.logprobs):
                yield delta
            finished = True
        finally:
            if finished and not resp.at_eof:
                self._release_when_done(resp)
            elif finished:
                resp.release()
            else:
                # On cancellation, an error or an early aclose() this drops the socket at
                # once, so the engine sees the disconnect and aborts.
                resp.close()

    async def _post(self, req: GenerateRequest) -> Response:
        try:
            return await self._client.request("POST", "/v1/completions", self.encode_body(req),
                                              content_type="application/json")
        except TimeoutError as exc:
            raise BackendError("timeout", "no response within the timeout") from exc
        except OSError as exc:  # refused, unreachable, a TLS failure
            raise BackendError("connect", "cannot connect to the engine",
                               detail=f"{type(exc).__name__}: {exc}") from exc
        except HttpError as exc:
            raise BackendError("stream", "the engine sent a bad HTTP response",
                               detail=str(exc)) from exc

    @staticmethod
    async def _error_text(resp: Response) -> str:
        """The start of an error answer's body, for the log (never shown to clients)."""
        try:
            return (await resp.read(4096)).decode("utf-8", "replace")[:500]
        except (TimeoutError, HttpError):
            return ""

    def _release_when_done(self, resp: Response) -> None:
        """The stream ended with `data: [DONE]`, and the end of the body (the last chunk of
        its chunked encoding) is still on its way. Closing now would throw the connection
        away, and the next request would have to open a new one (a TCP handshake and
        a new connection's setup on the path to its first token: ~0.5-1 ms here). So the
        end is awaited beside the turn, which goes on at once, and the connection then goes
        back to the pool; if more than a few bytes or nothing come within a few seconds,
        the connection is closed instead."""
        task = asyncio.ensure_future(self._drain(resp))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    @staticmethod
    async def _drain(resp: Response) -> None:
        try:
            left = _DRAIN_MAX_BYTES
            async with asyncio.timeout(_DRAIN_TIMEOUT_S):
                while not resp.at_eof and left > 0:
                    left -= len(await resp.read_some())
        except asyncio.CancelledError:
            resp.close()
            raise
        except Exception:  # a timeout, a broken connection: not worth keeping
            resp.close()
            return
        resp.release()  # back to the pool at the body's end, else closed

    async def _read_stream(self, resp: Response,
                           top_logprobs: int | None = None) -> AsyncIterator[GenerateDelta]:
        # Whatever is buffered is read at once: at speed an engine's events arrive many to a
        # read, and they go on as merged deltas (see SseReader), not one per token. Each
        # delta goes out as soon as its events are decoded: the stream's first token before
        # anything after it in the same read is even decoded.
        reader = SseReader(top_logprobs=top_logprobs)
        out: list[GenerateDelta] = []
        try:
            while chunk := await resp.read_some():
                reader.push(chunk)
                while reader.pending:
                    error: Exception | None = None
                    try:
                        reader.take(out)
                    except (BackendError, *_BAD_EVENT) as exc:
                        error = exc  # after what the read held before the bad event
                    if out:
                        for delta in out:
                            yield delta
                        out.clear()
                    if error is not None:
                        raise error
                if reader.done:
                    return
            reader.end(out)  # an event the stream did not terminate
            for delta in out:
                yield delta
        except TimeoutError as exc:
            raise BackendError("timeout", "no data from the upstream within the read timeout") from exc
        except (HttpError, OSError) as exc:  # ConnectionLost included
            raise BackendError("stream", "the engine's stream broke",
                               detail=f"{type(exc).__name__}: {exc}") from exc
        except _BAD_EVENT as exc:  # JSONDecodeError, UnicodeDecodeError, Infinity, deep nesting
            raise BackendError("stream", "the engine sent an unreadable event",
                               detail=f"{type(exc).__name__}: {str(exc)[:500]}") from exc
        if reader.done:
            return
        if reader.finish is None:
            raise BackendError("stream", "upstream closed the stream before finishing")


@dataclass(slots=True)
class MergedDelta(GenerateDelta):
    """The delta of several SSE events: `parts` are their texts, one token each (`num_tokens`
    may be larger: the engine's usage correction). The turn runner uses them to stop after
    the first tool call exactly where one delta per event would have."""

    parts: list[str] = field(default_factory=list)
    # With logprobs asked for: the entries of each part (an event may carry several tokens').
    part_logprobs: list[list[TokenLogprob]] | None = None


def parse_logprobs(data: Any, top_n: int) -> list[TokenLogprob]:
    """An SSE event's `logprobs` -> entries, each with at most `top_n` alternatives.

    Two shapes: the legacy completions form (vLLM, SGLang: parallel `tokens`,
    `token_logprobs` and `top_logprobs` lists, the latter of {token: logprob} dicts) and the
    chat form (llama.cpp: `content: [{token, logprob, top_logprobs: [{token, logprob}]}]`).
    A token without a logprob (null) is skipped."""
    out: list[TokenLogprob] = []
    if not isinstance(data, dict):
        return out
    content = data.get("content")
    if isinstance(content, list):
        for item in content:
            lp = item.get("logprob")
            if isinstance(lp, int | float):
                tops = [(t.get("token", ""), float(t["logprob"]))
                        for t in item.get("top_logprobs") or ()
                        if isinstance(t.get("logprob"), int | float)]
                out.append(TokenLogprob(str(item.get("token", "")), float(lp),
                                        _best(tops, top_n)))
        return out
    tokens = data.get("tokens") or ()
    lps = data.get("token_logprobs") or ()
    tops_list = data.get("top_logprobs") or ()
    for k, (token, lp) in enumerate(zip(tokens, lps, strict=False)):
        if isinstance(lp, int | float):
            tops = tops_list[k] if k < len(tops_list) else None
            pairs = [(t, float(v)) for t, v in tops.items()] if isinstance(tops, dict) else []
            out.append(TokenLogprob(str(token), float(lp), _best(pairs, top_n)))
    return out


def _best(pairs: list[tuple[str, float]], n: int) -> tuple[tuple[str, float], ...]:
    return tuple(sorted(pairs, key=lambda p: -p[1])[:n])


class SseReader:
    """The engine's SSE byte stream -> merged `GenerateDelta`s (pure, no I/O).

    `push(chunk)` buffers the bytes of one read and splits off its complete events, without
    decoding them; `take(out)` decodes the next of them and appends their delta(s) to `out`;
    `pending` says whether complete events are still waiting. `feed(chunk, out)` is both:
    every complete event of the read, decoded. Events may be split anywhere across reads;
    lines may end in `\n`, `\r\n` or `\r`; comment lines (`:`) and other fields are skipped;
    the `data:` lines of one event are joined with `\n` (the SSE rules). `data: [DONE]` sets
    `done`, and nothing after it is read.

    A delta merges several events: texts joined, token counts summed, the finish reason and
    stop string of the last event that has one. The events one `take` decodes are decoded
    by one `json.loads` of a JSON array. Should that fail (or not give one value per event),
    they are decoded one by one, and the bad event raises (ValueError, or BackendError for an
    `error` event) once `out` holds the delta of the events before it.

    How much one `take` decodes, and where a delta ends:

    - Until the stream's first token, one event: the first token goes out alone, before
      anything after it in the same read is decoded. A proxy busy enough to find the whole
      completion in one read would otherwise decode, parse and encode all of it before the
      client's first chunk.
    - After it, 4 events, then 16, then at most `max_merge` (64: about 1 ms of work
      downstream), which bounds the time a chunk waits for the rest of its delta. The small
      steps first keep the first chunk quick when it needs more than one token (a chat turn
      that opens with a tool call needs ~15-18, the call's name): those are decoded a few
      at a time, not with the whole read.
    - A delta also ends after `max_merge` tokens, and after an event whose text holds
      `</think>`: the turn counts the tokens of a delta as reasoning when the delta starts
      inside reasoning, so that count is the same as with one delta per event.

    Nothing else depends on how text is cut (the DSML parser is chunking-invariant), and a
    slow engine still gives one token per read.
    """

    __slots__ = ("_buf", "_cr", "_data", "_end", "_pos", "_size", "_started", "done", "finish",
                 "max_merge", "num_counted", "top_logprobs")

    def __init__(self, max_merge: int = 64, top_logprobs: int | None = None) -> None:
        self.max_merge = max_merge
        self.top_logprobs = top_logprobs  # None: logprobs not asked for (any sent are ignored)
        self._started = False  # the first token went out
        self._buf = b""
        self._cr = False  # the last read ended in "\r": maybe half of a "\r\n"
        self._data = b""  # _data[_pos:_end]: complete events not decoded yet
        self._pos = self._end = 0
        self._size = min(4, max_merge)  # events the next take decodes, once started
        self.done = False
        self.finish: str | None = None  # "stop" | "length" once an event said so
        self.num_counted = 0

    def feed(self, chunk: bytes, out: list[GenerateDelta]) -> None:
        """Every complete event of the stream so far, decoded into `out`."""
        self.push(chunk)
        while self.pending:
            self.take(out)

    def push(self, chunk: bytes) -> None:
        if self.done or not chunk:
            return
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk = chunk[:-1]
                self._cr = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf + chunk if self._buf else chunk
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self._buf = buf
            return
        self._buf = buf[cut + 2:]
        # Complete events, separated by blank lines: _data[_pos:_end], not copied out of the
        # read; take() cuts them off as it needs them.
        if self._pos < self._end:
            self._data = self._data[self._pos:self._end] + b"\n\n" + buf[:cut]
            self._pos, self._end = 0, len(self._data)
        else:
            self._data, self._pos, self._end = buf, 0, cut

    @property
    def pending(self) -> bool:
        """Complete events wait to be decoded (and the stream is not done)."""
        return self._pos < self._end and not self.done

    def take(self, out: list[GenerateDelta]) -> None:
        """Decode the next events (see the class): one until the first token, then 4, 16
        and from then on `max_merge`."""
        if self._started:
            size = self._size
            self._size = min(self.max_merge, size * 4)
        else:
            size = 1
        data, pos, end = self._data, self._pos, self._end
        at, n = pos, 1
        while True:  # the end of the size-th event from pos (or of the last one)
            sep = data.find(b"\n\n", at, end)
            if sep < 0:
                self._data, self._pos, self._end = b"", 0, 0
                sep = end
                break
            if n == size:
                self._pos = sep + 2
                break
            at, n = sep + 2, n + 1
        if not self.done:
            self._events(data[pos:sep], n, out)

    def end(self, out: list[GenerateDelta]) -> None:
        """End of the stream: a last event with no blank line after it still counts."""
        while self.pending:
            self.take(out)
        buf, self._buf = self._buf, b""
        if not self.done and buf.strip():
            self._events(buf, 1, out)

    def _events(self, region: bytes, n: int, out: list[GenerateDelta]) -> None:
        """Decode the `n` events of `region` (separated by blank lines) into `out`."""
        # The usual case: one `data: {...}` line per event. Then the payloads are the bytes
        # between the `data: ` prefixes, and they join into a JSON array by one replacement
        # (no [DONE] among them: each one starts with "{").
        if (region.startswith(b"data: {") and region.count(b"\n") == 2 * (n - 1)
                and (n == 1 or region.count(b"\n\ndata: {") == n - 1)):
            try:
                decoded = (json.loads(region[6:]) if n == 1 else
                           json.loads(b"[" + region[6:].replace(b"\n\ndata: ", b",") + b"]"))
            except ValueError:
                decoded = None
            if decoded is not None and (n == 1 or len(decoded) == n):
                self._merge([decoded] if n == 1 else decoded, out, b"\\u" in region)
                return
        payloads = []
        for event in region.split(b"\n\n"):
            if event.startswith(b"data: ") and b"\n" not in event:
                payloads.append(event[6:])  # one data line
            elif event:
                data = [line[5:].strip() for line in event.split(b"\n")
                        if line.startswith(b"data:")]
                if data:
                    payloads.append(b"\n".join(data))
        if not payloads:
            return
        for k, payload in enumerate(payloads):
            if payload[:1] != b"{" and payload.strip() == b"[DONE]":
                del payloads[k:]
                self.done = True
                break
        if len(payloads) == 1:
            self._merge([json.loads(payloads[0])], out, b"\\u" in region)
            return
        try:
            decoded = json.loads(b"[" + b",".join(payloads) + b"]")
        except ValueError:
            decoded = None
        if decoded is not None and len(decoded) == len(payloads):
            self._merge(decoded, out, b"\\u" in region)
            return
        good = []
        try:
            for payload in payloads:
                good.append(json.loads(payload))
        finally:  # what came before the bad event goes out first
            self._merge(good, out, b"\\u" in region)

    def _merge(self, events: list[Any], out: list[GenerateDelta], escaped: bool = False) -> None:
        """`escaped`: the events' bytes hold a `\\u` escape, so a text may hold a lone
        surrogate (an escaped pair is one character once decoded): it becomes U+FFFD, as
        invalid UTF-8 from an engine does, instead of failing every encoder downstream."""
        texts: list[str] = []
        top_n = self.top_logprobs
        lps: list[list[TokenLogprob]] | None = None if top_n is None else []
        num = 0
        finish = stop = None
        ids: list[int] | None = None  # the events' `token_ids`, where the engine sends them
        counted, started, max_merge = self.num_counted, self._started, self.max_merge
        try:
            for data in events:
                if "error" in data:
                    raise BackendError("stream", "the engine reported an error",
                                       detail=str(data["error"])[:500])
                for choice in data.get("choices") or ():
                    text = choice.get("text")
                    if escaped and text and _LONE_SURROGATE.search(text):
                        text = _LONE_SURROGATE.sub("\ufffd", text)
                    token_ids = choice.get("token_ids")
                    if type(token_ids) is list:
                        ids = token_ids if ids is None else ids + token_ids
                    if text:
                        texts.append(text)
                        num += 1
                        counted += 1
                        if lps is not None:
                            lps.append(parse_logprobs(choice.get("logprobs"), top_n or 0))
                    reason = choice.get("finish_reason")
                    if reason is not None:
                        finish = self.finish = "length" if reason == "length" else "stop"
                        stop = _matched_stop(choice) if finish == "stop" else None
                    if text and (not started or THINK_CLOSE in text or len(texts) >= max_merge):
                        started = True
                        out.append(_merged(texts, num, finish, stop, lps, ids))
                        texts, num, finish, stop, ids = [], 0, None, None, None
                        lps = None if lps is None else []
                usage = data.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    # SSE events can carry several tokens (speculative decoding, batching):
                    # the engine's own count is authoritative.
                    missing = int(usage["completion_tokens"]) - counted
                    if missing > 0:
                        counted += missing
                        num += missing
        finally:
            self.num_counted, self._started = counted, started
            if texts or num or finish is not None or ids:
                out.append(_merged(texts, num, finish, stop, lps, ids))


def _merged(texts: list[str], num: int, finish: str | None, stop: str | None,
            lps: list[list[TokenLogprob]] | None, ids: list[int] | None) -> MergedDelta:
    flat = None if lps is None else [e for p in lps for e in p]
    return MergedDelta("".join(texts), num, finish, stop, logprobs=flat, token_ids=ids,
                       parts=texts, part_logprobs=lps)
