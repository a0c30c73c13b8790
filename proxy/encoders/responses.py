"""Responses encoding: typed SSE events, each with a `sequence_number`, or one JSON response.

Stream: `response.created`, `response.in_progress`; per output item `output_item.added`,
its `content_part.added`, deltas (`reasoning_text.delta` / `output_text.delta` /
`function_call_arguments.delta`), the matching `.done` events, `output_item.done`; then
`response.completed` (or `response.incomplete` at max_output_tokens, `response.failed` on an
error) carrying the whole response. Output items come in the parser's order: reasoning,
message, function calls. A function call goes out once its invoke has closed, or once the
output cut it off (api.md "Cut calls"): then its item's status is `incomplete` and its
`arguments` are the fragments the model wrote (they do not parse), in a response that is
`incomplete` too. While the turn
is silent a `: keep-alive` comment goes out every `keepalive_interval_s`.

Reasoning items carry the text in clear (`content`) and signed (`encrypted_content`): Codex
replays only the latter (proxy.signature). V4 writes no summary of its reasoning, so when
the request asks for one (`reasoning.summary`: auto, concise, detailed) the reasoning text
itself is the summary (`summary_text`, streamed as `reasoning_summary_text` events, which
Codex and pydantic-ai show); otherwise `summary` is `[]`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from dsml.events import (
    CallOutcome,
    ContentDelta,
    Event,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from proxy.errors import ApiError
from proxy.logprobs import ContentWithLogprobs, openai_entries
from proxy.signature import ReasoningSigner
from proxy.turn import Turn
from schemas.responses import ResponsesRequest, ToolChoiceFunction

_dumps = json.dumps
KEEPALIVE = b": keep-alive\n\n"


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def envelope(req: ResponsesRequest, response_id: str, tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The response object without output, status and usage (those come at the end)."""
    choice: Any = req.tool_choice or "auto"
    if not isinstance(choice, str):
        choice = choice.model_dump() if isinstance(choice, ToolChoiceFunction) else (
            {"type": "allowed_tools", "mode": choice.mode, "tools": choice.tools})
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if (
        req.text and req.text.format) else {"type": "text"}
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()),
        "status": "in_progress", "error": None, "incomplete_details": None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {}, "model": req.model, "output": [],
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": req.reasoning.effort if req.reasoning else None,
                      "summary": wants_summary(req) or None},
        "store": req.store is not False, "temperature": req.temperature, "top_p": req.top_p,
        "text": {"format": fmt}, "tool_choice": choice,
        "tools": [{"type": "function", "name": t["function"]["name"],
                   "description": t["function"].get("description"),
                   "parameters": t["function"].get("parameters"),
                   "strict": bool(t["function"].get("strict"))} for t in tools],
        "truncation": "disabled", "usage": None,
    }


def wants_summary(req: ResponsesRequest) -> str:
    """The requested reasoning summary ("auto", "concise", "detailed"), "" for none."""
    summary = req.reasoning.summary if req.reasoning else None
    return summary if summary and summary != "none" else ""


def usage(turn: Turn) -> dict[str, Any]:
    return {"input_tokens": turn.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": turn.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": turn.reasoning_tokens},
            "total_tokens": turn.prompt_tokens + turn.completion_tokens}


def finished(response: dict[str, Any], turn: Turn, output: list[dict[str, Any]]) -> dict[str, Any]:
    incomplete = turn.finish_reason == "length"
    return {**response, "status": "incomplete" if incomplete else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "output": output, "usage": usage(turn)}


def reasoning_item(item_id: str, text: str, signer: ReasoningSigner,
                   summary: bool = False) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning",
            "summary": [{"type": "summary_text", "text": text}] if summary else [],
            "content": [{"type": "reasoning_text", "text": text}],
            "encrypted_content": signer.seal(text), "status": "completed"}


def text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`logprobs`: of the text's tokens (proxy.logprobs), when asked for."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def message_item(item_id: str, text: str, status: str = "completed",
                 logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [text_part(text, logprobs)] if status == "completed" else []}


