"""Property tests (hypothesis): chunking never matters, nothing raises, nothing is lost.

The accounting: with `trace=True` the parser records `spans`, (kind, text) pieces in input
order whose texts concatenate to everything fed; content and reasoning spans concatenate to
the result's content and reasoning. So every character comes back as content, reasoning,
an argument value, or is named as markup (or ignored after EOS).
"""

from __future__ import annotations

import json
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsml import markers
from dsml.events import ToolCallArgsDelta, ToolCallEnd
from dsml.parser import StreamParser
from tests.dsml.conftest import merge, parse_chunks, vectors

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = {"reasoning", "content", "markup", "value", "ignored"}

VECTORS = vectors("v4")[::7] + vectors("wild") + vectors("v4.1")[::31] + vectors("v3.2")[::31]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}

# Pieces of tag soup: every spelling the parser knows, broken ones, and ordinary text.
SOUP = [
    "<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>", '<｜DSML｜invoke name="get_weather">',
    '<｜DSML｜invoke name="nope">', '<｜DSML｜invoke name="get_weather"/>', "</｜DSML｜invoke>",
    '<｜DSML｜parameter name="city" string="true">', '<｜DSML｜parameter name="days" string="false">',
    '<｜DSML｜parameter name="days">', '<｜DSML｜parameter name="arguments" string="false">',
    "</｜DSML｜parameter>", "<｜｜DSML｜｜tool_calls>", "<|DSML|invoke name=“get_weather”>",
    "<DSML｜parameter name='x'>", "<｜DSML｜ calls>", "</｜DSML｜ invoke>", "<｜DSML｜function_calls>",
    "<invoke name=\"get_weather\">", "<parameter name=\"city\">", "</parameter>", "</invoke>",
    "</think>", "<think>", markers.EOS, "<｜end▁of▁sen", "<", ">", "/", "\"", "“", "\n", "\n\n", " ",
    "Oslo", "2", "{\"city\": \"Rome\"}", "[1, 2]", "text", "<｜DSML｜", "｜DSML｜", "x<y", "&amp;",
]  # fmt: skip


def check_accounting(parser: StreamParser, text: str) -> None:
    spans = parser.spans
    assert spans is not None
    assert "".join(t for _, t in spans) == text
    assert {k for k, _ in spans} <= KINDS
    r = parser.result
    assert "".join(t for k, t in spans if k == "content") == r.content
    assert "".join(t for k, t in spans if k == "reasoning") == r.reasoning_content
    assert r.raw == text


def check_calls(events: list) -> None:
    frags: dict[int, str] = {}
    for ev in events:
        if isinstance(ev, ToolCallArgsDelta):
            frags[ev.index] = frags.get(ev.index, "") + ev.fragment
        elif isinstance(ev, ToolCallEnd):
            assert json.loads(frags[ev.index]) == ev.arguments


def run_traced(
    chunks: list[str], tools, thinking: bool, strict: bool = False
) -> tuple[StreamParser, list]:
    parser, events = parse_chunks(chunks, tools, thinking, strict=strict, trace=True)
    check_accounting(parser, "".join(chunks))
    check_calls(events)
    # Tracing turns the fast paths of feed() off: both must give the same events.
    plain, plain_events = parse_chunks(chunks, tools, thinking, strict=strict)
    assert merge(plain_events) == merge(events)
    assert plain.result.content == parser.result.content
    assert plain.result.reasoning_content == parser.result.reasoning_content
    return parser, events


def chunked(text: str, rnd: random.Random) -> list[str]:
    cuts = sorted(rnd.sample(range(len(text) + 1), k=min(len(text) + 1, rnd.randint(0, 12))))
    return [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@SETTINGS
@given(st.sampled_from(VECTORS), st.randoms(use_true_random=False))
def test_random_rechunking_gives_identical_merged_events(vec: dict, rnd: random.Random) -> None:
    text = vec["completion"]
    _, whole = parse_chunks([text], vec["tools"], vec["thinking"])
    _, events = parse_chunks(chunked(text, rnd), vec["tools"], vec["thinking"])
    assert merge(events) == merge(whole)


@SETTINGS
@given(st.sampled_from(VECTORS), st.data())
def test_random_truncations_never_raise_or_lose_text(vec: dict, data: st.DataObject) -> None:
    text = vec["completion"]
    cut = data.draw(st.integers(0, len(text)))
    rnd = data.draw(st.randoms(use_true_random=False))
    run_traced(chunked(text[:cut], rnd), vec["tools"], vec["thinking"])


@SETTINGS
@given(st.binary(max_size=300), st.booleans(), st.randoms(use_true_random=False))
def test_random_bytes(raw: bytes, thinking: bool, rnd: random.Random) -> None:
    text = raw.decode("utf-8", errors="replace")
    run_traced(chunked(text, rnd), [WEATHER], thinking)
    run_traced([text], None, thinking)


@SETTINGS
@given(st.lists(st.sampled_from(SOUP), max_size=40), st.booleans(), st.booleans(),
       st.randoms(use_true_random=False))  # fmt: skip
def test_tag_soup(pieces: list[str], thinking: bool, strict: bool, rnd: random.Random) -> None:
    text = "".join(pieces)
    _, events = run_traced(chunked(text, rnd), [WEATHER], thinking, strict)
    # Chunking does not matter here either.
    _, whole = parse_chunks([text], [WEATHER], thinking, strict=strict)
    assert merge(events) == merge(whole)


@SETTINGS
@given(st.text(max_size=200), st.randoms(use_true_random=False))
def test_random_text_is_content_verbatim_without_tools(text: str, rnd: random.Random) -> None:
    parser, _ = run_traced(chunked(text, rnd), None, False)
    expected = text.split(markers.EOS, 1)[0]
    assert parser.result.content == expected
