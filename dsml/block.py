"""Handlers of the states inside a tool-call block: BLOCK, INVOKE, BODY and VALUE.

A `BlockStates` method handles one token in one state (see `dsml.states` for the table).
Inside a block the grammar is strict (dsml.md section 5): invokes separated by newlines,
parameters inside them, nothing else. Whitespace between tags is markup (more than the
canonical newlines is noticed as WHITESPACE); other text is either an invoke body (a JSON
object instead of parameters) or junk that `dsml.repair` reads when the block closes.
Value conversion and validation are `dsml.calls`' job; this module decides when they run
and what is emitted.

A mixin of `dsml.parser.StreamParser`: it uses the parser's state and output helpers
(`_notice`, `_span`, `_emit_text`, `_out`, ...).
"""

from __future__ import annotations

from typing import Any

from dsml import repair
from dsml.calls import (
    JUNK_ERROR,
    M_STR,
    Call,
    ParamPlan,
    close_value,
    convert,
    escape,
    unwrap,
    validate_call,
)
from dsml.events import (
    CallOutcome,
    RepairKind,
    ToolCall,
    args_delta,
    tool_call_end,
    tool_call_start,
)
from dsml.lexer import INVOKE_OPEN, MARKER_PREFIXES, PARAM_OPEN, TEXT, Tag
from dsml.schema import loads_strict
from dsml.states import AFTER, BLOCK, BODY, CONTENT, INVOKE, QUOTED, VALUE

_CANONICAL_WS = frozenset(("\n", "\n\n", ""))  # between tags: not a WHITESPACE repair
# Outcomes a strict parser delivers; a tuple of members bound once (`CallOutcome.VALID` is a
# ~90 ns lookup in 3.11 and an Enum hashes in Python, so no frozenset).
_DELIVERABLE = (CallOutcome.VALID, CallOutcome.REPAIRED)


class BlockLedger:
    """What a block keeps for its end: where it began (to return it whole as content) and
    the text that is no call, to settle as content or Notices once it is known whether
    the block holds a call (dsml.md 6.1 rule 6)."""

    __slots__ = (
        "calls_at_open", "leftovers", "open_mark", "open_span", "opener", "region", "sep", "tag",
        "tail", "upto", "ws",
    )  # fmt: skip

    def __init__(self, open_mark: tuple[int, int], open_span: int, calls_at_open: int) -> None:
        self.open_mark = open_mark  # a StreamParser._here() mark of the separator's start
        self.open_span = open_span  # trace length there
        self.calls_at_open = calls_at_open
        self.leftovers: list[tuple[bool, str]] = []  # (is broken markup, text) in order
        self.upto = 0  # leftovers before the end of the block's last complete invoke
        # The opener, the separator before it, the region it interrupted, and whitespace
        # after it: what comes back if the opener is text after all (dsml.regions).
        self.opener = ""
        self.sep = ""
        self.tag: Tag | None = None
        self.region = 0
        self.ws: list[tuple[str, bool]] = []
        self.tail = ""  # the last characters of that text (a plain invoke opener in them?)  # (text, is a second opener)


