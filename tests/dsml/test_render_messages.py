"""`render_messages` on DeepSeek's own format: the reference's rules and this port's stricter errors."""

from __future__ import annotations

from typing import Any

import pytest

from dsml import RenderError, render_messages
from dsml import markers as mk


def test_latest_reminder_and_task_tokens() -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "latest_reminder", "content": "2026-01-01"},
        {"role": "user", "content": "q", "task": "action"},
        {"role": "assistant", "content": "Search"},
    ]
    prompt = render_messages(messages, "thinking")
    assert prompt.text == (
        f"{mk.BOS}S{mk.LATEST_REMINDER}2026-01-01{mk.USER}q{mk.ASSISTANT}{mk.THINK_OPEN}"
        f"<｜action｜>Search{mk.EOS}"
    )
    assert [s.text for s in prompt.segments if s.control][-2:] == ["<｜action｜>", mk.EOS]


def test_wo_eos_leaves_the_turn_open() -> None:
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "par", "wo_eos": True},
    ]
    prompt = render_messages(messages, "chat")
    assert prompt.text.endswith(f"{mk.THINK_CLOSE}par")
    assert prompt.prefix == "par"


def test_max_effort_prefix_comes_before_the_first_message() -> None:
    prompt = render_messages(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}],
        "thinking",
        "v4",
        "max",
    )
    assert prompt.text.startswith(f"{mk.BOS}Reasoning Effort: Absolute maximum")
    assert prompt.text.endswith(f"\n\nS{mk.USER}q{mk.ASSISTANT}{mk.THINK_OPEN}")


@pytest.mark.parametrize(
    ("messages", "kwargs", "param"),
    [
        ([], {}, "messages"),
        ([{"role": "wizard", "content": "x"}], {}, "messages[0].role"),
        ([{"role": "user", "content": "x"}], {"thinking_mode": "deep"}, "thinking_mode"),
        ([{"role": "user", "content": "x"}], {"reasoning_effort": "ultra"}, "reasoning_effort"),
        ([{"role": "user", "content": "x"}], {"dialect": "v0"}, "dialect"),
        ([{"role": "developer", "content": ""}], {}, "messages[0].content"),
        ([{"role": "user", "content": "x", "task": "dance"}], {}, "messages[0].task"),
        ([{"role": "user", "content": ["x"]}], {}, "messages[0].content"),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "tool", "tool_call_id": "c", "content": [{"type": "image_url"}]},
            ],
            {},
            "messages[1].content[0]",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
                },
            ],
            {},
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]},
            ],
            {},
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            [{"role": "system", "content": "s", "tools": [{"type": "function"}]}],
            {},
            "messages[0].tools[0]",
        ),
    ],
)
def test_bad_messages_raise_render_error(messages: Any, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(RenderError) as err:
        render_messages(messages, **{"thinking_mode": "thinking", **kwargs})
    assert err.value.param == param
