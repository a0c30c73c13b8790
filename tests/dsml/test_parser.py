"""StreamParser against the vectors (dsml.md section 7) and the invariants of section 6."""

from __future__ import annotations

import json
import re

import pytest

from dsml import markers
from dsml.events import (
    CallOutcome,
    ContentDelta,
    Notice,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    TurnOutcome,
)
from dsml.lexer import MAX_HEAD, MAX_TAG
from dsml.parser import StreamParser, default_id, parse_completion
from tests.dsml.conftest import PARSE_FILES, merge, parse_chunks, split, summary, vectors

CHUNK_SIZES = [0, 1, 2, 3, 5, 11, 23]  # 0: the whole completion in one feed


def _check_calls(parser: StreamParser, events: list) -> None:
    """Fragments of each call concatenate to json.dumps(arguments) and to arguments_json;
    those of a cut call do not parse."""
    frags: dict[int, str] = {}
    ends: dict[int, ToolCallEnd] = {}
    for ev in events:
        if isinstance(ev, ToolCallArgsDelta):
            frags[ev.index] = frags.get(ev.index, "") + ev.fragment
        elif isinstance(ev, ToolCallEnd):
            ends[ev.index] = ev
    for index, end in ends.items():
        if end.outcome == CallOutcome.TRUNCATED:
            # A cut call is never completed: its fragments do not parse (api.md "Cut calls").
            with pytest.raises(json.JSONDecodeError):
                json.loads(frags.get(index, ""))
            continue
        assert json.loads(frags[index]) == end.arguments
        assert frags[index] == json.dumps(end.arguments, ensure_ascii=False)
    for call in parser.result.tool_calls:
        assert json.loads(call.arguments_json) == call.arguments


@pytest.mark.parametrize("name", list(PARSE_FILES))
@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_vectors(name: str, size: int) -> None:
    failures = []
    for vec in vectors(name):
        text = vec["completion"]
        chunks = [text] if size == 0 else split(text, size)
        parser, events = parse_chunks(chunks, vec["tools"], vec["thinking"])
        got = summary(parser)
        if got != vec["expected"]:
            failures.append((vec["id"], got, vec["expected"]))
            continue
        _check_calls(parser, events)
        assert parser.result.raw == text
    assert not failures, failures[:3]


@pytest.mark.parametrize("name", ["v4", "wild", "v4.1", "v3.2"])
def test_chunking_gives_identical_merged_events(name: str) -> None:
    for vec in vectors(name):
        text = vec["completion"]
        _, whole = parse_chunks([text], vec["tools"], vec["thinking"])
        for size in (1, 4, 7):
            _, chunked = parse_chunks(split(text, size), vec["tools"], vec["thinking"])
            assert merge(chunked) == merge(whole), (vec["id"], size)


def _few_completions() -> list[dict]:
    wild = vectors("wild")
    v4 = [v for v in vectors("v4") if v["expected"]["tool_calls"]]
    return [*wild, v4[0], v4[5], v4[17]]


@pytest.mark.parametrize("vec", _few_completions(), ids=lambda v: v["id"])
def test_every_split_point(vec: dict) -> None:
    text = vec["completion"]
    _, whole = parse_chunks([text], vec["tools"], vec["thinking"])
    expected = merge(whole)
    for i in range(len(text) + 1):
        _, events = parse_chunks([text[:i], text[i:]], vec["tools"], vec["thinking"])
        assert merge(events) == expected, i


def test_no_markup_leaks_when_parsed_as_calls() -> None:
    for name in PARSE_FILES:
        for vec in vectors(name):
            if not vec["expected"]["tool_calls"]:
                continue
            _, events = parse_chunks(split(vec["completion"], 3), vec["tools"], vec["thinking"])
            text = "".join(e.text for e in events if isinstance(e, ContentDelta | ReasoningDelta))
            assert "DSML" not in text and markers.EOS not in text, vec["id"]


def test_held_tail_is_bounded() -> None:
    for vec in vectors("v4")[:200] + vectors("wild"):
        parser = StreamParser(vec["tools"], vec["thinking"])
        for ch in vec["completion"]:
            parser.feed(ch)
            held = parser.held_tail
            # A marker head (a possible prefix) is at most MAX_HEAD; a recognised tag head
            # waiting for its attributes is bounded by MAX_TAG.
            assert len(held) <= MAX_HEAD or (parser.tag_wait and len(held) <= MAX_TAG), held
        parser.finish()


