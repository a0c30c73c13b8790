"""Turn grammars (dsml.grammar) against the parse vectors, token by token through the real
V4 tokenizer and llguidance.

Every completion whose calls the parser would deliver as valid, and whose text holds no
markup, is accepted whole (EOS included, and nothing after it). Every other one is
rejected, at a token inside the damage: inside the first invalid call, or on the token that
completes the first forbidden spelling in the text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("llguidance")

from dsml import markers
from dsml.grammar import (
    FORBIDDEN_IN_TEXT,
    THINK_CLOSE_ID,
    Phase,
    build_lark,
    phase_of,
    turn_spec,
)
from dsml.grammar_match import matcher, validate
from dsml.schema import ToolRegistry
from dsml.tokenizer import V4Tokenizer, load_tokenizer

DATA = Path(__file__).parent.parent / "data" / "dsml"
# The dialects the grammar names tags and `</think>` for (the V4 tokenizer's).
GRAMMAR_FILES = [DATA / "parse.jsonl", DATA / "dialects" / "v4-0731" / "parse.jsonl"]
INVOKE_OPEN = f"<{markers.DSML}{markers.INVOKE} name=\""


@pytest.fixture(scope="module")
def tok() -> V4Tokenizer:
    return load_tokenizer()


def run(spec, ids: list[int]) -> tuple[int | None, bool]:
    """(index of the first rejected token or None, whether the matcher ended the turn)."""
    m = matcher(spec)
    for i, token in enumerate(ids):
        if not m.consume_token(token):
            return i, False
    return None, m.is_stopped()


def byte_ends(tok: V4Tokenizer, ids: list[int]) -> list[int]:
    """The completion's byte offset at the end of each token."""
    ends, total = [], 0
    for token in ids:
        total += len(tok.token_bytes(token))
        ends.append(total)
    return ends


def first_violation(record: dict) -> tuple[int, int] | None:
    """The byte span (start, end) in the completion where a turn grammar must fail, None if
    the completion is a valid turn: the first forbidden spelling in reasoning or content,
    or the first call whose arguments do not validate (the span of its invoke)."""
    text = record["completion"]
    raw = text.encode()
    expected = record["expected"]
    registry = ToolRegistry(record["tools"])
    spans = []
    block_at = text.find(f"<{markers.DSML}{markers.TOOL_CALLS}>")
    free = text.removesuffix(markers.EOS) if block_at < 0 else text[:block_at]
    if record["thinking"] and markers.THINK_CLOSE in free:
        # The reasoning's own closer is the grammar's; a second one is text.
        cut = free.index(markers.THINK_CLOSE) + len(markers.THINK_CLOSE)
        free = free[:cut].replace(markers.THINK_CLOSE, "\0" * len(markers.THINK_CLOSE)) + free[cut:]
    eos_at = text.find(markers.EOS)
    if 0 <= eos_at < len(text) - len(markers.EOS):
        spans.append((len(text[:eos_at].encode()), len(text[:eos_at].encode()) + 1))
    for word in FORBIDDEN_IN_TEXT:
        # Text the parser left as text (reasoning, content) that holds markup.
        as_text = word in expected["reasoning_content"] or word in expected["content"]
        if (at := free.find(word)) >= 0 or (as_text and (at := text.find(word)) >= 0):
            start = len(text[:at].encode())
            spans.append((start, start + len(word.encode())))
    opens = [m.start() for m in re.finditer(re.escape(INVOKE_OPEN), text)]
    for call, at in zip(expected["tool_calls"], opens, strict=False):
        schema = registry.get(call["name"])
        # Markup in a value (names are declared: they may hold anything).
        markup = "DSML" in json.dumps(list(call["arguments"].values()), ensure_ascii=False)
        if markup or schema is None or schema.validate(call["arguments"]) is not None:
            end = text.find(f"</{markers.DSML}{markers.INVOKE}>", at)
            start = len(text[:at].encode())
            spans.append((start, len(text[:end].encode()) + len(markers.INVOKE) + 4 if end > 0
                          else len(raw)))
            break
    return min(spans) if spans else None


