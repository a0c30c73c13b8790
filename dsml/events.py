"""Events the streaming parser emits, and the outcomes it reports for metrics.

Every endpoint encoder (chat completions, Anthropic messages, Responses) and the metrics
consume these, so they stay small, immutable and free of wire details.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class CallOutcome(StrEnum):
    """Validation outcome of one tool call (label values of dsml_proxy_tool_calls_total)."""

    VALID = "valid"
    REPAIRED = "repaired"  # valid after a coercion/tolerance
    SCHEMA_INVALID = "schema_invalid"
    INVALID_JSON = "invalid_json"
    UNKNOWN_TOOL = "unknown_tool"
    TRUNCATED = "truncated"  # the stream ended inside this invoke; not in ParseResult.tool_calls


class TurnOutcome(StrEnum):
    """How a turn that offered tools ended (label values of dsml_proxy_tool_turns_total)."""

    TOOL_CALLS = "tool_calls"
    ANSWER = "answer"
    RECOVERED_FROM_THINKING = "recovered_from_thinking"
    RECOVERED_EMPTY = "recovered_empty"  # set by the proxy after its `</think>` continuation
    MALFORMED = "malformed"
    TRUNCATED = "truncated"
    EMPTY = "empty"


class RepairKind(StrEnum):
    """One value per tolerance of dsml.md section 6 (label values of dsml_proxy_dsml_repairs_total)."""

    DOUBLED_BARS = "doubled_bars"
    ASCII_BARS = "ascii_bars"
    MISSING_BAR = "missing_bar"
    TAG_SPELLING = "tag_spelling"  # toolcalls / tool-calls / v4.1 spaced / v3.2 function_calls
    TYPOGRAPHIC_QUOTES = "typographic_quotes"
    WHITESPACE = "whitespace"  # extra whitespace between tags or around '='
    BLOCK_SEPARATOR = "block_separator"  # a single '\n' (or none) before the block
    MISSING_STRING_ATTR = "missing_string_attr"
    SELF_CLOSING_INVOKE = "self_closing_invoke"
    JSON_BODY = "json_body"  # a JSON object inside an invoke instead of parameters
    WRAPPED_ARGUMENTS = "wrapped_arguments"  # a lone `arguments`/`input` parameter wrapping the object
    TYPE_COERCION = "type_coercion"  # string="true" value that the schema types otherwise
    MISSING_OPENER = "missing_opener"  # invokes without <｜DSML｜tool_calls>
    RECOVERED_FROM_THINKING = "recovered_from_thinking"  # block inside reasoning became calls
    ORPHAN_CLOSER = "orphan_closer"
    LXML_REPAIR = "lxml_repair"  # last resort: lxml's recovering parser read the block
    # Damaged blocks, dsml.md section 6.1 (the rule's number in brackets).
    PARAM_CLOSER_MISSING = "param_closer_missing"  # a parameter opener ended the open value (1)
    BROKEN_CLOSER = "broken_closer"  # a closer without its `>` (1)
    INVOKE_CLOSER_MISSING = "invoke_closer_missing"  # an invoke opener closed the open invoke (2)
    PARTIAL_TAG = "partial_tag"  # a stray `</` or cut tag between tags, dropped as markup (2)
    INVOKE_CLOSED_BY_BLOCK = "invoke_closed_by_block"  # the block closer closed the invoke (3)
    STRAY_OPENER = "stray_opener"  # a second block opener inside a block (4)
    DAMAGED_OPENER = "damaged_opener"  # a broken opener line right before a real block (4)
    FENCED = "fenced"  # a block in a code fence that ends the output (5)
    BROKEN_INVOKE = "broken_invoke"  # a nameless or unreadable invoke beside real calls (6)
    THINKING_ORPHAN = "thinking_orphan"  # an orphan invoke at the end of reasoning (8)
    GUARDED_SPELLING = "guarded_spelling"  # spaced or U+2016 bars, tool_use, no DSML token (9)
    EXTRA_THINK_TAG = "extra_think_tag"  # a second `</think>` or a doubled `<think>` (10)
    DUPLICATE_PARAMETER = "duplicate_parameter"  # a key given twice: the first value stays


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallArgsDelta:
    index: int
    fragment: str  # concatenated fragments of one call == json.dumps(final arguments)


@dataclass(frozen=True, slots=True)
class ToolCallEnd:
    index: int
    arguments: dict[str, Any]
    outcome: CallOutcome
    error: str | None = None  # validation message for schema_invalid / invalid_json / unknown_tool


@dataclass(frozen=True, slots=True)
class Notice:
    kind: RepairKind
    detail: str = ""


Event = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArgsDelta | ToolCallEnd | Notice

# Fast constructors for the parser's hot paths. Frozen dataclasses spend ~300 ns in
# __init__ (object.__setattr__ per field); setting the slots directly is ~2x cheaper and
# builds the same objects.
_new = object.__new__
_set_text = ContentDelta.text.__set__  # type: ignore[attr-defined]
_set_rtext = ReasoningDelta.text.__set__  # type: ignore[attr-defined]
_set_index = ToolCallArgsDelta.index.__set__  # type: ignore[attr-defined]
_set_fragment = ToolCallArgsDelta.fragment.__set__  # type: ignore[attr-defined]


def content_delta(text: str) -> ContentDelta:
    ev = _new(ContentDelta)
    _set_text(ev, text)
    return ev


def reasoning_delta(text: str) -> ReasoningDelta:
    ev = _new(ReasoningDelta)
    _set_rtext(ev, text)
    return ev


def args_delta(index: int, fragment: str) -> ToolCallArgsDelta:
    ev = _new(ToolCallArgsDelta)
    _set_index(ev, index)
    _set_fragment(ev, fragment)
    return ev


_set_start_index = ToolCallStart.index.__set__  # type: ignore[attr-defined]
_set_start_id = ToolCallStart.id.__set__  # type: ignore[attr-defined]
_set_start_name = ToolCallStart.name.__set__  # type: ignore[attr-defined]
_set_end_index = ToolCallEnd.index.__set__  # type: ignore[attr-defined]
_set_end_arguments = ToolCallEnd.arguments.__set__  # type: ignore[attr-defined]
_set_end_outcome = ToolCallEnd.outcome.__set__  # type: ignore[attr-defined]
_set_end_error = ToolCallEnd.error.__set__  # type: ignore[attr-defined]


def tool_call_start(index: int, id: str, name: str) -> ToolCallStart:
    ev = _new(ToolCallStart)
    _set_start_index(ev, index)
    _set_start_id(ev, id)
    _set_start_name(ev, name)
    return ev


def tool_call_end(
    index: int, arguments: dict[str, Any], outcome: CallOutcome, error: str | None
) -> ToolCallEnd:
    ev = _new(ToolCallEnd)
    _set_end_index(ev, index)
    _set_end_arguments(ev, arguments)
    _set_end_outcome(ev, outcome)
    _set_end_error(ev, error)
    return ev


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]
    arguments_json: str  # exactly the concatenated ToolCallArgsDelta fragments
    outcome: CallOutcome
    error: str | None = None


@dataclass(slots=True)
class ParseResult:
    """The whole turn, accumulated from the events (what a non-streaming response needs)."""

    reasoning_content: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    turn_outcome: TurnOutcome | None = None  # None when the request offered no tools
    raw: str = ""  # everything fed, verbatim