def test_held_tail_never_exceeds_longest_marker_in_text() -> None:
    parser = StreamParser([_tool("f", {"a": {"type": "string"}})], thinking=False)
    text = "a <｜DSML｜to <｜end▁of▁sent <｜｜DSML｜｜function_call " * 3
    for ch in text:
        parser.feed(ch)
        assert len(parser.held_tail) <= MAX_HEAD
    parser.finish()
    assert parser.result.content == text


def test_marker_lookalike_at_end_is_released() -> None:
    tools = [_tool("f", {})]
    for tail in ("2 <", "x <｜DSML｜", "y </think", "z <｜end▁of▁sen", 'w <｜DSML｜invoke name="f'):
        for thinking in (False, True):
            prefix = "</think>" if thinking else ""
            result = parse_completion(prefix + tail, tools, thinking)
            assert result.content == tail
            assert result.tool_calls == []


def test_eos_is_stripped_and_text_after_it_ignored() -> None:
    text = "Hi.<｜end▁of▁sentence｜>junk after"
    result = parse_completion(text, None, False)
    assert result.content == "Hi."
    assert result.raw == text
    assert result.turn_outcome is None


# ---------------------------------------------------------------- rendering round trip


def _tool(name: str, props: dict, required: list[str] | None = None) -> dict:
    params: dict = {"type": "object", "properties": props}
    if required is not None:
        params["required"] = required
    return {"type": "function", "function": {"name": name, "description": "", "parameters": params}}


def render_calls(calls: list[tuple[str, dict]]) -> str:
    """A block as DeepSeek's encoder writes it (dsml.md sections 3.11 and 5)."""
    invokes = []
    for name, args in calls:
        params = []
        for key, value in args.items():
            is_str = isinstance(value, str)
            text = value if is_str else json.dumps(value, ensure_ascii=False)
            params.append(markers.parameter_open(key, is_str) + text + markers.PARAMETER_CLOSE)
        invokes.append(
            markers.invoke_open(name) + "\n" + "\n".join(params) + "\n" + markers.INVOKE_CLOSE
        )
    return (
        "\n\n"
        + markers.TOOL_CALLS_OPEN
        + "\n"
        + "\n".join(invokes)
        + "\n"
        + markers.TOOL_CALLS_CLOSE
    )


ALL_TYPES = _tool(
    "all",
    {
        "s": {"type": "string"},
        "i": {"type": "integer"},
        "n": {"type": "number"},
        "b": {"type": "boolean"},
        "z": {"type": "null"},
        "a": {"type": "array", "items": {"type": "integer"}},
        "o": {"type": "object"},
        "any": {},
    },
)

ROUND_TRIP = [
    {"s": "plain"},
    {"s": 'quotes " and \\ backslash \\n not a newline'},
    {"s": "line1\nline2\ttab\r\x00\x1f control"},
    {"s": '<ok> & &amp; <｜DSML｜invoke name="x"> </think> <｜User｜> 😀 北京'},
    {"s": ""},
    {"i": 42},
    {"i": -7},
    {"i": 100000000000000000000},
    {"n": 3.14},
    {"n": 1e-07},
    {"n": -0.0},
    {"b": True},
    {"b": False},
    {"z": None},
    {"a": [1, 2, 3]},
    {"a": []},
    {"o": {"k": [1, {"x": None}], "s": "v<"}},
    {"o": {}},
    {"any": "text"},
    {"any": [True, "x"]},
    {},
    {"s": "x", "i": 1, "n": 2.5, "b": False, "z": None, "a": [0], "o": {"p": 1}},
]


@pytest.mark.parametrize("args", ROUND_TRIP, ids=lambda a: json.dumps(a, ensure_ascii=True)[:40])
def test_render_parse_round_trip(args: dict) -> None:
    text = render_calls([("all", args)]) + markers.EOS
    for chunks in ([text], split(text, 1), split(text, 3)):
        parser, events = parse_chunks(chunks, [ALL_TYPES], thinking=False)
        result = parser.result
        assert [(c.name, c.arguments) for c in result.tool_calls] == [("all", args)]
        assert result.tool_calls[0].outcome == CallOutcome.VALID
        assert result.content == "" and result.turn_outcome == TurnOutcome.TOOL_CALLS
        _check_calls(parser, events)
        # render(parse(x)) == x: the rendered bytes are the KV-cache key.
        rendered = render_calls([(c.name, c.arguments) for c in result.tool_calls]) + markers.EOS
        assert rendered == text


