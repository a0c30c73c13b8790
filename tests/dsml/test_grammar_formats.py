"""Turn grammars with a `response_format` (the content is that JSON and nothing else), with
thinking and with tools, and JSON-Schema `pattern` on raw string values, token by token
through the real V4 tokenizer and llguidance."""

from __future__ import annotations

import itertools
import json
import re

import pytest

pytest.importorskip("llguidance")

from dsml import markers
from dsml.grammar import (
    FORBIDDEN_IN_TEXT,
    NO_MARKUP_PATTERN,
    answer_schema,
    avoiding_pattern,
    build_lark,
    search_regex,
    turn_spec,
)
from dsml.grammar_match import matcher, validate
from dsml.patterns import search
from dsml.tokenizer import V4Tokenizer, load_tokenizer

EOS, THINK_CLOSE = markers.EOS, markers.THINK_CLOSE
SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "code": {"type": "string", "pattern": "^[A-Z]{2,6}$"}}, "required": ["answer", "tags"]}
FMT = {"type": "json_schema", "json_schema": {"name": "r", "strict": True, "schema": SCHEMA}}
GOOD = '{"answer": 42, "tags": ["a"]}'
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = (markers.invoke_open("get_weather") + "\n" + markers.parameter_open("city", True)
        + "Oslo" + markers.PARAMETER_CLOSE + "\n" + markers.INVOKE_CLOSE)
BLOCK = f"\n\n{markers.TOOL_CALLS_OPEN}\n{CALL}\n{markers.TOOL_CALLS_CLOSE}"


@pytest.fixture(scope="module")
def tok() -> V4Tokenizer:
    return load_tokenizer()


def ok(tok: V4Tokenizer, spec, text: str) -> bool:
    """Whether the grammar accepts `text` whole and ends the turn there."""
    m = matcher(spec)
    return all(m.consume_token(t) for t in tok.encode_generated(text)) and m.is_stopped()


# -- thinking + response_format ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "accepted"), [
    ("Let me think." + THINK_CLOSE + GOOD + EOS, True),
    (THINK_CLOSE + GOOD + EOS, True),  # empty reasoning
    ('Maybe {"answer": 1}? Or prose.' + THINK_CLOSE + GOOD + EOS, True),  # reasoning is free
    ("Hmm." + THINK_CLOSE + '{\n  "answer": 42,\n  "tags": [\n    "a"\n  ]\n}' + EOS, True),
    (GOOD + EOS, False),  # reasoning never closed: the JSON is reasoning, EOS cannot end it
    ("Hmm." + THINK_CLOSE + "Sure: " + GOOD + EOS, False),  # text around the answer
    ("Hmm." + THINK_CLOSE + GOOD + " Done." + EOS, False),
    ("Hmm." + THINK_CLOSE + '{"answer": "42", "tags": []}' + EOS, False),
    ("Hmm." + THINK_CLOSE + '{"answer": 4, "tags": [], "x": 1}' + EOS, False),  # strict
    ("Hmm." + THINK_CLOSE + '{"answer": 4, "tags": [], "code": "abc"}' + EOS, False),
    ("Hmm." + THINK_CLOSE + '{"answer": 4, "tags": [], "code": "NO"}' + EOS, True),
    ("Hmm <｜DSML｜tool_calls>" + THINK_CLOSE + GOOD + EOS, False),  # no DSML in reasoning
])
def test_thinking_then_the_json_answer(tok: V4Tokenizer, text: str, accepted: bool) -> None:
    assert ok(tok, turn_spec([], thinking=True, response_format=FMT), text) is accepted


def test_content_phase_is_the_answer(tok: V4Tokenizer) -> None:
    # After `</think>` (an empty-turn recovery, or a reasoning phase of its own).
    from dsml.grammar import Phase

    spec = turn_spec([], thinking=True, response_format=FMT, phase=Phase.CONTENT)
    assert ok(tok, spec, GOOD + EOS)
    assert not ok(tok, spec, "Sure." + EOS)


# -- tools + response_format ------------------------------------------------------------------


NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(("kwargs", "text", "accepted"), [
    ({}, GOOD + EOS, True),  # answer
    ({}, BLOCK + EOS, True),  # or call instead
    ({}, "Let me check." + BLOCK + EOS, False),  # no content before the block
    ({}, GOOD + BLOCK + EOS, False),  # not both
    ({}, "Sunny." + EOS, False),
    ({"thinking": True}, "Hmm." + THINK_CLOSE + BLOCK + EOS, True),
    ({"thinking": True}, "Hmm." + THINK_CLOSE + GOOD + EOS, True),
    ({"thinking": True}, "Hmm." + BLOCK + EOS, False),  # the swallowed call
    ({"tool_choice": "required"}, GOOD + EOS, False),  # a call is forced
    ({"tool_choice": "required"}, BLOCK + EOS, True),
    ({"tool_choice": NAMED}, BLOCK + EOS, True),
    ({"tool_choice": NAMED}, GOOD + EOS, False),
    ({"tool_choice": "none"}, BLOCK + EOS, False),  # no calls: the answer only
    ({"tool_choice": "none"}, GOOD + EOS, True),
    ({"parallel_tool_calls": False}, BLOCK.replace(CALL, CALL + "\n" + CALL) + EOS, False),
])
def test_tools_with_a_json_answer(tok: V4Tokenizer, kwargs: dict, text: str,
                                  accepted: bool) -> None:
    assert ok(tok, turn_spec([WEATHER], response_format=FMT, **kwargs), text) is accepted


# -- the answer's JSON --------------------------------------------------------------------------