JSON_VALUE = re.compile(
    re.escape('string="false">') + "(.*?)" + re.escape(f"</{markers.DSML}{markers.PARAMETER}>"),
    re.DOTALL)


def control_in_json(tok: V4Tokenizer, text: str) -> bool:
    controls = [c for c in tok.control_ids if c != markers.DSML]  # DSML is text to llguidance
    return any(c in m.group(1) for m in JSON_VALUE.finditer(text) for c in controls)


def encode_json_plain(tok: V4Tokenizer, text: str) -> list[int]:
    """The completion's ids with its JSON parameter values spelled in plain BPE: llguidance's
    JSON lexemes are text, so an added token (`</think>` in a JSON string) can only be
    written there in pieces."""
    ids, pos = [], 0
    for m in JSON_VALUE.finditer(text):
        ids += tok.encode_generated(text[pos:m.start(1)]) + tok.encode_text(m.group(1))
        pos = m.end(1)
    return ids + tok.encode_generated(text[pos:])


@pytest.mark.parametrize("path", GRAMMAR_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_parse_vectors_accepted_or_rejected_in_the_damage(tok: V4Tokenizer, path: Path) -> None:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    failures, accepted, rejected, retokenized = [], 0, 0, 0
    for record in records:
        spec = turn_spec(record["tools"], thinking=record["thinking"])
        ids = tok.encode_generated(record["completion"])
        at, stopped = run(spec, ids)
        violation = first_violation(record)
        if violation is None and control_in_json(tok, record["completion"]):
            # Rejected at the added token inside the JSON value, accepted spelled in text.
            at_plain, stopped = run(spec, encode_json_plain(tok, record["completion"]))
            if at is None or ids[at] not in tok.control_ids.values() or at_plain is not None:
                failures.append(f"{record['id']}: JSON value with an added token: rejected at "
                                f"{at}, in plain spelling at {at_plain}")
            retokenized += 1
            continue
        if violation is None:
            accepted += 1
            if at is not None:
                failures.append(f"{record['id']}: valid turn rejected at token {at} "
                                f"{tok.decode(ids[max(0, at - 6):at + 1])!r}")
            elif not stopped:
                failures.append(f"{record['id']}: valid turn not ended by its EOS")
            continue
        rejected += 1
        if at is None:
            failures.append(f"{record['id']}: invalid turn accepted ({violation})")
            continue
        ends = byte_ends(tok, ids)
        token_start = ends[at - 1] if at else 0
        start, end = violation
        # The rejected token lies in the damage: it ends after the damage begins and starts
        # before the damage ends (a token can carry text before the damage).
        if not (ends[at] > start and token_start < end):
            failures.append(f"{record['id']}: rejected at token {at} (bytes {token_start}-"
                            f"{ends[at]}), outside the damage {violation}")
    assert accepted > len(records) // 2  # the vectors are mostly valid turns
    assert rejected > 0
    print(f"{path.name}: {accepted} valid turns accepted, {rejected} invalid ones rejected, "
          f"{retokenized} accepted with an added token in a JSON value spelled as text")
    assert not failures, f"{len(failures)}/{len(records)}:\n" + "\n".join(failures[:15])


# -- the wild vectors: damage is rejected where it starts ---------------------------------


def canonical_turn(record: dict) -> str:
    """The well-formed spelling (dsml.md 3.11, 5) of what the parser recovered."""
    expected = record["expected"]
    text = expected["reasoning_content"] + markers.THINK_CLOSE if record["thinking"] else ""
    text += expected["content"]
    if expected["tool_calls"]:
        invokes = []
        for call in expected["tool_calls"]:
            params = []
            for key, value in call["arguments"].items():
                is_str = isinstance(value, str)
                body = value if is_str else json.dumps(value, ensure_ascii=False)
                params.append(markers.parameter_open(key, is_str) + body + markers.PARAMETER_CLOSE)
            invokes.append(markers.invoke_open(call["name"]) + "\n" + "\n".join(params)
                           + "\n" + markers.INVOKE_CLOSE)
        text += f"\n\n{markers.TOOL_CALLS_OPEN}\n" + "\n".join(invokes) + "\n" + markers.TOOL_CALLS_CLOSE
    return text + markers.EOS


def test_wild_vectors_rejected_at_the_damage(tok: V4Tokenizer) -> None:
    records = [json.loads(line) for line in (DATA / "wild.jsonl").read_text("utf-8").splitlines()]
    report, failures = [], []
    for record in records:
        spec = turn_spec(record["tools"], thinking=record["thinking"])
        ids = tok.encode_generated(record["completion"])
        at, stopped = run(spec, ids)
        raw, canonical = record["completion"].encode(), canonical_turn(record).encode()
        starts = [i for i, (a, b) in enumerate(zip(raw, canonical, strict=False)) if a != b][:1]
        if not starts and len(raw) != len(canonical):
            starts = [min(len(raw), len(canonical))]
        if (violation := first_violation(record)) is not None:
            starts.append(violation[0])
        damage = min(starts, default=None)
        report.append(f"{record['id']}: damage at byte {damage}, rejected at token {at}")
        if damage is None:  # a well-formed turn among the wild ones
            if at is not None or not stopped:
                failures.append(f"{record['id']}: well-formed, rejected at {at}")
            continue
        if record.get("finish") == "length":  # cut short: a valid prefix that never ends
            damage = len(raw)
        if damage >= len(raw):
            if at is not None or stopped:
                failures.append(f"{record['id']}: truncated turn: rejected at {at}, ended {stopped}")
            continue
        if at is None:
            failures.append(f"{record['id']}: damaged turn accepted")
        elif byte_ends(tok, ids)[at] <= damage:
            failures.append(f"{record['id']}: rejected at token {at}, before the damage at {damage}")
    print("\n".join(report))
    assert not failures, "\n".join(failures)
    assert sum("rejected at token None" not in line for line in report) >= len(records) - 2


# -- request shapes ---------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1},
                   "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}
TOOLS = [WEATHER, SEARCH]
CALL = (markers.invoke_open("get_weather") + "\n" + markers.parameter_open("city", True)
        + "Taipei" + markers.PARAMETER_CLOSE + "\n" + markers.parameter_open("days", False)
        + "3" + markers.PARAMETER_CLOSE + "\n" + markers.INVOKE_CLOSE)
CALL2 = (markers.invoke_open("search") + "\n" + markers.parameter_open("q", True) + "rain"
         + markers.PARAMETER_CLOSE + "\n" + markers.INVOKE_CLOSE)


def block(*invokes: str) -> str:
    return f"\n\n{markers.TOOL_CALLS_OPEN}\n" + "\n".join(invokes) + "\n" + markers.TOOL_CALLS_CLOSE


def rejected_at(tok: V4Tokenizer, spec, text: str) -> tuple[int | None, bool, str]:
    """(first rejected token, turn ended, the text up to and including that token)."""
    ids = tok.encode_generated(text)
    at, stopped = run(spec, ids)
    return at, stopped, "" if at is None else tok.decode(ids[: at + 1])


@pytest.mark.parametrize(("kwargs", "text", "ok"), [
    ({}, "Sunny." + markers.EOS, True),
    ({}, "Let me check." + block(CALL, CALL2) + markers.EOS, True),
    ({}, block(CALL) + markers.EOS, True),
    ({}, "" + markers.EOS, True),
    ({"tool_choice": "required"}, "Sunny." + markers.EOS, False),
    ({"tool_choice": "required"}, block(CALL2) + markers.EOS, True),
    ({"tool_choice": {"type": "function", "function": {"name": "search"}}},
     block(CALL) + markers.EOS, False),
    ({"tool_choice": {"type": "function", "function": {"name": "search"}}},
     block(CALL2) + markers.EOS, True),
    ({"tool_choice": "none"}, "Sunny." + block(CALL) + markers.EOS, False),
    ({"parallel_tool_calls": False}, block(CALL, CALL2) + markers.EOS, False),
    ({"parallel_tool_calls": False}, block(CALL2) + markers.EOS, True),
    ({"thinking": True}, "Hmm." + markers.THINK_CLOSE + "Sunny." + markers.EOS, True),
    ({"thinking": True}, "Hmm." + block(CALL) + markers.EOS, False),  # the swallowed call
    ({"thinking": True}, "Hmm <|DSML|invoke" + markers.THINK_CLOSE + markers.EOS, False),
    ({}, block(CALL) + "more" + markers.EOS, False),  # nothing but EOS after a block
])
def test_request_shapes(tok: V4Tokenizer, kwargs: dict, text: str, ok: bool) -> None:
    spec = turn_spec(TOOLS, **kwargs)
    at, stopped, _ = rejected_at(tok, spec, text)
    assert (at is None and stopped) is ok, (at, stopped)


@pytest.mark.parametrize(("bad", "where"), [
    # An undeclared tool: rejected in its name.
    (block(CALL.replace("get_weather", "get_wether")), 'name="get_we'),
    # An undeclared parameter.
    (block(CALL.replace('"days"', '"dayz"')), 'name="day'),
    # A string parameter written as JSON.
    (block(CALL.replace('"city" string="true"', '"city" string="false"')), 'string="f'),
    # A JSON value outside the schema (minimum 1) and a non-integer.
    (block(CALL.replace(">3<", ">0<")), '"days" string="false">0'),
    (block(CALL.replace(">3<", ">3.5<")), '"days" string="false">3.'),
    # An enum string outside the enum.
    (block(CALL.replace("\n" + markers.INVOKE_CLOSE, "\n" + markers.parameter_open("unit", True)
                        + "k" + markers.PARAMETER_CLOSE + "\n" + markers.INVOKE_CLOSE)), '">k'),
    # A required parameter missing: rejected at the empty line that would end the invoke.
    (block(CALL2.replace(markers.parameter_open("q", True) + "rain" + markers.PARAMETER_CLOSE
                         + "\n", "\n")), 'search">\n\n'),
    # DSML markup inside a string value.
    (block(CALL.replace("Taipei", "Tai<｜DSML｜parameter")), "Tai<｜DSML｜"),
])
def test_bad_calls_rejected_where_they_go_wrong(tok: V4Tokenizer, bad: str, where: str) -> None:
    at, _, upto = rejected_at(tok, turn_spec(TOOLS), bad + markers.EOS)
    assert at is not None
    assert upto.endswith(where) or where in upto[-len(where) - 8:], upto[-60:]


def test_phases_start_where_the_turn_runner_left_off(tok: V4Tokenizer) -> None:
    forced_block = f"\n\n{markers.TOOL_CALLS_OPEN}\n"
    named = forced_block + markers.invoke_open("search") + "\n"
    assert phase_of("", thinking=True, forced=forced_block) == (Phase.REASONING, "")
    assert phase_of("", thinking=True, forced="") == (Phase.TURN, "")
    assert phase_of(markers.THINK_CLOSE + forced_block, thinking=True,
                    forced=forced_block) == (Phase.BLOCK, "")
    assert phase_of(named, thinking=False, forced=named) == (Phase.INVOKE, "search")
    assert phase_of("x" + markers.THINK_CLOSE, thinking=True, forced="") == (Phase.CONTENT, "")
    assert phase_of("half a call <", thinking=False, forced="") is None

    reasoning = turn_spec(TOOLS, thinking=True, tool_choice="required", phase=Phase.REASONING)
    assert rejected_at(tok, reasoning, "Hmm." + markers.THINK_CLOSE)[:2] == (None, True)
    assert rejected_at(tok, reasoning, "Hmm." + markers.EOS)[0] is not None

    in_block = turn_spec(TOOLS, tool_choice="required", phase=Phase.BLOCK)
    rest = block(CALL, CALL2).removeprefix(forced_block) + markers.EOS
    assert rejected_at(tok, in_block, rest)[:2] == (None, True)
    assert rejected_at(tok, in_block, "Sunny" + markers.EOS)[0] == 0

    in_invoke = turn_spec(TOOLS, tool_choice={"type": "function", "function": {"name": "search"}},
                          phase=Phase.INVOKE, invoke_name="search")
    rest = block(CALL2).removeprefix(named) + markers.EOS
    assert rejected_at(tok, in_invoke, rest)[:2] == (None, True)
    with pytest.raises(ValueError, match="no tool"):
        build_lark(turn_spec(TOOLS, phase=Phase.INVOKE, invoke_name="nope"))


def test_response_format_json_schema_enforced(tok: V4Tokenizer) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "strict": True, "schema": {
        "type": "object", "properties": {"answer": {"type": "integer"},
                                         "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["answer", "tags"]}}}
    spec = turn_spec([], response_format=fmt)
    assert rejected_at(tok, spec, '{"answer": 42, "tags": ["a"]}' + markers.EOS)[:2] == (None, True)
    assert rejected_at(tok, spec, '{"answer": "42"' + markers.EOS)[0] is not None
    # strict: no property beyond those listed.
    assert rejected_at(tok, spec, '{"answer": 4, "tags": [], "x": 1}' + markers.EOS)[0] is not None
    assert rejected_at(tok, spec, "Sure: {" + markers.EOS)[0] == 0
    as_object = turn_spec([], response_format={"type": "json_object"})
    assert rejected_at(tok, as_object, '{"a": [1]}' + markers.EOS)[:2] == (None, True)
    assert rejected_at(tok, as_object, "[1]" + markers.EOS)[0] == 0


def test_strict_tool_forbids_extra_nested_properties(tok: V4Tokenizer) -> None:
    tool = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"o": {"type": "object", "properties": {
            "a": {"type": "integer"}}, "required": ["a"]}}, "required": ["o"]}}}
    call = lambda body: block(markers.invoke_open("f") + "\n" + markers.parameter_open("o", False)  # noqa: E731
                              + body + markers.PARAMETER_CLOSE + "\n" + markers.INVOKE_CLOSE)
    assert rejected_at(tok, turn_spec([tool]), call('{"a": 1}') + markers.EOS)[:2] == (None, True)
    assert rejected_at(tok, turn_spec([tool]), call('{"a": 1, "b": 2}') + markers.EOS)[0] is not None