def test_round_trip_many_calls() -> None:
    calls = [("all", a) for a in ROUND_TRIP[:8]]
    text = "Checking.\n" + render_calls(calls) + markers.EOS
    result = parse_completion(text, [ALL_TYPES], thinking=False)
    assert result.content == "Checking.\n"
    got = [(c.name, c.arguments) for c in result.tool_calls]
    assert got == calls
    assert render_calls(got) == render_calls(calls)


# ---------------------------------------------------------------- one test per type


def _one(key: str, attr: str | None, value_text: str, tools: list[dict] | None = None) -> tuple:
    attr_text = "" if attr is None else f' string="{attr}"'
    text = (
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="all">\n'
        f'<｜DSML｜parameter name="{key}"{attr_text}>{value_text}</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
    )
    parser, events = parse_chunks(split(text, 2), tools or [ALL_TYPES], thinking=False)
    _check_calls(parser, events)
    call = parser.result.tool_calls[0]
    notices = [e.kind.value for e in events if isinstance(e, Notice)]
    return call.arguments, call.outcome, notices, events


def test_string_parameter_streams_escaped_fragments() -> None:
    args, outcome, _, events = _one("s", "true", 'a "b"\n\\c')
    assert args == {"s": 'a "b"\n\\c'} and outcome == CallOutcome.VALID
    frags = [e.fragment for e in events if isinstance(e, ToolCallArgsDelta)]
    # Streamed as it arrived (more than the opening and closing fragments).
    assert len(frags) > 3
    assert "".join(frags) == '{"s": "a \\"b\\"\\n\\\\c"}'


@pytest.mark.parametrize(
    ("key", "text", "value"),
    [
        ("i", "42", 42),
        ("i", "-7", -7),
        ("n", "3.5", 3.5),
        ("n", "1e-07", 1e-07),
        ("b", "true", True),
        ("b", "false", False),
        ("z", "null", None),
        ("a", "[1, 2]", [1, 2]),
        ("o", '{"k": "v"}', {"k": "v"}),
        ("any", '"quoted"', "quoted"),
    ],
)
def test_non_string_parameter_is_held_until_close(key: str, text: str, value: object) -> None:
    args, outcome, _, events = _one(key, "false", text)
    assert args == {key: value} and outcome == CallOutcome.VALID
    frags = [e.fragment for e in events if isinstance(e, ToolCallArgsDelta)]
    assert frags == ["{" + json.dumps(key) + ": " + json.dumps(value), "}"]


def test_invalid_json_value_is_an_error_outcome() -> None:
    args, outcome, _, events = _one("i", "false", "forty-two")
    assert outcome == CallOutcome.INVALID_JSON
    assert args == {"i": "forty-two"}
    end = next(e for e in events if isinstance(e, ToolCallEnd))
    assert end.error is not None and "'i'" in end.error


def test_invalid_json_for_string_schema_is_kept_as_string() -> None:
    args, outcome, notices, _ = _one("s", "false", "just text")
    assert args == {"s": "just text"} and outcome == CallOutcome.REPAIRED
    assert "type_coercion" in notices


def test_nan_is_not_json() -> None:
    args, outcome, _, _ = _one("n", "false", "NaN")
    assert outcome == CallOutcome.INVALID_JSON and args == {"n": "NaN"}


def test_float_overflow_is_not_json() -> None:
    args, outcome, _, _ = _one("n", "false", "1e999")
    assert outcome == CallOutcome.INVALID_JSON and args == {"n": "1e999"}


def test_empty_delta_is_a_no_op() -> None:
    parser = StreamParser([WEATHER], False)
    assert parser.feed("") == []
    assert parser.feed("Hi") == [ContentDelta("Hi")]
    assert parser.feed("") == []
    parser.finish()
    assert parser.result.content == "Hi" and parser.result.raw == "Hi"


