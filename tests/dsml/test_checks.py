"""dsml.checks: the compiled subset of JSON Schema agrees with jsonschema, speaks its
messages, refuses what it does not support, and never runs schema text as code."""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from dsml.checks import compile_check

# Property names that would break (or hijack) naively generated source.
ODD_NAMES = [
    "city",
    "a b",
    "'",
    '"',
    "\\",
    "\\'",
    '\\"',
    "{",
    "}",
    "{}",
    "{c0}",
    "{v}",
    "\n",
    "a\nb",
    "\r\n",
    "\t",
    "\x00",
    "é",
    "🙂",
    '"); import os; ("',
    "'); import os; ('",
    "__import__('os').system('false')",
    "v",
    "c0",
    "_MISSING",
    "",
]

NAMES = st.sampled_from(ODD_NAMES) | st.text(max_size=4)

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-4, 4)
    | st.sampled_from([0.0, 1.0, 2.0, -1.0, 0.5, -1.5, 2.5, 10**20, 1e20, -(10**20)])
    | st.floats(-10, 10, allow_nan=False, allow_infinity=False)
    | st.text(max_size=4)
    | NAMES
)

JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3),
    max_leaves=8,
)

TYPES = ["string", "integer", "number", "boolean", "null", "array", "object"]
ANNOTATION_VALUES = {
    "description": st.text(max_size=5),
    "title": st.text(max_size=5),
    "default": JSON_VALUES,
}


@st.composite
def _bounds(draw: st.DrawFn, schema: dict[str, Any], kinds: list[str]) -> None:
    """Numeric and length bounds, mostly fitting the types (but not always)."""
    numeric = st.integers(-5, 5) | st.sampled_from([-1.5, 0.5, 2.5, 1.0])
    length = st.integers(0, 4)
    if "integer" in kinds or "number" in kinds or draw(st.integers(0, 9)) == 0:
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if draw(st.integers(0, 3)) == 0:
                schema[key] = draw(numeric)
    if "string" in kinds or draw(st.integers(0, 9)) == 0:
        for key in ("minLength", "maxLength"):
            if draw(st.integers(0, 2)) == 0:
                schema[key] = draw(length)
    if "array" in kinds or draw(st.integers(0, 9)) == 0:
        for key in ("minItems", "maxItems"):
            if draw(st.integers(0, 2)) == 0:
                schema[key] = draw(length)


@st.composite
def schemas(draw: st.DrawFn, depth: int = 0) -> Any:
    """A schema of the supported subset, nested at most ~3 levels."""
    kinds = ["true", "false", "empty", "scalar", "enum", "const"]
    if depth < 3:
        kinds += ["object", "object", "array", "array"]
    kind = draw(st.sampled_from(kinds))
    if kind == "true":
        return True
    if kind == "false":
        return False
    schema: dict[str, Any] = {}
    if kind == "scalar":
        if draw(st.booleans()):
            schema["type"] = draw(st.sampled_from(TYPES[:5]))
        else:
            schema["type"] = draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=3,
                                           unique=True))  # fmt: skip
        kinds_ = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        draw(_bounds(schema, kinds_))
    elif kind == "enum":
        schema["enum"] = draw(st.lists(SCALARS | JSON_VALUES, min_size=1, max_size=4))
        if draw(st.booleans()):
            schema["type"] = draw(st.sampled_from(TYPES))
    elif kind == "const":
        schema["const"] = draw(JSON_VALUES)
    elif kind == "object":
        if draw(st.integers(0, 3)):
            schema["type"] = "object" if draw(st.integers(0, 3)) else ["object", "null"]
        names = draw(st.lists(NAMES, max_size=4, unique=True))
        if names or draw(st.booleans()):
            schema["properties"] = {n: draw(schemas(depth + 1)) for n in names}
        if draw(st.booleans()):
            required = [n for n in names if draw(st.booleans())]
            if draw(st.integers(0, 4)) == 0:
                required.append(draw(NAMES))  # required but not declared
            schema["required"] = required
        extra = draw(st.integers(0, 3))
        if extra == 1:
            schema["additionalProperties"] = False
        elif extra == 2:
            schema["additionalProperties"] = True
        elif extra == 3:
            schema["additionalProperties"] = draw(schemas(depth + 1))
    elif kind == "array":
        if draw(st.integers(0, 3)):
            schema["type"] = "array"
        if draw(st.integers(0, 3)):
            schema["items"] = draw(schemas(depth + 1))
        draw(_bounds(schema, ["array"]))
    for key, values in ANNOTATION_VALUES.items():
        if draw(st.integers(0, 9)) == 0:
            schema[key] = draw(values)
    # Keyword order must not matter: shuffle it.
    keys = draw(st.permutations(list(schema)))
    return {k: schema[k] for k in keys}


