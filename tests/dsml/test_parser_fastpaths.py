"""The fast paths of StreamParser.feed() and the caches behind them give what the slow path
gives: the marker cache (`lexer.markers`), the shared schema checks (`schema._derived`), the
C-level JSON reading and writing (`schema.loads_strict`, `calls.dumps`)."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsml import lexer, markers, schema
from dsml.calls import dumps
from dsml.dialects import Dialect
from dsml.schema import ToolSchema, loads_strict
from tests.dsml.conftest import merge, parse_chunks, split, summary, vectors

F = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("trace", [False, True])
def test_overlong_tag_is_text_exactly_once(trace: bool) -> None:
    """A tag head whose attributes run past MAX_TAG is text, fed once (the lexer used to
    keep the delta that overflowed and then read it again)."""
    text = 'Hi <｜DSML｜invoke name="' + "a" * (lexer.MAX_TAG + 100) + '"> tail'
    parser, _ = parse_chunks(split(text, 7), [F], False, trace=trace)
    assert parser.result.content == text
    assert parser.result.tool_calls == []


def _clear_marker_cache() -> None:
    for cache in lexer._MARKERS.values():
        for key in list(cache)[lexer._NUM_FIXED :]:
            del cache[key]


def test_marker_cache_gives_what_the_lexer_gives() -> None:
    """Cold (every tag read by the lexer), warm (every tag from the cache) and traced (no
    fast paths at all) runs agree, event for event."""
    vecs = [v for v in vectors("v4") if v["expected"]["tool_calls"]][:40] + vectors("wild")
    for vec in vecs:
        chunks = split(vec["completion"], 3)
        _clear_marker_cache()
        _, cold = parse_chunks(chunks, vec["tools"], vec["thinking"])
        assert len(lexer._MARKERS[Dialect.V4]) > lexer._NUM_FIXED or not cold
        _, warm = parse_chunks(chunks, vec["tools"], vec["thinking"])
        _, traced = parse_chunks(chunks, vec["tools"], vec["thinking"], trace=True)
        assert cold == warm, vec["id"]
        assert merge(warm) == merge(traced), vec["id"]


def test_marker_cache_is_bounded_and_keeps_the_fixed_markers(monkeypatch) -> None:
    monkeypatch.setattr(lexer, "_MAX_CACHED", lexer._NUM_FIXED + 10)
    _clear_marker_cache()
    params = "\n".join(
        markers.parameter_open(f"k{i}", True) + str(i) + markers.PARAMETER_CLOSE for i in range(40)
    )
    block = (
        f"{markers.TOOL_CALLS_OPEN}\n{markers.invoke_open('f')}\n{params}\n"
        f"{markers.INVOKE_CLOSE}\n{markers.TOOL_CALLS_CLOSE}"
    )
    parser, _ = parse_chunks(split("\n\n" + block + markers.EOS, 4), [F], False)
    assert summary(parser)["tool_calls"] == [
        {"name": "f", "arguments": {f"k{i}": str(i) for i in range(40)}}
    ]
    cache = lexer._MARKERS[Dialect.V4]
    assert len(cache) <= lexer._NUM_FIXED + 10
    assert markers.EOS in cache and markers.PARAMETER_CLOSE in cache


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "enum": [1, 2]}},
    "required": ["city"],
}


def test_equal_schemas_share_their_check_and_types() -> None:
    a = ToolSchema("w", json.loads(json.dumps(WEATHER)))
    b = ToolSchema("w", json.loads(json.dumps(WEATHER)))  # a new request, same tools
    assert a.validate({"city": "x"}) is None and a.param_types("days") == {"integer"}
    assert b.validate({"city": "x"}) is None
    assert a._derived is b._derived


def test_schema_changed_after_use_gets_its_own_check() -> None:
    params = copy.deepcopy(WEATHER)
    first = ToolSchema("w", params)
    assert first.validate({"city": "x", "days": 2}) is None
    params["properties"]["days"]["enum"].remove(2)  # the caller reuses and changes its dict
    assert ToolSchema("w", params).validate({"city": "x", "days": 2}) is not None
    # The check built before is untouched: it was built from a private copy.
    assert ToolSchema("w", copy.deepcopy(WEATHER)).validate({"city": "x", "days": 2}) is None


def test_schemas_that_differ_only_in_json_type_do_not_share() -> None:
    one, true, one_float = (schema._derived({"const": v}) for v in (1, True, 1.0))
    assert one is not true and one is not one_float and true is not one_float
    assert schema._derived({"const": 1}) is one


@pytest.mark.parametrize(
    "text",
    ["1", "-0", "1.5e3", '"a\\u00e9"', "[1, {\"a\": null}]", "true", "null", " 1", "1 ",
     "007", "1 2", "[1,", "", "NaN", "-Infinity", "1e999", '"unterminated', "{}x", "[]"],
)  # fmt: skip
def test_loads_strict_reads_like_json(text: str) -> None:
    decoder = json.JSONDecoder(
        parse_constant=schema._reject_constant, parse_float=schema._finite_float
    )
    try:
        want = ("ok", decoder.decode(text))
    except ValueError as exc:
        want = ("error", type(exc), str(exc))
    try:
        got = ("ok", loads_strict(text))
    except ValueError as exc:
        got = ("error", type(exc), str(exc))
    assert got == want


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(_JSON)
def test_dumps_writes_like_json_dumps(value: object) -> None:
    assert dumps(value) == json.dumps(value, ensure_ascii=False)


_ODD = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {
            "type": "object",
            "properties": {"p_<b>_1": {"type": "string"}, "x": {"type": "integer"}},
        },
    },
}


@pytest.mark.parametrize(
    "text",
    [
        # `<`, `>` and a newline inside a quoted attribute: the tag keeps arriving.
        '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="p_<b>_1" '
        'string="true">a <y <tag> b</｜DSML｜parameter>\n<｜DSML｜parameter name="x\n" '
        'string="false">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>',
        # A `<` that starts no marker, in content, in a value and between tags.
        'Hi <y and <tag\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<b'
        '<｜DSML｜parameter name="x" string="false"><y 3</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
        'x <｜DSML｜invoke name="f" <y>\n<｜DSML｜tool_calls <b "a>"',
    ],
)
def test_tag_and_text_shortcuts_give_what_the_lexer_gives(text: str) -> None:
    """_decide() keeps a tag whose quoted attributes hold `<`, `>` or a newline waiting, and
    reads a `<` that starts no marker as text, without the lexer: every split agrees with
    the traced parser (no fast paths)."""
    for tools in ([_ODD], None):
        _, whole = parse_chunks([text], tools, False, trace=True)
        for size in (1, 2, 3, 5):
            _, events = parse_chunks(split(text, size), tools, False)
            assert merge(events) == merge(whole), size
        for cut in range(1, len(text)):
            _, events = parse_chunks([text[:cut], text[cut:]], tools, False)
            assert merge(events) == merge(whole), cut