def test_schema_invalid_outcome_still_delivered() -> None:
    args, outcome, _, events = _one("i", "false", "1.5")
    assert outcome == CallOutcome.SCHEMA_INVALID and args == {"i": 1.5}
    assert any(isinstance(e, ToolCallStart) for e in events)


def test_unknown_tool_still_delivered() -> None:
    text = '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="nope">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    result = parse_completion(text, [ALL_TYPES], thinking=False)
    assert [(c.name, c.outcome) for c in result.tool_calls] == [("nope", CallOutcome.UNKNOWN_TOOL)]
    assert "all" in (result.tool_calls[0].error or "")


# ---------------------------------------------------------------- tolerances

WEATHER = _tool("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"}}, ["city"])


def _weather(block: str, thinking: bool = False) -> tuple:
    parser, events = parse_chunks(split(block, 3), [WEATHER], thinking)
    _check_calls(parser, events)
    r = parser.result
    notices = {e.kind.value for e in events if isinstance(e, Notice)}
    return r, notices


CANON = (
    '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
)


@pytest.mark.parametrize(
    ("old", "new", "kind"),
    [
        ("｜DSML｜", "｜｜DSML｜｜", "doubled_bars"),
        ("｜DSML｜", "|DSML|", "ascii_bars"),
        ("<｜DSML｜", "<DSML｜", "missing_bar"),
        ("tool_calls>", "toolcalls>", "tag_spelling"),
        ("tool_calls>", "tool-calls>", "tag_spelling"),
        ("tool_calls>", "function_calls>", "tag_spelling"),
        ("｜DSML｜", "｜DSML｜ ", "tag_spelling"),  # v4.1 spaced tags
        ("｜DSML｜", "｜｜DSML｜｜ ", "doubled_bars"),  # V4.1 in the wild: both at once
        ('"', "“", "typographic_quotes"),
        (" name=", "  name = ", "whitespace"),
        ('">', '" >', "whitespace"),
    ],
)
def test_tolerated_spellings(old: str, new: str, kind: str) -> None:
    block = CANON.replace(old, new)
    if new == "“":  # opening quotes typographic, closing ones too
        block = re.sub(r"“([^“]*)“", r"“\1”", block)
    if new.endswith("｜ "):
        block = block.replace("tool_calls>", "calls>")
    r, notices = _weather("Sure.\n\n" + block + markers.EOS)
    assert summary_of(r) == ("Sure.", [("get_weather", {"city": "Oslo", "days": 2})])
    assert kind in notices
    assert r.tool_calls[0].outcome in (CallOutcome.VALID, CallOutcome.REPAIRED)


def summary_of(r) -> tuple:
    return r.content, [(c.name, c.arguments) for c in r.tool_calls]


def test_canonical_block_has_no_notices() -> None:
    r, notices = _weather("Sure.\n\n" + CANON + markers.EOS)
    assert notices == set() and r.tool_calls[0].outcome == CallOutcome.VALID
    assert r.turn_outcome == TurnOutcome.TOOL_CALLS


@pytest.mark.parametrize("sep", ["\n", ""])
def test_short_separator(sep: str) -> None:
    r, notices = _weather("Sure." + sep + CANON + markers.EOS)
    assert summary_of(r) == ("Sure.", [("get_weather", {"city": "Oslo", "days": 2})])
    assert "block_separator" in notices


def test_extra_whitespace_between_tags() -> None:
    r, notices = _weather("\n\n" + CANON.replace(">\n<", ">\n   \n<") + markers.EOS)
    assert [c.arguments for c in r.tool_calls] == [{"city": "Oslo", "days": 2}]
    assert "whitespace" in notices


def test_missing_string_attribute_uses_schema() -> None:
    block = CANON.replace(' string="true"', "").replace(' string="false"', "")
    r, notices = _weather(block + markers.EOS)
    assert [c.arguments for c in r.tool_calls] == [{"city": "Oslo", "days": 2}]
    assert "missing_string_attr" in notices
    assert r.tool_calls[0].outcome == CallOutcome.REPAIRED


def test_self_closing_invoke() -> None:
    tools = [_tool("list_dir", {})]
    text = '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="list_dir"/>\n</｜DSML｜tool_calls>'
    parser, events = parse_chunks(split(text, 2), tools, False)
    assert [(c.name, c.arguments, c.outcome) for c in parser.result.tool_calls] == [
        ("list_dir", {}, CallOutcome.REPAIRED)
    ]
    assert any(isinstance(e, Notice) and e.kind.value == "self_closing_invoke" for e in events)


