"""Anthropic Messages encoding: `event:` SSE per parser event, or one JSON message.

Stream: `message_start`, `ping`, then per content block `content_block_start`, its
`content_block_delta`s (`thinking_delta`, `text_delta`, `input_json_delta`) and
`content_block_stop`; a thinking block gets its `signature_delta` just before its stop (the
signature covers the whole text). A tool_use block goes out when its invoke has closed, or
when the output cut it off (api.md "Cut calls"): then its `partial_json` fragments are
what the model wrote, the stop reason is `max_tokens`, and the non-streamed `input` is what
the SDK's accumulator makes of those fragments (jiter's partial mode, as the SDK parses
them). Then `message_delta` (stop reason, output tokens) and `message_stop`. Blocks come in the order the parser emits: thinking, text, tool calls. The
`anthropic` SDK's accumulator rebuilds from them the message `message_body` returns.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from jiter import from_json

from dsml.events import (
    ContentDelta,
    Event,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from proxy.errors import ApiError
from proxy.signature import ReasoningSigner
from proxy.translate import wire_call_id
from proxy.translate.anthropic import TOOL_ID_PREFIX
from proxy.turn import Turn
from schemas.anthropic import Message, TextOut, ThinkingOut, ToolUseOut, Usage

_dumps = json.dumps
PING = b'event: ping\ndata: {"type":"ping"}\n\n'

# ApiError status -> Anthropic's error `type`.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


# Error codes the anthropic SDK reads from `error.details.error_code` (its thread state
# replays the whole history under a new thread on `thread_not_found`).
DETAIL_CODES = frozenset({"thread_not_found"})


def anthropic_error(err: ApiError) -> tuple[int, dict[str, Any]]:
    """Status and body of an error in Anthropic's shape; overloaded (this server's concurrency
    limit full, or the engine's) is 529, which Claude Code retries with backoff."""
    status = 529 if err.code in ("overloaded", "upstream_overloaded") else err.status_code
    kind = ERROR_TYPES.get(status, "api_error")
    error: dict[str, Any] = {"type": kind, "message": err.message}
    if err.code in DETAIL_CODES:
        error["details"] = {"error_code": err.code}
    return status, {"type": "error", "error": error}


def partial_input(fragments: str) -> dict[str, Any]:
    """A cut call's `input` as the anthropic SDK accumulates it: jiter's partial mode drops
    an unfinished string, so a half-written value never looks whole."""
    if not fragments:
        return {}
    value = from_json(fragments.encode(), partial_mode=True)
    return value if isinstance(value, dict) else {}


def new_message_id() -> str:
    return "msg_" + uuid.uuid4().hex


