"""Streaming parser for DeepSeek-V4's output: reasoning, content and DSML tool calls.

What the model writes after the prompt (dsml.md section 5), e.g. in thinking mode::

    I need the weather first.</think>Let me check.

    <｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Taipei</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls><｜end▁of▁sentence｜>

becomes ReasoningDelta("I need the weather first."), ContentDelta("Let me check."),
ToolCallStart(0, id, "get_weather"), ToolCallArgsDelta fragments that concatenate to
`{"city": "Taipei", "days": 3}`, and ToolCallEnd(0, {...}, CallOutcome.VALID).

Three layers: `dsml.lexer.IncrementalLexer` turns deltas into text and marker tokens
(holding back only a possible marker prefix), a state machine written as a transition
table (`_TABLE[state][token kind]`) consumes them, and `dsml.events` are what comes out.

Policies (dsml.md section 6) and the decisions the spec leaves open:

- A string value streams as JSON-escaped fragments only when the schema allows a string
  there. A `string="true"` value the schema types otherwise (and every `string="false"`
  value) is held until its parameter closes, then coerced, so streamed fragments are never
  retracted: a call's fragments always concatenate to `json.dumps(arguments,
  ensure_ascii=False)`. A lone `arguments`/`input` parameter the schema does not declare
  is held until the invoke closes (it may be a wrapper to unwrap).
- `string="false"` text that is not JSON (NaN and 1e999 included): kept as a string when
  the schema allows strings (repaired), else the call ends `invalid_json` with the raw
  text as the value and an error naming the parameter.
- strict=True: calls are not streamed; each is emitted whole (start, one fragment, end)
  when its invoke closes and validates. An invalid call emits no events, is listed in
  `StreamParser.rejected`, and leaves no gap in the indices.
- Inside reasoning a block (or an invoke without opener) is held; it becomes calls when it
  closes, names declared tools and only whitespace, `</think>` and EOS follow. Otherwise
  its text is released as reasoning, verbatim. An invoke without opener in content is
  held until it closes and becomes a call when it names a declared tool and carries the
  schema's required arguments; otherwise it is content.
- Text inside a block that the state machine cannot read is kept; at the block's end
  `dsml.repair` (lxml) reads it, and what it cannot turn into calls is content.
- End of stream inside a block: a started call ends with `CallOutcome.TRUNCATED` (its
  streamed JSON closed, so fragments stay valid JSON; the member was added to events.py)
  and is not in `ParseResult.tool_calls`; the text from the end of the last complete
  invoke comes back as content; the turn is `truncated` (no EOS) or `malformed` (EOS).
- Each kind of repair is noticed once per block (orphan closers and lxml repairs each
  time); a call with any tolerance applied validates as `repaired`.
- `trace=True` records `spans`: (kind, text) pieces in input order, kind one of reasoning,
  content, markup, value, ignored; their texts concatenate to everything fed. It turns
  the fast paths off (tests compare both).
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any

from dsml import repair
from dsml.events import (
    CallOutcome,
    ContentDelta,
    Event,
    Notice,
    ParseResult,
    ReasoningDelta,
    RepairKind,
    ToolCall,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    TurnOutcome,
)
from dsml.lexer import (
    CALLS_CLOSE,
    CALLS_OPEN,
    END,
    INVOKE_CLOSE,
    INVOKE_OPEN,
    NUM_KINDS,
    PARAM_CLOSE,
    PARAM_OPEN,
    TEXT,
    THINK,
    IncrementalLexer,
    Tag,
)
from dsml.schema import ToolRegistry, ToolSchema, coerce_value, loads_strict, type_allows

# Parser states.
REASONING, CONTENT, BLOCK, INVOKE, BODY, VALUE, AFTER, DONE = range(8)
# Value modes of a parameter.
M_STR, M_COERCE, M_JSON = range(3)
# Fast paths of feed(): plain text in these states needs one `in` test and one event.
FAST_NONE, FAST_CONTENT, FAST_REASONING, FAST_VALUE, FAST_HELD_VALUE, FAST_WS = range(6)

_WRAPPERS = ("arguments", "input")
_JUNK_ERROR = "unreadable text inside the invoke (returned as content)"
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]').search
_ALPHANUM = string.ascii_letters + string.digits
_RNG = random.Random()  # seeded from os.urandom at import
_new = object.__new__
# Frozen dataclasses spend ~300 ns in __init__ (object.__setattr__ per field); the hot
# paths set the slots directly instead (~2x cheaper, same objects).
_set_text = ContentDelta.text.__set__  # type: ignore[attr-defined]
_set_rtext = ReasoningDelta.text.__set__  # type: ignore[attr-defined]
_set_index = ToolCallArgsDelta.index.__set__  # type: ignore[attr-defined]
_set_fragment = ToolCallArgsDelta.fragment.__set__  # type: ignore[attr-defined]


def _content(text: str) -> ContentDelta:
    ev = _new(ContentDelta)
    _set_text(ev, text)
    return ev


def _reasoning(text: str) -> ReasoningDelta:
    ev = _new(ReasoningDelta)
    _set_rtext(ev, text)
    return ev


def _args(index: int, fragment: str) -> ToolCallArgsDelta:
    ev = _new(ToolCallArgsDelta)
    _set_index(ev, index)
    _set_fragment(ev, fragment)
    return ev


def _escape(text: str) -> str:
    return text if _NEEDS_ESCAPE(text) is None else encode_basestring(text)[1:-1]


def default_id() -> str:
    """`call_` + 24 random alphanumerics. Call ids only need to be unique within a
    conversation, not secret; a seeded Mersenne Twister costs ~2 us where an urandom
    syscall per id measured ~20 us on a busy VM."""
    return "call_" + "".join(_RNG.choices(_ALPHANUM, k=24))


# json.dumps builds a new encoder per call when given options (~2 us); this one is reused.
_encode = json.JSONEncoder(ensure_ascii=False).encode


def _dumps(value: Any) -> str:
    """json.dumps(value, ensure_ascii=False), with the scalars written directly."""
    kind = type(value)
    if kind is str:
        return encode_basestring(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        return float.__repr__(value)  # finite: loads_strict refuses NaN and overflow
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    return _encode(value)


class _Call:
    """One invoke being read."""

    __slots__ = (
        "args", "body", "emitted", "error", "errors", "id", "index", "jparts", "key", "mode",
        "name", "outcome", "pending", "repairs", "streaming", "tool", "types", "vparts", "wrapper",
    )  # fmt: skip

    def __init__(self, name: str, tool: ToolSchema | None, streaming: bool) -> None:
        self.name = name
        self.tool = tool
        self.streaming = streaming
        self.id = ""
        self.index = -1
        self.args: dict[str, Any] = {}
        self.jparts: list[str] = []  # argument JSON fragments (emitted or, if held, to emit)
        self.emitted = 0  # parameters written into jparts
        self.repairs: list[RepairKind] = []
        self.errors: list[str] = []  # invalid_json messages
        self.body: list[str] | None = None  # raw text of a JSON body
        self.pending: tuple[str, Any] | None = None  # a wrapper candidate, not yet written
        self.key = ""
        self.mode = M_STR
        self.types: frozenset[str] | None = None
        self.vparts: list[str] = []
        self.wrapper = False
        self.outcome = CallOutcome.VALID  # decided at the invoke closer
        self.error: str | None = None


class _Hold:
    """Text held back until decided: a block inside reasoning, or an invoke without opener."""

    __slots__ = ("bare", "calls", "closed", "events", "raw", "region", "spans", "think_at")

    def __init__(self, region: int, raw: list[str], bare: bool) -> None:
        self.region = region  # REASONING or CONTENT: where the raw text goes if rejected
        self.raw = raw
        self.bare = bare
        self.calls: list[_Call] = []
        self.events: list[Event] = []  # notices waiting for the decision
        self.spans: list[tuple[str, str]] = []
        self.closed = False  # the block (or bare invoke) closed; waiting for EOS
        self.think_at = -1  # index in raw of a `</think>` seen after the block


class StreamParser:
    """Feed text deltas, get events. See the module docstring for the format and policies."""

    def __init__(
        self,
        tools: list[dict[str, Any]] | None,
        thinking: bool,
        strict: bool = False,
        id_factory: Callable[[], str] | None = None,
        *,
        trace: bool = False,
    ) -> None:
        self._tools = ToolRegistry(tools)
        self._has_tools = bool(self._tools)
        self._strict = strict
        self._id_factory = id_factory or default_id
        self._lex = IncrementalLexer()
        self._state = REASONING if thinking else CONTENT
        self._out: list[Event] = []
        self._raw: list[str] = []
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._calls: list[ToolCall] = []
        self._notices: list[Notice] = []
        self.rejected: list[ToolCall] = []  # strict mode: invalid calls not emitted
        self._nl = ""  # held trailing newlines: the block separator if a block follows
        self._ws = ""  # whitespace between tags inside a block (its first 3 chars suffice)
        self._after_ws: list[str] = []  # whitespace after a block
        self._hold: _Hold | None = None
        self._call: _Call | None = None
        self._next_index = 0
        self._seen: set[RepairKind] = set()  # repairs already noticed in this block
        self._junk: list[str] = []  # block text the state machine could not read
        self._block_start = -1  # absolute offset of a streaming block's separator
        self._mark = 0  # trace length where the unfinished part of the block starts
        self._eos = False
        self._unterminated = False
        self._malformed = False
        self._recovered = False
        self._fast = FAST_NONE
        self._kind = TEXT  # kind of the token being handled
        self._summed = (0, 0)  # (pieces of _raw summed, their total length)
        self._junk_spans: list[int] = []
        self._in_junk = False  # unreadable block text runs until the next tag
        self._result: ParseResult | None = None
        self.spans: list[tuple[str, str]] | None = [] if trace else None
        if not trace:
            self._span = self._no_span  # type: ignore[method-assign]
        self._update_fast()

    # ----------------------------------------------------------------- public API

    def feed(self, text: str) -> list[Event]:
        if not text:
            return []
        self._raw.append(text)
        fast = self._fast
        # Fast paths (dsml.md section 6 asks for linear work; issue 2 for ~1 us a delta):
        # text without `<` in a text or value state costs one `in` test and one event;
        # deltas of a marker still arriving cost one absorb() call. Everything else goes
        # through the lexer and the transition table.
        if fast:
            if "<" not in text:
                if fast == FAST_VALUE:
                    self._vparts.append(text)
                    frag = text if _NEEDS_ESCAPE(text) is None else encode_basestring(text)[1:-1]
                    self._jparts.append(frag)
                    ev = _new(ToolCallArgsDelta)
                    _set_index(ev, self._cindex)
                    _set_fragment(ev, frag)
                    return [ev]
                if fast == FAST_HELD_VALUE:
                    self._vparts.append(text)
                    return []
                if fast == FAST_WS:
                    if text.isspace():
                        self._ws = (self._ws + text)[:3]
                        return []
                elif text and (text[-1] != "\n" or not self._has_tools):
                    if fast == FAST_CONTENT:
                        self._content.append(text)
                        ev = _new(ContentDelta)
                        _set_text(ev, text)
                        return [ev]
                    self._reasoning.append(text)
                    ev = _new(ReasoningDelta)
                    _set_rtext(ev, text)
                    return [ev]
            else:
                events = self._fast_split(text, fast)
                if events is not None:
                    return events
        lex = self._lex
        if (lex.tag_wait or lex.prefix_wait) and lex.absorb(text):
            return []  # a marker is still arriving: nothing to decide yet
        return self._feed_slow(text)

    def _fast_split(self, text: str, fast: int) -> list[Event] | None:
        """`text` + `<…`: the part before the `<` is plain text for the fast path and the
        rest only starts a marker (a `\n<` or `</` token). Hold it without the lexer loop."""
        lt = text.index("<")
        head = text[:lt]
        if fast == FAST_WS:
            if head and not head.isspace():
                return None
        elif fast in (FAST_CONTENT, FAST_REASONING) and head.endswith("\n") and self._has_tools:
            return None  # a possible block separator: the slow path holds it
        if not self._lex.hold_prefix(text[lt:]):
            return None
        self._fast = FAST_NONE
        if not head:
            return []
        if fast == FAST_VALUE:
            self._vparts.append(head)
            frag = _escape(head)
            self._jparts.append(frag)
            return [_args(self._cindex, frag)]
        if fast == FAST_HELD_VALUE:
            self._vparts.append(head)
            return []
        if fast == FAST_WS:
            self._ws = (self._ws + head)[:3]
            return []
        if fast == FAST_CONTENT:
            self._content.append(head)
            return [_content(head)]
        self._reasoning.append(head)
        return [_reasoning(head)]

    def _feed_slow(self, text: str) -> list[Event]:
        if self._state == DONE:
            if self._result is not None:
                raise RuntimeError("StreamParser.feed() after finish()")
            self._span("ignored", text)
            return []
        out = self._out = []
        self._lex.push(text)
        self._run(False)
        self._update_fast()
        return out

    def finish(self) -> list[Event]:
        if self._result is not None:
            return []
        out = self._out = []
        if self._state != DONE:
            self._run(True)
            if self._state != DONE:
                self._end(eos=False)
        self._fast = FAST_NONE
        self._state = DONE
        self._result = ParseResult(
            reasoning_content="".join(self._reasoning),
            content="".join(self._content),
            tool_calls=self._calls,
            notices=self._notices,
            turn_outcome=self._turn_outcome(),
            raw="".join(self._raw),
        )
        return out

    @property
    def result(self) -> ParseResult:
        if self._result is None:
            raise RuntimeError("StreamParser.result is valid after finish()")
        return self._result

    @property
    def held_tail(self) -> str:
        """Text the lexer holds back because it may start a marker (never > lexer.MAX_HEAD
        unless a recognised tag head is waiting for its attributes)."""
        return self._lex.held

    # ----------------------------------------------------------------- the loop

    def _run(self, final: bool) -> None:
        lex = self._lex
        table = _TABLE
        while (state := self._state) != DONE:
            tok = lex.next(state == VALUE, final)
            if tok is None:
                return
            kind, raw, tag = tok
            self._kind = kind
            if kind != TEXT:
                self._in_junk = False
            hold = self._hold
            if hold is not None:
                hold.raw.append(raw)
            table[state][kind](self, raw, tag)
        # After EOS: what the lexer still holds is ignored text.
        self._span("ignored", lex.held)
        lex.clear()

    def _offset(self) -> int:
        """Absolute offset of the next unread character. Summed lazily: the fast path of
        feed() does not count characters."""
        raw = self._raw
        count, total = self._summed
        if count < len(raw):
            total += sum(map(len, raw[count:]))
            self._summed = (len(raw), total)
        return total - len(self._lex.held)

    def _update_fast(self) -> None:
        st = self._state
        fast = FAST_NONE
        lex = self._lex
        # After _run() the lexer holds text only while it waits for a marker to complete.
        if (
            self.spans is None
            and not (lex.tag_wait or lex.prefix_wait)
            and not self._nl
            and self._hold is None
        ):
            if st == CONTENT:
                fast = FAST_CONTENT
            elif st == REASONING:
                fast = FAST_REASONING
            elif st == VALUE:
                call = self._call
                if call is not None and call.streaming and call.mode == M_STR and not call.wrapper:
                    fast = FAST_VALUE
                    self._jparts = call.jparts
                    self._cindex = call.index
                elif call is not None:
                    fast = FAST_HELD_VALUE
                if call is not None:
                    self._vparts = call.vparts
            elif st in (INVOKE, BLOCK) and not self._in_junk:
                fast = FAST_WS
        self._fast = fast

    # ----------------------------------------------------------------- output helpers

    def _span(self, kind: str, text: str) -> None:
        if text:
            (self._hold.spans if self._hold is not None else self.spans).append((kind, text))  # type: ignore[union-attr]

    @staticmethod
    def _no_span(kind: str, text: str) -> None:
        pass

    def _emit_text(self, region: int, text: str, span: bool = True) -> None:
        if not text:
            return
        if region == REASONING:
            self._reasoning.append(text)
            self._out.append(_reasoning(text))
            if span:
                self._span("reasoning", text)
        else:
            self._content.append(text)
            self._out.append(_content(text))
            if span:
                self._span("content", text)

    def _notice(self, kind: RepairKind, detail: str = "", dedupe: bool = True) -> None:
        if dedupe:
            if kind in self._seen:
                return
            self._seen.add(kind)
        ev = Notice(kind, detail)
        if self._hold is not None:
            self._hold.events.append(ev)
        else:
            self._notices.append(ev)
            self._out.append(ev)

    def _tag_repairs(self, tag: Tag, call: _Call | None) -> None:
        for kind in tag.repairs:  # usually empty
            self._notice(kind, tag.raw)
            if call is not None:
                call.repairs.append(kind)

    # ----------------------------------------------------------------- text states

    def _text(self, region: int, text: str) -> None:
        """Reasoning/content text; with tools, up to two trailing newlines are held (they
        are the block separator if a block follows)."""
        if self._nl:
            text = self._nl + text
            self._nl = ""
        if self._has_tools and text.endswith("\n"):
            keep = 2 if text.endswith("\n\n") else 1
            self._nl = text[-keep:]
            text = text[:-keep]
        self._emit_text(region, text)

    def _flush_nl(self) -> None:
        if self._nl:
            nl, self._nl = self._nl, ""
            self._emit_text(self._state if self._state in (REASONING, CONTENT) else CONTENT, nl)

    def _on_reasoning_text(self, raw: str, tag: Tag | None) -> None:
        self._text(REASONING, raw)

    def _on_content_text(self, raw: str, tag: Tag | None) -> None:
        self._text(CONTENT, raw)

    def _on_think(self, raw: str, tag: Tag | None) -> None:
        self._flush_nl()
        self._span("markup", raw)
        self._state = CONTENT

    def _on_eos(self, raw: str, tag: Tag | None) -> None:
        if self._hold is not None:
            self._hold.raw.pop()  # EOS is not part of the held text
        self._end(eos=True, raw=raw)

    def _on_orphan(self, raw: str, tag: Tag | None) -> None:
        if not self._has_tools:
            self._text(CONTENT, raw)
            return
        self._flush_nl()
        self._span("markup", raw)
        self._notice(RepairKind.ORPHAN_CLOSER, raw, dedupe=False)

    def _on_block_open(self, raw: str, tag: Tag | None) -> None:
        region = REASONING if self._state == REASONING else CONTENT
        if not self._has_tools:
            self._text(region, raw)
            return
        if self._hold is not None:
            self._reject(raw, tag)
            return
        if self._state == AFTER:
            sep, self._after_ws = "".join(self._after_ws), []
        else:
            sep, self._nl = self._nl, ""
        self._seen = set()
        self._junk = []
        self._junk_spans = []
        if region == REASONING:
            self._hold = _Hold(REASONING, [sep, raw], bare=False)
        else:
            self._block_start = self._offset() - len(raw) - len(sep)
            self._mark = len(self.spans) if self.spans is not None else 0
        self._span("markup", sep + raw)
        if len(sep) < 2:
            self._notice(RepairKind.BLOCK_SEPARATOR, repr(sep))
        assert tag is not None
        self._tag_repairs(tag, None)
        self._ws = ""
        self._state = BLOCK

    def _on_bare_invoke(self, raw: str, tag: Tag | None) -> None:
        """An invoke without the block opener: held until it closes (dsml.md section 6)."""
        region = REASONING if self._state == REASONING else CONTENT
        assert tag is not None
        name = tag.attrs.get("name")
        tool = self._tools.get(name) if name is not None else None
        if self._hold is not None:
            self._reject(raw, tag)
            return
        if tool is None:
            if self._state == AFTER:
                self._on_after_text(raw, tag)
            else:
                self._text(region, raw)
            return
        if self._state == AFTER:
            self._flush_after_ws()
        sep, self._nl = self._nl, ""
        self._seen = set()
        self._junk = []
        self._junk_spans = []
        self._hold = _Hold(region, [sep, raw], bare=True)
        self._span("markup", sep)
        self._notice(RepairKind.MISSING_OPENER, raw)
        self._ws = ""
        self._state = BLOCK
        self._on_invoke_open(raw, tag)

    # ----------------------------------------------------------------- block states

    def _check_ws(self) -> None:
        ws, self._ws = self._ws, ""
        if ws not in ("\n", "\n\n", ""):
            self._notice(RepairKind.WHITESPACE, repr(ws))

    def _on_block_text(self, raw: str, tag: Tag | None) -> None:
        if self._in_junk:
            self._on_junk(raw, tag)
        elif raw.isspace():
            self._ws = (self._ws + raw)[:3]
            self._span("markup", raw)
        else:
            self._start_junk(raw, tag)

    def _leading_ws(self, raw: str) -> str:
        """Whitespace before text inside a block is markup however the deltas split it."""
        body = raw.lstrip()
        if len(body) < len(raw):
            self._ws = (self._ws + raw[: len(raw) - len(body)])[:3]
            self._span("markup", raw[: len(raw) - len(body)])
        return body

    def _start_junk(self, raw: str, tag: Tag | None) -> None:
        """The text up to the next tag is junk (read again at the block's end)."""
        if self._hold is None:
            raw = self._leading_ws(raw)
        self._in_junk = True
        self._on_junk(raw, tag)

    def _on_junk(self, raw: str, tag: Tag | None) -> None:
        """Something the state machine cannot read inside a block."""
        hold = self._hold
        if hold is not None:
            self._reject(raw, tag)
            return
        call = self._call
        if self._state == INVOKE and call is not None and _JUNK_ERROR not in call.errors:
            call.errors.append(_JUNK_ERROR)
        self._junk.append(raw)
        if self.spans is not None:  # decided at the block's end: repaired calls or content
            self._junk_spans.append(len(self.spans))
            self.spans.append(("junk", raw))

    def _on_invoke_open(self, raw: str, tag: Tag | None) -> None:
        assert tag is not None
        self._check_ws()
        name = tag.attrs.get("name")
        if name is None:
            self._on_junk(raw, tag)
            return
        tool = self._tools.get(name)
        hold = self._hold
        if hold is not None and tool is None:
            self._reject(raw, tag)
            return
        streaming = hold is None and not self._strict
        call = _Call(name, tool, streaming)
        self._call = call
        self._span("markup", raw)
        self._tag_repairs(tag, call)
        if streaming:
            call.index = self._next_index
            self._next_index += 1
            call.id = self._id_factory()
            self._out.append(ToolCallStart(call.index, call.id, name))
        if tag.self_closing:
            call.repairs.append(RepairKind.SELF_CLOSING_INVOKE)
            self._notice(RepairKind.SELF_CLOSING_INVOKE, raw)
            self._close_call(call)
            return
        self._state = INVOKE

    def _on_invoke_text(self, raw: str, tag: Tag | None) -> None:
        call = self._call
        assert call is not None
        if self._in_junk:
            self._on_junk(raw, tag)
        elif raw.isspace():
            self._ws = (self._ws + raw)[:3]
            self._span("markup", raw)
        elif call.emitted == 0 and call.pending is None and not call.args:
            raw = self._leading_ws(raw)
            call.body = [raw]
            self._span("markup", raw)
            self._state = BODY
        else:
            self._start_junk(raw, tag)

    def _on_body_any(self, raw: str, tag: Tag | None) -> None:
        assert self._call is not None and self._call.body is not None
        self._call.body.append(raw)
        self._span("markup", raw)

    def _on_param_open(self, raw: str, tag: Tag | None) -> None:
        assert tag is not None
        call = self._call
        assert call is not None
        if self._ws:
            self._check_ws()
        key = tag.attrs.get("name")
        if key is None:
            self._on_junk(raw, tag)
            return
        self._span("markup", raw)
        if tag.repairs:
            self._tag_repairs(tag, call)
        if call.pending is not None:
            self._flush_pending(call)
        tool = call.tool
        types = tool.param_types(key) if tool is not None else None
        attr = tag.attrs.get("string")
        if attr is None:
            call.repairs.append(RepairKind.MISSING_STRING_ATTR)
            self._notice(RepairKind.MISSING_STRING_ATTR, raw)
            mode = M_STR if types is None or "string" in types else M_COERCE
        elif attr == "true" or attr.strip().lower() == "true":
            mode = M_STR if types is None or "string" in types else M_COERCE
        else:
            mode = M_JSON
        call.key = key
        call.mode = mode
        call.types = types
        call.vparts = []
        call.wrapper = wrapper = (
            key in _WRAPPERS and tool is not None and key not in tool.properties
            and bool(tool.properties) and call.emitted == 0 and not call.args
        )  # fmt: skip
        if mode == M_STR and call.streaming and not wrapper:
            frag = ("{" if call.emitted == 0 else ", ") + encode_basestring(key) + ': "'
            call.jparts.append(frag)
            call.emitted += 1
            self._out.append(_args(call.index, frag))
        self._state = VALUE

    def _on_value_text(self, raw: str, tag: Tag | None) -> None:
        call = self._call
        assert call is not None
        call.vparts.append(raw)
        self._span("value", raw)
        if call.streaming and call.mode == M_STR and not call.wrapper:
            frag = _escape(raw)
            call.jparts.append(frag)
            self._out.append(_args(call.index, frag))

    def _on_param_close(self, raw: str, tag: Tag | None) -> None:
        call = self._call
        assert call is not None and tag is not None
        self._span("markup", raw)
        if tag.repairs:
            self._tag_repairs(tag, call)
        text = "".join(call.vparts)
        key, mode, types = call.key, call.mode, call.types
        call.vparts = []
        self._state = INVOKE
        if mode == M_STR and call.streaming and not call.wrapper:
            call.args[key] = text
            call.jparts.append('"')
            self._out.append(_args(call.index, '"'))
            return
        value: Any = text
        if mode == M_COERCE:
            value, changed = coerce_value(text, types)
            if changed:
                call.repairs.append(RepairKind.TYPE_COERCION)
                self._notice(RepairKind.TYPE_COERCION, key)
        elif mode == M_JSON:
            try:
                value = loads_strict(text)
            except ValueError as exc:
                if types is not None and "string" in types:
                    call.repairs.append(RepairKind.TYPE_COERCION)
                    self._notice(RepairKind.TYPE_COERCION, key)
                else:
                    call.errors.append(
                        f'parameter {key!r}: string="false" value is not JSON ({exc})'
                    )
            else:
                if isinstance(value, str) and not type_allows(types, value):
                    value, changed = coerce_value(value, types)  # a JSON string holding an array
                    if changed:
                        call.repairs.append(RepairKind.TYPE_COERCION)
                        self._notice(RepairKind.TYPE_COERCION, key)
        if call.wrapper:
            call.pending = (key, value)
            call.wrapper = False
            return
        self._write_param(call, key, value)

    def _write_param(self, call: _Call, key: str, value: Any) -> None:
        call.args[key] = value
        frag = ("{" if call.emitted == 0 else ", ") + encode_basestring(key) + ": " + _dumps(value)
        call.emitted += 1
        call.jparts.append(frag)
        if call.streaming:
            self._out.append(_args(call.index, frag))

    def _flush_pending(self, call: _Call) -> None:
        if call.pending is not None:
            key, value = call.pending
            call.pending = None
            self._write_param(call, key, value)

    def _on_invoke_close(self, raw: str, tag: Tag | None) -> None:
        call = self._call
        assert call is not None and tag is not None
        if self._ws:
            self._check_ws()
        self._span("markup", raw)
        if tag.repairs:
            self._tag_repairs(tag, call)
        if call.body is not None:
            self._read_body(call)
        elif call.pending is not None:
            key, value = call.pending
            inner = value
            if isinstance(inner, str):
                try:
                    inner = loads_strict(inner)
                except ValueError:
                    inner = None
            tool = call.tool
            if (
                isinstance(inner, dict)
                and tool is not None
                and inner
                and set(inner) <= set(tool.properties)
            ):
                call.pending = None
                call.repairs.append(RepairKind.WRAPPED_ARGUMENTS)
                self._notice(RepairKind.WRAPPED_ARGUMENTS, key)
                self._write_object(call, inner)
            else:
                self._flush_pending(call)
        self._close_call(call)

    def _write_object(self, call: _Call, obj: dict[str, Any]) -> None:
        call.args = dict(obj)
        if obj:
            frag = _dumps(obj)[:-1]  # the closing brace comes with the call's end
            call.emitted = len(obj)
            call.jparts.append(frag)
            if call.streaming:
                self._out.append(_args(call.index, frag))

    def _read_body(self, call: _Call) -> None:
        assert call.body is not None
        text = "".join(call.body).strip()
        call.body = None
        try:
            obj = loads_strict(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            call.repairs.append(RepairKind.JSON_BODY)
            self._notice(RepairKind.JSON_BODY, call.name)
            self._write_object(call, obj)
            return
        params = repair.read_parameters(text)
        if params is None:
            call.errors.append(
                f"invoke body is neither parameters nor a JSON object: {text[:200]!r}"
            )
            return
        call.repairs.append(RepairKind.LXML_REPAIR)
        self._notice(RepairKind.LXML_REPAIR, call.name)
        obj = {}
        for key, attr, value_text in params:
            obj[key] = self._convert(call, key, attr, value_text)
        self._write_object(call, obj)

    def _convert(self, call: _Call, key: str, attr: str | None, text: str) -> Any:
        types = call.tool.param_types(key) if call.tool is not None else None
        if attr is not None and attr.strip().lower() == "false":
            try:
                return loads_strict(text)
            except ValueError:
                return text
        return coerce_value(text, types)[0]

    def _outcome(self, call: _Call) -> tuple[CallOutcome, str | None]:
        if call.tool is None:
            names = ", ".join(sorted(self._tools.tools)) or "none"
            return CallOutcome.UNKNOWN_TOOL, f"unknown tool {call.name!r}; declared: {names}"
        if call.errors:
            return CallOutcome.INVALID_JSON, "; ".join(call.errors)
        error = call.tool.validate(call.args)
        if error is not None:
            return CallOutcome.SCHEMA_INVALID, error
        return (CallOutcome.REPAIRED if call.repairs else CallOutcome.VALID), None

    def _close_call(self, call: _Call) -> None:
        """The invoke closed: finish the JSON, validate, deliver or hold."""
        closing = "}" if call.emitted else "{}"
        call.jparts.append(closing)
        if call.streaming:
            self._out.append(_args(call.index, closing))
        outcome, error = self._outcome(call)
        self._call = None
        hold = self._hold
        self._state = BLOCK
        invalid = outcome not in (CallOutcome.VALID, CallOutcome.REPAIRED)
        if hold is None:
            if self._junk:  # resolve it now: the unfinished part of the block starts here
                self._repair_junk()
            if call.streaming:
                self._end_call(call, outcome, error)
            elif invalid:  # strict mode
                self.rejected.append(
                    ToolCall("", call.name, call.args, "".join(call.jparts), outcome, error)
                )
            else:
                self._deliver(call, outcome, error)
            self._mark = len(self.spans) if self.spans is not None else 0
            self._block_start = self._offset()
            return
        if self._strict and invalid:
            self._reject(None, None)
            return
        call.outcome, call.error = outcome, error
        hold.calls.append(call)
        if hold.bare:
            tool = call.tool
            assert tool is not None
            if any(r not in call.args for r in tool.required):
                self._malformed = self._malformed or hold.region == CONTENT
                self._reject(None, None)
            elif hold.region == CONTENT:
                self._accept()
                self._state = CONTENT
            else:
                hold.closed = True
                self._state = AFTER

    def _end_call(self, call: _Call, outcome: CallOutcome, error: str | None) -> None:
        self._out.append(ToolCallEnd(call.index, call.args, outcome, error))
        self._calls.append(
            ToolCall(call.id, call.name, call.args, "".join(call.jparts), outcome, error)
        )

    def _deliver(self, call: _Call, outcome: CallOutcome, error: str | None) -> None:
        call.index = self._next_index
        self._next_index += 1
        call.id = self._id_factory()
        self._out.append(ToolCallStart(call.index, call.id, call.name))
        self._out.append(_args(call.index, "".join(call.jparts)))
        self._end_call(call, outcome, error)

    def _on_block_close(self, raw: str, tag: Tag | None) -> None:
        assert tag is not None
        self._check_ws()
        self._span("markup", raw)
        self._tag_repairs(tag, None)
        hold = self._hold
        if hold is not None:
            if hold.bare:  # an orphan closer after a bare invoke: reading failed
                self._reject(raw, tag)
                return
            hold.closed = True
            self._state = AFTER
            return
        self._state = AFTER
        self._after_ws = []
        self._block_start = -1
        if self._junk:
            self._repair_junk()

    def _repair_junk(self) -> None:
        junk = "".join(self._junk)
        self._junk = []
        found = [inv for inv in repair.read_invokes(junk) if inv.name is not None]
        if self.spans is not None:
            for i in self._junk_spans:
                self.spans[i] = ("markup" if found else "content", self.spans[i][1])
        self._junk_spans = []
        if not found:
            self._malformed = True
            self._emit_text(CONTENT, junk, span=False)
            return
        for inv in found:
            assert inv.name is not None
            call = _Call(inv.name, self._tools.get(inv.name), streaming=False)
            call.repairs.append(RepairKind.LXML_REPAIR)
            if inv.params:
                self._write_object(
                    call, {k: self._convert(call, k, a, v) for k, a, v in inv.params}
                )
            elif inv.body:
                call.body = [inv.body]
                self._read_body(call)
            call.jparts.append("}" if call.emitted else "{}")
            outcome, error = self._outcome(call)
            self._notice(RepairKind.LXML_REPAIR, inv.name, dedupe=False)
            if self._strict and outcome not in (CallOutcome.VALID, CallOutcome.REPAIRED):
                self.rejected.append(
                    ToolCall("", call.name, call.args, "".join(call.jparts), outcome, error)
                )
            else:
                self._deliver(call, outcome, error)

    # ----------------------------------------------------------------- after a block

    def _flush_after_ws(self) -> None:
        ws, self._after_ws = "".join(self._after_ws), []
        self._span("markup", ws)

    def _on_after_text(self, raw: str, tag: Tag | None) -> None:
        hold = self._hold
        if raw.isspace():
            if hold is not None:
                self._span("markup", raw)
            else:
                self._after_ws.append(raw)
            return
        if hold is not None:
            self._reject(raw, tag)
            return
        text = "".join(self._after_ws) + raw
        self._after_ws = []
        self._state = CONTENT
        self._text(CONTENT, text)

    def _on_after_think(self, raw: str, tag: Tag | None) -> None:
        hold = self._hold
        if hold is not None and hold.region == REASONING and hold.think_at < 0:
            hold.think_at = len(hold.raw) - 1  # the `</think>` just appended
            self._span("markup", raw)
            return
        self._on_after_text(raw, tag)

    def _on_after_tag(self, raw: str, tag: Tag | None) -> None:
        if self._hold is not None:
            self._reject(raw, tag)
            return
        self._on_after_text(raw, tag)

    def _on_after_orphan(self, raw: str, tag: Tag | None) -> None:
        if self._hold is not None:
            self._reject(raw, tag)
            return
        self._flush_after_ws()
        self._span("markup", raw)
        self._notice(RepairKind.ORPHAN_CLOSER, raw, dedupe=False)

    # ----------------------------------------------------------------- decisions

    def _accept(self) -> None:
        hold = self._hold
        assert hold is not None
        self._hold = None
        events, spans = hold.events, hold.spans
        for ev in events:
            assert isinstance(ev, Notice)
            self._notices.append(ev)
            self._out.append(ev)
        if self.spans is not None:
            self.spans.extend(spans)
        for call in hold.calls:
            self._deliver(call, call.outcome, call.error)
        if hold.region == REASONING and hold.calls:
            self._recovered = True
            self._notice(RepairKind.RECOVERED_FROM_THINKING, str(len(hold.calls)), dedupe=False)

    def _reject(self, raw: str | None, tag: Tag | None) -> None:
        """Release held text verbatim to its region. With `raw` (the token being handled),
        that token is taken back out and read again in the restored state."""
        hold = self._hold
        assert hold is not None
        self._hold = None
        self._call = None
        if raw is not None:
            hold.raw.pop()
        region = hold.region
        self._state = region
        if hold.think_at >= 0:
            self._text(REASONING, "".join(hold.raw[: hold.think_at]))
            self._on_think(hold.raw[hold.think_at], None)
            self._text(CONTENT, "".join(hold.raw[hold.think_at + 1 :]))
        else:
            self._text(region, "".join(hold.raw))
        if raw is not None:
            _TABLE[self._state][self._kind](self, raw, tag)

    def _end(self, eos: bool, raw: str = "") -> None:
        """EOS or the end of the stream."""
        self._eos = eos
        st = self._state
        hold = self._hold
        if hold is not None:
            if hold.closed:
                self._accept()
            else:
                self._reject(None, None)
            st = self._state
        if st in (REASONING, CONTENT):
            self._flush_nl()
        elif st == AFTER:
            self._flush_after_ws()
        elif st in (BLOCK, INVOKE, BODY, VALUE):
            self._truncate(self._offset() - len(raw))
        self._span("markup", raw)
        self._state = DONE

    def _truncate(self, end: int) -> None:
        """An unterminated block: a started call ends TRUNCATED; unread text becomes content."""
        call = self._call
        self._call = None
        if call is not None and call.streaming:
            if call.mode == M_STR and self._state == VALUE and not call.wrapper:
                call.args[call.key] = "".join(call.vparts)
                closing = '"}'
            else:
                closing = "}" if call.emitted else "{}"
            call.jparts.append(closing)
            self._out.append(_args(call.index, closing))
            self._out.append(
                ToolCallEnd(call.index, call.args, CallOutcome.TRUNCATED,
                            "the block ended before this invoke closed; its text is returned as content")
            )  # fmt: skip
        start = self._block_start
        if start < 0:
            return
        text = "".join(self._raw)[start:end]
        if self.spans is not None:
            del self.spans[self._mark :]
        self._junk = []
        self._junk_spans = []
        if text.strip():
            self._unterminated = True
            self._emit_text(CONTENT, text)
        else:
            self._span("markup", text)
        self._block_start = -1

    def _turn_outcome(self) -> TurnOutcome | None:
        if not self._has_tools:
            return None
        if self._unterminated:
            return TurnOutcome.MALFORMED if self._eos else TurnOutcome.TRUNCATED
        if self._calls:
            return (
                TurnOutcome.RECOVERED_FROM_THINKING if self._recovered else TurnOutcome.TOOL_CALLS
            )
        if self._malformed or self.rejected:
            return TurnOutcome.MALFORMED
        if "".join(self._content).strip():
            return TurnOutcome.ANSWER
        return TurnOutcome.EMPTY


def _row(default: Callable[..., None], **by_kind: Callable[..., None]) -> list[Callable[..., None]]:
    row = [default] * NUM_KINDS
    for name, fn in by_kind.items():
        row[_KIND_NAMES[name]] = fn
    return row


_KIND_NAMES = {
    "TEXT": TEXT, "THINK": THINK, "END": END, "CALLS_OPEN": CALLS_OPEN, "CALLS_CLOSE": CALLS_CLOSE,
    "INVOKE_OPEN": INVOKE_OPEN, "INVOKE_CLOSE": INVOKE_CLOSE, "PARAM_OPEN": PARAM_OPEN,
    "PARAM_CLOSE": PARAM_CLOSE,
}  # fmt: skip

P = StreamParser
# The transition table: _TABLE[state][token kind] -> handler(parser, raw, tag).
_TABLE: list[list[Callable[..., None]]] = [None] * 8  # type: ignore[list-item]
_TABLE[REASONING] = _row(
    P._on_reasoning_text, THINK=P._on_think, END=P._on_eos, CALLS_OPEN=P._on_block_open,
    INVOKE_OPEN=P._on_bare_invoke,
)  # fmt: skip
_TABLE[CONTENT] = _row(
    P._on_content_text, END=P._on_eos, CALLS_OPEN=P._on_block_open, INVOKE_OPEN=P._on_bare_invoke,
    CALLS_CLOSE=P._on_orphan, INVOKE_CLOSE=P._on_orphan, PARAM_CLOSE=P._on_orphan,
)  # fmt: skip
_TABLE[BLOCK] = _row(
    P._on_junk, TEXT=P._on_block_text, END=P._on_eos, INVOKE_OPEN=P._on_invoke_open,
    CALLS_CLOSE=P._on_block_close,
)  # fmt: skip
_TABLE[INVOKE] = _row(
    P._on_junk, TEXT=P._on_invoke_text, END=P._on_eos, PARAM_OPEN=P._on_param_open,
    INVOKE_CLOSE=P._on_invoke_close,
)  # fmt: skip
_TABLE[BODY] = _row(P._on_body_any, END=P._on_eos, INVOKE_CLOSE=P._on_invoke_close)
_TABLE[VALUE] = _row(P._on_value_text, END=P._on_eos, PARAM_CLOSE=P._on_param_close)
_TABLE[AFTER] = _row(
    P._on_after_tag, TEXT=P._on_after_text, THINK=P._on_after_think, END=P._on_eos,
    CALLS_OPEN=P._on_block_open, INVOKE_OPEN=P._on_bare_invoke, CALLS_CLOSE=P._on_after_orphan,
    INVOKE_CLOSE=P._on_after_orphan, PARAM_CLOSE=P._on_after_orphan,
)  # fmt: skip
_TABLE[DONE] = _row(lambda self, raw, tag: None)
del P


def parse_completion(
    text: str, tools: list[dict[str, Any]] | None, thinking: bool, strict: bool = False
) -> ParseResult:
    """Parse a whole completion (feed + finish)."""
    parser = StreamParser(tools, thinking, strict)
    parser.feed(text)
    parser.finish()
    return parser.result


__all__ = ["StreamParser", "default_id", "parse_completion"]