def call_item(item_id: str, call_id: str, name: str, arguments: str,
              status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def response_body(turn: Turn, response: dict[str, Any], signer: ReasoningSigner) -> dict[str, Any]:
    """The non-streaming response; what the SDK accumulates from the stream."""
    result = turn.result
    assert result is not None, "response_body() before the turn finished"
    output: list[dict[str, Any]] = []
    if result.reasoning_content:
        output.append(reasoning_item(new_id("rs_"), result.reasoning_content, signer,
                                     summary=bool(response["reasoning"]["summary"])))
    if result.content:
        logprobs = None if turn.logprobs is None else openai_entries(turn.logprobs.content)
        output.append(message_item(new_id("msg_"), result.content, logprobs=logprobs))
    output.extend(call_item(new_id("fc_"), c.id, c.name, c.arguments_json,
                            "incomplete" if c.outcome is CallOutcome.TRUNCATED else "completed")
                  for c in turn.calls)
    return finished(response, turn, output)


class ResponsesStreamEncoder:
    def __init__(self, response: dict[str, Any], signer: ReasoningSigner) -> None:
        self.response = response
        self._signer = signer
        self._seq = 0
        self.output: list[dict[str, Any]] = []  # finished items, for the final response
        self._open: str | None = None  # "reasoning" | "message"
        self._item_id = ""
        self._text: list[str] = []
        self._logprobs: list[dict[str, Any]] = []  # of the open message's text
        self._call: tuple[str, str, list[str]] | None = None  # (call id, name, fragments) held
        self._summary = bool(response["reasoning"]["summary"])
        self.final: dict[str, Any] | None = None  # the whole response, once finished

    def _emit(self, kind: str, **fields: Any) -> bytes:
        data = _dumps({"type": kind, "sequence_number": self._seq, **fields})
        self._seq += 1
        return f"event: {kind}\ndata: {data}\n\n".encode()

    def start(self) -> bytes:
        return (self._emit("response.created", response=self.response)
                + self._emit("response.in_progress", response=self.response))

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._item_id, "output_index": len(self.output)}

    def _open_item(self, kind: str) -> bytes:
        out = self._close()
        self._open, self._text, self._logprobs = kind, [], []
        if kind == "reasoning":
            self._item_id = new_id("rs_")
            item = {"id": self._item_id, "type": "reasoning", "summary": [], "content": [],
                    "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
            if self._summary:  # the text is its own summary (see the module docstring)
                out += self._emit("response.output_item.added", output_index=len(self.output),
                                  item=item)
                out += self._emit("response.reasoning_summary_part.added", **self._where(),
                                  summary_index=0, part={"type": "summary_text", "text": ""})
                return out + self._emit("response.content_part.added", **self._where(),
                                        content_index=0, part=part)
        else:
            self._item_id = new_id("msg_")
            item = message_item(self._item_id, "", "in_progress")
            part = text_part("")
        return (out + self._emit("response.output_item.added", output_index=len(self.output),
                                 item=item)
                + self._emit("response.content_part.added", **self._where(), content_index=0,
                             part=part))

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        text = "".join(self._text)
        where = self._where()
        if self._open == "reasoning":
            item = reasoning_item(self._item_id, text, self._signer, self._summary)
            out = (self._emit("response.reasoning_text.done", **where, content_index=0, text=text)
                   + self._emit("response.content_part.done", **where, content_index=0,
                                part={"type": "reasoning_text", "text": text}))
            if self._summary:
                part = {"type": "summary_text", "text": text}
                out += (self._emit("response.reasoning_summary_text.done", **where,
                                   summary_index=0, text=text)
                        + self._emit("response.reasoning_summary_part.done", **where,
                                     summary_index=0, part=part))
        else:
            item = message_item(self._item_id, text, logprobs=self._logprobs)
            out = (self._emit("response.output_text.done", **where, content_index=0, text=text,
                              logprobs=self._logprobs)
                   + self._emit("response.content_part.done", **where, content_index=0,
                                part=text_part(text, self._logprobs)))
        self._open = None
        out += self._emit("response.output_item.done", output_index=where["output_index"], item=item)
        self.output.append(item)
        return out

    def encode(self, event: Event) -> bytes:
        if isinstance(event, ReasoningDelta | ContentDelta):
            if not event.text:
                return b""
            kind = "reasoning" if isinstance(event, ReasoningDelta) else "message"
            out = b"" if self._open == kind else self._open_item(kind)
            self._text.append(event.text)
            delta_type = ("response.reasoning_text.delta" if kind == "reasoning"
                          else "response.output_text.delta")
            extra: dict[str, Any] = {} if kind == "reasoning" else {"logprobs": []}
            if isinstance(event, ContentWithLogprobs):  # SDKs read them from the delta
                extra["logprobs"] = openai_entries(event.logprobs)
                self._logprobs.extend(extra["logprobs"])
            out += self._emit(delta_type, **self._where(), content_index=0,
                              delta=event.text, **extra)
            if kind == "reasoning" and self._summary:
                out += self._emit("response.reasoning_summary_text.delta", **self._where(),
                                  summary_index=0, delta=event.text)
            return out
        if isinstance(event, ToolCallStart):
            self._call = (event.id, event.name, [])
            return b""
        if isinstance(event, ToolCallArgsDelta):
            if event.fragment and self._call is not None:
                self._call[2].append(event.fragment)
            return b""
        if isinstance(event, ToolCallEnd):
            return self._function_call(event)
        return b""  # Notice: metrics only

    def _function_call(self, end: ToolCallEnd) -> bytes:
        call, self._call = self._call, None
        if call is None:
            return b""
        status = "incomplete" if end.outcome is CallOutcome.TRUNCATED else "completed"
        call_id, name, fragments = call
        out = self._close()
        item_id, index = new_id("fc_"), len(self.output)
        out += self._emit("response.output_item.added", output_index=index,
                          item=call_item(item_id, call_id, name, "", "in_progress"))
        for fragment in fragments:
            out += self._emit("response.function_call_arguments.delta", item_id=item_id,
                              output_index=index, delta=fragment)
        arguments = "".join(fragments)
        item = call_item(item_id, call_id, name, arguments, status)
        self.output.append(item)
        return (out + self._emit("response.function_call_arguments.done", item_id=item_id,
                                 output_index=index, name=name, arguments=arguments)
                + self._emit("response.output_item.done", output_index=index, item=item))

    def finish(self, turn: Turn) -> bytes:
        out = self._close()
        response = self.final = finished(self.response, turn, self.output)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return out + self._emit(kind, response=response)

    def error(self, err: ApiError) -> bytes:
        response = {**self.response, "status": "failed", "output": self.output,
                    "error": {"code": err.code or err.type, "message": err.message}}
        return self._emit("response.failed", response=response)

    def keepalive(self) -> bytes:
        return KEEPALIVE  # a comment: no event, so no sequence_number is used up
