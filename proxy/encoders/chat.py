"""Chat Completions encoding: SSE chunks per event, or one JSON body for the whole turn.

Streaming rules (api.md), which the openai SDK's accumulator relies on: the first chunk
carries the role; tool-call indices run 0..n-1 in order of appearance; `id`, `type` and
`function.name` appear once, in a call's first delta (with `arguments: ""`); later deltas
carry only `index` and an `arguments` fragment; one tool-call entry per chunk; the
`finish_reason` comes on a final chunk with an empty delta; with `include_usage` one more
chunk has `choices: []` and the usage, every earlier chunk `usage: null`; `id`, `created` and
`model` never change. Reasoning goes out as both `reasoning_content` (DeepSeek, LiteLLM) and
`reasoning` (vLLM, Ollama).

Chunks are built as strings around a fixed prefix: json.dumps of only the new text per event
keeps the per-chunk cost to a few microseconds (the benchmark of issue 3 counts them).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from dsml.events import ContentDelta, Event, ReasoningDelta, ToolCallArgsDelta, ToolCallStart
from proxy.errors import ApiError, sse_error_event
from proxy.logprobs import ContentWithLogprobs, openai_entries
from proxy.turn import Turn

_dumps = json.dumps
DONE = b"data: [DONE]\n\n"
# An SSE comment: keeps idle connections open while a turn is silent; SSE clients (the
# openai SDK included) skip comment lines.
KEEPALIVE = b": keep-alive\n\n"


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage_dict(turn: Turn) -> dict[str, Any]:
    return {
        "prompt_tokens": turn.prompt_tokens,
        "completion_tokens": turn.completion_tokens,
        "total_tokens": turn.prompt_tokens + turn.completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": turn.reasoning_tokens},
    }


class ChatStreamEncoder:
    """One per streamed response. `start()`, `encode(event)` per event, then `finish(turn)`."""

    def __init__(self, model: str, *, include_usage: bool, completion_id: str | None = None,
                 created: int | None = None) -> None:
        self.id = completion_id or new_completion_id()
        self.created = created if created is not None else int(time.time())
        self.model = model
        self.include_usage = include_usage
        self._head = (
            f'data: {{"id":{_dumps(self.id)},"object":"chat.completion.chunk",'
            f'"created":{self.created},"model":{_dumps(model)},"choices":'
        )
        self._indices: dict[int, int] = {}  # parser call index -> wire index (0..n-1, no gaps)

    def _chunk(self, delta_json: str, finish_reason: str | None = None,
               logprobs_json: str = "null") -> bytes:
        finish = "null" if finish_reason is None else f'"{finish_reason}"'
        return (
            f'{self._head}[{{"index":0,"delta":{delta_json},"logprobs":{logprobs_json},'
            f'"finish_reason":{finish}}}],"usage":null}}\n\n'
        ).encode()

    def start(self) -> bytes:
        return self._chunk('{"role":"assistant"}')

    def encode(self, event: Event) -> bytes:
        if isinstance(event, ContentDelta):
            if not event.text:
                return b""
            if isinstance(event, ContentWithLogprobs):  # the SDK reads choices[].logprobs.content
                lp = _dumps({"content": openai_entries(event.logprobs)}, separators=(",", ":"))
                return self._chunk('{"content":' + _dumps(event.text) + "}", None, lp)
            return self._chunk('{"content":' + _dumps(event.text) + "}")
        if isinstance(event, ReasoningDelta):
            if not event.text:
                return b""
            text = _dumps(event.text)
            return self._chunk('{"reasoning_content":' + text + ',"reasoning":' + text + "}")
        if isinstance(event, ToolCallStart):
            index = self._indices.setdefault(event.index, len(self._indices))
            return self._chunk(
                f'{{"tool_calls":[{{"index":{index},"id":{_dumps(event.id)},"type":"function",'
                f'"function":{{"name":{_dumps(event.name)},"arguments":""}}}}]}}'
            )
        if isinstance(event, ToolCallArgsDelta):
            if not event.fragment:
                return b""
            index = self._indices[event.index]
            return self._chunk(
                f'{{"tool_calls":[{{"index":{index},'
                f'"function":{{"arguments":{_dumps(event.fragment)}}}}}]}}'
            )
        return b""  # ToolCallEnd, Notice: nothing new on the wire

    def finish(self, turn: Turn) -> bytes:
        out = self._chunk("{}", turn.finish_reason)
        if self.include_usage:
            usage = _dumps(usage_dict(turn), separators=(",", ":"))
            out += f"{self._head}[],\"usage\":{usage}}}\n\n".encode()
        return out + DONE

    def error(self, err: ApiError) -> bytes:
        return sse_error_event(err)

    def keepalive(self) -> bytes:
        return KEEPALIVE


def chat_completion_body(turn: Turn, model: str, completion_id: str | None = None) -> dict[str, Any]:
    """The non-streaming response; equal to what the SDK accumulates from the stream."""
    result = turn.result
    assert result is not None, "chat_completion_body() before the turn finished"
    message: dict[str, Any] = {
        "role": "assistant",
        "content": result.content or None,
        "reasoning_content": result.reasoning_content or None,
        "reasoning": result.reasoning_content or None,
    }
    calls = turn.calls  # a cut call included, as the stream showed it (api.md "Cut calls")
    if calls:
        message["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments_json}}
            for call in calls
        ]
    return {
        "id": completion_id or new_completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message,
                     "logprobs": (None if turn.logprobs is None
                                  else {"content": openai_entries(turn.logprobs.content)}),
                     "finish_reason": turn.finish_reason}],
        "usage": usage_dict(turn),
    }