def test_json_object_and_an_empty_schema(tok: V4Tokenizer) -> None:
    as_object = turn_spec([], response_format={"type": "json_object"})
    assert ok(tok, as_object, '{"a": [1, 2.5, {"b": null, "c": true}], "d": "e"}' + EOS)
    assert ok(tok, as_object, "{}" + EOS)
    for bad in ("[1]", '"x"', "Sure.", '{"a": 1} trailing', '{"a": ["x DSML"]}'):
        assert not ok(tok, as_object, bad + EOS), bad
    # json_schema without a schema: any JSON value (it renders nothing, but asks for JSON).
    anything = turn_spec([], response_format={"type": "json_schema", "json_schema": {}})
    for value in ("[1]", '"x"', "3", '{"a": {}}'):
        assert ok(tok, anything, value + EOS), value
    assert not ok(tok, anything, "Sure." + EOS)


@pytest.mark.parametrize("word", FORBIDDEN_IN_TEXT)
def test_markup_inside_answer_strings_is_rejected(tok: V4Tokenizer, word: str) -> None:
    spec = turn_spec([], response_format=FMT)
    assert not ok(tok, spec, '{"answer": 1, "tags": ["a ' + word + ' b"]}' + EOS)
    assert ok(tok, spec, '{"answer": 1, "tags": ["a ' + word[:-1] + ' b"]}' + EOS)


def test_a_string_with_its_own_pattern_gets_both(tok: V4Tokenizer) -> None:
    spec = turn_spec([], response_format=FMT)
    assert ok(tok, spec, '{"answer": 1, "tags": [], "code": "DSMX"}' + EOS)
    assert not ok(tok, spec, '{"answer": 1, "tags": [], "code": "DSML"}' + EOS)  # ours
    assert not ok(tok, spec, '{"answer": 1, "tags": [], "code": "dsmx"}' + EOS)  # theirs


def test_whitespace_is_bounded(tok: V4Tokenizer) -> None:
    spec = turn_spec([], response_format={"type": "json_object"})
    assert ok(tok, spec, '{\n\t"a": [\n\t\t1\n\t]\n}' + EOS)
    assert ok(tok, spec, "{" + " " * 16 + '"a": 1}' + EOS)
    assert not ok(tok, spec, "{" + " " * 17 + '"a": 1}' + EOS)
    assert not ok(tok, spec, '{\n\n"a": 1}' + EOS)
    assert not ok(tok, spec, ' {"a": 1}' + EOS)
    assert answer_schema({"type": "json_object"})["x-guidance"]["whitespace_pattern"]


def test_avoiding_pattern_is_exact() -> None:
    pattern = re.compile(NO_MARKUP_PATTERN, re.DOTALL)
    for n in range(7):
        for chars in itertools.product("D<SMLt/k>", repeat=n):
            text = "".join(chars)
            assert (pattern.match(text) is not None) == \
                (not any(w in text for w in FORBIDDEN_IN_TEXT)), text
    for word in FORBIDDEN_IN_TEXT:
        for before, after in itertools.product(("", "x", "<", "D", "</", "DS", "<t"),
                                               ("", "x", "<", "D")):
            assert pattern.match(before + word + after) is None
            near = before + word[:-1] + after
            assert (pattern.match(near) is not None) == \
                (not any(w in near for w in FORBIDDEN_IN_TEXT)), near
    with pytest.raises(ValueError):
        avoiding_pattern(["ab", "ba"])  # "b" begins a word and sits inside another


# -- `pattern` on raw string values -------------------------------------------------------------


PATTERNS = ["^[a-z]+$", "[0-9]{3}", "^ab", "cd$", "^a|b$", "^$", "a/b", r"^\d{4}-\d{2}$",
            "(?i)abc", r"\Aab\z", "^(x|y)+$", "[$^]", r"a\$", r"^\w+@\w+\.com$", "^é+$"]
VALUES = ["", "ab", "abc", "xabcdx", "cd", "xcd", "b", "a", "123", "x1234", "2025-01", "2025-1",
          "ABC", "xy", "yxz", "$", "a$", "^", "a/b", "me@host.com", "me@host.org", "éé", "a\nb",
          "ab\n"]


def raw_call(value: str) -> str:
    return (f"\n\n{markers.TOOL_CALLS_OPEN}\n" + markers.invoke_open("f") + "\n"
            + markers.parameter_open("s", True) + value + markers.PARAMETER_CLOSE + "\n"
            + markers.INVOKE_CLOSE + "\n" + markers.TOOL_CALLS_CLOSE + EOS)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_raw_string_pattern_matches_as_the_validator_does(tok: V4Tokenizer, pattern: str) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": pattern}},
        "required": ["s"]}}}
    spec = turn_spec([tool])
    assert validate(build_lark(spec)) == ""
    for value in VALUES:
        # The parser validates a value with RE2's search (dsml.patterns): the grammar agrees.
        assert ok(tok, spec, raw_call(value)) is search(pattern, value), (pattern, value)


def test_raw_string_pattern_with_lengths_and_no_markup(tok: V4Tokenizer) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": "^[A-Za-z]+",
                                               "maxLength": 6}}, "required": ["s"]}}}
    spec = turn_spec([tool])
    assert ok(tok, spec, raw_call("Oslo 1"))
    assert not ok(tok, spec, raw_call("Oslo 12"))  # 7 code points
    assert not ok(tok, spec, raw_call("1 Oslo"))
    assert not ok(tok, spec, raw_call("ADSML"))


def test_patterns_search_regex_cannot_place_are_refused() -> None:
    for pattern in ("(^a)", "a^b", "a$b", "(?i)^a|b"):
        with pytest.raises(ValueError):
            search_regex(pattern)
    assert search_regex("ab") == "(?s:.*)(?:ab)(?s:.*)"
    assert json.loads(json.dumps(search_regex(r"^\d$"))) == "(?:[0-9])"
