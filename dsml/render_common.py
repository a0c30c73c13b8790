"""What the V4-family renderer (`dsml.render`) and the V3.2 renderer (`dsml.render_v32`)
share: the segment builder, the tools-section cache, the checks of client input, and
`_Renderer`, which writes sections, assistant turns and tool-call history. Both renderer
modules import this one, and neither imports the other at module level.
"""

from __future__ import annotations

import json
import marshal
import re
from collections.abc import Mapping, Sequence
from typing import Any

from dsml import markers as mk
from dsml.dialects import (
    JSON_OBJECT_SECTION,
    RESPONSE_FORMAT_SECTION,
    Dialect,
    DialectTexts,
    texts,
)
from dsml.errors import RenderError
from dsml.lru import SizedLRU
from dsml.prompt import Segment

THINKING_MODES = ("thinking", "chat")
ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")
JSON_OBJECT = "json_object"  # value of a message's `response_format` for json_object mode

# Roles whose history survives drop_thinking even before the last user turn.
_KEPT_ROLES = ("user", "system", "tool", "latest_reminder")

# Control strings that may appear inside the renderer's own fixed texts (the tools section).
_FIXED_CONTROL = re.compile(
    "|".join(re.escape(s) for s in (mk.DSML, mk.THINK_OPEN, mk.THINK_CLOSE, mk.SYSTEM))
)


def to_json(value: Any, param: str = "messages") -> str:
    """The reference's serialization: Python's default separators, non-ASCII kept."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as err:
        raise RenderError(f"{param} is not JSON-serializable: {err}", param=param) from None


class SegmentBuilder:
    """Accumulates segments; adjacent plain-text pieces merge, control strings stay single."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []

    def extend_built(self, segments: Sequence[Segment]) -> None:
        """Append the segments another SegmentBuilder built, as if its calls were made here.

        Such segments have no empty text and no two texts in a row, so only the first one
        can merge (with a text segment this builder ends with)."""
        if not segments:
            return
        first = segments[0]
        if not first.control and self.segments and not self.segments[-1].control:
            self.segments[-1] = Segment(self.segments[-1].text + first.text)
            self.segments.extend(segments[1:])
        else:
            self.segments.extend(segments)

    def control(self, text: str) -> None:
        self.segments.append(Segment(text, control=True))

    def text(self, text: str) -> None:
        if not text:
            return
        if self.segments and not self.segments[-1].control:
            self.segments[-1] = Segment(self.segments[-1].text + text)
        else:
            self.segments.append(Segment(text))

    def fixed(self, text: str) -> None:
        """Renderer-owned text: its `｜DSML｜` and think tags are real control tokens."""
        start = 0
        for match in _FIXED_CONTROL.finditer(text):
            self.text(text[start : match.start()])
            self.control(match.group())
            start = match.end()
        self.text(text[start:])


# ---------------------------------------------------------------------------------------
# The rendered tools section, cached by content.
#
# An agent sends the same tools every turn, and their section is most of a short request's
# rendering (the schemas' JSON, and the fixed intro cut into text and control segments).
# It depends only on the tool list and the dialect's intro and outro texts, so it is cached
# under exactly those: the key holds the two texts and `marshal` (format 2) of the tools.
# marshal writes only plain data (dict, list, str, int, float, bool, None, tuple...), keeps
# types apart (1, 1.0 and True differ, as in the JSON written) and dict order, refuses
# anything else (subclasses included: those are rendered uncached), and format 2 has no
# back-references, so equal content gives equal bytes. The cached value is a tuple of
# frozen Segments: nothing a caller holds can change it. Bounded by entries and by size.

TOOLS_CACHE_MAX_ENTRIES = 256
TOOLS_CACHE_MAX_CHARS = 8_000_000  # key bytes + section text, over all entries


TOOLS_SECTIONS: SizedLRU[tuple[str, str, bytes], tuple[Segment, ...]] = SizedLRU(
    TOOLS_CACHE_MAX_ENTRIES, TOOLS_CACHE_MAX_CHARS
)


def _tools_key(texts_: DialectTexts, tools: Any) -> tuple[str, str, bytes] | None:
    try:
        return texts_.tools_intro, texts_.tools_outro, marshal.dumps(tools, 2)
    except (ValueError, TypeError, RecursionError):  # not plain data: rendered uncached
        return None


