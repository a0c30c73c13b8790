"""Handlers of the text states (REASONING, CONTENT, AFTER a block) and the decisions
about held text.

Reasoning and content stream as they arrive, except up to two trailing newlines when tools
were offered: they are the block separator if a block follows. A block opener in content
starts a streaming block (`dsml.block`); one inside reasoning, or an invoke without its
opener, starts a `Hold`: its text is kept until `_accept` turns it into calls or `_reject`
releases it verbatim (dsml.md section 6, "Thinking"). `_end` and `_truncate` settle the
stream at EOS or at its end.

A mixin of `dsml.parser.StreamParser`, like `dsml.block.BlockStates`.
"""

from __future__ import annotations

import re

from dsml.block import BlockLedger
from dsml.calls import Call
from dsml.events import (
    CallOutcome,
    Event,
    Notice,
    RepairKind,
    ToolCallEnd,
    TurnOutcome,
)
from dsml.lexer import CALLS_OPEN, INVOKE_OPEN, PARAM_OPEN, TEXT, Tag
from dsml.markers import THINK_CLOSE, THINK_OPEN
from dsml.quoting import FENCED, INLINE
from dsml.states import (
    AFTER,
    BLOCK,
    BODY,
    CONTENT,
    DONE,
    INVOKE,
    OPENED,
    QUOTED,
    REASONING,
    VALUE,
)

_GUARDED = RepairKind.GUARDED_SPELLING
_FENCE_RUN = re.compile(r"\s*(?:`+|~+)\s*")
_PLAIN_INVOKE = re.compile(r"<invoke\s{1,8}name\s{0,8}=")
_PLAIN_INVOKE_MAX = 31  # characters kept: one less than the longest match can be
_OPENER_KINDS = (CALLS_OPEN, INVOKE_OPEN, PARAM_OPEN)  # a closer's kind is its opener's + 1
_OPENERS_AND_CLOSERS = frozenset((*_OPENER_KINDS, *(k + 1 for k in _OPENER_KINDS)))


class Hold:
    """Text held back until decided: a block inside reasoning, or an invoke without opener."""

    __slots__ = (
        "bare", "calls", "closed", "events", "fence", "guarded", "raw", "region", "spans",
        "think_at",
    )  # fmt: skip

    def __init__(self, region: int, raw: list[str], bare: bool) -> None:
        self.region = region  # REASONING or CONTENT: where the raw text goes if rejected
        self.raw = raw
        self.bare = bare
        self.calls: list[Call] = []
        self.events: list[Event] = []  # notices waiting for the decision
        self.spans: list[tuple[str, str]] = []
        self.closed = False  # the block (or bare invoke) closed; waiting for EOS
        self.think_at = -1  # index in raw of a `</think>` seen after the block
        self.guarded = bare  # calls only of declared tools with their required arguments
        self.fence: str | None = None  # in a code fence: what follows the block ("" so far)

    def qualifies(self) -> bool:
        """Every call names a declared tool and carries its required arguments (the
        guards of an invoke without opener, dsml.md section 6 and 6.1 rule 9)."""
        return bool(self.calls) and all(
            c.tool is not None and all(r in c.args for r in c.tool.required) for c in self.calls
        )


