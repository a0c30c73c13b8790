"""`forced_opener`: which text forces which tool choice."""

from __future__ import annotations

from typing import Any

import pytest

from dsml.prompt import Prompt, Segment
from proxy.turn import FORCED_BLOCK, forced_opener

TOOLS = [{"type": "function", "function": {"name": "a.b-c", "parameters": {}}}]


def prompt(tool_choice: Any, tools: list | None = None) -> Prompt:
    return Prompt([Segment("x")], tools=TOOLS if tools is None else tools,
                  tool_choice=tool_choice)


@pytest.mark.parametrize(("choice", "expected"), [
    ("auto", ""),
    ("none", ""),
    ("required", "\n\n<｜DSML｜tool_calls>\n"),
    ({"type": "function", "function": {"name": "a.b-c"}},
     '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="a.b-c">\n'),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": []}}, FORCED_BLOCK),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}, ""),
])
def test_forced_opener(choice: Any, expected: str) -> None:
    assert forced_opener(prompt(choice)) == expected


def test_no_tools_never_forces() -> None:
    assert forced_opener(prompt("required", tools=[])) == ""


@pytest.mark.parametrize(("dialect", "block", "invoke"), [
    ("v4", "<｜DSML｜tool_calls>", "<｜DSML｜invoke"),
    ("v4-0731", "<｜DSML｜tool_calls>", "<｜DSML｜invoke"),
    ("v4.1", "<｜DSML｜ calls>", "<｜DSML｜ invoke"),
    ("v3.2", "<｜DSML｜function_calls>", "<｜DSML｜invoke"),
])
def test_each_dialect_forces_with_its_own_tags(dialect: str, block: str, invoke: str) -> None:
    assert forced_opener(prompt("required"), dialect) == f"\n\n{block}\n"
    named = {"type": "function", "function": {"name": "a.b-c"}}
    assert forced_opener(prompt(named), dialect) == f'\n\n{block}\n{invoke} name="a.b-c">\n'