def _int_range(schema: dict[str, Any]) -> tuple[int, int]:
    lo, hi = -6, 6
    if "minimum" in schema:
        lo = max(lo, math.ceil(schema["minimum"]))
    if "exclusiveMinimum" in schema:
        lo = max(lo, math.floor(schema["exclusiveMinimum"]) + 1)
    if "maximum" in schema:
        hi = min(hi, math.floor(schema["maximum"]))
    if "exclusiveMaximum" in schema:
        hi = min(hi, math.ceil(schema["exclusiveMaximum"]) - 1)
    return lo, hi


def fitting(schema: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values built to fit `schema` (mostly: impossible bounds and odd mixes still miss)."""
    if not isinstance(schema, dict) or depth > 5:
        return JSON_VALUES
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    declared = schema.get("type", TYPES)
    kinds = declared if isinstance(declared, list) else [declared]
    options = []
    for kind in kinds:
        if kind == "null":
            options.append(st.none())
        elif kind == "boolean":
            options.append(st.booleans())
        elif kind in ("integer", "number"):
            lo, hi = _int_range(schema)
            ints = st.integers(lo, hi) if lo <= hi else st.integers(-6, 6)
            options.append(ints)
            options.append(ints.map(float))  # 2.0 is an integer too
            if kind == "number":
                options.append(st.floats(lo - 1, hi + 1, allow_nan=False, allow_infinity=False)
                               if lo <= hi else st.floats(-6, 6))  # fmt: skip
        elif kind == "string":
            lo, hi = schema.get("minLength", 0), schema.get("maxLength", 5)
            options.append(st.text(min_size=lo, max_size=max(lo, hi)))
        elif kind == "array":
            lo, hi = schema.get("minItems", 0), schema.get("maxItems", 3)
            items = fitting(schema.get("items", True), depth + 1)
            options.append(st.lists(items, min_size=lo, max_size=max(lo, hi)))
        elif kind == "object":
            options.append(_fitting_object(schema, depth))
    return st.one_of(options)


@st.composite
def _fitting_object(draw: st.DrawFn, schema: dict[str, Any], depth: int) -> dict[str, Any]:
    props = schema.get("properties", {})
    out = {}
    for name in schema.get("required", []):
        out[name] = draw(fitting(props.get(name, schema.get("additionalProperties", True)),
                                 depth + 1))  # fmt: skip
    for name, sub in props.items():
        if name not in out and draw(st.booleans()):
            out[name] = draw(fitting(sub, depth + 1))
    extra = schema.get("additionalProperties", True)
    if extra is not False and draw(st.integers(0, 3)) == 0:
        name = draw(NAMES)
        if name not in props:
            out[name] = draw(fitting(extra, depth + 1))
    return out


@st.composite
def _mutated(draw: st.DrawFn, value: Any) -> Any:
    """`value` with one change: a member replaced, dropped or added."""
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(list(value)))
        if draw(st.booleans()):
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: draw(SCALARS)}
    if isinstance(value, list) and value:
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], draw(SCALARS), *value[i + 1 :]]
    return draw(SCALARS)


@st.composite
def schema_and_value(draw: st.DrawFn) -> tuple[Any, Any]:
    schema = draw(schemas())
    way = draw(st.integers(0, 5))
    if way == 0:
        value = draw(JSON_VALUES)
    elif way == 1:
        value = draw(fitting(schema).flatmap(_mutated))
    else:
        value = draw(fitting(schema))
    return schema, value


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema_and_value())
def test_compiled_check_agrees_with_jsonschema(case: tuple[Any, Any]) -> None:
    schema, value = case
    check = compile_check(schema)
    assert check is not None, schema
    got = check(value)
    assert got is None or isinstance(got, str)
    assert (got is None) == Draft202012Validator(schema).is_valid(value), (schema, value, got)


def test_generated_values_are_often_valid() -> None:
    """The agreement test sees both verdicts often, not mostly invalid values."""
    seen = {True: 0, False: 0}

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(schema_and_value())
    def count(case: tuple[Any, Any]) -> None:
        schema, value = case
        seen[Draft202012Validator(schema).is_valid(value)] += 1

    count()
    assert seen[True] > 30 and seen[False] > 15, seen


# --- messages ---------------------------------------------------------------------------

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 2, "maxLength": 5},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2},
        "unit": {"enum": ["c", "f"]},
        "v": {"const": 2},
    },
    "required": ["city"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("schema", "value", "message"),
    [
        ({"type": "integer"}, "x", "'x' is not of type 'integer'"),
        ({"type": "integer"}, 1.5, "1.5 is not of type 'integer'"),
        ({"type": "number"}, True, "True is not of type 'number'"),
        ({"type": "null"}, 0, "0 is not of type 'null'"),
        (CITY, [], "[] is not of type 'object'"),
        (CITY, {"city": 1}, "city: 1 is not of type 'string'"),
        (CITY, {"days": 2}, "'city' is a required property"),
        (
            CITY,
            {"city": "Oslo", "zip": 1},
            "Additional properties are not allowed ('zip' was unexpected)",
        ),
        (CITY, {"city": "x"}, "city: 'x' is too short"),
        (CITY, {"city": "Reykjavik"}, "city: 'Reykjavik' is too long"),
        (CITY, {"city": "Oslo", "days": 0}, "days: 0 is less than the minimum of 1"),
        (CITY, {"city": "Oslo", "days": 10}, "days: 10 is greater than the maximum of 9"),
        (CITY, {"city": "Oslo", "tags": []}, "tags: [] is too short"),
        (CITY, {"city": "Oslo", "tags": ["a", "b", "c"]}, "tags: ['a', 'b', 'c'] is too long"),
        (CITY, {"city": "Oslo", "tags": ["a", 3]}, "tags: 1: 3 is not of type 'string'"),
        (CITY, {"city": "Oslo", "unit": "k"}, "unit: 'k' is not one of ['c', 'f']"),
        (CITY, {"city": "Oslo", "v": 3}, "v: 2 was expected"),
        ({"items": {"type": "integer"}}, [1, "a"], "1: 'a' is not of type 'integer'"),
        ({"items": {"type": "integer"}}, ["a"], "0: 'a' is not of type 'integer'"),
        ({"enum": ["a", 1]}, "b", "'b' is not one of ['a', 1]"),
        ({"enum": [1]}, True, "True is not one of [1]"),
        ({"const": "x"}, "y", "'x' was expected"),
        ({"const": None}, 0, "None was expected"),
        ({"minimum": 1.5}, 1, "1 is less than the minimum of 1.5"),
        ({"maximum": 0}, 0.5, "0.5 is greater than the maximum of 0"),
        ({"minLength": 2}, "a", "'a' is too short"),
        ({"maxLength": 1}, "ab", "'ab' is too long"),
        ({"minItems": 1}, [], "[] is too short"),
        ({"maxItems": 1}, [1, 2], "[1, 2] is too long"),
        (
            {"additionalProperties": {"type": "integer"}},
            {"n": "x"},
            "n: 'x' is not of type 'integer'",
        ),
        (
            {"properties": {"a": {"items": {"properties": {"b": {"type": "string"}}}}}},
            {"a": [{"b": 1}]},
            "a: 0: b: 1 is not of type 'string'",
        ),
        (
            {"properties": {"a": {"items": {"required": ["q"]}}}},
            {"a": [{"q": 1}, {}]},
            "a: 1: 'q' is a required property",
        ),
        (
            {"properties": {"a": {"additionalProperties": False, "properties": {"k": True}}}},
            {"a": {"k": 1, "z": 2}},
            "a: Additional properties are not allowed ('z' was unexpected)",
        ),
        ({"properties": {"a": False}}, {"a": 1}, "a: False schema does not allow 1"),
        ({"items": False}, [None], "0: False schema does not allow None"),
        (False, {"a": 1}, "False schema does not allow {'a': 1}"),
    ],
)
def test_messages(schema: Any, value: Any, message: str) -> None:
    check = compile_check(schema)
    assert check is not None
    assert check(value) == message
    assert not Draft202012Validator(schema).is_valid(value)


def test_exclusive_bound_messages() -> None:
    check = compile_check({"exclusiveMinimum": 1, "exclusiveMaximum": 3})
    assert check is not None
    assert check(1).startswith("1 is less than or equal to")
    assert check(3).startswith("3 is greater than or equal to")
    assert check(2) is None and check(1.5) is None


def test_type_list_message_names_each_type() -> None:
    check = compile_check({"type": ["string", "null"]})
    assert check is not None
    assert check("a") is None and check(None) is None
    message = check(1)
    assert message is not None and message.startswith("1 is not of type")
    assert "'string'" in message and "'null'" in message


def test_first_error_wins_in_keyword_order() -> None:
    check = compile_check({"type": "object", "required": ["a", "b"]})
    assert check is not None
    assert check({}) == "'a' is a required property"
    assert check({"a": 1}) == "'b' is a required property"
    assert check("x") == "'x' is not of type 'object'"


def test_integral_floats_are_integers_and_bools_are_not_numbers() -> None:
    check = compile_check({"type": "integer", "enum": [1, 2]})
    assert check is not None
    assert check(1.0) is None and check(2) is None
    assert check(True) is not None
    number = compile_check({"type": "number", "minimum": 0})
    assert number is not None
    assert number(False) == "False is not of type 'number'"
    bounded = compile_check({"minimum": 5})
    assert bounded is not None and bounded(True) is None  # bounds ignore booleans


# --- unsupported and trivial schemas ----------------------------------------------------


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "pattern": "(a)\\1"},  # RE2 cannot: jsonschema's (refused earlier)
        {"anyOf": [{"type": "string"}, {"type": "null"}]},
        {"oneOf": [{"type": "string"}]},
        {"allOf": [{"type": "string"}]},
        {"not": {"type": "string"}},
        {"$ref": "#/$defs/P", "$defs": {"P": {"type": "integer"}}},
        {"$ref": "#"},
        {"properties": {"a": {"$ref": "#"}}},
        {"patternProperties": {"^x": {}}, "additionalProperties": False},
        {"additionalProperties": False, "patternProperties": {"^x": {"type": "string"}}},
        {"required": ["a", 1]},
        {"required": [None]},
        {"items": {"type": "string", "pattern": "(?=x)"}},
        {"properties": {"a": {"properties": {"b": {"format": "date", "uniqueItems": True}}}}},
        {"type": "strng"},
        {"type": []},
        {"type": ["string", "nope"]},
        {"enum": "abc"},
        {"properties": ["a"]},
        {"multipleOf": 2},
        {"prefixItems": [{"type": "string"}]},
        {"additionalProperties": False, "properties": ["a"]},
        {"minimum": "1"},
        {"minimum": True},
        {"if": {"type": "string"}, "then": {"minLength": 1}},
        {"dependentRequired": {"a": ["b"]}},
        {"unknownKeyword": 1},
        None,
        "string",
        1,
        [],
    ],
)
def test_unsupported_schemas_return_none(schema: Any) -> None:
    assert compile_check(schema) is None


@pytest.mark.parametrize(
    "schema",
    [
        {},
        True,
        {"description": "anything", "title": "t", "default": 3, "examples": [1],
         "format": "date", "$comment": "c", "deprecated": True, "readOnly": True,
         "writeOnly": False, "$schema": "https://json-schema.org/draft/2020-12/schema"},
        {"properties": {"a": {}, "b": True}},
        {"items": True},
        {"additionalProperties": True},
        {"additionalProperties": {}},
    ],
)  # fmt: skip
def test_trivial_schemas_accept_anything(schema: Any) -> None:
    check = compile_check(schema)
    assert check is not None
    oracle = Draft202012Validator(schema)
    for value in (None, True, 0, 1.5, "", "x", [], [1, "a"], {}, {"a": [None]}, {"b": 1}):
        assert check(value) is None and oracle.is_valid(value), value


def test_false_rejects_everything() -> None:
    check = compile_check(False)
    assert check is not None
    for value in (None, True, 0, 1.5, "", "x", [], {}, {"a": 1}):
        assert check(value) == f"False schema does not allow {value!r}"


# --- injection safety -------------------------------------------------------------------

EVIL = [
    "__import__('os').system('false')",
    "__import__('os')._exit(3)",
    '"); __import__("os").system("false"); ("',
    "'); __import__('os').system('false'); ('",
    "\n__import__('os').system('false')\n",
    "\\'); __import__('os').system('false') #",
    '""" + __import__("os").system("false") + """',
    "{c0}{v}{prefix}",
    "} + __import__('os').system('false') + {",
    "x\"\nimport os\nos.system('false')\n\"",
]


@pytest.fixture
def no_system(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """os.system and os._exit record their calls instead of running."""
    calls: list[Any] = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(("system", a)) or 0)
    monkeypatch.setattr(os, "_exit", lambda *a: calls.append(("_exit", a)))
    return calls


@pytest.mark.parametrize("name", EVIL)
def test_property_names_never_run(name: str, no_system: list[Any]) -> None:
    schema = {
        "type": "object",
        "properties": {name: {"type": "string", "enum": [name, "ok"]},
                       "n": {"additionalProperties": {"const": name}}},
        "required": [name],
        "additionalProperties": False,
    }  # fmt: skip
    check = compile_check(schema)
    assert check is not None
    assert name not in check.source  # type: ignore[attr-defined]
    assert "__import__" not in check.source and "system" not in check.source  # type: ignore[attr-defined]
    oracle = Draft202012Validator(schema)
    cases = [
        ({name: name}, None),
        ({name: "ok", "n": {"k": name}}, None),
        ({}, f"{name!r} is a required property"),
        ({name: 1}, f"{name}: 1 is not of type 'string'"),
        ({name: "no"}, f"{name}: 'no' is not one of {[name, 'ok']!r}"),
        ({name: "ok", "n": {"k": 1}}, f"n: k: {name!r} was expected"),
        ({name: "ok", "zz": 1}, "Additional properties are not allowed ('zz' was unexpected)"),
    ]
    for value, message in cases:
        assert check(value) == message, value
        assert oracle.is_valid(value) is (message is None)
    assert no_system == []


@pytest.mark.parametrize("name", EVIL)
def test_enum_and_const_members_never_run(name: str, no_system: list[Any]) -> None:
    for schema in ({"enum": [name, {name: [name]}]}, {"const": {name: name}},
                   {"items": {"const": name}}, {"type": "string", "maxLength": 100,
                                                "description": name, "default": name}):  # fmt: skip
        check = compile_check(schema)
        assert check is not None
        assert name not in check.source  # type: ignore[attr-defined]
        for value in (name, {name: name}, {name: [name]}, [name], [name, 1], 1, None):
            assert (check(value) is None) == Draft202012Validator(schema).is_valid(value)
    assert no_system == []


def test_odd_property_names_stay_out_of_source() -> None:
    # Names of 4+ characters that are not identifiers (one quote alone is in any source).
    names = [n for n in ODD_NAMES + EVIL if len(n) >= 4 and not n.isidentifier()]
    schema = {"properties": {n: {"type": "integer"} for n in names}, "required": names}
    check = compile_check(schema)
    assert check is not None
    for n in names:
        assert n not in check.source, n  # type: ignore[attr-defined]
    value = {n: i for i, n in enumerate(names)}
    assert check(value) is None
    bad = {**value, names[-1]: "x"}
    assert check(bad) == f"{names[-1]}: 'x' is not of type 'integer'"


# --- depth ------------------------------------------------------------------------------


def _nested(depth: int, wrap: str) -> Any:
    schema: Any = {"type": "integer"}
    for _ in range(depth):
        schema = {"items": schema} if wrap == "items" else {"properties": {"a": schema}}
    return schema


def _nested_value(depth: int, wrap: str, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value] if wrap == "items" else {"a": value}
    return value


@pytest.mark.parametrize("wrap", ["items", "properties"])
@pytest.mark.parametrize("depth", [1, 5, 15, 16, 17, 40, 200])
def test_deep_schemas_return_none_or_a_working_check(depth: int, wrap: str) -> None:
    schema = _nested(depth, wrap)
    check = compile_check(schema)  # never raises
    if check is None:
        return
    oracle = Draft202012Validator(schema)
    for leaf in (1, "x", 2.0, None):
        value = _nested_value(depth, wrap, leaf)
        assert (check(value) is None) == oracle.is_valid(value), (depth, leaf)
    assert check(_nested_value(depth, wrap, 1)) is None
    assert check(_nested_value(depth, wrap, "x")) is not None


def test_shallow_nesting_compiles() -> None:
    assert compile_check(_nested(5, "items")) is not None
    assert compile_check(_nested(5, "properties")) is not None


# --- pattern, on RE2 (issue 14) -------------------------------------------------------------


def test_pattern_is_compiled_and_agrees_with_jsonschema() -> None:
    schema = {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-z]+$"}}}
    check = compile_check(schema)
    assert check is not None and "_matches" in check.source  # type: ignore[attr-defined]
    reference = Draft202012Validator(schema)
    for value in ({"id": "abc"}, {"id": "ABC"}, {"id": 3}, {"id": "a1"}, {}):
        expected = next(iter(reference.iter_errors(value)), None)
        got = check(value)
        assert (got is None) == (expected is None), value
        if expected is not None:
            assert got == f"id: {expected.message}"


def test_catastrophic_pattern_runs_in_linear_time() -> None:
    # Python's re takes seconds on this (doubling per 'a'); RE2 takes microseconds.
    import time

    check = compile_check({"type": "string", "pattern": "^(a+)+$"})
    assert check is not None
    start = time.perf_counter()
    assert check("a" * 28 + "!") == repr("a" * 28 + "!") + " does not match '^(a+)+$'"
    assert check("a" * 10_000 + "!") is not None
    assert check("aaa") is None
    assert time.perf_counter() - start < 0.05