# ---------------------------------------------------------------------------------------
# Checking the input: everything here is client-controlled, so errors are RenderError.


def _as_text(value: Any, param: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RenderError(f"{param} must be a string", param=param)
    return value


def _tool_result_text(content: Any, param: str) -> str:
    """A tool result is a string or a list of text parts, joined by blank lines."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, Sequence):
        raise RenderError(f"{param} must be a string or a list of text parts", param=param)
    texts_ = []
    for k, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise RenderError(
                f"{param}[{k}]: content parts of type {kind!r} are not supported in tool results",
                param=f"{param}[{k}]",
            )
        texts_.append(_as_text(part.get("text"), f"{param}[{k}].text"))
    return "\n\n".join(texts_)


def call_arguments(arguments: Any, param: str) -> dict[str, Any]:
    """History arguments as an object, from a JSON string or an object."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError) as err:
            raise RenderError(f"{param} is not valid JSON: {err}", param=param) from None
    if not isinstance(arguments, Mapping):
        raise RenderError(f"{param} must be a JSON object", param=param)
    return dict(arguments)


def _checked(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise RenderError("messages must be a non-empty list", param="messages")
    checked = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise RenderError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = msg.get("role")
        if role not in ROLES:
            raise RenderError(
                f"messages[{i}].role: unknown role {role!r}", param=f"messages[{i}].role"
            )
        for key in ("tools", "tool_calls"):
            value = msg.get(key)
            if value and (not isinstance(value, Sequence) or isinstance(value, str)):
                raise RenderError(
                    f"messages[{i}].{key} must be a list", param=f"messages[{i}].{key}"
                )
        checked.append(dict(msg))
    return checked


# ---------------------------------------------------------------------------------------
# Preprocessing, as the reference does it.


def _merge_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool results become `<tool_result>` blocks of a user turn; a following user joins it.

    As in the reference, every user message becomes a list of blocks, and a user message
    right after another user turn (without a task) joins that turn.
    """
    merged: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        role = msg["role"]
        previous_joinable = (
            merged
            and merged[-1]["role"] == "user"
            and "blocks" in merged[-1]
            and merged[-1].get("task") is None
        )
        if role == "tool":
            text = _tool_result_text(msg.get("content"), f"messages[{i}].content")
            call_id = msg.get("tool_call_id")
            block = ("tool_result", call_id if isinstance(call_id, str) else "", text)
            if merged and merged[-1]["role"] == "user" and "blocks" in merged[-1]:
                merged[-1]["blocks"].append(block)
            else:
                merged.append({"role": "user", "blocks": [block]})
        elif role == "user":
            block = ("text", "", _as_text(msg.get("content"), f"messages[{i}].content"))
            if previous_joinable:
                merged[-1]["blocks"].append(block)
            else:
                merged.append({**msg, "blocks": [block]})
        else:
            merged.append(msg)
    return merged


def _sort_tool_results(messages: list[dict[str, Any]]) -> None:
    """Order each turn's tool results by their call's position in the last assistant turn."""
    call_order: dict[str, int] = {}
    for msg in messages:
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            call_order = {}
            for k, call in enumerate(msg["tool_calls"]):
                call_id = call.get("id") if isinstance(call, Mapping) else None
                if call_id and isinstance(call_id, str):
                    call_order[call_id] = k
        elif msg["role"] == "user" and "blocks" in msg:
            results = [b for b in msg["blocks"] if b[0] == "tool_result"]
            if len(results) > 1 and call_order:
                ordered = iter(sorted(results, key=lambda b: call_order.get(b[1], 0)))
                msg["blocks"] = [
                    next(ordered) if b[0] == "tool_result" else b for b in msg["blocks"]
                ]


def _opens_turn(messages: list[dict[str, Any]], i: int, system_token: bool) -> bool:
    """Whether message i is an instruction the assistant answers (user, developer, and in
    V4.1 a system message after the first, which gets its own <｜System｜> turn)."""
    role = messages[i]["role"]
    return role in ("user", "developer") or (system_token and role == "system" and i > 0)


def _last_user_index(messages: list[dict[str, Any]], system_token: bool = False) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if _opens_turn(messages, i, system_token):
            return i
    return -1


def _drop_thinking(
    messages: list[dict[str, Any]], system_token: bool, kept_roles: tuple[str, ...] = _KEPT_ROLES
) -> list[dict[str, Any]]:
    """Before the last user turn: assistant reasoning goes, developer messages go."""
    last_user = _last_user_index(messages, system_token)
    kept = []
    for i, msg in enumerate(messages):
        if msg["role"] in kept_roles or i >= last_user:
            kept.append(msg)
        elif msg["role"] == "assistant":
            kept.append({k: v for k, v in msg.items() if k != "reasoning_content"})
    return kept


# ---------------------------------------------------------------------------------------
# Rendering one message.


class _Renderer:
    def __init__(self, dialect: Dialect, thinking: bool, drop_thinking: bool,
                 tools_keys: Mapping[int, bytes] | None = None) -> None:
        self.texts: DialectTexts = texts(dialect)
        # id(a tools list) -> marshal of it, where the caller knows it (_render_messages).
        self.tools_keys = tools_keys
        self.thinking = thinking
        self.drop_thinking = drop_thinking
        self.out = SegmentBuilder()
        self.continues_reasoning = False  # an open assistant turn left inside reasoning
        self.is_v32 = dialect == Dialect.V3_2

    # -- sections owned by a system or developer message

    def tools_section(self, tools: Any, param: str) -> None:
        if not isinstance(tools, Sequence) or isinstance(tools, str):
            raise RenderError(f"{param} must be a list", param=param)
        known = self.tools_keys.get(id(tools)) if self.tools_keys else None
        key = ((self.texts.tools_intro, self.texts.tools_outro, known) if known is not None
               else _tools_key(self.texts, tools))
        section = TOOLS_SECTIONS.get(key) if key is not None else None
        if section is None:
            section = self._tools_section(tools, param)
            if key is not None:
                TOOLS_SECTIONS.put(key, section, len(key[2]) + sum(len(s.text) for s in section))
        self.out.extend_built(section)

    def _tools_section(self, tools: Sequence[Any], param: str) -> tuple[Segment, ...]:
        schemas = []
        for k, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, Mapping) else None
            if not isinstance(function, Mapping):
                raise RenderError(f"{param}[{k}].function must be an object", param=f"{param}[{k}]")
            schemas.append(to_json(function, f"{param}[{k}].function"))
        out = SegmentBuilder()
        out.text("\n\n")
        out.fixed(self.texts.tools_intro)
        out.text("\n".join(schemas))
        out.fixed(self.texts.tools_outro)
        return tuple(out.segments)

    def response_format_section(self, response_format: Any) -> None:
        self.out.text("\n\n")
        if response_format == JSON_OBJECT:
            self.out.fixed(JSON_OBJECT_SECTION)
        else:
            self.out.fixed(RESPONSE_FORMAT_SECTION)
            self.out.text(to_json(response_format, "response_format"))

    def attachments(self, msg: dict[str, Any], i: int) -> None:
        if msg.get("tools"):
            self.tools_section(msg["tools"], f"messages[{i}].tools")
        if msg.get("response_format"):
            self.response_format_section(msg["response_format"])

    # -- the assistant's tool-call history

    def tool_calls(self, calls: Any, param: str) -> None:
        if not isinstance(calls, Sequence) or isinstance(calls, str):
            raise RenderError(f"{param} must be a list", param=param)
        t = self.texts
        self.out.text("\n\n<")
        self.out.control(mk.DSML)
        self.out.text(f"{t.block_tag}>\n")
        for k, call in enumerate(calls):
            function = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(function, Mapping):
                raise RenderError(f"{param}[{k}].function must be an object", param=f"{param}[{k}]")
            name = _as_text(function.get("name"), f"{param}[{k}].function.name")
            if "arguments" not in function:
                raise RenderError(
                    f"{param}[{k}].function.arguments is missing",
                    param=f"{param}[{k}].function.arguments",
                )
            arguments = call_arguments(function["arguments"], f"{param}[{k}].function.arguments")
            if k:
                self.out.text("\n")
            self.out.text("<")
            self.out.control(mk.DSML)
            self.out.text(f'{t.invoke_tag} name="{name}">\n')
            for n, (key, value) in enumerate(arguments.items()):
                is_string = isinstance(value, str)
                if n:
                    self.out.text("\n")
                self.out.text("<")
                self.out.control(mk.DSML)
                self.out.text(
                    f'{t.parameter_tag} name="{key}" string="{"true" if is_string else "false"}">'
                )
                self.out.text(
                    value if is_string else to_json(value, f"{param}[{k}].function.arguments")
                )
                self.out.text("</")
                self.out.control(mk.DSML)
                self.out.text(f"{t.parameter_tag}>")
            self.out.text("\n</")
            self.out.control(mk.DSML)
            self.out.text(f"{t.invoke_tag}>")
        self.out.text("\n</")
        self.out.control(mk.DSML)
        self.out.text(f"{t.block_tag}>")

    # -- one message, then what follows it

    def message(self, i: int, messages: list[dict[str, Any]], last_user: int) -> None:
        msg = messages[i]
        role = msg["role"]
        content_param = f"messages[{i}].content"
        if role == "system":
            if self.texts.system_token and i > 0:
                self.out.control(mk.SYSTEM)
            self.out.text(_as_text(msg.get("content"), content_param))
            self.attachments(msg, i)
        elif role == "developer":
            content = _as_text(msg.get("content"), content_param)
            if not content:
                raise RenderError("a developer message needs content", param=content_param)
            self.out.control(mk.USER)
            self.out.text(content)
            self.attachments(msg, i)
        elif role == "user":
            self.out.control(mk.USER)
            for k, (kind, _, text) in enumerate(msg["blocks"]):
                if k:
                    self.out.text("\n\n")
                if kind == "tool_result":
                    self.out.text(f"{mk.TOOL_RESULT_OPEN}{text}{mk.TOOL_RESULT_CLOSE}")
                else:
                    self.out.text(text)
        elif role == "latest_reminder":
            self.out.control(mk.LATEST_REMINDER)
            self.out.text(_as_text(msg.get("content"), content_param))
        else:
            self.assistant(i, messages, last_user)
        self.turn_transition(i, messages, last_user)

    def assistant(self, i: int, messages: list[dict[str, Any]], last_user: int) -> None:
        msg = messages[i]
        # After a quick-instruction task the answer is the task's output, never reasoning.
        after_task = i > 0 and messages[i - 1].get("task") is not None
        content = _as_text(msg.get("content"), f"messages[{i}].content")
        open_turn = bool(msg.get("wo_eos") or msg.get("prefix"))
        # V3.2 writes reasoning only after the last user turn, whatever drop_thinking says.
        keeps_reasoning = i > last_user or (not self.drop_thinking and not self.is_v32)
        if self.thinking and not after_task and keeps_reasoning:
            self.out.text(
                _as_text(msg.get("reasoning_content"), f"messages[{i}].reasoning_content")
            )
            if open_turn and not content and not msg.get("tool_calls"):
                # A continuation with no answer text yet continues the reasoning (as
                # DeepSeek's request layer does); the reference would close it.
                self.continues_reasoning = True
                return
            self.out.control(mk.THINK_CLOSE)
        self.out.text(content)
        if msg.get("tool_calls"):
            self.tool_calls(msg["tool_calls"], f"messages[{i}].tool_calls")
        if not open_turn:
            self.out.control(mk.EOS)

    def turn_transition(self, i: int, messages: list[dict[str, Any]], last_user: int) -> None:
        """After a user turn comes `<｜Assistant｜>` and the think tag that opens the answer."""
        if i + 1 < len(messages) and messages[i + 1]["role"] not in (
            "assistant",
            "latest_reminder",
        ):
            return
        task = messages[i].get("task")
        if task is not None:
            token = mk.TASK_TOKENS.get(task) if isinstance(task, str) else None
            if token is None:
                raise RenderError(
                    f"messages[{i}].task: unknown task {task!r}", param=f"messages[{i}].task"
                )
            if task == "action":
                self.out.control(mk.ASSISTANT)
                self.out.control(mk.THINK_OPEN if self.thinking else mk.THINK_CLOSE)
            self.out.control(token)
        elif _opens_turn(messages, i, self.texts.system_token):
            self.out.control(mk.ASSISTANT)
            opens_reasoning = self.thinking and (not self.drop_thinking or i >= last_user)
            self.out.control(mk.THINK_OPEN if opens_reasoning else mk.THINK_CLOSE)
