"""DeepSeek-V3.2's prompt format (`encoding_dsv32.py`), for `dsml.render.render_messages`.

V3.2 differs from V4 in layout, not only in texts, so it has its own renderer: the tool
block is `<｜DSML｜function_calls>`, every user turn ends with the assistant opener, and tool
results are one positional `<function_results>` block per call group. A thinking-mode
conversation with one tool call renders as:

    <｜begin▁of▁sentence｜><｜User｜>{user}<｜Assistant｜><think>{reasoning}</think>{content}

    <｜DSML｜function_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜function_calls><｜end▁of▁sentence｜>

    <function_results>
    <result>{result}</result>
    </function_results>

    <think>

Sections (tools, response format), tool-call history and assistant turns are shared with
V4 through `dsml.render_common._Renderer`; this module only owns the message loop and tool results.
"""

from __future__ import annotations

from typing import Any

from dsml import markers as mk
from dsml.errors import RenderError
from dsml.render_common import (
    _as_text,
    _drop_thinking,
    _last_user_index,
    _Renderer,
    _tool_result_text,
)


class V32Renderer(_Renderer):
    """DeepSeek-V3.2 (`encoding_dsv32.py`): every user turn ends with the assistant opener,
    tool results follow the calls as one `<function_results>` block per call group, matched
    to calls by position, and earlier reasoning is dropped even when tools are offered."""

    def render(self, messages: list[dict[str, Any]]) -> None:
        for i, msg in enumerate(messages):
            if msg.get("task") is not None or msg["role"] == "latest_reminder":
                raise RenderError(
                    f"messages[{i}]: DeepSeek-V3.2 has no tasks or reminder turns",
                    param=f"messages[{i}]",
                )
        if self.thinking and self.drop_thinking:
            messages = _drop_thinking(messages, False, kept_roles=("user", "system", "tool"))
        last_user = _last_user_index(messages)
        self.out.control(mk.BOS)
        for i, msg in enumerate(messages):
            role = msg["role"]
            content_param = f"messages[{i}].content"
            if role == "system":
                self.out.text(_as_text(msg.get("content"), content_param))
                self.attachments(msg, i)
            elif role in ("user", "developer"):
                content = _as_text(msg.get("content"), content_param)
                self.out.control(mk.USER)
                if role == "developer":
                    if not content:
                        raise RenderError("a developer message needs content", param=content_param)
                    self.attachments(msg, i)
                    content = f"\n\n# The user's message is: {content}"
                self.out.text(content)
                self.out.control(mk.ASSISTANT)
                self.out.control(
                    mk.THINK_OPEN if self.thinking and i == last_user else mk.THINK_CLOSE
                )
            elif role == "tool":
                self.tool_result(i, messages, last_user)
            else:
                self.assistant(i, messages, last_user)

    def tool_result(self, i: int, messages: list[dict[str, Any]], last_user: int) -> None:
        caller = i - 1
        while caller >= 0 and messages[caller]["role"] == "tool":
            caller -= 1
        calls = messages[caller].get("tool_calls") if caller >= 0 else None
        position = i - caller  # 1 for the first result of the group
        if messages[caller]["role"] != "assistant" or not calls or len(calls) < position:
            raise RenderError(
                f"messages[{i}]: a tool result must follow an assistant message with as many tool calls",
                param=f"messages[{i}]",
            )
        if position == 1:
            self.out.text("\n\n<function_results>")
        text = _tool_result_text(messages[i].get("content"), f"messages[{i}].content")
        self.out.text(f"\n<result>{text}</result>")
        if position == len(calls):
            self.out.text("\n</function_results>\n\n")
            self.out.control(mk.THINK_OPEN if self.thinking and i >= last_user else mk.THINK_CLOSE)
