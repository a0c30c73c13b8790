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
