"""Anthropic Messages request -> the OpenAI-chat-shaped dict `dsml.render_chat` reads.

Decisions (README, "Claude Code"):

- Thinking. `thinking.type` `enabled` / `adaptive` / `between_tools` turn V4's thinking mode
  on, `disabled` off; without `thinking` the model name decides (`deepseek-chat` off,
  `deepseek-reasoner` on, the server's name its default), as on the chat endpoint.
  Effort: `output_config.effort` if given (DeepSeek's folding: low -> low, medium/high ->
  high, xhigh/max -> max in `v4`), otherwise from `budget_tokens` (`effort_for_budget`).
- Replayed `thinking` blocks are rendered only when their signature verifies (HMAC of the
  text under this server's secret). An unverifiable one is dropped, not a 400: Claude Code
  keeps sessions across server restarts and model switches, and refusing would wedge the
  session; dropping renders an empty reasoning, which the reasoning cache then backfills
  when it still holds what this server generated for those tool calls.
- `tool_use` ids are `toolu_` + the parser's `call_` suffix; mapped back on the way in.
- `tool_result` with `is_error: true` is prefixed with "Error: ": V4's tool-result turn has
  no error flag, and the model should not read a failure as an output.
- A trailing assistant message without tool calls is a prefill: the turn continues it.
- Images in a `tool_result` become a short text placeholder (see IMAGE_OMITTED).
"""

from __future__ import annotations

from typing import Any

from proxy.errors import ApiError
from proxy.signature import ReasoningSigner
from proxy.translate import IMAGE_OMITTED, chat_call_id
from schemas.anthropic import (
    CountTokensRequest,
    ImageBlock,
    MessageParam,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)

TOOL_ID_PREFIX = "toolu_"

# budget_tokens -> reasoning effort. Claude Code asks for 4,000 ("think"), 10,000 ("think
# hard") and 31,999 ("ultrathink", its maximum); Anthropic's minimum budget is 1,024. V4 has
# three tiers, and only `max` changes the `v4` prompt (an effort prefix): keep it for the
# budgets that mean "as much as you can".
EFFORT_BUDGETS = ((4096, "low"), (24576, "high"))  # below the bound -> that effort
MAX_EFFORT = "max"


def effort_for_budget(budget_tokens: int) -> str:
    for bound, effort in EFFORT_BUDGETS:
        if budget_tokens < bound:
            return effort
    return MAX_EFFORT


def to_chat(req: CountTokensRequest, signer: ReasoningSigner) -> tuple[dict[str, Any], bool]:
    """The chat dict for `render_chat`, and whether parallel tool calls are allowed."""
    chat: dict[str, Any] = {"model": req.model, "messages": _messages(req, signer)}
    chat.update(_thinking(req))
    parallel = True
    if req.tools:
        chat["tools"] = [_tool(t, k) for k, t in enumerate(req.tools)]
    if req.tool_choice is not None:
        choice = req.tool_choice
        parallel = not choice.disable_parallel_tool_use
        if choice.type == "tool":
            if not choice.name:
                raise ApiError(400, "tool_choice.name is required for type tool",
                               param="tool_choice.name")
            chat["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        elif req.tools:
            chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    fmt = req.output_config.format if req.output_config else None
    if fmt is not None:
        chat["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": fmt.schema_}}
    return chat, parallel


def _thinking(req: CountTokensRequest) -> dict[str, Any]:
    thinking = req.thinking
    effort = req.output_config.effort if req.output_config else None
    if thinking is None:
        return {"reasoning_effort": effort} if effort else {}
    if thinking.type == "disabled":
        return {"thinking": {"type": "disabled"}}
    if effort is None and thinking.type == "enabled" and thinking.budget_tokens:
        effort = effort_for_budget(thinking.budget_tokens)
    out: dict[str, Any] = {"thinking": {"type": "enabled"}}
    if effort:
        out["reasoning_effort"] = effort
    return out


def _tool(tool: Any, k: int) -> dict[str, Any]:
    if tool.type not in (None, "custom"):
        raise ApiError(400, f"tools[{k}]: server tool type {tool.type!r} is not supported; "
                       "only client tools (name, description, input_schema) are",
                       param=f"tools[{k}].type")
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _messages(req: CountTokensRequest, signer: ReasoningSigner) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if isinstance(req.system, str):
        if req.system:
            out.append({"role": "system", "content": req.system})
    elif req.system:
        # Each block a system message: the renderer joins them with "\n\n" into one prompt.
        out.extend({"role": "system", "content": b.text} for b in req.system)
    for k, message in enumerate(req.messages):
        if message.role == "user":
            out.extend(_user(message, k))
        else:
            out.append(_assistant(message, signer))
    last = out[-1] if out else None
    if last is not None and last["role"] == "assistant" and not last.get("tool_calls"):
        last["prefix"] = True
    return out


def _part(block: TextBlock | ImageBlock) -> dict[str, Any]:
    # Images pass through as image parts: the renderer refuses them with a clear 400.
    return {"type": "text", "text": block.text} if isinstance(block, TextBlock) else {"type": "image"}


def _user(message: MessageParam, k: int) -> list[dict[str, Any]]:
    if isinstance(message.content, str):
        return [{"role": "user", "content": message.content}]
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(message.content):
        if isinstance(block, ToolResultBlock):
            results.append(_tool_result(block))
        elif isinstance(block, TextBlock | ImageBlock):
            parts.append(_part(block))
        else:
            raise ApiError(400, f"messages[{k}].content[{j}]: a {block.type} block belongs in "
                           "an assistant message", param=f"messages[{k}].content[{j}].type")
    # Tool results first: V4 puts them at the head of the user turn, the text after them.
    if parts or not results:
        results.append({"role": "user", "content": parts})
    return results


def _tool_result(block: ToolResultBlock) -> dict[str, Any]:
    content = block.content
    if content is None:
        content = ""
    elif not isinstance(content, str):
        content = [_part(b) if isinstance(b, TextBlock) else IMAGE_OMITTED for b in content]
    if block.is_error:
        if isinstance(content, str):
            content = "Error: " + content
        elif content and content[0]["type"] == "text":
            content[0] = {"type": "text", "text": "Error: " + content[0]["text"]}
        else:
            content.insert(0, {"type": "text", "text": "Error:"})
    return {"role": "tool", "tool_call_id": chat_call_id(block.tool_use_id, TOOL_ID_PREFIX),
            "content": content}


def _assistant(message: MessageParam, signer: ReasoningSigner) -> dict[str, Any]:
    if isinstance(message.content, str):
        return {"role": "assistant", "content": message.content}
    reasoning: list[str] = []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.content:
        if isinstance(block, ThinkingBlock):
            if signer.verify(block.thinking, block.signature):
                reasoning.append(block.thinking)
        elif isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            calls.append({"id": chat_call_id(block.id, TOOL_ID_PREFIX), "type": "function",
                          "function": {"name": block.name, "arguments": block.input}})
        elif isinstance(block, ToolResultBlock | ImageBlock):
            raise ApiError(400, f"a {block.type} block belongs in a user message",
                           param="messages.content.type")
        # redacted_thinking: another provider's opaque reasoning, nothing to render.
    out: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if reasoning:
        out["reasoning_content"] = "".join(reasoning)
    if calls:
        out["tool_calls"] = calls
    return out
