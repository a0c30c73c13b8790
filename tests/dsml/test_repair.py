"""dsml.repair (lxml's recovering parser) and lxml as an independent oracle for the parser."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from dsml import markers, repair
from dsml.parser import parse_completion
from tests.dsml.conftest import vectors


def test_normalise_every_spelling() -> None:
    text = (
        '<｜DSML｜tool_calls><｜｜DSML｜｜invoke name=“a”><|DSML|parameter name="k">v</DSML｜parameter>'
        "</｜DSML｜ invoke></｜DSML｜function_calls>"
    )
    assert repair.normalise(text) == (
        '<tool_calls><invoke name="a"><parameter name="k">v</parameter></invoke></tool_calls>'
    )


def test_read_invokes_recovers_unclosed_tags() -> None:
    text = '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">x'
    found = repair.read_invokes(text)
    assert [(i.name, i.params) for i in found] == [("f", [("a", "true", "x")])]


def test_read_invokes_json_body() -> None:
    found = repair.read_invokes('<invoke name="f">{"a": 1}</invoke>')
    assert found[0].name == "f" and json.loads(found[0].body) == {"a": 1}


def test_read_parameters_none_when_nothing_found() -> None:
    assert repair.read_parameters("just words") is None
    assert repair.read_parameters('<parameter name="a">1</parameter>') == [("a", None, "1")]


def test_entities_are_not_expanded() -> None:
    found = repair.read_invokes(
        '<!DOCTYPE r [<!ENTITY e "boom">]><invoke name="f"><parameter name="a">&e;</parameter></invoke>'
    )
    assert all("boom" not in p[2] for inv in found for p in inv.params)


def test_lxml_oracle_agrees_on_well_formed_vector_blocks() -> None:
    """Vector blocks whose names and values are XML text (no <, >, &; no newline in a name):
    lxml reads the same calls as the parser."""
    compared = 0
    for vec in vectors("v4"):
        calls = vec["expected"]["tool_calls"]
        if not calls or any(c in json.dumps(calls, ensure_ascii=False) for c in "<>&"):
            continue
        # XML normalises whitespace inside attribute values (the parameter names).
        if any(ch in key for c in calls for key in c["arguments"] for ch in "\t\n\r"):
            continue
        text = vec["completion"].removesuffix(markers.EOS)
        block = text[text.index(markers.TOOL_CALLS_OPEN) :]
        found = repair.read_invokes(block)
        result = parse_completion(vec["completion"], vec["tools"], vec["thinking"])
        assert [inv.name for inv in found] == [c.name for c in result.tool_calls]
        for inv, call in zip(found, result.tool_calls, strict=True):
            oracle = {k: (v if attr == "true" else json.loads(v)) for k, attr, v in inv.params}
            assert oracle == call.arguments == calls[result.tool_calls.index(call)]["arguments"]
            compared += 1
    assert compared > 50


# The oracle's normalise() turns typographic quotes into `"` (a tolerance for attributes),
# so values that contain them are not comparable with it.
_SAFE = st.text(
    alphabet=st.characters(blacklist_characters="<>&\"'\r“”", blacklist_categories=("Cs", "Cc")),
    max_size=30,
)
_VALUES = st.one_of(_SAFE, st.integers(), st.booleans(), st.none(), st.lists(st.integers(), max_size=3),
                    st.floats(allow_nan=False, allow_infinity=False))  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True), _VALUES, max_size=4))
def test_lxml_oracle_agrees_on_rendered_calls(args: dict) -> None:
    params = "\n".join(
        markers.parameter_open(k, isinstance(v, str))
        + (v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
        + markers.PARAMETER_CLOSE
        for k, v in args.items()
    )
    block = f"{markers.TOOL_CALLS_OPEN}\n{markers.invoke_open('f')}\n{params}\n{markers.INVOKE_CLOSE}\n{markers.TOOL_CALLS_CLOSE}"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    result = parse_completion("\n\n" + block + markers.EOS, tools, False)
    (inv,) = repair.read_invokes(block)
    oracle = {k: (v if attr == "true" else json.loads(v)) for k, attr, v in inv.params}
    assert [c.arguments for c in result.tool_calls] == [oracle] == [args]