def test_special_token_sets_hold_no_markup(tok: V4Tokenizer) -> None:
    from dsml.grammar import SPECIALS_IN_TEXT, SPECIALS_IN_VALUE
    from dsml.grammar_match import ll_tokenizer

    assert tok.control_ids[markers.THINK_CLOSE] == THINK_CLOSE_ID
    ll = ll_tokenizer()
    for ranges, words in ((SPECIALS_IN_TEXT, FORBIDDEN_IN_TEXT), (SPECIALS_IN_VALUE, ("DSML",))):
        for part in ranges.split(","):
            lo, hi = map(int, part.split("-"))
            for i in range(lo, hi + 1):
                text = tok.token_to_text(i)
                assert not any(w in text for w in words), (i, text)
                assert "tool▁call" not in text, (i, text)
                assert ll.is_special_token(i) or "DSML" not in text.upper(), (i, text)


def test_grammars_compile_and_are_cached() -> None:
    from dsml.grammar import turn_lark

    spec = turn_spec(TOOLS, thinking=True)
    assert validate(turn_lark(spec)) == ""
    assert turn_lark(spec) is turn_lark(turn_spec(TOOLS, thinking=True))
    assert matcher(spec) is not matcher(spec)  # each request gets its own copy


def test_string_lengths_bound_raw_values(tok: V4Tokenizer) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 4}},
        "required": ["s"]}}}
    def call(value: str) -> str:
        return block(markers.invoke_open("f") + "\n" + markers.parameter_open("s", True) + value
                     + markers.PARAMETER_CLOSE + "\n" + markers.INVOKE_CLOSE) + markers.EOS
    spec = turn_spec([tool])
    assert rejected_at(tok, spec, call("北京ab"))[:2] == (None, True)  # 4 code points
    assert rejected_at(tok, spec, call("ab"))[:2] == (None, True)
    assert rejected_at(tok, spec, call("a"))[0] is not None
    assert rejected_at(tok, spec, call("abcde"))[0] is not None


