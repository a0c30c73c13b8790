"""Incremental lexer: text deltas in, text and marker tokens out.

Every marker the parser cares about starts with `<`: `</think>`, the EOS string and the DSML
tags (`<｜DSML｜tool_calls>`, `<｜DSML｜invoke name="…">`, `<｜DSML｜parameter name="…"
string="…">` and their closers, in every spelling dsml.md section 6 tolerates). Text up to
the next `<` is released at once. At a `<` the lexer either recognises a marker, rejects it
(the `<` is text), or holds it back because the next delta decides; a held head is never
longer than `MAX_HEAD`. Once a DSML tag head is recognised its attributes are scanned up to
the closing `>` (quotes may hide a `>`), bounded by `MAX_TAG`.

Tags are read in every spelling whatever the dialect; the dialect that rendered the
prompt (`dsml.dialects`) only decides which spelling is native, i.e. not a repair: v4.1's
spaced ` calls`/` invoke`/` parameter`, v3.2's `function_calls`, v4's `tool_calls`.

The lexer keeps only the undecided tail between deltas, so each character is examined a
bounded number of times however long the stream gets. Deltas that only extend a marker
still arriving (most deltas of a tool-call block, which a tokenizer splits after `<`,
`｜DSML｜`, `parameter`, ...) need not reach next(): `MARKER_PREFIXES` says whether a held
head may still grow, `absorb()` takes such a delta, and `markers` maps the text of every
complete marker read so far (and of each DSML tag followed by a newline) to its token, so
the delta that brings the `>` costs a dict lookup (the parser's fast paths in `dsml.parser`
use all three).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from itertools import product
from types import MappingProxyType
from typing import Any

from dsml.dialects import Dialect, texts
from dsml.events import RepairKind
from dsml.markers import EOS, THINK_CLOSE, THINK_OPEN

# Token kinds (ints: they index the parser's transition table).
TEXT, THINK, END, CALLS_OPEN, CALLS_CLOSE, INVOKE_OPEN, INVOKE_CLOSE, PARAM_OPEN, PARAM_CLOSE = (
    range(9)
)
NUM_KINDS = 9

# Tag names by kind. `tool_calls` is v4; `calls` is the v4.1 block tag (spaced, see below);
# `function_calls` is v3.2; the rest are spellings seen in the wild.
_CALLS_NAMES = (
    "tool_calls", "toolcalls", "tool-calls", "calls", "function_calls", "tool_use", "tool_call",
)  # fmt: skip
_NAMES = {**dict.fromkeys(_CALLS_NAMES, "calls"), "invoke": "invoke", "parameter": "parameter"}
_BARS_BEFORE = ("｜", "｜｜", "|", "||", "", "‖", " | ")  # "" is the missing first bar
_BARS_AFTER = ("｜", "｜｜", "|", "||", "‖", " | ")
# Spellings accepted only under the guards of an invoke without opener (dsml.md 6.1 rule 9):
# spaced or U+2016 bars, the tag names tool_use / tool_call, and the plain tags an engine's
# skip_special_tokens leaves (`<invoke name=…>`: no DSML token at all).
_GUARDED_BARS = ("‖", " | ")
_GUARDED_NAMES = ("tool_use", "tool_call")
_PLAIN_NAMES = ("tool_calls", "invoke", "parameter")

_HEAD = re.compile(
    r"<(/?)(?:(｜｜|｜|\|\||\||‖| \| |)DSML(｜｜|｜|\|\||\||‖| \| )( ?)"
    r"(tool_calls|toolcalls|tool-calls|function_calls|calls|tool_use|tool_call|invoke|parameter)"
    r"|(tool_calls|invoke|parameter))(?=[\s/><])"  # the last: plain, no DSML token
)
_Q = '"“”'  # straight and typographic quotes
_ATTR = rf"\s+[\w-]+\s*=\s*[{_Q}][^{_Q}]*[{_Q}]"
_TAG_END = re.compile(rf"(?:{_ATTR})*\s*(/?)>")
# Every prefix of an attribute list (fullmatch): decides whether to wait for more text.
_TAG_PARTIAL = re.compile(
    rf"(?:{_ATTR})*(?:\s+(?:[\w-]+(?:\s*(?:=\s*(?:[{_Q}][^{_Q}]*)?)?)?)?|\s*/?)?"
)
# A tag cut before its `>`: its attributes (if any), then a newline or the next tag.
_TAG_CUT = re.compile(rf"(?:{_ATTR})*(?=\s*<|\n)")
_ATTR_ITEM = re.compile(rf"([\w-]+)\s*=\s*[{_Q}]([^{_Q}]*)[{_Q}]")
# A parameter opener whose `>` is missing and whose value follows at once
# (`<｜DSML｜parameter name="city" string="true"Paris`): the head, whole attributes, then
# neither `>`, `/`, whitespace nor another attribute (a missing space before one).
_GLUED = re.compile(rf"(?:{_ATTR})+(?![\s>/]|[\w-]+\s*=)")
_CANONICAL_ATTRS = re.compile(r'(?: [\w-]+="[^"“”]*")*')


_KIND = {
    ("calls", False): CALLS_OPEN,
    ("calls", True): CALLS_CLOSE,
    ("invoke", False): INVOKE_OPEN,
    ("invoke", True): INVOKE_CLOSE,
    ("parameter", False): PARAM_OPEN,
    ("parameter", True): PARAM_CLOSE,
}


def _spellings() -> list[tuple[str, str, str, str, str]]:
    """(slash, bars before, bars after, space, name) of every head the lexer reads; a
    plain head (no DSML token) has None for both bars."""
    out: list[tuple[Any, ...]] = list(
        product(("", "/"), _BARS_BEFORE, _BARS_AFTER, ("", " "), _NAMES)
    )
    out += [(slash, None, None, "", name) for slash in ("", "/") for name in _PLAIN_NAMES]
    return out  # type: ignore[return-value]


def _head_text(slash: str, before: str | None, after: str | None, space: str, name: str) -> str:
    if before is None:
        return f"<{slash}{name}"
    return f"<{slash}{before}DSML{after}{space}{name}"


_SPELLINGS = _spellings()
_DSML_HEADS = [_head_text(*s) for s in _SPELLINGS]
# Plain heads are value text inside a value (XML in a shell command or a file).
PLAIN_HEADS = frozenset(f"<{slash}{name}" for slash in ("", "/") for name in _PLAIN_NAMES)
MAX_HEAD = max(len(h) for h in [*_DSML_HEADS, THINK_CLOSE, EOS])
MAX_TAG = 2048  # a tag with attributes; longer than any tool or parameter name we accept
# `rest in MARKER_PREFIXES` means "wait for more": proper prefixes of `</think>` and EOS, and
# DSML heads up to their full name (the next character must show where the name ends).
MARKER_PREFIXES = frozenset(
    [h[:i] for h in _DSML_HEADS for i in range(1, len(h) + 1)]
    + [m[:i] for m in (THINK_CLOSE, THINK_OPEN, EOS) for i in range(1, len(m))]
)


class Tag:
    """One complete DSML tag. A plain slotted class, built once per distinct tag text and
    then shared through the marker cache: read-only for its users."""

    __slots__ = ("attrs", "kind", "name", "plain", "raw", "repairs", "self_closing", "string")

    def __init__(self, kind: int, raw: str, attrs: Mapping[str, str], self_closing: bool,
                 repairs: tuple[RepairKind, ...]) -> None:  # fmt: skip
        self.kind = kind
        self.raw = raw
        self.attrs = attrs
        self.self_closing = self_closing
        self.repairs = repairs
        # The two attributes the parser reads, looked up once per distinct tag text
        # (the tag is cached) instead of once per tag read.
        # An empty or blank name is no name: such an opener is not a call (dsml.md 6.1 rule 6).
        name = attrs.get("name")
        self.name = name if name and not name.isspace() else None
        self.string = attrs.get("string")
        self.plain = "DSML" not in raw  # no DSML token (dsml.md 6.1 rule 9)

    def __repr__(self) -> str:
        return f"Tag({self.raw!r})"


def _head_repairs(
    before: str | None, after: str | None, space: str, name: str, native: frozenset[str]
) -> tuple[RepairKind, ...]:
    if before is None or after is None:
        return (RepairKind.GUARDED_SPELLING,)
    out = []
    if before in _GUARDED_BARS or after in _GUARDED_BARS or name in _GUARDED_NAMES:
        out.append(RepairKind.GUARDED_SPELLING)
        before, after = before.replace(" | ", "|"), after.replace(" | ", "|")
    if before == "":
        out.append(RepairKind.MISSING_BAR)
    if "|" in before or "|" in after:
        out.append(RepairKind.ASCII_BARS)
    if len(before) == 2 or len(after) == 2:
        out.append(RepairKind.DOUBLED_BARS)
    if space + name not in native:
        out.append(RepairKind.TAG_SPELLING)
    return tuple(out)


def _native_names(dialect: Dialect) -> frozenset[str]:
    """The tag names (after `｜DSML｜`, a leading space included) the dialect's prompt
    teaches: writing them is not a repair (v4.1's ` calls`, v3.2's `function_calls`)."""
    t = texts(dialect)
    return frozenset((t.block_tag, t.invoke_tag, t.parameter_tag))


def _attr_repairs(head: tuple[RepairKind, ...], attr_text: str) -> tuple[RepairKind, ...]:
    out = list(head)
    if "“" in attr_text or "”" in attr_text:
        out.append(RepairKind.TYPOGRAPHIC_QUOTES)
    if _CANONICAL_ATTRS.fullmatch(attr_text.replace("“", '"').replace("”", '"')) is None:
        out.append(RepairKind.WHITESPACE)
    return tuple(out)


def _head_info(dialect: Dialect) -> dict[str, tuple[int, tuple[RepairKind, ...]]]:
    """Every head spelling -> (token kind, repairs it implies in `dialect`)."""
    native = _native_names(dialect)
    return {
        _head_text(slash, before, after, space, name): (
            _KIND[_NAMES[name], slash == "/"],
            _head_repairs(before, after, space, name, native),
        )
        for slash, before, after, space, name in _SPELLINGS
    }


def _bare_tokens(info: dict[str, tuple[int, tuple[RepairKind, ...]]]) -> dict[str, tuple]:
    """Tags without attributes (closers, block openers) as ready-made tokens: (kind, raw, tag)."""
    return {
        head: (kind, head + ">", Tag(kind, head + ">", MappingProxyType({}), False, repairs))
        for head, (kind, repairs) in info.items()
    }


# Per dialect, built once at import (4 x 560 spellings): one dict lookup per tag.
_HEAD_INFO = {d: _head_info(d) for d in Dialect}
_BARE_TOKENS = {d: _bare_tokens(info) for d, info in _HEAD_INFO.items()}

# Complete markers already read, by their exact text, per dialect: the parser's fast path
# (`StreamParser._decide`) looks a marker up here when its `>` arrives. A tool-call block
# repeats a few tags (`<｜DSML｜invoke name="get_weather">`, each parameter opener, the
# closers), and a dict lookup replaces two regex matches, an attribute scan and a Tag per
# tag (the ~12% of deltas that complete a tag took ~60% of the parser's time). Shared by
# all lexers, like a compiled-regex cache; bounded because tag text is model output, and
# emptied (but for the fixed markers) when full, so it follows the current tool set.
# A DSML tag is also cached followed by a newline (`tag + "\n"`, the same token): most tag
# deltas end with `>\n` (`</｜DSML｜parameter` + `>\n`), and one lookup of the whole held
# text then decides them, without splitting off what follows the `>` first.
_MAX_CACHED = 4096
_MARKERS: dict[Dialect, dict[str, tuple[int, str, Tag | None]]] = {
    d: {
        key: tok
        for head, tok in bare.items()
        if head not in PLAIN_HEADS  # (the fast path would read them in a value too)
        for key in (tok[1], tok[1] + "\n")
    }
    for d, bare in _BARE_TOKENS.items()
}
for _cache in _MARKERS.values():
    _cache[THINK_CLOSE] = (THINK, THINK_CLOSE, None)
    _cache[THINK_OPEN] = (THINK, THINK_OPEN, None)  # `<think>`: markup only where rule 10 says
    _cache[EOS] = (END, EOS, None)
_NUM_FIXED = len(_MARKERS[Dialect.V4])
# Markers inside a value: EOS and every DSML tag (dsml.md 6.1 rule 1; an invoke opener is
# decided by the next tag, see dsml.block). `</think>` is value text there.
VALUE_MARKERS = frozenset(
    (PARAM_CLOSE, END, PARAM_OPEN, INVOKE_OPEN, INVOKE_CLOSE, CALLS_OPEN, CALLS_CLOSE)
)
_BROKEN = (RepairKind.BROKEN_CLOSER,)
_DAMAGED = (RepairKind.DAMAGED_OPENER,)
_NO_ATTRS: Mapping[str, str] = MappingProxyType({})


# Whether a buffer starts with a DSML tag head (`<｜DSML｜invoke`, `</|DSML|parameter`, ...).
match_head = _HEAD.match


def starts_tag(text: str) -> bool:
    """`text` is a complete DSML tag head followed by the start of its attributes (`<｜DSML｜
    invoke name="ge`): only a `>` can decide it now."""
    m = _HEAD.match(text)
    return m is not None and _TAG_PARTIAL.fullmatch(text, m.end()) is not None


# Heads followed by the start of their first attribute as the model writes it (` name="`):
# the delta after `<｜DSML｜invoke` is usually ` name`. The parser's fast path switches to
# waiting for the `>` with a set lookup instead of starts_tag()'s two regex matches.
TAG_STARTS = frozenset(
    t
    for h in _DSML_HEADS
    for t in (h + ' name="'[:i] for i in range(1, 8))
    if starts_tag(t)
)


class IncrementalLexer:
    """Holds the undecided tail; `next()` returns one token or None (needs more text)."""

    __slots__ = (
        "_bare_tokens", "_buf", "_head_info", "_pos", "markers", "prefix_wait", "tag_wait"
    )  # fmt: skip

    def __init__(self, dialect: Dialect | str = Dialect.V4) -> None:
        if type(dialect) is not Dialect:
            dialect = Dialect(dialect)  # ValueError names an unknown dialect
        self._head_info = _HEAD_INFO[dialect]
        self._bare_tokens = _BARE_TOKENS[dialect]
        # Complete markers by their text -> token, shared per dialect (see _MARKERS).
        self.markers = _MARKERS[dialect]
        self._buf = ""
        self._pos = 0
        # A recognised tag head waits for its `>`: until a delta brings `>`, `<` or a
        # newline, the parser may just push() without calling next() (its fast path).
        self.tag_wait = False
        self.prefix_wait = False  # the held text is a proper prefix of a marker head

    def push(self, text: str) -> None:
        pos = self._pos
        if pos < len(self._buf):
            self._buf = self._buf[pos:] + text
        else:
            self._buf = text
        self._pos = 0

    def absorb(self, text: str) -> bool:
        """Take `text` without reading it when it cannot decide what is held: a marker head
        still growing, or a tag whose `>` has not come. The parser's fast path for markup."""
        if self.tag_wait:
            if ">" in text or "<" in text or "\n" in text:
                return False
            buf = self._buf[self._pos :] + text
            if len(buf) > MAX_TAG:
                return False  # next() decides (the `<` is text); the caller pushes `text`
            self._buf = buf
            self._pos = 0
            return True
        if self.prefix_wait:
            cand = self._buf[self._pos :] + text
            if len(cand) <= MAX_HEAD and cand in MARKER_PREFIXES:
                self._buf = cand
                self._pos = 0
                return True
            # The head just completed and its attributes begin (` name="...`).
            if ">" not in text and "<" not in text and "\n" not in text:
                m = _HEAD.match(cand)
                if m is not None and _TAG_PARTIAL.fullmatch(cand, m.end()):
                    self._buf = cand
                    self._pos = 0
                    self.prefix_wait = False
                    self.tag_wait = True
                    return True
        return False

    def clear(self) -> None:
        """Drop everything not yet read (text after EOS)."""
        self._buf = ""
        self._pos = 0
        self.tag_wait = self.prefix_wait = False

    @property
    def held(self) -> str:
        return self._buf[self._pos :]

    def glued_opener(self, text: str) -> tuple[str, Tag] | None:
        """(its raw text, its Tag) where TEXT starts with a DSML parameter opener glued to
        its value (no `>`): the lexer gives such text as TEXT (it is decided only once the
        value's first character came), and inside a value dsml.md 6.1 rule 1 makes it an
        opener all the same."""
        m = _HEAD.match(text)
        if m is None or m.group(1) or m.group(5) != "parameter":
            return None
        cut = _GLUED.match(text, m.end())
        if cut is None:
            return None
        raw = text[: cut.end()]
        kind, head_repairs = self._head_info[m.group()]
        attrs = dict(_ATTR_ITEM.findall(text, m.end(), cut.end()))
        return raw, Tag(kind, raw, attrs, False, head_repairs + _DAMAGED)

    def next(self, value_mode: int, final: bool) -> tuple[int, str, Tag | None] | None:
        """The next token as (kind, raw text, tag). In value mode (1, or 2 in a value whose
        opener was plain) `</think>` is value text, and so are plain tags in mode 1."""
        buf = self._buf
        pos = self._pos
        n = len(buf)
        self.tag_wait = self.prefix_wait = False
        if pos >= n:
            return None
        lt = buf.find("<", pos)
        if lt != pos:
            end = n if lt < 0 else lt
            self._pos = end
            return TEXT, buf[pos:end], None
        m = _HEAD.match(buf, pos)  # DSML tags first: most `<` in a tool block start one
        if m is not None and not (value_mode == 1 and m.group() in PLAIN_HEADS):
            kind, head_repairs = self._head_info[m.group()]
            hend = m.end()
            if buf[hend] == ">":  # closers: no attributes, one shared token per spelling
                self._pos = hend + 1
                return self._bare_tokens[m.group()]
            tail = _TAG_END.match(buf, hend)
            if tail is not None:
                end = tail.end()
                raw = buf[pos:end]
                attr_text = buf[hend : tail.start(1)]
                self._pos = end
                attrs = dict(_ATTR_ITEM.findall(attr_text))
                repairs = head_repairs
                if _CANONICAL_ATTRS.fullmatch(attr_text) is None:
                    repairs = _attr_repairs(head_repairs, attr_text)
                tok = kind, raw, Tag(kind, raw, attrs, tail.group(1) == "/", repairs)
                cache = self.markers
                if m.group(2) is None:  # a plain tag: not for the fast path (see _MARKERS)
                    return tok
                if len(cache) + 2 > _MAX_CACHED:  # keep the fixed markers, drop the rest
                    for key in list(cache)[_NUM_FIXED:]:
                        cache.pop(key, None)
                cache[raw] = cache[raw + "\n"] = tok
                return tok
            if not final and n - pos <= MAX_TAG and _TAG_PARTIAL.fullmatch(buf, hend):
                self.tag_wait = True
                return None
            cut = _TAG_CUT.match(buf, hend)
            if cut is not None:  # a tag without `>` (dsml.md 6.1 rules 1 and 4)
                self._pos = end = cut.end()
                raw = buf[pos:end]
                attrs = dict(_ATTR_ITEM.findall(buf, hend, end))
                broken = _BROKEN if m.group(1) else _DAMAGED
                return kind, raw, Tag(kind, raw, attrs, False, head_repairs + broken)
        elif buf.startswith(EOS, pos):
            self._pos = pos + len(EOS)
            return END, EOS, None
        elif not value_mode and buf.startswith(THINK_CLOSE, pos):
            self._pos = pos + len(THINK_CLOSE)
            return THINK, THINK_CLOSE, None
        elif not value_mode and buf.startswith(THINK_OPEN, pos):
            self._pos = pos + len(THINK_OPEN)
            return THINK, THINK_OPEN, None
        elif not final and n - pos <= MAX_HEAD and buf[pos:] in MARKER_PREFIXES:
            self.prefix_wait = True
            return None
        # Not a marker: the `<` is text, up to the next `<`.
        lt = buf.find("<", pos + 1)
        end = n if lt < 0 else lt
        self._pos = end
        return TEXT, buf[pos:end], None