def test_json_body_inside_invoke() -> None:
    block = '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n{"city": "Rome", "days": 1}\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    r, notices = _weather(block)
    assert [c.arguments for c in r.tool_calls] == [{"city": "Rome", "days": 1}]
    assert "json_body" in notices


@pytest.mark.parametrize("wrapper", ["arguments", "input"])
@pytest.mark.parametrize("attr", ["true", "false"])
def test_wrapper_parameter_is_unwrapped(wrapper: str, attr: str) -> None:
    block = (
        f'<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="{wrapper}" '
        f'string="{attr}">{{"city": "Paris"}}</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    )
    r, notices = _weather(block)
    assert [c.arguments for c in r.tool_calls] == [{"city": "Paris"}]
    assert "wrapped_arguments" in notices


def test_wrapper_name_declared_in_schema_is_not_unwrapped() -> None:
    tools = [_tool("run", {"input": {"type": "string"}})]
    text = '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="run">\n<｜DSML｜parameter name="input" string="true">{"a": 1}</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    r = parse_completion(text, tools, False)
    assert [c.arguments for c in r.tool_calls] == [{"input": '{"a": 1}'}]


def test_wrapper_with_foreign_keys_is_kept() -> None:
    block = '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="input" string="false">{"x": 1}</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    r, notices = _weather(block)
    assert [c.arguments for c in r.tool_calls] == [{"input": {"x": 1}}]
    assert r.tool_calls[0].outcome == CallOutcome.SCHEMA_INVALID
    assert "wrapped_arguments" not in notices


@pytest.mark.parametrize(
    ("key", "text", "value"),
    [
        ("i", "7", 7),
        ("n", "2.5", 2.5),
        ("b", "true", True),
        ("a", "[1, 2]", [1, 2]),
        ("o", '{"k": 1}', {"k": 1}),
    ],
)
def test_string_true_values_the_schema_types_otherwise(key: str, text: str, value: object) -> None:
    args, outcome, notices, _ = _one(key, "true", text)
    assert args == {key: value} and outcome == CallOutcome.REPAIRED
    assert "type_coercion" in notices


def test_string_true_that_does_not_parse_stays_a_string() -> None:
    args, outcome, notices, _ = _one("i", "true", "seven")
    assert args == {"i": "seven"} and outcome == CallOutcome.SCHEMA_INVALID
    assert "type_coercion" not in notices


def test_json_string_where_array_expected() -> None:
    args, outcome, notices, _ = _one("a", "false", '"[1, 2]"')
    assert args == {"a": [1, 2]} and outcome == CallOutcome.REPAIRED
    assert "type_coercion" in notices


def test_invoke_without_opener_becomes_a_call() -> None:
    text = 'Checking.\n\n<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n</｜DSML｜invoke><｜end▁of▁sentence｜>'
    r, notices = _weather(text)
    assert summary_of(r) == ("Checking.", [("get_weather", {"city": "Oslo"})])
    assert "missing_opener" in notices and r.turn_outcome == TurnOutcome.TOOL_CALLS


def test_invoke_without_opener_and_required_args_stays_text() -> None:
    text = 'See <｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n</｜DSML｜invoke> there.'
    r, _ = _weather(text)
    assert r.content == text and r.tool_calls == []


def test_invoke_without_opener_for_undeclared_tool_stays_text() -> None:
    text = 'See <｜DSML｜invoke name="other">\n</｜DSML｜invoke> there.'
    r, notices = _weather(text)
    # Its closer is no orphan: the opener is in the text (dsml.md 6.1 rule 7).
    assert r.tool_calls == [] and r.content == text
    assert "orphan_closer" not in notices


def test_text_after_a_block_is_content() -> None:
    r, _ = _weather("\n\n" + CANON + "\n\nP.S. done" + markers.EOS)
    assert summary_of(r) == ("\n\nP.S. done", [("get_weather", {"city": "Oslo", "days": 2})])


def test_two_blocks() -> None:
    r, notices = _weather("A\n\n" + CANON + "\n\n" + CANON.replace("Oslo", "Bergen") + markers.EOS)
    assert summary_of(r) == ("A", [("get_weather", {"city": "Oslo", "days": 2}),
                                   ("get_weather", {"city": "Bergen", "days": 2})])  # fmt: skip
    assert notices == set()


def test_orphan_closers_are_stripped() -> None:
    r, notices = _weather("Done.</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>")
    # Dropped with the whitespace before them (dsml.md 6.1 rule 7).
    assert r.content == "Done." and "orphan_closer" in notices
    assert r.turn_outcome == TurnOutcome.ANSWER


def test_lxml_repairs_what_the_state_machine_cannot_read() -> None:
    # Parameters written without the DSML token: plain XML tags inside the invoke.
    block = '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n<parameter name="city" string="true">Lima</parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    r, notices = _weather(block)
    assert [c.arguments for c in r.tool_calls] == [{"city": "Lima"}]
    # Plain tags are now read by the state machine itself (dsml.md 6.1 rule 9).
    assert "guarded_spelling" in notices and r.tool_calls[0].outcome == CallOutcome.REPAIRED


def test_lxml_repairs_a_stray_invoke_between_invokes() -> None:
    block = '<｜DSML｜tool_calls>\n<invoke name="get_weather"><parameter name="city" string="true">Kyiv</parameter></invoke>\n</｜DSML｜tool_calls>'
    r, notices = _weather(block)
    assert [c.arguments for c in r.tool_calls] == [{"city": "Kyiv"}]
    assert "guarded_spelling" in notices  # (dsml.md 6.1 rule 9; lxml read it before)


def test_unreadable_junk_in_block_is_returned_as_content() -> None:
    block = "Hm.\n\n<｜DSML｜tool_calls>\nwhat is this\n</｜DSML｜tool_calls>"
    r, _ = _weather(block)
    # A block without any call comes back whole, as written (dsml.md 6.1 rule 6).
    assert r.tool_calls == [] and r.content == block
    assert r.turn_outcome == TurnOutcome.MALFORMED


# ---------------------------------------------------------------- end of stream


def test_truncated_block_returns_text_as_content() -> None:
    text = "Let me check.\n\n" + CANON[:120]
    parser, events = parse_chunks(split(text, 5), [WEATHER], False)
    r = parser.result
    assert r.tool_calls == [] and r.content == text
    assert r.turn_outcome == TurnOutcome.TRUNCATED
    ends = [e for e in events if isinstance(e, ToolCallEnd)]
    assert [e.outcome for e in ends] == [CallOutcome.TRUNCATED]
    _check_calls(parser, events)


def test_eos_inside_block_is_malformed() -> None:
    text = "\n\n" + CANON[:100] + markers.EOS
    r = parse_completion(text, [WEATHER], False)
    assert r.tool_calls == [] and r.content == "\n\n" + CANON[:100]
    assert r.turn_outcome == TurnOutcome.MALFORMED


def test_cut_call_fragments_are_what_the_model_wrote() -> None:
    """api.md "Cut calls": the parser never closes a cut call's arguments into JSON."""
    text = "\n\n" + CANON[: CANON.index("Oslo") + 2]
    parser, events = parse_chunks(split(text, 4), [WEATHER], False)
    frags = "".join(e.fragment for e in events if isinstance(e, ToolCallArgsDelta))
    assert frags == '{"city": "Os'
    end = next(e for e in events if isinstance(e, ToolCallEnd))
    assert end.outcome == CallOutcome.TRUNCATED and end.arguments == {"city": "Os"}
    assert parser.result.tool_calls == [] and parser.result.turn_outcome == TurnOutcome.TRUNCATED


def test_eos_after_a_closed_parameter_completes_the_call() -> None:
    """The exception of api.md "Cut calls": the model itself ended its turn after a
    parameter closed, with the required arguments there."""
    cut = CANON.index("</｜DSML｜parameter>") + len("</｜DSML｜parameter>\n")
    for chunks in (1, 3):
        parser, events = parse_chunks(split("\n\n" + CANON[:cut] + markers.EOS, chunks),
                                      [WEATHER], False)
        _check_calls(parser, events)
        r = parser.result
        assert [c.arguments for c in r.tool_calls] == [{"city": "Oslo"}]
        assert r.content == "" and r.turn_outcome == TurnOutcome.TOOL_CALLS
    # Without EOS (max_tokens) the same text is a cut call.
    r = parse_completion("\n\n" + CANON[:cut], [WEATHER], False)
    assert r.tool_calls == [] and r.turn_outcome == TurnOutcome.TRUNCATED
    # EOS inside a value, or before a required argument, is no exception.
    r = parse_completion("\n\n" + CANON[: CANON.index("Oslo") + 2] + markers.EOS, [WEATHER], False)
    assert r.tool_calls == []
    only_days = CANON.replace(CANON.split("\n")[2] + "\n", "")
    cut = only_days.index("</｜DSML｜parameter>") + len("</｜DSML｜parameter>")
    r = parse_completion("\n\n" + only_days[:cut] + markers.EOS, [WEATHER], False)
    assert r.tool_calls == [] and r.turn_outcome == TurnOutcome.MALFORMED


def test_every_truncation_never_loses_text() -> None:
    full = "Let me check.\n\n" + CANON + markers.EOS
    for i in range(len(full)):
        parser, events = parse_chunks([full[:i]], [WEATHER], False)
        r = parser.result
        _check_calls(parser, events)
        if r.tool_calls:
            assert r.tool_calls[0].arguments == {"city": "Oslo", "days": 2}
        else:
            assert r.content == full[:i], i


def test_completed_invokes_of_a_truncated_block_stand() -> None:
    two = CANON.replace(
        "</｜DSML｜invoke>\n",
        "</｜DSML｜invoke>\n"
        + CANON.split("\n", 1)[1].split("</｜DSML｜invoke>")[0]
        + "</｜DSML｜invoke>\n",
        1,
    )
    text = "\n\n" + two[: two.rindex("Oslo")]
    r = parse_completion(text, [WEATHER], False)
    assert [c.arguments for c in r.tool_calls] == [{"city": "Oslo", "days": 2}]
    assert r.content.startswith('\n<｜DSML｜invoke name="get_weather">') and r.content.endswith(
        'string="true">'
    )
    assert r.turn_outcome == TurnOutcome.TRUNCATED


# ---------------------------------------------------------------- thinking


def test_block_before_think_close_becomes_calls() -> None:
    text = "Need weather.\n\n" + CANON + "\n</think>\n" + markers.EOS
    r, notices = _weather(text, thinking=True)
    assert r.reasoning_content == "Need weather." and r.content == ""
    assert [c.arguments for c in r.tool_calls] == [{"city": "Oslo", "days": 2}]
    assert r.turn_outcome == TurnOutcome.RECOVERED_FROM_THINKING
    assert "recovered_from_thinking" in notices


def test_block_in_reasoning_followed_by_more_reasoning_stays_reasoning() -> None:
    text = "Maybe:\n\n" + CANON + "\nNo, first think.</think>Answer." + markers.EOS
    r, notices = _weather(text, thinking=True)
    assert r.reasoning_content == "Maybe:\n\n" + CANON + "\nNo, first think."
    assert r.content == "Answer." and r.tool_calls == []
    assert r.turn_outcome == TurnOutcome.ANSWER and notices == set()


def test_block_in_reasoning_followed_by_content_stays_reasoning() -> None:
    text = "Maybe:\n\n" + CANON + "</think>\n\nActually, the answer." + markers.EOS
    r, _ = _weather(text, thinking=True)
    assert r.reasoning_content == "Maybe:\n\n" + CANON
    assert r.content == "\n\nActually, the answer." and r.tool_calls == []


def test_block_in_reasoning_naming_unknown_tool_stays_reasoning() -> None:
    block = CANON.replace("get_weather", "launch")
    r, _ = _weather("Hmm\n\n" + block + markers.EOS, thinking=True)
    assert r.reasoning_content == "Hmm\n\n" + block and r.tool_calls == []


def test_unclosed_block_in_reasoning_is_reasoning() -> None:
    text = "Hmm\n\n" + CANON[:90]
    r, _ = _weather(text + markers.EOS, thinking=True)
    assert r.reasoning_content == text and r.tool_calls == [] and r.content == ""
    assert r.turn_outcome == TurnOutcome.EMPTY


def test_reasoning_block_is_held_not_streamed() -> None:
    parser = StreamParser([WEATHER], thinking=True)
    events = parser.feed("Need weather.\n\n" + CANON)
    assert events == [ReasoningDelta("Need weather.")]
    events = parser.feed(markers.EOS) + parser.finish()
    assert [type(e).__name__ for e in events if not isinstance(e, Notice)] == [
        "ToolCallStart", "ToolCallArgsDelta", "ToolCallEnd",
    ]  # fmt: skip


def test_forced_think_close_and_opener_fed_by_proxy() -> None:
    parser = StreamParser([WEATHER], thinking=True)
    parser.feed("</think>\n\n<｜DSML｜tool_calls>\n")
    parser.feed(CANON.split("\n", 1)[1] + markers.EOS)
    parser.finish()
    assert [c.arguments for c in parser.result.tool_calls] == [{"city": "Oslo", "days": 2}]


# ---------------------------------------------------------------- modes and outcomes


def test_no_tools_means_dsml_is_content() -> None:
    text = "Here:\n\n" + CANON + markers.EOS
    for tools in (None, []):
        r = parse_completion(text, tools, False)
        assert r.content == "Here:\n\n" + CANON and r.tool_calls == [] and r.turn_outcome is None


def test_strict_mode_holds_and_rejects_invalid_calls() -> None:
    bad = CANON.replace('string="false">2<', 'string="false">two<')
    text = "\n\n" + bad.replace("</｜DSML｜tool_calls>", "") + CANON.split("\n", 1)[1] + markers.EOS
    parser, events = parse_chunks(split(text, 4), [WEATHER], False, strict=True)
    r = parser.result
    assert [(c.arguments, c.outcome) for c in r.tool_calls] == [
        ({"city": "Oslo", "days": 2}, CallOutcome.VALID)
    ]
    assert [c.outcome for c in parser.rejected] == [CallOutcome.INVALID_JSON]
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [s.index for s in starts] == [0]
    # Held until validated: start, the whole JSON, end, back to back.
    i = events.index(starts[0])
    assert isinstance(events[i + 1], ToolCallArgsDelta) and isinstance(events[i + 2], ToolCallEnd)
    assert events[i + 1].fragment == '{"city": "Oslo", "days": 2}'


def test_strict_mode_all_rejected_is_malformed() -> None:
    bad = CANON.replace('string="false">2<', 'string="false">two<')
    r = StreamParser([WEATHER], False, strict=True)
    r.feed(bad)
    r.finish()
    assert r.result.tool_calls == [] and r.result.turn_outcome == TurnOutcome.MALFORMED


@pytest.mark.parametrize(
    ("text", "thinking", "outcome"),
    [
        ("Hello." + markers.EOS, False, TurnOutcome.ANSWER),
        ("thinking only</think>" + markers.EOS, True, TurnOutcome.EMPTY),
        ("" + markers.EOS, False, TurnOutcome.EMPTY),
        ("\n\n" + CANON + markers.EOS, False, TurnOutcome.TOOL_CALLS),
        ("\n\n" + CANON[:50], False, TurnOutcome.TRUNCATED),
    ],
)
def test_turn_outcomes(text: str, thinking: bool, outcome: TurnOutcome) -> None:
    assert parse_completion(text, [WEATHER], thinking).turn_outcome == outcome


def test_default_ids() -> None:
    ids = {default_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)  # 96 bits, zero-padded
    parser = StreamParser([WEATHER], False)
    events = parser.feed(CANON)
    start = next(e for e in events if isinstance(e, ToolCallStart))
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", start.id)


def test_feed_after_finish_raises_and_result_before_finish_raises() -> None:
    parser = StreamParser(None, False)
    with pytest.raises(RuntimeError):
        _ = parser.result
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


def test_event_order_of_a_streamed_call() -> None:
    parser = StreamParser([WEATHER], False, id_factory=lambda: "call_x")
    events = []
    for piece in split("Hi.\n\n" + CANON + markers.EOS, 4):
        events += parser.feed(piece)
    events += parser.finish()
    merged = merge(events)
    assert merged == [
        ContentDelta("Hi."),
        ToolCallStart(0, "call_x", "get_weather"),
        ToolCallArgsDelta(0, '{"city": "Oslo", "days": 2}'),
        ToolCallEnd(0, {"city": "Oslo", "days": 2}, CallOutcome.VALID, None),
    ]
