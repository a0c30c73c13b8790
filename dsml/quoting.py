"""Whether text is inside markdown quoting: a fenced code block or an inline code span.

DSML quoted in an explanation is text, never a call (dsml.md 6.1 rule 5). The parser does
not scan text as it streams (its fast paths only test for `<`); when a block or invoke
opener arrives in reasoning or content, `MarkdownQuotes.state` reads the text emitted since
its last call, so each character is read once however many openers come.

CommonMark, simplified: a fence is a line starting (after up to 3 spaces) with 3 or more
backticks or tildes, closed by a line of at least as many of the same character; an inline
code span opens with a run of backticks and closes with a run of the same length, or at a
blank line (the paragraph ends).
"""

from __future__ import annotations

import re

NONE, INLINE, FENCED = range(3)
_MARK = re.compile(r"\n|`+|~+")


class MarkdownQuotes:
    """Incremental state of one region's text (the pieces of a list that only grows)."""

    __slots__ = ("_blank", "_closing", "_code", "_fence", "_line_start", "_read")

    def __init__(self) -> None:
        self._read = 0  # pieces of the region's list already read
        self._fence = ""  # the opening fence run, when inside a fenced block
        self._closing = False  # a closing fence run on this line, nothing else after it yet
        self._code = 0  # length of the backtick run that opened an inline code span
        self._line_start = True  # only up to 3 spaces since the last newline
        self._blank = False  # the current line is empty so far (after a newline)

    def state(self, pieces: list[str]) -> int:
        """NONE, INLINE or FENCED at the end of `pieces` (read from where the last call
        stopped)."""
        # Joined: a backtick run split between two deltas is one run. (No run continues
        # past this call: an opener's `<` follows the text read.)
        self._feed("".join(pieces[self._read :]))
        self._read = len(pieces)
        if self._fence and not self._closing:
            return FENCED
        return INLINE if self._code else NONE

    def _feed(self, text: str) -> None:
        if not self._fence and not self._code and "`" not in text and "~" not in text:
            # Plain text (most of it): only where its last line stands matters later.
            if "\n" in text:
                self._line_start = self._blank = True
                text = text.rpartition("\n")[2]
            if text:
                self._other(text)
            return
        pos = 0
        for m in _MARK.finditer(text):
            before = text[pos : m.start()]
            if before:
                self._other(before)
            pos = m.end()
            run = m.group()
            if run == "\n":
                if self._closing:
                    self._fence = ""
                    self._closing = False
                if self._blank:
                    self._code = 0  # a blank line ends the paragraph and its code span
                self._line_start = self._blank = True
                continue
            at_start = self._line_start
            self._line_start = self._blank = False
            if self._fence:
                if at_start and run[0] == self._fence[0] and len(run) >= len(self._fence):
                    self._closing = True  # if only whitespace follows on its line
                else:
                    self._closing = False
                continue
            if at_start and len(run) >= 3 and not self._code:
                self._fence = run
                continue
            if run[0] == "`":
                if not self._code:
                    self._code = len(run)
                elif len(run) == self._code:
                    self._code = 0
        if text[pos:]:
            self._other(text[pos:])

    def _other(self, text: str) -> None:
        """Text without newlines, backticks or tildes."""
        if self._line_start and (len(text) > 3 or text.strip(" ")):
            self._line_start = False
        if text.strip():
            self._closing = False
        self._blank = False
