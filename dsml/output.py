"""The parser's output helpers and input offsets, a mixin of `dsml.parser.StreamParser`
(like the handler mixins `dsml.regions` and `dsml.block`, which use them): events and the
accumulated text go out through here, and marks of offsets in the text fed are kept
lazily (summing the pieces fed at every tag cost ~1 us each)."""

from __future__ import annotations

from dsml.calls import Call
from dsml.events import Notice, RepairKind, content_delta, reasoning_delta
from dsml.lexer import Tag
from dsml.states import REASONING


class Output:
    """Output helpers and offsets of the text fed."""

    __slots__ = ()

    def _offset(self) -> int:
        """Absolute offset of the next unread character (what the lexer holds is in _raw,
        _pending is not). Summed lazily: the fast path of feed() does not count characters."""
        raw = self._raw
        count, total = self._summed
        if count < len(raw):
            total += sum(map(len, raw[count:]))
            self._summed = (len(raw), total)
        return total - len(self._lex.held)

    def _here(self, back: int) -> tuple[int, int]:
        """A mark for the offset `back` characters before the next unread one, resolved
        by _resolve() only if needed (a truncated block): summing the pieces fed at every
        invoke closer cost ~1 us each."""
        lex = self._lex  # (lex.held would copy what it holds)
        return len(self._raw), len(lex._buf) - lex._pos + back

    def _resolve(self, mark: tuple[int, int]) -> int:
        num_pieces, back = mark
        return sum(map(len, self._raw[:num_pieces])) - back

    def _text_since(self, mark: tuple[int, int], end: int) -> str:
        """The text fed from `mark` to the absolute offset `end`, reading only the pieces
        since the mark (a block that comes back whole: once per block, not the stream)."""
        raw = self._raw
        num_pieces, back = mark
        head: list[str] = []
        need, i = back, num_pieces
        while need > 0 and i > 0:
            i -= 1
            head.append(raw[i])
            need -= len(raw[i])
        before = "".join(reversed(head))
        text = (before[len(before) - back :] if back else "") + "".join(raw[num_pieces:])
        total = self._offset() + len(self._lex._buf) - self._lex._pos  # (all of _raw)
        return text[: len(text) - (total - end)] if total > end else text

    def _trace_span(self, kind: str, text: str) -> None:
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
            self._out.append(reasoning_delta(text))
            if span:
                self._span("reasoning", text)
        else:
            self._content.append(text)
            self._out.append(content_delta(text))
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

    def _tag_repairs(self, tag: Tag, call: Call | None) -> None:
        for kind in tag.repairs:  # usually empty
            self._notice(kind, tag.raw)
            if call is not None:
                call.repairs.append(kind)
