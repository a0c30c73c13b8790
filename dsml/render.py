"""DeepSeek's message list -> a `Prompt` of segments, byte-identical to DeepSeek's encoders.

This is a port of `encode_messages` from DeepSeek's reference encoders: `encoding_dsv4.py`
(V4 and V4-0731, which differ only in effort texts), its V4.1 successor (spaced tag names,
a `<｜System｜>` turn for the effort budget and for mid-conversation system messages) and
`encoding_dsv32.py` (V3.2: `function_calls`, positional `<function_results>`; its own
`V32Renderer` in `dsml.render_v32`; what both share is `dsml.render_common`). One change of output type: instead of one string it produces
segments, so that only the control strings this renderer inserts can become special tokens
(dsml.md section 4). `Prompt.text` is exactly the reference encoder's string.

A thinking-mode conversation with one tool call renders as:

    <｜begin▁of▁sentence｜>{system}\\n\\n## Tools ... {tool schemas} ...
    <｜User｜>{user}<｜Assistant｜><think>{reasoning}</think>{content}

    <｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls><｜end▁of▁sentence｜><｜User｜><tool_result>{result}</tool_result><｜Assistant｜><think>

Input is DeepSeek's own message format (what the official golden tests use): roles
`system`, `developer` (a user turn that may carry tools), `user`, `assistant`, `tool`,
`latest_reminder`; `tools` and `response_format` ride on a system or developer message;
assistant `wo_eos: true` (or `prefix: true`) leaves the turn open. Extensions over the
reference, all used by `dsml.request`:

- `tool_calls[].function.arguments` may be an object as well as a JSON string; anything
  that is not a JSON object is a `RenderError` (the reference would wrap it as
  `{"arguments": ...}`, which teaches the model to wrap its own arguments);
- `response_format: "json_object"` renders DeepSeek's fixed JSON instruction instead of a
  schema section;
- tool-result parts other than text are a `RenderError` (the reference writes
  `[Unsupported ...]` into the prompt).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dsml import markers as mk
from dsml.dialects import Dialect, Effort, texts
from dsml.errors import RenderError
from dsml.prompt import Prompt, Segment
from dsml.render_common import (
    JSON_OBJECT,  # noqa: F401 (dsml.request imports it from here)
    THINKING_MODES,
    _checked,
    _drop_thinking,
    _last_user_index,
    _merge_tool_messages,
    _Renderer,
    _sort_tool_results,
)
from dsml.render_v32 import V32Renderer


def _effort_prefix(dialect: Dialect, reasoning_effort: Effort | str | int | None) -> str:
    try:
        return texts(dialect).effort_prefix(reasoning_effort)
    except ValueError as err:
        budgets = " or an integer 1-100" if texts(dialect).effort_budgets else ""
        raise RenderError(
            f"reasoning_effort must be one of {[e.value for e in Effort]}{budgets}, "
            f"got {reasoning_effort!r} ({err})",
            param="reasoning_effort",
        ) from None


def render_messages(
    messages: Sequence[Mapping[str, Any]],
    thinking_mode: str = "thinking",
    dialect: Dialect | str = Dialect.V4,
    reasoning_effort: Effort | str | int | None = None,
    *,
    drop_thinking: bool = True,
) -> Prompt:
    """Render DeepSeek-format messages as the dialect's reference `encode_messages` does.

    `reasoning_effort` is the encoder's tier (`low`, `high`, `max`; in V4.1 also a budget
    1-100); None means the encoder's default (no prefix in V4, `high` in V4.1). The prefix
    is written only in thinking mode, before the first message.
    """
    return _render_messages(messages, thinking_mode, dialect, reasoning_effort,
                            drop_thinking=drop_thinking)


def _render_messages(
    messages: Sequence[Mapping[str, Any]],
    thinking_mode: str = "thinking",
    dialect: Dialect | str = Dialect.V4,
    reasoning_effort: Effort | str | int | None = None,
    *,
    drop_thinking: bool = True,
    tools_keys: Mapping[int, bytes] | None = None,
) -> Prompt:
    """`render_messages`; `tools_keys` maps id() of a `tools` list among `messages` to
    marshal (format 2) of that list, which its caller already has (dsml.request): the
    tools-section cache key without computing it again. The caller holds those lists for
    the whole call, so their ids cannot be reused meanwhile."""
    if thinking_mode not in THINKING_MODES:
        raise RenderError(f"thinking_mode must be one of {THINKING_MODES}", param="thinking_mode")
    try:
        dialect = Dialect(dialect)
    except ValueError:
        raise RenderError(f"unknown dialect {dialect!r}", param="dialect") from None
    thinking = thinking_mode == "thinking"
    effort_prefix = _effort_prefix(dialect, reasoning_effort)  # checked in chat mode too
    effort_prefix = effort_prefix if thinking else ""
    if dialect == Dialect.V3_2:
        msgs = _checked(messages)
        renderer: _Renderer = V32Renderer(dialect, thinking, drop_thinking, tools_keys)
        offered = [tool for msg in msgs for tool in (msg.get("tools") or [])]
        renderer.render(msgs)
    else:
        msgs = _merge_tool_messages(_checked(messages))
        _sort_tool_results(msgs)
        offered = [tool for msg in msgs for tool in (msg.get("tools") or [])]
        # Any tools in the conversation keep every turn's reasoning (tool use spans turns).
        drop_thinking = drop_thinking and not offered
        renderer = _Renderer(dialect, thinking, drop_thinking, tools_keys)
        if thinking and drop_thinking:
            msgs = _drop_thinking(msgs, renderer.texts.system_token)
        renderer.out.control(mk.BOS)
        # V4.1 hosts the effort text in a leading <｜System｜> turn, shared with a first
        # system message.
        if renderer.texts.system_token and (effort_prefix or msgs[0]["role"] == "system"):
            renderer.out.control(mk.SYSTEM)
        renderer.out.text(effort_prefix)
        last_user = _last_user_index(msgs, renderer.texts.system_token)
        for i in range(len(msgs)):
            renderer.message(i, msgs, last_user)

    segments = renderer.out.segments
    return Prompt(
        segments=segments,
        thinking=renderer.continues_reasoning
        or segments[-1] == Segment(mk.THINK_OPEN, control=True),
        tools=list(offered),
        prefix=_prefix_text(msgs),
    )


def _prefix_text(messages: list[dict[str, Any]]) -> str:
    last = messages[-1]
    if last["role"] == "assistant" and (last.get("wo_eos") or last.get("prefix")):
        return last.get("content") or ""
    return ""
