"""dsml.schema: parameter types, coercion, and validation (Draft 2020-12, no remote $ref)."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from dsml.checks import compile_check
from dsml.errors import RenderError
from dsml.request import render_chat
from dsml.schema import ToolRegistry, ToolSchema, _compile, coerce_value, loads_strict
from tests.dsml.conftest import vectors


def test_registry_reads_openai_tools() -> None:
    reg = ToolRegistry(
        [
            {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
            {"type": "function", "function": {"name": "b"}},  # no parameters: anything goes
            {"type": "function"},  # no name: ignored
        ]
    )
    assert set(reg.tools) == {"a", "b"} and bool(reg)
    assert reg.get("b") is not None and reg.get("b").validate({"x": 1}) is None
    assert reg.get("c") is None
    assert not ToolRegistry(None) and not ToolRegistry([])


@pytest.mark.parametrize(
    ("sub", "types"),
    [
        ({"type": "string"}, {"string"}),
        ({"type": ["integer", "null"]}, {"integer", "null"}),
        ({"enum": ["a", 1]}, {"string", "integer"}),
        ({"const": True}, {"boolean"}),
        ({"anyOf": [{"type": "string"}, {"type": "array"}]}, {"string", "array"}),
        ({"oneOf": [{"type": "number"}, {}]}, None),
        ({"$ref": "#/$defs/Point"}, {"object"}),
        ({"description": "untyped"}, None),
    ],
)
def test_param_types(sub: dict, types: set | None) -> None:
    tool = ToolSchema(
        "t", {"type": "object", "properties": {"p": sub}, "$defs": {"Point": {"type": "object"}}}
    )
    got = tool.param_types("p")
    assert (None if got is None else set(got)) == types
    assert tool.param_types("undeclared") is None


@pytest.mark.parametrize(
    ("text", "types", "value", "changed"),
    [
        ("7", {"integer"}, 7, True),
        ("7.5", {"integer"}, "7.5", False),
        ("7.0", {"integer"}, 7.0, True),
        ("2.5", {"number"}, 2.5, True),
        ("true", {"boolean"}, True, True),
        ("null", {"null"}, None, True),
        ("[1]", {"array"}, [1], True),
        ('{"a": 1}', {"object"}, {"a": 1}, True),
        ('{"a": 1}', {"array"}, '{"a": 1}', False),
        ("7", {"string", "integer"}, "7", False),  # a string is allowed: keep it
        ("NaN", {"number"}, "NaN", False),
        ("7", None, "7", False),
    ],
)
def test_coerce_value(text: str, types: set | None, value: object, changed: bool) -> None:
    got, did = coerce_value(text, None if types is None else frozenset(types))
    assert did is changed
    assert got == value and type(got) is type(value)


def test_loads_strict_rejects_nan_and_infinity() -> None:
    for text in ("NaN", "Infinity", "-Infinity", "[1, NaN]"):
        with pytest.raises(ValueError):
            loads_strict(text)
    assert loads_strict("100000000000000000000") == 10**20


def test_validate_messages() -> None:
    tool = ToolSchema(
        "t",
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city"],
            "additionalProperties": False,
        },
    )
    assert tool.validate({"city": "Oslo", "days": 2}) is None
    assert "required" in tool.validate({"days": 2})
    assert "days" in tool.validate({"city": "x", "days": "2"})
    assert "minimum" in tool.validate({"city": "x", "days": 0})
    assert "unexpected" in tool.validate({"city": "x", "zip": 1})


def test_unsupported_keywords_use_jsonschema() -> None:
    params = {"type": "object", "properties": {"id": {"type": "integer", "multipleOf": 3}}}
    assert compile_check(params) is None
    tool = ToolSchema("t", params)
    assert tool.validate({"id": 9}) is None
    assert "multiple of" in tool.validate({"id": 4})


def test_remote_ref_is_never_fetched() -> None:
    tool = ToolSchema(
        "t", {"type": "object", "properties": {"x": {"$ref": "https://example.com/s.json"}}}
    )
    error = tool.validate({"x": 1})
    assert error is not None and "cannot be resolved" in error


def test_local_ref_resolves() -> None:
    tool = ToolSchema(
        "t",
        {
            "type": "object",
            "properties": {"p": {"$ref": "#/$defs/P"}},
            "$defs": {"P": {"type": "integer"}},
        },
    )
    assert tool.validate({"p": 1}) is None
    assert tool.validate({"p": "x"}) is not None


def test_validators_are_cached_by_schema_text() -> None:
    params = {"type": "object", "properties": {"q": {"type": "integer", "multipleOf": 2}}}
    before = _compile.cache_info().hits
    for _ in range(3):
        ToolSchema("t", dict(params)).validate({"q": 2})
    assert _compile.cache_info().hits >= before + 2


def _mutations(value: object, rnd: random.Random) -> list[object]:
    pool = [None, True, False, 0, 1, -1, 1.5, 10**20, "", "x", "true", [], [1], ["a"], {}, {"k": 1}]
    out = [value, rnd.choice(pool)]
    if isinstance(value, dict) and value:
        key = rnd.choice(list(value))
        out.append({**value, key: rnd.choice(pool)})
        out.append({k: v for k, v in value.items() if k != key})
        out.append({**value, "extra": 1})
    return out


def test_compiled_check_agrees_with_jsonschema_on_vectors() -> None:
    rnd = random.Random(0)
    checked = 0
    for vec in vectors("v4") + vectors("wild"):
        for tool in vec["tools"]:
            params = tool["function"].get("parameters") or {}
            fast = compile_check(params)
            assert fast is not None, params  # the vectors use only the common subset
            oracle = Draft202012Validator(params)
            calls = [
                c["arguments"]
                for c in vec["expected"]["tool_calls"]
                if c["name"] == tool["function"]["name"]
            ]
            for args in calls or [{}]:
                for candidate in _mutations(args, rnd):
                    assert (fast(candidate) is None) == oracle.is_valid(candidate), (
                        params,
                        candidate,
                    )
                    checked += 1
    assert checked > 500


@pytest.mark.parametrize(
    ("schema", "good", "bad"),
    [
        ({"enum": [1, "a"]}, [1, 1.0, "a"], [True, "b", [1]]),
        ({"const": [1, {"a": True}]}, [[1, {"a": True}]], [[True, {"a": 1}]]),
        ({"type": "integer"}, [1, 2.0, 10**30], [1.5, True, "1"]),
        ({"type": "number", "exclusiveMaximum": 3}, [2.9, -1], [3, "2"]),
        (
            {"type": "array", "items": {"type": "string"}, "maxItems": 1},
            [[], ["a"]],
            [[1], ["a", "b"]],
        ),
        ({"type": "string", "minLength": 2}, ["ab"], ["a", 12]),
        ({"type": "object", "additionalProperties": {"type": "integer"}}, [{"a": 1}], [{"a": "x"}]),
        (False, [], [1, None]),
    ],
)
def test_compiled_check_edge_cases_agree_with_jsonschema(schema, good: list, bad: list) -> None:
    fast = compile_check(schema)
    assert fast is not None
    oracle = Draft202012Validator(schema)
    for value in good:
        assert fast(value) is None and oracle.is_valid(value), value
    for value in bad:
        assert fast(value) is not None and not oracle.is_valid(value), value
    json.dumps(schema)  # schemas here are JSON


# --- hostile schemas (issue 14) --------------------------------------------------------------

EVIL = "a" * 28 + "!"


@pytest.mark.parametrize(("params", "bad", "good"), [
    # jsonschema validates these (outside the compiled subset): its patterns on RE2 too.
    ({"type": "object", "properties": {"s": {"anyOf": [{"type": "string", "pattern": "^(a+)+$"}]}}},
     {"s": EVIL}, {"s": "aaa"}),
    ({"type": "object", "patternProperties": {"^(a+)+$": {"type": "integer"}}},
     {"aaa": "x"}, {EVIL: "x", "aa": 1}),
    ({"type": "object", "patternProperties": {"^(a+)+$": {}}, "additionalProperties": False},
     {EVIL: 1}, {"aaa": 1}),
    ({"type": "object", "propertyNames": {"pattern": "^(a+)+$"}}, {EVIL: 1}, {"aaa": 1}),
])
def test_jsonschema_patterns_run_in_linear_time(params: dict, bad: dict, good: dict) -> None:
    import time

    tool = ToolSchema("t", params)
    start = time.perf_counter()
    assert tool.validate(bad) is not None
    assert tool.validate(good) is None
    assert time.perf_counter() - start < 0.5  # Python's re: ~8 s on 28 'a's, doubling per 'a'


def test_ref_cycle_is_a_validation_error_not_a_crash() -> None:
    tool = ToolSchema("t", {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}},
                            "$defs": {"a": {"$ref": "#/$defs/a"}}})
    error = tool.validate({"x": 1})
    assert error is not None and "loop" in error


# --- fuzzed schemas: a 400 or a verdict, never an exception (issue 14) ----------------------

_PATTERNS = ["^(a+)+$", "(a)\\1", "(?=x)", "[", "\\p{L}+", "^[a-z]{2,5}$", "\ud800", "a{99999}",
             "(?i)abc", ".*.*.*=.*", "\\d+"]
_KEYWORDS = ["type", "properties", "required", "items", "enum", "const", "pattern",
             "patternProperties", "propertyNames", "additionalProperties", "anyOf", "oneOf",
             "allOf", "not", "$ref", "$defs", "minimum", "maxLength", "format",
             "unevaluatedProperties", "if", "then", "dependentSchemas", "prefixItems"]
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=4), children, max_size=3), max_leaves=8)
_schemas = st.recursive(
    st.booleans() | st.fixed_dictionaries({"type": st.sampled_from(
        ["string", "integer", "object", "array", "null", "bogus"])}),
    lambda children: st.dictionaries(
        st.sampled_from(_KEYWORDS),
        children | st.sampled_from(_PATTERNS) | _json | st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "b", "^x", "(a)\\1", "#/$defs/a"]), children,
                          max_size=3)
        | st.sampled_from(["#/$defs/a", "#", "#/nope", "https://example.com/s.json"]),
        max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=_schemas, arguments=st.dictionaries(st.sampled_from(["a", "b", "x1", "aaaa!"]),
                                                   _json, max_size=3))
def test_fuzzed_schemas_render_or_refuse_and_validate_without_exceptions(
        schema: object, arguments: dict) -> None:
    import time

    params = schema if isinstance(schema, dict) else {"type": "object"}
    request = {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": params}}]}
    try:
        prompt = render_chat(request)
    except RenderError:
        return  # a 400 in the proxy
    tools = ToolRegistry(prompt.tools)
    start = time.perf_counter()
    verdict = tools.get("f").validate(arguments)  # type: ignore[union-attr]
    assert verdict is None or isinstance(verdict, str)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("schema", [{"type": [{"type": "string"}]}, {"type": [1]},
                                    {"type": ["string", None]}])
def test_a_malformed_type_list_renders_or_refuses_without_a_crash(schema: dict) -> None:
    # found by the fuzz test above: a `type` list holding a schema crashed the compiled check
    test_fuzzed_schemas_render_or_refuse_and_validate_without_exceptions.hypothesis.inner_test(
        schema, {"a": 1})
