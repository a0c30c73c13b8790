"""dsml.lexer: tokens, held prefixes and value mode."""

from __future__ import annotations

import pytest

from dsml.events import RepairKind
from dsml.lexer import (
    CALLS_CLOSE,
    CALLS_OPEN,
    END,
    INVOKE_OPEN,
    MAX_HEAD,
    PARAM_CLOSE,
    PARAM_OPEN,
    TEXT,
    THINK,
    IncrementalLexer,
)
from dsml.markers import EOS


def tokens(text: str, value_mode: bool = False, final: bool = True) -> list[tuple[int, str]]:
    lex = IncrementalLexer()
    lex.push(text)
    out = []
    while (tok := lex.next(value_mode, final)) is not None:
        out.append((tok[0], tok[1]))
    return out


def test_text_and_markers() -> None:
    text = (
        'a</think>b<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">x</｜DSML｜tool_calls>'
        + EOS
        + "z"
    )
    assert tokens(text) == [
        (TEXT, "a"),
        (THINK, "</think>"),
        (TEXT, "b"),
        (CALLS_OPEN, "<｜DSML｜tool_calls>"),
        (TEXT, "\n"),
        (INVOKE_OPEN, '<｜DSML｜invoke name="f">'),
        (TEXT, "x"),
        (CALLS_CLOSE, "</｜DSML｜tool_calls>"),
        (END, EOS),
        (TEXT, "z"),
    ]


@pytest.mark.parametrize(
    ("tag", "repairs"),
    [
        ('<｜DSML｜parameter name="k" string="true">', ()),
        ('<｜｜DSML｜｜parameter name="k" string="true">', (RepairKind.DOUBLED_BARS,)),
        ('<|DSML|parameter name="k" string="true">', (RepairKind.ASCII_BARS,)),
        ('<DSML｜parameter name="k" string="true">', (RepairKind.MISSING_BAR,)),
        ('<｜DSML｜ parameter name="k" string="true">', (RepairKind.TAG_SPELLING,)),
        ("<｜DSML｜parameter name=“k” string=“true”>", (RepairKind.TYPOGRAPHIC_QUOTES,)),
        ('<｜DSML｜parameter  name = "k" string="true" >', (RepairKind.WHITESPACE,)),
    ],
)
def test_tag_spellings(tag: str, repairs: tuple) -> None:
    lex = IncrementalLexer()
    lex.push(tag)
    kind, raw, parsed = lex.next(False, True)
    assert kind == PARAM_OPEN and raw == tag
    assert dict(parsed.attrs) == {"name": "k", "string": "true"}
    assert (parsed.name, parsed.string) == ("k", "true")  # read once per tag text
    assert parsed.repairs == repairs


def test_quoted_gt_does_not_end_a_tag() -> None:
    tag = '<｜DSML｜parameter name="p_<tag>_1" string="false">'
    assert tokens(tag + "1") == [(PARAM_OPEN, tag), (TEXT, "1")]


@pytest.mark.parametrize(
    "prefix", ["<", "</", "<｜DSML", "<｜DSML｜invo", "<｜DSML｜invoke", "</thi", "<｜end▁of"]
)
def test_possible_marker_prefix_is_held(prefix: str) -> None:
    lex = IncrementalLexer()
    lex.push("x" + prefix)
    assert lex.next(False, False) == (TEXT, "x", None)
    assert lex.next(False, False) is None
    assert lex.held == prefix and len(prefix) <= MAX_HEAD
    # At the end of the stream the held text is released as text.
    assert lex.next(False, True) == (TEXT, prefix, None)


def test_not_a_marker_is_released_at_once() -> None:
    assert tokens("x<y <b> <｜User｜>", final=False) == [
        (TEXT, "x"),
        (TEXT, "<y "),
        (TEXT, "<b> "),
        (TEXT, "<｜User｜>"),
    ]


def test_value_mode_sees_dsml_tags_but_not_think() -> None:
    # Every DSML tag is a marker in a value (dsml.md 6.1 rule 1; the parser decides an
    # invoke opener by the next tag); `</think>` is value text.
    text = '<｜DSML｜invoke name="x"></think></｜DSML｜parameter>'
    assert tokens(text, value_mode=True) == [
        (INVOKE_OPEN, '<｜DSML｜invoke name="x">'),
        (TEXT, "</think>"),
        (PARAM_CLOSE, "</｜DSML｜parameter>"),
    ]


def test_absorb_waits_for_the_closing_bracket() -> None:
    lex = IncrementalLexer()
    lex.push("<")
    assert lex.next(False, False) is None and lex.prefix_wait
    assert lex.absorb("｜DSML｜") and lex.absorb("parameter") and lex.absorb(' name="k')
    assert lex.tag_wait and lex.held == '<｜DSML｜parameter name="k'
    assert not lex.absorb('">')  # completes the tag: the caller must read it
    lex.push('">')
    assert lex.next(False, False)[0] == PARAM_OPEN


def test_unterminated_head_text_is_not_a_tag() -> None:
    assert tokens("<｜DSML｜invoke is a tag name\n") == [(TEXT, "<｜DSML｜invoke is a tag name\n")]