class RegionStates:
    """Token handlers for REASONING, CONTENT and AFTER; accept/reject/end/truncate."""

    __slots__ = ()

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
        if raw == THINK_OPEN:  # a doubled `<think>` is markup, a later one text (rule 10)
            if self._reasoning or self._nl:
                self._text(REASONING, raw)
            else:
                self._extra_think(raw)
            return
        self._flush_nl()
        self._span("markup", raw)
        self._state = CONTENT

    def _on_content_think(self, raw: str, tag: Tag | None) -> None:
        """`</think>` after reasoning ended is markup (dsml.md 6.1 rule 10); `<think>` text."""
        if raw == THINK_OPEN:
            self._text(CONTENT, raw)
        else:
            self._flush_nl()
            self._extra_think(raw)

    def _extra_think(self, raw: str) -> None:
        self._span("markup", raw)
        self._notice(RepairKind.EXTRA_THINK_TAG, raw, dedupe=False)

    def _on_eos(self, raw: str, tag: Tag | None) -> None:
        if self._hold is not None:
            self._hold.raw.pop()  # EOS is not part of the held text
        self._end(eos=True, raw=raw)

    def _on_orphan(self, raw: str, tag: Tag | None) -> None:
        """A closer in content: text when its opener went to the text (dsml.md 6.1 rule 7),
        else an orphan, dropped with the whitespace before it."""
        opened = self._opened
        kind = self._kind
        if not self._has_tools or opened[kind - 1] or _GUARDED in tag.repairs:  # type: ignore[union-attr]
            if opened[kind - 1]:
                opened[kind - 1] -= 1
            self._text(CONTENT, raw)
            return
        nl, self._nl = self._nl, ""
        self._span("markup", nl + raw)
        self._notice(RepairKind.ORPHAN_CLOSER, raw, dedupe=False)

    def _quoting(self, region: int) -> int:
        """Markdown quoting at the end of the region's text so far (dsml.quoting)."""
        if region == REASONING:
            return self._quotes[0].state(self._reasoning)
        return self._quotes[1].state(self._content)

    def _on_reasoning_closer(self, raw: str, tag: Tag | None) -> None:
        """A closer in reasoning is text; it ends a block released as text (rule 7)."""
        if self._opened[self._kind - 1]:
            self._opened[self._kind - 1] -= 1
        self._text(REASONING, raw)

    def _on_text_opener(self, raw: str, tag: Tag | None) -> None:
        """A parameter opener outside a block is text; its closer will be too (rule 7)."""
        self._opened[PARAM_OPEN] += 1
        self._text(CONTENT, raw)

    def _on_block_open(self, raw: str, tag: Tag | None) -> None:
        region = REASONING if self._state == REASONING else CONTENT
        if not self._has_tools:
            self._text(region, raw)
            return
        if self._hold is not None:
            self._reject(raw, tag)
            return
        quoting = self._quoting(region)
        if quoting == INLINE:  # quoted in a code span: text (dsml.md 6.1 rule 5)
            self._opened[CALLS_OPEN] += 1
            self._on_after_text(raw, tag) if self._state == AFTER else self._text(region, raw)
            return
        if self._state == AFTER:
            sep, self._after_ws = "".join(self._after_ws), []
        else:
            sep, self._nl = self._nl, ""
        self._seen = set()
        self._junk = []
        self._junk_spans = []
        mark = self._here(len(raw) + len(sep))
        self._ledger = BlockLedger(
            mark, len(self.spans) if self.spans is not None else 0,
            len(self._calls) + len(self.rejected),
        )  # fmt: skip
        assert tag is not None
        guarded = _GUARDED in tag.repairs  # (rule 9: held, like an invoke without opener)
        if region == REASONING or guarded or quoting == FENCED:
            self._hold = Hold(region, [sep, raw], bare=False)
            self._hold.guarded = guarded
            if quoting == FENCED:
                self._hold.fence = ""
        else:
            self._block_start = mark
            self._mark = len(self.spans) if self.spans is not None else 0
        if self.spans is not None:
            self._span("markup", sep + raw)
        ledger = self._ledger
        ledger.opener, ledger.sep, ledger.tag, ledger.region = raw, sep, tag, region
        self._ws = ""
        self._state = OPENED

    # ----------------------------------------------------------------- after a block opener
    # A block opener counts only when the next markup is an invoke opener or the block
    # closer (dsml.md 6.1 rule 4); until then it is OPENED.

    def _on_opened_text(self, raw: str, tag: Tag | None) -> None:
        """Text is no markup: held until the next tag decides (a plain `<invoke name=…>`,
        which the lexer reads as text, counts as an invoke opener)."""
        ledger = self._ledger
        ledger.ws.append((raw, False))  # spanned when decided
        # Searched in the last characters and this text: found wherever deltas split it.
        tail = ledger.tail + raw
        ledger.tail = tail[-_PLAIN_INVOKE_MAX:]
        if "<invoke" in tail and _PLAIN_INVOKE.search(tail):
            self._on_opened_confirm(None, None)

    def _on_opened_confirm(self, raw: str | None, tag: Tag | None) -> None:
        ledger = self._ledger
        if self._hold is not None and any(not o and not t.isspace() for t, o in ledger.ws):
            self._reject(raw, tag)  # a held block must be well-formed: released as written
            return
        sep, opener = ledger.sep, ledger.tag
        if len(sep) < 2:
            self._notice(RepairKind.BLOCK_SEPARATOR, repr(sep))
        assert opener is not None
        if opener.repairs:
            self._tag_repairs(opener, None)
        self._ws = ""
        self._state = BLOCK
        held, ledger.ws = ledger.ws, []
        if held:
            kind, self._kind = self._kind, TEXT
            for text, opener in held:
                if opener:
                    self._on_stray_opener(text, None)
                else:
                    self._table[BLOCK][TEXT](self, text, None)
            self._kind = kind
            self._in_junk = False  # (a tag follows)
        if raw is not None:
            self._table[BLOCK][self._kind](self, raw, tag)

    def _on_opened_stray(self, raw: str, tag: Tag | None) -> None:
        """A second opener right after the first: markup of the same block (rule 4)."""
        self._ledger.ws.append((raw, True))  # (comes back with the first if that was text)

    def _unopen(self, raw: str | None, tag: Tag | None) -> None:
        """The opener was text after all (`Example: '<｜DSML｜toolcalls>'`): it comes back
        as written, and the token `raw` is read again in the region."""
        if self._hold is not None:
            self._reject(raw, tag)
            return
        ledger = self._ledger
        self._state = ledger.region
        self._block_start = None
        self._opened[CALLS_OPEN] += 1  # its closer is text too (rule 7)
        if self.spans is not None:
            del self.spans[ledger.open_span :]
        self._text(ledger.region, ledger.sep + ledger.opener + "".join(t for t, _ in ledger.ws))
        if raw is not None:
            self._table[self._state][self._kind](self, raw, tag)

    def _on_bare_invoke(self, raw: str, tag: Tag | None) -> None:
        """An invoke without the block opener: held until it closes (dsml.md section 6)."""
        region = REASONING if self._state == REASONING else CONTENT
        assert tag is not None
        name = tag.name
        tool = self._tools.get(name) if name is not None else None
        hold = self._hold
        if hold is not None and hold.bare and hold.closed and tool is not None:
            hold.closed = False  # the next orphan invoke of a reasoning run (rule 8)
            self._state = BLOCK
            self._on_invoke_open(raw, tag)
            return
        if hold is not None:
            self._reject(raw, tag)
            return
        quoting = self._quoting(region)
        if tool is None or self._opened[CALLS_OPEN] or quoting == INLINE:  # text (rules 5, 7)
            self._opened[INVOKE_OPEN] += 1
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
        self._hold = Hold(region, [sep, raw], bare=True)
        if quoting == FENCED:
            self._hold.fence = ""
        self._span("markup", sep)
        self._notice(RepairKind.MISSING_OPENER, raw)
        self._ws = ""
        self._state = BLOCK
        self._on_invoke_open(raw, tag)

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
            if hold.fence is not None and _FENCE_RUN.fullmatch(raw):  # the closing fence
                hold.fence += raw.strip()
                self._span("markup", raw)
                return
            self._reject(raw, tag)
            return
        text = "".join(self._after_ws) + raw
        self._after_ws = []
        self._state = CONTENT
        self._text(CONTENT, text)

    def _on_after_think(self, raw: str, tag: Tag | None) -> None:
        hold = self._hold
        if hold is not None and hold.region == REASONING and hold.think_at < 0 and raw == THINK_CLOSE:
            hold.think_at = len(hold.raw) - 1  # the `</think>` just appended
            self._span("markup", raw)
            return
        if hold is None and raw == THINK_CLOSE:
            self._flush_after_ws()
            self._extra_think(raw)
            return
        self._on_after_text(raw, tag)

    def _on_after_tag(self, raw: str, tag: Tag | None) -> None:
        if self._hold is not None:
            self._reject(raw, tag)
            return
        self._on_after_text(raw, tag)

    def _on_after_orphan(self, raw: str, tag: Tag | None) -> None:
        hold = self._hold
        if hold is not None:
            if hold.bare and hold.region == REASONING:  # closers after it: still a call (rule 8)
                self._span("markup", raw)
                return
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
        if hold.fence is not None:  # a fenced block that ends the output (rule 5)
            self._notice(RepairKind.FENCED, hold.fence, dedupe=False)
            for call in hold.calls:
                call.repairs.append(RepairKind.FENCED)
                if call.outcome == CallOutcome.VALID:
                    call.outcome = CallOutcome.REPAIRED
        for call in hold.calls:
            self._deliver(call, call.outcome, call.error)
        if hold.region == REASONING and hold.calls:
            if hold.bare:
                self._notice(RepairKind.THINKING_ORPHAN, hold.calls[0].name, dedupe=False)
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
        markers = self._markers
        for piece in hold.raw:  # openers released as text keep their closers (rule 7)
            tok = markers.get(piece) if piece[:1] == "<" else None
            if tok is not None and tok[0] in _OPENERS_AND_CLOSERS:
                kind = tok[0]
                if kind in _OPENER_KINDS:
                    self._opened[kind] += 1
                elif self._opened[kind - 1]:
                    self._opened[kind - 1] -= 1
        region = hold.region
        self._state = region
        if hold.think_at >= 0:
            self._text(REASONING, "".join(hold.raw[: hold.think_at]))
            self._on_think(hold.raw[hold.think_at], None)
            self._text(CONTENT, "".join(hold.raw[hold.think_at + 1 :]))
        else:
            self._text(region, "".join(hold.raw))
        if raw is not None:
            self._table[self._state][self._kind](self, raw, tag)

    def _end(self, eos: bool, raw: str = "") -> None:
        """EOS or the end of the stream."""
        self._eos = eos
        st = self._state
        hold = self._hold
        if hold is not None:
            if hold.closed and (not hold.guarded or hold.qualifies()):
                self._accept()
            elif hold.closed:
                self._reject(None, None)
            else:
                # An orphan invoke the stream leaves open is cut like an open block.
                self._unterminated = self._unterminated or hold.region == CONTENT
                self._reject(None, None)
            st = self._state
        if st == OPENED:  # EOS decides: the opener was text; a cut stream leaves a block open
            if eos:
                self._unopen(None, None)
            else:
                self._on_opened_confirm(None, None)
            st = self._state
        if st in (REASONING, CONTENT):
            self._flush_nl()
        elif st == AFTER:
            if self._after_ws or self.spans is not None:
                self._flush_after_ws()
        elif st in (BLOCK, INVOKE, BODY, VALUE, QUOTED):
            if eos and st == INVOKE and self._complete_at_eos():
                st = self._state  # BLOCK: the rest of the block is whitespace or unread
            self._truncate(self._offset() - len(raw))
        self._span("markup", raw)
        self._state = DONE

    def _complete_at_eos(self) -> bool:
        """The model ended its turn (EOS) between the parameters of a call that has its
        required arguments: the call is complete (api.md "Cut calls", the exception; in the
        spirit of dsml.md 6.1 rule 3). Closes it and returns True; False leaves it cut."""
        call = self._call
        if (call is None or self._hold is not None or self._in_junk or call.tool is None
                or call.index < 0 or call.broken or call.pending is not None
                or call.body is not None or not call.args
                or any(r not in call.args for r in call.tool.required)):
            return False
        self._close_call(call)
        return True

    def _truncate(self, end: int) -> None:
        """An unterminated block: a started call ends TRUNCATED; unread text becomes content.

        A streamed call that was cut is never completed here: its fragments stay exactly
        what the model wrote, which do not parse as JSON (api.md "Cut calls"), so no
        consumer of the fragments can run it as if it were whole."""
        call = self._call
        self._call = None
        if call is not None and call.streaming and call.index >= 0:
            if call.streams and self._state in (VALUE, QUOTED):
                assert call.plan is not None
                call.args[call.plan.key] = "".join(call.vparts)
            self._out.append(
                ToolCallEnd(call.index, call.args, CallOutcome.TRUNCATED,
                            "the block ended before this invoke closed; its text is returned as content")
            )  # fmt: skip
        if self._block_start is None:
            return
        ledger = self._ledger
        self._junk = []  # (after the last complete invoke: in the text returned below)
        self._junk_spans = []
        if len(self._calls) + len(self.rejected) == ledger.calls_at_open:
            if ledger.leftovers:  # no call: the whole block comes back (dsml.md 6.1 rule 6)
                self._block_start = ledger.open_mark
                self._mark = ledger.open_span
                ledger.leftovers = []
        elif ledger.leftovers:
            del ledger.leftovers[ledger.upto :]  # the rest is in the text returned below
            self._settle_block(end)
        start = self._resolve(self._block_start)
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
        self._block_start = None

    def _turn_outcome(self) -> TurnOutcome | None:
        if not self._has_tools:
            return None
        if self._unterminated:
            return _MALFORMED if self._eos else _TRUNCATED
        if self._calls:
            return _RECOVERED if self._recovered else _TOOL_CALLS
        if self._malformed or self.rejected:
            return _MALFORMED
        if "".join(self._content).strip():
            return _ANSWER
        return _EMPTY


# Members bound once: a `TurnOutcome.X` lookup costs ~90 ns in 3.11, once per turn here.
_MALFORMED, _TRUNCATED, _TOOL_CALLS = (
    TurnOutcome.MALFORMED, TurnOutcome.TRUNCATED, TurnOutcome.TOOL_CALLS
)  # fmt: skip
_RECOVERED, _ANSWER, _EMPTY = (
    TurnOutcome.RECOVERED_FROM_THINKING, TurnOutcome.ANSWER, TurnOutcome.EMPTY
)  # fmt: skip