def stop_reason(turn: Turn) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence).

    `stop_sequence` only when the backend said which of the request's stop strings matched
    (vLLM's `stop_reason`, SGLang's `matched_stop`, the embedded engine); a natural end
    (EOS), or a backend that does not say (llama.cpp, ds4), is `end_turn`.
    """
    if turn.finish_reason == "tool_calls":
        return "tool_use", None
    if turn.finish_reason == "length":
        return "max_tokens", None
    if turn.stop_sequence is not None:
        return "stop_sequence", turn.stop_sequence
    return "end_turn", None


def _event(name: str, body: str) -> bytes:
    return f"event: {name}\ndata: {body}\n\n".encode()


class AnthropicStreamEncoder:
    def __init__(self, turn: Turn, model: str, signer: ReasoningSigner) -> None:
        self.id = new_message_id()
        self.model = model
        self._turn = turn
        self._signer = signer
        self._index = -1
        self._open: str | None = None  # "thinking" | "text" | "tool_use"
        self._thinking: list[str] = []
        self._call: tuple[str, str, list[str]] | None = None  # (id, name, fragments) held
        self.finished = False  # message_stop went out

    def start(self) -> bytes:
        # Called after the first event: the prompt is tokenized, its token count known.
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self._turn.prompt_tokens, "output_tokens": 0}}
        return _event("message_start", _dumps({"type": "message_start", "message": message})) + PING

    def _start_block(self, kind: str, block: str) -> bytes:
        out = self._close()
        self._index += 1
        self._open = kind
        return out + _event("content_block_start", '{"type":"content_block_start","index":'
                            f'{self._index},"content_block":{block}}}')

    def _delta(self, delta: str) -> bytes:
        return _event("content_block_delta",
                      f'{{"type":"content_block_delta","index":{self._index},"delta":{delta}}}')

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        out = b""
        if self._open == "thinking":
            signature = self._signer.sign("".join(self._thinking))
            out = self._delta(f'{{"type":"signature_delta","signature":{_dumps(signature)}}}')
            self._thinking = []
        self._open = None
        return out + _event("content_block_stop",
                            f'{{"type":"content_block_stop","index":{self._index}}}')

    def encode(self, event: Event) -> bytes:
        if isinstance(event, ReasoningDelta):
            if not event.text:
                return b""
            out = b""
            if self._open != "thinking":
                out = self._start_block("thinking", '{"type":"thinking","thinking":"","signature":""}')
            self._thinking.append(event.text)
            return out + self._delta(f'{{"type":"thinking_delta","thinking":{_dumps(event.text)}}}')
        if isinstance(event, ContentDelta):
            if not event.text:
                return b""
            out = b"" if self._open == "text" else self._start_block("text", '{"type":"text","text":""}')
            return out + self._delta(f'{{"type":"text_delta","text":{_dumps(event.text)}}}')
        if isinstance(event, ToolCallStart):
            # The open text/thinking block stays open: if this call turns out truncated, its
            # text continues that block, as in the non-streaming message.
            self._call = (wire_call_id(event.id, TOOL_ID_PREFIX), event.name, [])
            return b""
        if isinstance(event, ToolCallArgsDelta):
            if event.fragment and self._call is not None:
                self._call[2].append(event.fragment)
            return b""
        if isinstance(event, ToolCallEnd):
            return self._tool_use_block(event)
        return b""  # Notice: metrics only

    def _tool_use_block(self, end: ToolCallEnd) -> bytes:
        # A call is held until its invoke closes or the output cuts it off; a cut one goes
        # out as the model wrote it (stop reason max_tokens), never completed.
        call, self._call = self._call, None
        if call is None:
            return b""
        call_id, name, fragments = call
        out = self._start_block("tool_use", f'{{"type":"tool_use","id":{_dumps(call_id)},'
                                f'"name":{_dumps(name)},"input":{{}}}}')
        for fragment in fragments:
            out += self._delta(f'{{"type":"input_json_delta","partial_json":{_dumps(fragment)}}}')
        return out + self._close()

    def finish(self, turn: Turn) -> bytes:
        reason, sequence = stop_reason(turn)
        self.finished = True
        delta = {"type": "message_delta",
                 "delta": {"stop_reason": reason, "stop_sequence": sequence},
                 "usage": {"output_tokens": turn.completion_tokens}}
        return (self._close() + _event("message_delta", _dumps(delta))
                + _event("message_stop", '{"type":"message_stop"}'))

    def error(self, err: ApiError) -> bytes:
        return _event("error", _dumps(anthropic_error(err)[1]))

    def keepalive(self) -> bytes:
        return PING  # Anthropic's own keep-alive event; the SDK skips it


def message_body(turn: Turn, model: str, signer: ReasoningSigner,
                 message_id: str | None = None) -> dict[str, Any]:
    result = turn.result
    assert result is not None, "message_body() before the turn finished"
    content: list[ThinkingOut | TextOut | ToolUseOut] = []
    if result.reasoning_content:
        content.append(ThinkingOut(thinking=result.reasoning_content,
                                   signature=signer.sign(result.reasoning_content)))
    if result.content:
        content.append(TextOut(text=result.content))
    content.extend(ToolUseOut(id=wire_call_id(c.id, TOOL_ID_PREFIX), name=c.name, input=c.arguments)
                   for c in result.tool_calls)
    cut = turn.cut_call
    if cut is not None:  # what the SDK accumulates from the streamed fragments
        content.append(ToolUseOut(id=wire_call_id(cut.id, TOOL_ID_PREFIX), name=cut.name,
                                  input=partial_input(cut.arguments_json)))
    reason, sequence = stop_reason(turn)
    message = Message(id=message_id or new_message_id(), model=model, content=content, stop_reason=reason,
                      stop_sequence=sequence,
                      usage=Usage(input_tokens=turn.prompt_tokens,
                                  output_tokens=turn.completion_tokens))
    return message.model_dump()
