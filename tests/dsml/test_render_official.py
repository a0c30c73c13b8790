"""DeepSeek's own golden prompts, rendered from DeepSeek's own message format.

Each case is run the way its `cases.json` says (tests/data/dsml/dialects/*/official/); the
top-level `official/` set is the first V4 release's, run like the v4-0731 copy of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsml import Dialect, render_messages

DATA = Path(__file__).parents[1] / "data" / "dsml"

# The four V4 goldens: case 1 is {"tools", "messages"}; cases 2-4 are bare message lists.
V4_CASES = [
    {"input": f"test_input_{n}.json", "output": f"test_output_{n}.txt", "thinking_mode": mode}
    for n, mode in [(1, "thinking"), (2, "thinking"), (3, "thinking"), (4, "chat")]
]


def load_messages(path: Path) -> list[dict]:
    """The goldens' convention: a dict input carries tools for the first message."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list):
        return data
    messages = data["messages"]
    if data.get("tools"):
        messages[0]["tools"] = data["tools"]
    return messages


def dialect_cases(dialect: str) -> list[tuple[str, dict]]:
    folder = DATA / "dialects" / dialect / "official"
    spec = json.loads((folder / "cases.json").read_text(encoding="utf-8"))
    return [(dialect, case) for case in spec["cases"]]


def expected_output(folder: Path, case: dict) -> str:
    text = (folder / case["output"]).read_text(encoding="utf-8")
    return text.strip() if case.get("strip_output") else text


@pytest.mark.parametrize("case", V4_CASES, ids=lambda c: c["input"])
def test_v4_official_goldens(case: dict) -> None:
    folder = DATA / "official"
    prompt = render_messages(
        load_messages(folder / case["input"]), case["thinking_mode"], Dialect.V4
    )
    assert prompt.text == expected_output(folder, case)


@pytest.mark.parametrize(
    ("dialect", "case"),
    [*dialect_cases("v4-0731"), *dialect_cases("v4.1"), *dialect_cases("v3.2")],
    ids=lambda x: x if isinstance(x, str) else f"{x['input']}-{x.get('reasoning_effort')}",
)
def test_dialect_official_goldens(dialect: str, case: dict) -> None:
    folder = DATA / "dialects" / dialect / "official"
    prompt = render_messages(
        load_messages(folder / case["input"]),
        case["thinking_mode"],
        dialect,
        reasoning_effort=case.get("reasoning_effort"),
    )
    assert prompt.text == expected_output(folder, case)


def test_official_thinking_flag_follows_the_prompt_end() -> None:
    # Golden 2 ends with an assistant turn; appending a user turn asks for a new answer.
    messages = load_messages(DATA / "official" / "test_input_2.json")
    closed = render_messages(messages, "thinking")
    assert closed.text.endswith("<｜end▁of▁sentence｜>") and not closed.thinking
    opened = render_messages([*messages, {"role": "user", "content": "And Spain?"}], "thinking")
    assert opened.text.endswith("<｜User｜>And Spain?<｜Assistant｜><think>") and opened.thinking
    chat = render_messages([*messages, {"role": "user", "content": "And Spain?"}], "chat")
    assert chat.text.endswith("<｜Assistant｜></think>") and not chat.thinking