def test_no_dsml_pattern_is_exactly_no_dsml() -> None:
    import itertools

    from dsml.grammar import NO_DSML_PATTERN

    pattern = re.compile(NO_DSML_PATTERN, re.DOTALL)
    for n in range(9):
        for chars in itertools.product("DSMLx\n", repeat=n):
            text = "".join(chars)
            assert (pattern.match(text) is not None) == ("DSML" not in text), text


def test_markup_inside_json_strings_rejected(tok: V4Tokenizer) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"o": {"type": "object", "properties": {
            "notes": {"type": "array", "items": {"type": "string"}}}}}, "required": ["o"]}}}
    def call(body: str) -> str:
        return block(markers.invoke_open("f") + "\n" + markers.parameter_open("o", False) + body
                     + markers.PARAMETER_CLOSE + "\n" + markers.INVOKE_CLOSE) + markers.EOS
    spec = turn_spec([tool])
    assert rejected_at(tok, spec, call('{"notes": ["a DSM b", "SML"]}'))[:2] == (None, True)
    at, _, upto = rejected_at(tok, spec, call('{"notes": ["x</｜DSML｜parameter>"]}'))
    assert at is not None and upto.endswith("｜DSML｜"), upto


def test_formats_llguidance_lacks_leave_the_turn_constrained(tok: V4Tokenizer) -> None:
    """OpenAPI-style formats llguidance does not know (`int32`, `uri-reference`) would fail
    the whole grammar (and the turn would go unconstrained): they are dropped, the formats it
    knows are kept and enforced, and a property *named* "format" is left alone."""
    from dsml.grammar import _known_formats_only, turn_lark

    schema = {"type": "object", "properties": {
        "format": {"type": "string", "format": "date"},
        "ref": {"type": "string", "format": "uri-reference"},
        "n": {"type": "integer", "format": "int32", "default": {"format": "int32"}}},
        "required": ["format", "ref", "n"]}
    kept = _known_formats_only(schema)
    assert kept["properties"]["format"] == {"type": "string", "format": "date"}
    assert "format" not in kept["properties"]["ref"]
    assert kept["properties"]["n"] == {"type": "integer", "default": {"format": "int32"}}
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"o": schema}, "required": ["o"]}}}
    def call(body: str) -> str:
        return block(markers.invoke_open("f") + "\n" + markers.parameter_open("o", False) + body
                     + markers.PARAMETER_CLOSE + "\n" + markers.INVOKE_CLOSE) + markers.EOS
    spec = turn_spec([tool])
    assert validate(turn_lark(spec)) == ""
    good = '{"format": "2026-12-07", "ref": "../a", "n": 3}'
    assert rejected_at(tok, spec, call(good))[:2] == (None, True)
    assert rejected_at(tok, spec, call(good.replace("2026-12-07", "soon")))[0] is not None
    assert rejected_at(tok, spec, call(good.replace("../a", "<｜DSML｜invoke")))[0] is not None
    answer = turn_spec([], response_format={"type": "json_schema", "json_schema": {
        "name": "r", "schema": {"type": "object", "properties": {
            "id": {"type": "string", "format": "byte"}}, "required": ["id"]}}})
    assert rejected_at(tok, answer, '{"id": "QUJD"}' + markers.EOS)[:2] == (None, True)
