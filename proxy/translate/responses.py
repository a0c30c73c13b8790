"""Responses request <-> chat messages: input items in, the turn's output back as a message.

Input items fold into OpenAI-chat messages for `dsml.render_chat`: `reasoning`, assistant
`message` and `function_call` items that follow one another form one assistant message (a
`reasoning` item after content opens the next one); `function_call_output` becomes a tool
message matched by `call_id`. `instructions` become the system message and, as on OpenAI, are
not carried over by `previous_response_id`.

Replayed reasoning is trusted only through `encrypted_content` (this server's signed blob);
reasoning text in clear without it is dropped, as are unverifiable blobs (same policy as
Anthropic thinking signatures, see `proxy.translate.anthropic`).
"""

from __future__ import annotations

import uuid
from typing import Any

from dsml.events import ParseResult
from proxy.errors import ApiError
from proxy.signature import ReasoningSigner
from proxy.translate import IMAGE_OMITTED, allowed_tool_names
from schemas.responses import (
    ContentPart,
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
    ToolChoiceAllowed,
    ToolChoiceFunction,
)

TEXT_PARTS = ("input_text", "output_text", "text")


def input_messages(req: ResponsesRequest, signer: ReasoningSigner) -> list[dict[str, Any]]:
    """The request's own input as chat messages (what the response store appends)."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    out: list[dict[str, Any]] = []
    assistant: dict[str, Any] | None = None
    for k, item in enumerate(req.input):
        if isinstance(item, MessageItem) and item.role != "assistant":
            assistant = None
            out.append({"role": item.role, "content": _parts(item.content, f"input[{k}]")})
            continue
        if isinstance(item, FunctionCallOutputItem):
            assistant = None
            output = _parts(item.output, f"input[{k}].output")
            if not isinstance(output, str):  # images a tool returned: see IMAGE_OMITTED
                output = [IMAGE_OMITTED if p["type"] == "image" else p for p in output]
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
            continue
        if assistant is None or (isinstance(item, ReasoningItem) and (
                assistant["content"] or assistant["tool_calls"])):
            assistant = {"role": "assistant", "content": "", "tool_calls": []}
            out.append(assistant)
        if isinstance(item, ReasoningItem):
            reasoning = signer.unseal(item.encrypted_content)
            if reasoning is not None:
                assistant["reasoning_content"] = assistant.get("reasoning_content", "") + reasoning
        elif isinstance(item, MessageItem):
            assistant["content"] += _text(item.content, f"input[{k}]")
        elif isinstance(item, FunctionCallItem):
            assistant["tool_calls"].append({"id": item.call_id, "type": "function", "function": {
                "name": item.name, "arguments": item.arguments}})
    for message in out:
        if message["role"] == "assistant":
            message["content"] = message["content"] or None
            if not message["tool_calls"]:
                del message["tool_calls"]
    return out


def _parts(content: str | list[ContentPart], param: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if part.type in TEXT_PARTS and part.text is not None:
            parts.append({"type": "text", "text": part.text})
        elif part.type == "input_image":
            parts.append({"type": "image"})  # the renderer refuses images with a clear 400
        else:
            raise ApiError(400, f"{param}[{j}]: content part type {part.type!r} is not supported",
                           param=f"{param}[{j}].type")
    return parts


def _text(content: str | list[ContentPart], param: str) -> str:
    parts = _parts(content, param)
    return parts if isinstance(parts, str) else "".join(p.get("text", "") for p in parts)


def to_chat(req: ResponsesRequest, messages: list[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """The chat dict for `render_chat` over `messages` (stored history + input)."""
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    chat: dict[str, Any] = {"model": req.model, "messages": system + messages}
    tools = [_tool(t, k) for k, t in enumerate(req.tools or [])]
    choice = req.tool_choice
    if isinstance(choice, ToolChoiceAllowed):
        allowed = allowed_tool_names(choice.tools, "tool_choice.tools")
        tools = [t for t in tools if t["function"]["name"] in allowed]
        choice = choice.mode
    if tools:
        chat["tools"] = tools
        if isinstance(choice, ToolChoiceFunction):
            chat["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        elif choice is not None:
            chat["tool_choice"] = choice
    if req.reasoning is not None and req.reasoning.effort is not None:
        chat["reasoning_effort"] = req.reasoning.effort  # "none" turns thinking off
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "output", "schema": fmt.schema_ or {}, "strict": fmt.strict}}
    elif fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    return chat, req.parallel_tool_calls is not False


def _tool(tool: Any, k: int) -> dict[str, Any]:
    if tool.type != "function" or not tool.name:
        raise ApiError(400, f"tools[{k}]: tool type {tool.type!r} is not supported; only "
                       "function tools are", param=f"tools[{k}].type")
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.parameters is not None:
        function["parameters"] = tool.parameters
    if tool.strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def output_message(result: ParseResult) -> dict[str, Any]:
    """The turn's output as the assistant message a follow-up's history holds."""
    message: dict[str, Any] = {"role": "assistant", "content": result.content or None}
    if result.reasoning_content:
        message["reasoning_content"] = result.reasoning_content
    if result.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.name, "arguments": c.arguments_json}} for c in result.tool_calls]
    return message


# Id prefixes of listed input items that came without an id (OpenAI's spellings).
_ITEM_PREFIX = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_",
                "reasoning": "rs_"}


def listed_input_items(raw: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's input as `GET /v1/responses/{id}/input_items` lists it: every item
    with an `id` and a `type`, message content as a list of parts, a `status`."""
    items = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
    out = []
    for given in items:
        item = dict(given)
        kind = item.setdefault("type", "message")
        item.setdefault("id", _ITEM_PREFIX.get(kind, "item_") + uuid.uuid4().hex)
        if kind == "message" and isinstance(item.get("content"), str):
            assistant = item.get("role") == "assistant"
            part: dict[str, Any] = {"type": "output_text" if assistant else "input_text",
                                    "text": item["content"]}
            if assistant:
                part["annotations"] = []
            item["content"] = [part]
        if kind != "reasoning":
            item.setdefault("status", "completed")
        out.append(item)
    return out
