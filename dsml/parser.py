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
table (`dsml.states`: `table[state][token kind]`) consumes them, and `dsml.events` are
what comes out. The table's handlers are in `dsml.regions` (reasoning, content, held
text) and `dsml.block` (inside a block); `dsml.calls` converts and validates values. This
module owns the public API and the feed() fast paths; `dsml.output` the output helpers.

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
- `dialect` (dsml.md section 2) is the dialect that rendered the prompt. Every dialect's
  tags are read whatever it is; only its own spelling is not a repair (v4.1's spaced
  `<｜DSML｜ invoke …>`, v3.2's `function_calls`), so those calls come out `valid`.
- Each kind of repair is noticed once per block (orphan closers and lxml repairs each
  time); a call with any tolerance applied validates as `repaired`.
- Damaged blocks follow dsml.md section 6.1, each rule a named transition of the table
  (`dsml.states`): a tag that cannot come where it is ends what is open (a value, an
  invoke), a block opener counts only when an invoke or its closer is the next tag, an
  invoke opener inside a value is decided by the next tag, text that is no call comes
  back as content or in a Notice, never inside a call. Markdown-quoted DSML
  (`dsml.quoting`) is text. Each rule's outcome is a `RepairKind`.
- `trace=True` records `spans`: (kind, text) pieces in input order, kind one of reasoning,
  content, markup, value, ignored; their texts concatenate to everything fed. It turns
  the fast paths off (tests compare both).
"""

from __future__ import annotations

from collections.abc import Callable
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any

from dsml.block import BlockLedger, BlockStates
from dsml.calls import NEEDS_ESCAPE, Call, default_id, escape
from dsml.dialects import Dialect
from dsml.events import (
    ContentDelta,
    Event,
    Notice,
    ParseResult,
    ReasoningDelta,
    RepairKind,
    ToolCall,
    ToolCallArgsDelta,
    args_delta,
    content_delta,
    reasoning_delta,
)
from dsml.lexer import (
    MARKER_PREFIXES,
    MAX_TAG,
    TAG_STARTS,
    TEXT,
    VALUE_MARKERS,
    IncrementalLexer,
    Tag,
    match_head,
    starts_tag,
)
from dsml.output import Output
from dsml.quoting import MarkdownQuotes
from dsml.regions import Hold, RegionStates
from dsml.schema import ToolRegistry
from dsml.states import (
    BLOCK,
    CONTENT,
    DONE,
    FAST_CONTENT,
    FAST_HELD_VALUE,
    FAST_NONE,
    FAST_PREFIX,
    FAST_REASONING,
    FAST_TAG,
    FAST_VALUE,
    FAST_WS,
    INVOKE,
    NUM_STATES,
    OPENED,
    REASONING,
    VALUE,
    transition_table,
)

_new = object.__new__
# The fast path of plain text in each state but VALUE (see _update_fast).
_FAST_OF_STATE = [FAST_NONE] * NUM_STATES
_FAST_OF_STATE[CONTENT] = FAST_CONTENT
_FAST_OF_STATE[REASONING] = FAST_REASONING
_FAST_OF_STATE[INVOKE] = _FAST_OF_STATE[BLOCK] = FAST_WS
# feed()'s fast paths build events inline (see dsml.events.content_delta for why).
_set_text = ContentDelta.text.__set__  # type: ignore[attr-defined]
_set_rtext = ReasoningDelta.text.__set__  # type: ignore[attr-defined]
_set_index = ToolCallArgsDelta.index.__set__  # type: ignore[attr-defined]
_set_fragment = ToolCallArgsDelta.fragment.__set__  # type: ignore[attr-defined]


class StreamParser(RegionStates, BlockStates, Output):
    """Feed text deltas, get events. See the module docstring for the format and policies."""

    # Slotted: CPython 3.11 keeps at most 30 attributes of an instance inline; past that
    # each parser's attributes went to a dict, slower to read and write on every path
    # (measured: ~5% of the parser's time on the tool-call corpus).
    __slots__ = (
        "_after_ws", "_block_start", "_call", "_calls", "_cindex", "_content", "_eos", "_fast",
        "_has_tools", "_hold", "_id_factory", "_in_junk", "_jparts", "_junk", "_junk_spans",
        "_kind", "_ledger", "_lex", "_malformed", "_mark", "_markers", "_next_index", "_nl",
        "_notices", "_opened", "_out", "_pending", "_plain_value", "_quoted", "_quotes", "_raw",
        "_reasoning", "_recovered", "_rest", "_result", "_seen", "_span", "_state", "_strict",
        "_summed", "_tools", "_unterminated", "_vparts", "_ws", "dialect", "rejected", "spans",
    )  # fmt: skip

    def __init__(
        self,
        tools: list[dict[str, Any]] | None,
        thinking: bool,
        strict: bool = False,
        id_factory: Callable[[], str] | None = None,
        *,
        trace: bool = False,
        dialect: Dialect | str = Dialect.V4,
    ) -> None:
        self._tools = ToolRegistry(tools)
        self._has_tools = bool(self._tools)
        self._strict = strict
        self._id_factory = id_factory or default_id
        # The dialect that rendered the prompt: its own tag spelling is not a repair (the
        # lexer still reads every dialect's tags). A bad name raises ValueError here.
        self.dialect = dialect if type(dialect) is Dialect else Dialect(dialect)
        self._lex = IncrementalLexer(self.dialect)
        self._state = REASONING if thinking else CONTENT
        self._out: list[Event] = []
        # Everything read, as fed; with _pending (a marker still arriving) everything fed.
        # Written as `self._raw.append(x)`: 3.11 appends to a list inline, ~20 ns less than
        # calling a bound `append` kept in an attribute (~2% of the parser's time).
        self._raw: list[str] = []
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._calls: list[ToolCall] = []
        self._notices: list[Notice] = []
        self.rejected: list[ToolCall] = []  # strict mode: invalid calls not emitted
        self._nl = ""  # held trailing newlines: the block separator if a block follows
        self._ws = ""  # whitespace between tags inside a block (its first 3 chars suffice)
        self._after_ws: list[str] = []  # whitespace after a block
        self._hold: Hold | None = None
        self._call: Call | None = None
        self._next_index = 0
        self._seen: set[RepairKind] = set()  # repairs already noticed in this block
        self._junk: list[str] = []  # block text the state machine could not read
        self._quoted: list[tuple[str, Tag | None]] = []  # held in QUOTED (dsml.block)
        self._plain_value = False  # the value's opener was plain: a plain closer ends it
        self._quotes = (MarkdownQuotes(), MarkdownQuotes())  # reasoning, content (dsml.quoting)
        self._opened = [0] * 9  # by token kind: openers that went to the text (dsml.regions)
        self._ledger = BlockLedger((0, 0), 0, 0)  # the current block's (dsml.block)
        # Where a streaming block's unfinished part starts (its separator, then the end of
        # its last complete invoke), as a _here() mark: text to return if it never closes.
        self._block_start: tuple[int, int] | None = None
        self._mark = 0  # trace length where the unfinished part of the block starts
        self._eos = False
        self._unterminated = False
        self._malformed = False
        self._recovered = False
        self._pending = ""  # a marker still arriving, held by the fast path (not the lexer)
        self._rest: str | None = None  # text _decide() left to feed (None: not in its loop)
        self._markers = self._lex.markers
        self._kind = TEXT  # kind of the token being handled
        self._summed = (0, 0)  # (pieces of _raw summed, their total length)
        self._junk_spans: list[int] = []
        self._in_junk = False  # unreadable block text runs until the next tag
        self._result: ParseResult | None = None
        self.spans: list[tuple[str, str]] | None = [] if trace else None
        # _span(kind, text) records a span (trace mode) or does nothing.
        self._span: Callable[[str, str], None]
        if not trace:
            self._span = self._no_span
            self._fast = FAST_REASONING if thinking else FAST_CONTENT  # as _update_fast()
        else:
            self._span = self._trace_span
            self._fast = FAST_NONE

    # ----------------------------------------------------------------- public API

    def feed(self, text: str) -> list[Event]:
        if not text:
            return []
        fast = self._fast
        # Fast paths (dsml.md section 6 asks for linear work; issue 2 for <= 1 us a delta).
        # Most deltas of a tool-call block only extend a marker still arriving (a tokenizer
        # splits `<｜DSML｜invoke name="f">` into ~9 deltas): held in _pending, one concat
        # and one test each, and kept in _raw only when _decide() reads the marker (an
        # append per piece, and splitting the last one at the `>`, took ~5% of the parser's
        # time). Text without `<` in a text or value state costs one `in` test and one
        # event. Everything else goes through the lexer and the transition table.
        if fast >= FAST_PREFIX:
            held = self._pending + text
            if fast == FAST_TAG:
                if ">" not in text and "<" not in text and "\n" not in text and len(held) <= MAX_TAG:
                    self._pending = held
                    return []
            elif held in MARKER_PREFIXES:
                self._pending = held
                return []
            elif held in TAG_STARTS:  # the head is complete and its attributes begin
                self._pending = held
                self._fast = FAST_TAG
                return []
            return self._decide(text, held)
        if fast:
            if "<" not in text:
                self._raw.append(text)
                if fast == FAST_VALUE:
                    self._vparts.append(text)
                    frag = text if NEEDS_ESCAPE(text) is None else encode_basestring(text)[1:-1]
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
                    return self._plain(text)  # text inside a block: one TEXT token
                elif text[-1] != "\n" or not self._has_tools:
                    if fast == FAST_CONTENT:
                        self._content.append(text)
                        ev = _new(ContentDelta)
                        _set_text(ev, text)
                        return [ev]
                    self._reasoning.append(text)
                    ev = _new(ReasoningDelta)
                    _set_rtext(ev, text)
                    return [ev]
                else:  # trailing newlines: held, they may separate a block (see _text)
                    out = self._out = []
                    self._text(CONTENT if fast == FAST_CONTENT else REASONING, text)
                    self._fast = FAST_NONE
                    return out
            elif text in MARKER_PREFIXES:  # `<`, `</`: a marker starts, nothing before it
                self._pending = text
                self._fast = FAST_PREFIX
                return []
            else:
                events = self._fast_split(text, fast)
                if events is not None:
                    return events
        lex = self._lex
        if lex.tag_wait or lex.prefix_wait:  # the lexer itself holds a marker still arriving
            self._raw.append(text)
            return [] if lex.absorb(text) else self._feed_slow(text)
        if self.spans is None and self._state != DONE:
            if text[0] == "<":  # a whole marker in one delta (EOS, `</think>`)? (_decide keeps it)
                return self._decide(text)
            self._raw.append(text)
            if "<" not in text:  # e.g. after a held newline: the TEXT token next() would give
                return self._plain(text)
        else:
            self._raw.append(text)
        return self._feed_slow(text)

    def _decide(self, text: str, joined: str = "") -> list[Event]:
        """`text` (the last piece fed) decides the marker held in _pending (`joined` is
        the two together, when the caller has it). When the two make a marker read before
        (`IncrementalLexer.markers`: one dict lookup), it is handled here as _run() would,
        and the rest of the delta is fed again (a newline after a tag, the start of a
        value); else the lexer reads them like any text. What it reads, it keeps in _raw."""
        held = self._pending
        buf = joined or held + text
        # Usually a marker read before, alone or followed by its newline (the lexer caches
        # both): one lookup decides it.
        tok = self._markers.get(buf)
        if tok is not None:
            self._pending = ""
            rest = "\n" if buf[-1] == "\n" else ""  # (a marker ends with `>`)
        else:
            # One partition() (~60 ns) instead of find() and two slices (~200 ns).
            before, gt, rest = text.partition(">")
            if not gt:
                return self._no_gt(text, held, buf)
            self._pending = ""
            if rest:
                tok = self._markers.get(held + before + gt)  # up to the `>`
                # A buffer that starts with a complete marker reads as that marker (a tag
                # ends at the first `>` after balanced quotes): the token next() would give.
                if tok is None and self._fast == FAST_TAG and ">" in rest:
                    rest, tok = self._quoted_gt(text, held, len(before) + 1)
        state = self._state
        if tok is None or (state == VALUE and tok[0] not in VALUE_MARKERS):
            if tok is None and self._still_tag(buf):  # a `>` inside a quoted value
                self._pending = buf
                return []
            self._raw.append(buf)
            self._fast = FAST_NONE
            if state != DONE and buf.find("<", 1) < 0 and (tok is not None or match_head(buf) is None):
                # No marker here (`<｜User｜>`, or a tag that is text inside a value): the
                # lexer would read `buf` as one TEXT token, up to the next `<`.
                return self._plain(buf)
            return self._feed_slow(buf)
        # (self._fast is set below, after the handler: no handler reads it.)
        out = self._out = []
        kind, raw, tag = tok
        self._kind = kind
        self._in_junk = False
        hold = self._hold
        if hold is not None:
            hold.raw.append(raw)
        self._raw.append(raw)  # what follows the marker (`rest`) is kept when it is read
        _TABLE[state][kind](self, raw, tag)
        # No trace mode here, and the lexer holds nothing outside _run().
        fast = self._fast = self._fast_of_state()
        if not rest:
            return out
        if fast == FAST_WS and rest.isspace():  # the `\n` after a tag, as feed() would
            self._raw.append(rest)
            self._ws = (self._ws + rest)[:3]
            return out
        if self._state == OPENED and rest.isspace():  # after a block opener, as _plain() would
            self._raw.append(rest)
            self._ledger.ws.append((rest, False))
            if self._hold is not None:  # (the opener may have just started one)
                self._hold.raw.append(rest)
            return out
        if self._rest is not None:  # inside the loop below: it feeds `rest` next
            self._rest = rest
            return out
        # Feed the rest of the delta in a loop, not by recursion: a delta of many markers
        # (`</think>` x 500) would otherwise nest one feed() per marker.
        self._rest = ""
        while rest:
            more = self.feed(rest)
            if more:
                out.extend(more)
            rest, self._rest = self._rest, ""
        self._rest = None
        return out

    def _no_gt(self, text: str, held: str, buf: str) -> list[Event]:
        """_decide() for a `text` without `>` (`buf` is `held` + `text`): the marker is
        still arriving, or what was held is text after all."""
        if not held and text in MARKER_PREFIXES:  # e.g. `<` after a held separator
            self._pending = text
            self._fast = FAST_PREFIX
            return []
        if (
            self._fast == FAST_PREFIX
            and "<" not in text
            and "\n" not in text
            and starts_tag(buf)  # the head is complete and its attributes begin
        ):
            self._pending = buf
            self._fast = FAST_TAG
            return []
        if self._still_tag(buf):
            self._pending = buf
            return []
        self._pending = ""
        self._raw.append(buf)
        if (
            self._fast == FAST_PREFIX
            and "<" not in text
            and self._state != DONE
            and match_head(buf) is None
        ):
            self._fast = FAST_NONE
            # What looked like a marker is text (`<y`, `<tag`): the lexer would read
            # `buf` as one TEXT token (its only `<` is the first character, and it
            # is no marker prefix: feed() checked).
            return self._plain(buf)
        self._fast = FAST_NONE
        return self._feed_slow(buf)

    def _quoted_gt(self, text: str, held: str, end: int) -> tuple[str, Any]:
        """The first `>` of `text` was inside a quoted attribute (`name="p_<b>_1"`): try
        the later ones. A cached marker that `held` + `text` starts with is the tag the
        lexer would read (only one prefix of a text can be a complete tag), so it costs
        a lookup per `>` instead of the lexer (~20 us). Returns (what follows it, token)."""
        markers = self._markers
        while True:
            end = text.find(">", end) + 1
            if not end:
                return "", None
            tok = markers.get(held + text[:end])
            if tok is not None:
                return text[end:], tok

    def _still_tag(self, buf: str) -> bool:
        """A tag whose attributes are still arriving holds `buf` (its `<`, `>` or newline
        are inside a quoted value: `name="p_<b>_1`): the lexer would only wait again
        (`IncrementalLexer.next` sets tag_wait), which costs ~10 us a delta through
        _feed_slow()."""
        return (
            self._fast == FAST_TAG
            and len(buf) <= MAX_TAG
            and starts_tag(buf)
        )

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
        tail = text[lt:]
        if tail not in MARKER_PREFIXES:
            return None
        self._pending = tail
        self._fast = FAST_PREFIX
        if not head:
            return []
        self._raw.append(head)
        if fast == FAST_VALUE:
            self._vparts.append(head)
            frag = escape(head)
            self._jparts.append(frag)
            return [args_delta(self._cindex, frag)]
        if fast == FAST_HELD_VALUE:
            self._vparts.append(head)
            return []
        if fast == FAST_WS:
            self._ws = (self._ws + head)[:3]
            return []
        if fast == FAST_CONTENT:
            self._content.append(head)
            return [content_delta(head)]
        self._reasoning.append(head)
        return [reasoning_delta(head)]

    def _plain(self, text: str) -> list[Event]:
        """`text` is one TEXT token and the lexer holds nothing (not in trace mode): handled
        as _run() would, without the lexer (~10 us through _feed_slow())."""
        out = self._out = []
        self._kind = TEXT
        hold = self._hold
        if hold is not None:
            hold.raw.append(text)
        _TABLE[self._state][TEXT](self, text, None)
        self._update_fast()
        return out

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
        if self._pending:
            self._raw.append(self._pending)
            self._lex.push(self._pending)
            self._pending = ""
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
        return self._pending or self._lex.held

    @property
    def tag_wait(self) -> bool:
        """A recognised tag head waits for its `>` (then the held tail is within MAX_TAG)."""
        return self._fast == FAST_TAG or self._lex.tag_wait

    # ----------------------------------------------------------------- the loop

    def _run(self, final: bool) -> None:
        lex = self._lex
        table = _TABLE
        while (state := self._state) != DONE:
            tok = lex.next((2 if self._plain_value else 1) if state == VALUE else 0, final)
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

    def _update_fast(self) -> None:
        lex = self._lex
        # No fast paths in trace mode, nor while the lexer waits for a marker to complete
        # (after _run(); 1 delta in 50,000 of the corpus): _pending cannot take that text
        # over, it is in _raw already and offsets marked while _run() read it count it there.
        if self.spans is not None or lex.tag_wait or lex.prefix_wait:
            self._fast = FAST_NONE
        else:
            self._fast = self._fast_of_state()

    def _fast_of_state(self) -> int:
        """The fast path for the state the parser is in, the lexer holding nothing; binds
        what a value's fast path appends to. Runs after every tag: the usual cases (a block
        state, a value) are tested first."""
        if self._nl or self._hold is not None:
            return FAST_NONE
        st = self._state
        if st == VALUE:
            call = self._call
            if call is None:
                return FAST_NONE
            self._vparts = call.vparts
            if call.streams:
                self._jparts = call.jparts
                self._cindex = call.index
                return FAST_VALUE
            return FAST_HELD_VALUE
        fast = _FAST_OF_STATE[st]
        return FAST_NONE if fast == FAST_WS and self._in_junk else fast

# The transition table: _table[state][token kind] -> handler(parser, raw, tag). Hot paths
# read the module global: Python 3.11 does not specialize a class attribute read through
# an instance (`self._table`), a global read is one cached lookup.
StreamParser._table = _TABLE = transition_table(StreamParser)


def parse_completion(
    text: str,
    tools: list[dict[str, Any]] | None,
    thinking: bool,
    strict: bool = False,
    *,
    dialect: Dialect | str = Dialect.V4,
) -> ParseResult:
    """Parse a whole completion (feed + finish)."""
    parser = StreamParser(tools, thinking, strict, dialect=dialect)
    parser.feed(text)
    parser.finish()
    return parser.result


__all__ = ["StreamParser", "default_id", "parse_completion"]