class BlockStates:
    """Token handlers for BLOCK, INVOKE, BODY and VALUE, and the delivery of calls."""

    __slots__ = ()

    def _check_ws(self) -> None:
        """A tag begins: the whitespace since the last one should be canonical newline(s)."""
        if self._ws not in _CANONICAL_WS:
            self._notice(RepairKind.WHITESPACE, repr(self._ws))
        self._ws = ""

    def _opener_name(self, raw: str, tag: Tag | None) -> str | None:
        """An invoke or parameter opener begins: the whitespace before it is checked, and
        its name returned; an opener without a name is junk (None)."""
        assert tag is not None
        self._check_ws()
        if tag.name is None:
            self._on_junk(raw, tag)
        return tag.name

    def _on_block_text(self, raw: str, tag: Tag | None) -> None:
        if raw in MARKER_PREFIXES:
            self._partial_tag(raw)
        elif self._in_junk:
            self._on_junk(raw, tag)
        elif raw.isspace():
            self._ws = (self._ws + raw)[:3]
            self._span("markup", raw)
        else:
            self._start_junk(raw, tag)

    def _partial_tag(self, raw: str) -> None:
        """A cut tag (`</`, `</｜DSML｜inv`) right before the next tag is markup (dsml.md
        6.1 rule 2): the lexer gives it as text only when a `<` follows it."""
        self._span("markup", raw)
        self._notice(RepairKind.PARTIAL_TAG, raw, dedupe=False)

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
        if self._state == INVOKE and call is not None and JUNK_ERROR not in call.errors:
            call.errors.append(JUNK_ERROR)
        self._junk.append(raw)
        if self.spans is not None:  # decided at the block's end: repaired calls or content
            self._junk_spans.append(len(self.spans))
            self.spans.append(("junk", raw))

    def _on_invoke_open(self, raw: str, tag: Tag | None) -> None:
        name = self._opener_name(raw, tag)
        if name is None:
            return
        tool = self._tools.get(name)
        hold = self._hold
        if hold is not None and tool is None:
            self._reject(raw, tag)
            return
        if self._junk:  # calls recovered from text before this invoke come before it
            self._repair_junk()
        streaming = hold is None and not self._strict
        call = Call(name, tool, streaming)
        call.opener = raw
        if hold is not None and hold.guarded and not hold.bare:
            call.repairs.append(RepairKind.GUARDED_SPELLING)
        self._call = call
        if self.spans is not None:
            self._span("markup", raw)
        if tag.repairs:
            self._tag_repairs(tag, call)
        if tag.self_closing:
            call.repairs.append(RepairKind.SELF_CLOSING_INVOKE)
            self._notice(RepairKind.SELF_CLOSING_INVOKE, raw)
            self._close_call(call)
            return
        self._state = INVOKE

    def _on_invoke_text(self, raw: str, tag: Tag | None) -> None:
        call = self._call
        assert call is not None
        if raw in MARKER_PREFIXES:
            self._partial_tag(raw)
        elif self._in_junk:
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

    def _start(self, call: Call) -> None:
        """The invoke is a call: ToolCallStart (at its first parameter, or at its end)."""
        call.index = self._next_index
        self._next_index += 1
        call.id = self._id_factory()
        self._out.append(tool_call_start(call.index, call.id, call.name))

    def _on_param_open(self, raw: str, tag: Tag | None) -> None:
        call = self._call
        assert call is not None
        key = self._opener_name(raw, tag)
        if key is None:
            return
        assert tag is not None
        if self.spans is not None:
            self._span("markup", raw)
        if tag.repairs:
            self._tag_repairs(tag, call)
        if call.streaming and call.index < 0:
            self._start(call)
        if call.pending is not None:
            if call.pending[0].key == key:
                return self._skip_value(call, raw, key, tag)
            self._flush_pending(call)
        if key in call.args:
            return self._skip_value(call, raw, key, tag)
        plan = call.plans.get(raw)
        if plan is None:
            plan = call.new_plan(raw, key, tag.string)
        if plan.missing_attr:
            call.repairs.append(RepairKind.MISSING_STRING_ATTR)
            self._notice(RepairKind.MISSING_STRING_ATTR, raw)
        call.plan = plan
        self._plain_value = tag.plain
        if plan.maybe_wrapper and call.emitted == 0 and not call.args:
            call.wrapper = True  # held until the invoke closes (it may wrap the arguments)
            call.streams = False
        elif plan.mode == M_STR and call.streaming:
            call.streams = True
            frag = (plan.first if call.emitted == 0 else plan.more) + '"'
            call.jparts.append(frag)
            call.emitted += 1
            self._out.append(args_delta(call.index, frag))
        else:
            call.streams = False
        self._state = VALUE

    def _skip_value(self, call: Call, raw: str, key: str, tag: Tag) -> None:
        """A parameter given again: its value is read and dropped, reported in a Notice
        (the first one may have streamed already: it stays, so the streamed JSON equals
        the arguments)."""
        call.plan = call.plans.get(raw) or call.new_plan(raw, key, tag.string)
        call.skip = True
        call.streams = False
        self._state = VALUE

    def _on_value_glued(self, raw: str, tag: Tag | None) -> None:
        """TEXT in a value: a parameter opener glued to its value ends the value (rule 1);
        other text is value text."""
        glued = self._lex.glued_opener(raw) if raw.startswith("<") else None
        if glued is None:
            return self._on_value_text(raw, tag)
        self._read_glued(raw, *glued, self._on_value_cut)

    def _read_glued(self, raw: str, head: str, tag: Tag, on_opener) -> None:
        """`raw` = a glued opener `head` + value text: the opener through `on_opener`, then
        the text as TEXT in whatever state that left."""
        kind = self._kind
        self._kind = PARAM_OPEN
        on_opener(head, tag)
        self._kind = TEXT
        if len(head) < len(raw):
            self._table[self._state][TEXT](self, raw[len(head):], None)
        self._kind = kind

    def _on_value_text(self, raw: str, tag: Tag | None) -> None:
        call = self._call
        assert call is not None
        call.vparts.append(raw)
        self._span("value", raw)
        if call.streams:
            frag = escape(raw)
            call.jparts.append(frag)
            self._out.append(args_delta(call.index, frag))

    def _on_param_close(self, raw: str, tag: Tag | None) -> None:
        call = self._call
        assert call is not None and tag is not None
        if self.spans is not None:
            self._span("markup", raw)
        if tag.repairs:
            self._tag_repairs(tag, call)
        self._end_value(call)

    def _on_value_cut(self, raw: str, tag: Tag | None) -> None:
        """A DSML tag inside a value ends it as its closer would (dsml.md 6.1 rule 1: a
        value never holds markup); the tag is then read as in the invoke."""
        call = self._call
        assert call is not None and call.plan is not None
        call.repairs.append(RepairKind.PARAM_CLOSER_MISSING)
        self._notice(RepairKind.PARAM_CLOSER_MISSING, call.plan.key)
        self._end_value(call)
        self._table[INVOKE][self._kind](self, raw, tag)

    def _on_value_invoke(self, raw: str, tag: Tag | None) -> None:
        """An invoke opener inside a value: quoted text (DeepSeek's parse vectors quote one
        in a string value) or the next invoke, the value's closer forgotten. The next tag
        decides (QUOTED); until then what follows is held, not streamed."""
        self._quoted = [(raw, tag)]
        self._state = QUOTED

    def _on_quoted_any(self, raw: str, tag: Tag | None) -> None:
        glued = self._lex.glued_opener(raw) if tag is None and raw.startswith("<") else None
        if glued is None:
            self._quoted.append((raw, None))
            return
        # a parameter opener glued to its value: it decides, as a whole opener would
        self._read_glued(raw, *glued, self._on_quoted_invoke)

    def _on_quoted_text(self, raw: str, tag: Tag | None) -> None:
        """The value's closer (or EOS) came: the held opener and text were value text."""
        kind = self._kind
        self._state = VALUE
        self._kind = TEXT
        for text, _ in self._quoted:
            self._on_value_text(text, None)
        self._quoted = []
        self._kind = kind
        self._table[VALUE][kind](self, raw, tag)

    def _on_quoted_invoke(self, raw: str, tag: Tag | None) -> None:
        """A parameter opener (or the block closer) came: the held opener began the next
        invoke (dsml.md 6.1 rules 1 and 2); the held text is read again after it."""
        if self._hold is not None:  # held text is decided whole: released as it was written
            self._quoted = []
            self._reject(raw, tag)
            return
        kind = self._kind
        (opener, otag), *rest = self._quoted
        self._quoted = []
        call = self._call
        assert call is not None and call.plan is not None
        call.repairs.append(RepairKind.PARAM_CLOSER_MISSING)
        self._notice(RepairKind.PARAM_CLOSER_MISSING, call.plan.key)
        self._end_value(call)
        self._kind = INVOKE_OPEN
        self._on_invoke_cut(opener, otag)
        if self._block_start is not None:  # the held text and this tag are unread there too
            pieces, back = self._block_start
            self._block_start = (pieces, back + sum(len(t) for t, _ in rest) + len(raw))
        self._kind = TEXT
        for text, _ in rest:  # (a tag held there is read as text: it was no decision)
            self._table[self._state][TEXT](self, text, None)
        self._kind = kind
        self._table[self._state][kind](self, raw, tag)

    def _end_value(self, call: Call) -> None:
        text = "".join(call.vparts)
        call.vparts = []
        plan = call.plan
        assert plan is not None
        self._state = INVOKE
        if call.skip:
            call.skip = False
            call.repairs.append(RepairKind.DUPLICATE_PARAMETER)
            self._notice(RepairKind.DUPLICATE_PARAMETER, f"{plan.key}: {text}", dedupe=False)
            return
        if call.streams:
            call.args[plan.key] = text
            call.jparts.append('"')
            self._out.append(args_delta(call.index, '"'))
            return
        value, coerced, error = close_value(plan, text)
        if coerced:
            call.repairs.append(RepairKind.TYPE_COERCION)
            self._notice(RepairKind.TYPE_COERCION, plan.key)
        elif error is not None:
            call.errors.append(error)
        if call.wrapper:
            call.pending = (plan, value)
            call.wrapper = False
            return
        frag = call.write_param(plan, value)  # _write_param(), inline
        if call.streaming:
            self._out.append(args_delta(call.index, frag))

    def _write_param(self, call: Call, plan: ParamPlan, value: Any) -> None:
        frag = call.write_param(plan, value)
        if call.streaming:
            if call.index < 0:
                self._start(call)
            self._out.append(args_delta(call.index, frag))

    def _flush_pending(self, call: Call) -> None:
        if call.pending is not None:
            plan, value = call.pending
            call.pending = None
            self._write_param(call, plan, value)

    def _on_invoke_close(self, raw: str, tag: Tag | None) -> None:
        call = self._call
        assert call is not None and tag is not None
        self._check_ws()
        if self.spans is not None:
            self._span("markup", raw)
        if tag.repairs:
            self._tag_repairs(tag, call)
        self._finish_invoke(call)

    def _on_invoke_cut(self, raw: str, tag: Tag | None) -> None:
        """An invoke opener or the block closer while an invoke is open closes it first
        (dsml.md 6.1 rules 2 and 3): its parameters so far are its arguments, and the tag
        is then read as after an invoke. A parameter never moves to the next call."""
        call = self._call
        assert call is not None
        kind = (RepairKind.INVOKE_CLOSER_MISSING if self._kind == INVOKE_OPEN
                else RepairKind.INVOKE_CLOSED_BY_BLOCK)  # fmt: skip
        call.repairs.append(kind)
        self._notice(kind, call.name)
        self._check_ws()
        hold = self._hold
        if hold is not None:
            hold.raw.pop()  # the tag is not part of this invoke's held text
        self._finish_invoke(call)
        if self._hold is not None:
            self._hold.raw.append(raw)
        elif self._block_start is not None:  # the unfinished part starts before this tag
            pieces, back = self._block_start
            self._block_start = (pieces, back + len(raw))
        self._table[self._state][self._kind](self, raw, tag)

    def _on_stray_opener(self, raw: str, tag: Tag | None) -> None:
        """A block opener inside a block is markup (dsml.md 6.1 rule 4)."""
        self._span("markup", raw)
        self._notice(RepairKind.STRAY_OPENER, raw, dedupe=False)

    def _finish_invoke(self, call: Call) -> None:
        if call.body is not None:
            self._read_body(call)
        elif call.pending is not None:
            key = call.pending[0].key
            inner = unwrap(call)
            if inner is not None:
                call.pending = None
                call.repairs.append(RepairKind.WRAPPED_ARGUMENTS)
                self._notice(RepairKind.WRAPPED_ARGUMENTS, key)
                self._write_object(call, inner)
            else:
                self._flush_pending(call)
        self._close_call(call)

    def _write_object(self, call: Call, obj: dict[str, Any]) -> None:
        frag = call.write_object(obj)
        if frag is not None and call.streaming:
            if call.index < 0:
                self._start(call)
            self._out.append(args_delta(call.index, frag))

    def _read_body(self, call: Call) -> None:
        assert call.body is not None
        raw_body = "".join(call.body)
        text = raw_body.strip()
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
        if params is None or not repair.keeps_text(text, [v for _, _, v in params]):
            call.broken = call.opener + raw_body  # prose: no call (dsml.md 6.1 rule 6)
            return
        call.repairs.append(RepairKind.LXML_REPAIR)
        self._notice(RepairKind.LXML_REPAIR, call.name)
        obj = {}
        for key, attr, value_text in params:
            obj[key] = convert(call, key, attr, value_text)
        self._write_object(call, obj)

    def _close_call(self, call: Call) -> None:
        """The invoke closed: finish the JSON, validate, deliver or hold."""
        self._call = None
        self._state = BLOCK
        hold = self._hold
        if call.broken:  # no call (dsml.md 6.1 rule 6): settled with the block
            if hold is not None:
                self._reject(None, None)
            else:
                self._ledger.leftovers.append((True, call.broken))
                self._mark_block_start()
            return
        if call.streaming and call.index < 0:
            self._start(call)
        closing = "}" if call.emitted else "{}"
        call.jparts.append(closing)
        if call.streaming:
            self._out.append(args_delta(call.index, closing))
        outcome, error = validate_call(call, self._tools)
        invalid = outcome not in _DELIVERABLE
        if hold is None:
            if call.streaming:  # _end_call(), inline
                self._out.append(tool_call_end(call.index, call.args, outcome, error))
                self._calls.append(
                    ToolCall(call.id, call.name, call.args, "".join(call.jparts), outcome, error)
                )
            elif invalid:  # strict mode
                self.rejected.append(
                    ToolCall("", call.name, call.args, "".join(call.jparts), outcome, error)
                )
            else:
                self._deliver(call, outcome, error)
            # Calls recovered from text inside this invoke come after it, never inside it.
            if self._junk:
                self._repair_junk()
            self._mark_block_start()
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
            elif hold.region == CONTENT and hold.fence is None:
                self._accept()
                self._state = CONTENT
            else:
                hold.closed = True
                self._state = AFTER

    def _mark_block_start(self) -> None:
        """The unfinished part of the block starts here (returned if the block never closes)."""
        self._mark = len(self.spans) if self.spans is not None else 0
        self._ledger.upto = len(self._ledger.leftovers)
        lex = self._lex  # self._here(0), inline
        self._block_start = (len(self._raw), len(lex._buf) - lex._pos)

    def _end_call(self, call: Call, outcome: CallOutcome, error: str | None) -> None:
        self._out.append(tool_call_end(call.index, call.args, outcome, error))
        self._calls.append(
            ToolCall(call.id, call.name, call.args, "".join(call.jparts), outcome, error)
        )

    def _deliver(self, call: Call, outcome: CallOutcome, error: str | None) -> None:
        call.index = self._next_index
        self._next_index += 1
        call.id = self._id_factory()
        self._out.append(tool_call_start(call.index, call.id, call.name))
        self._out.append(args_delta(call.index, "".join(call.jparts)))
        self._end_call(call, outcome, error)

    def _on_block_close(self, raw: str, tag: Tag | None) -> None:
        assert tag is not None
        self._check_ws()
        if self.spans is not None:
            self._span("markup", raw)
        if tag.repairs:
            self._tag_repairs(tag, None)
        hold = self._hold
        if hold is not None:
            if hold.bare:  # an orphan closer after a bare invoke: reading failed
                self._reject(raw, tag)
                return
            hold.closed = True
            self._state = AFTER
            if hold.region == CONTENT and hold.fence is None:  # guarded (rule 9): decided now
                if hold.qualifies():
                    self._accept()
                else:
                    self._reject(None, None)
            return
        self._state = AFTER
        self._after_ws = []
        self._block_start = None
        if self._junk or self._ledger.leftovers:
            self._settle_block(None)

    def _settle_block(self, end: int | None) -> None:
        """The block ends at offset `end` (its closer when None, or where the stream left it): what
        is no call comes back. With a call in the block, prose is content and broken
        invokes are Notices; with none, the whole block is content as written (rule 6)."""
        if self._junk:
            self._repair_junk()
        ledger = self._ledger
        if not ledger.leftovers:
            return
        leftovers, ledger.leftovers = ledger.leftovers, []
        if len(self._calls) + len(self.rejected) > ledger.calls_at_open:
            for broken, text in leftovers:
                if broken:
                    self._notice(RepairKind.BROKEN_INVOKE, text, dedupe=False)
                else:
                    self._emit_text(CONTENT, text, span=False)
            if self.spans is not None:
                for i, (kind, text) in enumerate(self.spans):
                    if kind == "leftover":
                        self.spans[i] = ("content", text)
            return
        self._malformed = True
        text = self._text_since(ledger.open_mark, self._offset() if end is None else end)
        if self.spans is not None:
            del self.spans[ledger.open_span :]
        self._emit_text(CONTENT, text)

    def _repair_junk(self) -> None:
        """Read the block text the state machine could not (dsml.md section 6: lxml):
        invokes in it become calls, the rest is kept for the block's end."""
        junk = "".join(self._junk)
        self._junk = []
        pieces: list[tuple[int, int, str]] = []  # (start, end, span kind) in junk
        for start, end, is_invoke in repair.split_invokes(junk):
            text = junk[start:end]
            if not is_invoke and repair.has_markup(text):  # a tag outside any invoke
                self._ledger.leftovers.append((True, text))
                pieces.append((start, end, "markup"))
                continue
            if not is_invoke:
                if text.strip():
                    self._ledger.leftovers.append((False, text))
                pieces.append((start, end, "leftover" if text.strip() else "markup"))
                continue
            found = [inv for inv in repair.read_invokes(text) if inv.name and not inv.name.isspace()]
            call = None
            if len(found) == 1 and repair.keeps_text(
                text, [v for _, _, v in found[0].params] + [found[0].body]
            ):
                call = self._repaired_call(found[0])
            if call is None:
                self._ledger.leftovers.append((True, text))
            pieces.append((start, end, "markup"))
        if self.spans is not None:
            self._relabel_junk(pieces)

    def _repaired_call(self, inv: repair.RepairedInvoke) -> Call | None:
        """Deliver the call lxml recovered (None when it is no call: a prose body)."""
        assert inv.name is not None
        call = Call(inv.name, self._tools.get(inv.name), streaming=False)
        call.repairs.append(RepairKind.LXML_REPAIR)
        if inv.params:
            self._write_object(call, {k: convert(call, k, a, v) for k, a, v in inv.params})
        elif inv.body:
            call.body = [inv.body]
            self._read_body(call)
            if call.broken:
                return None
        call.jparts.append("}" if call.emitted else "{}")
        outcome, error = validate_call(call, self._tools)
        self._notice(RepairKind.LXML_REPAIR, inv.name, dedupe=False)
        if self._strict and outcome not in _DELIVERABLE:
            self.rejected.append(
                ToolCall("", call.name, call.args, "".join(call.jparts), outcome, error)
            )
        else:
            self._deliver(call, outcome, error)
        return call

    def _relabel_junk(self, pieces: list[tuple[int, int, str]]) -> None:
        """Trace mode: each junk span, split where the junk was cut, becomes markup (a
        call, a broken invoke, whitespace) or `leftover` (prose settled with the block)."""
        spans = self.spans
        assert spans is not None
        slots = []
        at = 0
        for i in self._junk_spans:
            text = spans[i][1]
            slots.append((i, at, text))
            at += len(text)
        for i, begin, text in reversed(slots):
            parts = []
            for start, end, kind in pieces:
                lo, hi = max(start, begin), min(end, begin + len(text))
                if lo < hi:
                    parts.append((kind, text[lo - begin : hi - begin]))
            spans[i : i + 1] = parts
        self._junk_spans = []
