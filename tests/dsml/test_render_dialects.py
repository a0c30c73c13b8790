"""What V4.1 and V3.2 render differently from V4 (dsml.md section 2, issue 6)."""

from __future__ import annotations

from typing import Any

import pytest

from dsml import Dialect, RenderError, UnsupportedError, render_chat, render_messages
from dsml import markers as mk

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object"}},
}


def budget_prefix(budget: int) -> str:
    return (
        f"{mk.SYSTEM}Reasoning Effort: {budget} "
        "(range 1-100, the higher the value, the more thorough the reasoning)\n\n"
    )


def request(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "deepseek-v4.1-flash", "messages": list(messages), **fields}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


# --- V4.1 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("effort", "budget"),
    [
        (None, 75),
        ("minimal", 50),
        ("low", 50),
        ("medium", 75),
        ("high", 75),
        ("xhigh", 75),
        ("max", 100),
        (1, 1),
        (63, 63),
        (100, 100),
    ],
)
def test_v41_effort_budget(effort: Any, budget: int) -> None:
    fields = {} if effort is None else {"reasoning_effort": effort}
    prompt = render_chat(request(user("hi"), **fields), dialect=Dialect.V4_1)
    assert prompt.text == f"{mk.BOS}{budget_prefix(budget)}{mk.USER}hi{mk.ASSISTANT}{mk.THINK_OPEN}"
    assert [s.text for s in prompt.segments if s.control][:2] == [mk.BOS, mk.SYSTEM]


@pytest.mark.parametrize("effort", [0, 101, -5, True, 7.5, "extreme"])
def test_v41_rejects_budgets_outside_1_to_100(effort: Any) -> None:
    with pytest.raises(RenderError) as err:
        render_chat(request(user("hi"), reasoning_effort=effort), dialect=Dialect.V4_1)
    assert err.value.param == "reasoning_effort"


def test_integer_effort_is_v41_only() -> None:
    with pytest.raises(RenderError):
        render_chat(request(user("hi"), reasoning_effort=60), dialect=Dialect.V4)


def test_v41_system_prompt_shares_the_effort_turn() -> None:
    prompt = render_chat(
        request({"role": "system", "content": "S"}, user("hi")), dialect=Dialect.V4_1
    )
    assert prompt.text == f"{mk.BOS}{budget_prefix(75)}S{mk.USER}hi{mk.ASSISTANT}{mk.THINK_OPEN}"
    chat = render_chat(
        request({"role": "system", "content": "S"}, user("hi"), thinking={"type": "disabled"}),
        dialect=Dialect.V4_1,
    )
    assert chat.text == f"{mk.BOS}{mk.SYSTEM}S{mk.USER}hi{mk.ASSISTANT}{mk.THINK_CLOSE}"


def test_v41_mid_conversation_system_message_is_its_own_turn() -> None:
    answer = {"role": "assistant", "content": "A", "reasoning_content": "R"}
    body = request(
        user("q"),
        answer,
        {"role": "developer", "content": "Now in French."},
        reasoning_effort="low",
    )
    prompt = render_chat(body, dialect=Dialect.V4_1)
    # The system turn is the latest instruction: it gets the generation prompt, and the
    # answer before it loses its reasoning (drop_thinking counts it as a user turn).
    assert prompt.text == (
        f"{mk.BOS}{budget_prefix(50)}{mk.USER}q{mk.ASSISTANT}{mk.THINK_CLOSE}A{mk.EOS}"
        f"{mk.SYSTEM}Now in French.{mk.ASSISTANT}{mk.THINK_OPEN}"
    )
    # V4 has no system turn: the same instruction joins the front system prompt.
    v4 = render_chat(body, dialect=Dialect.V4)
    assert v4.text.startswith(f"{mk.BOS}Now in French.{mk.USER}q")


def test_v41_spaced_tags_in_tools_and_history() -> None:
    call = {
        "id": "c",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    body = request(
        user("weather?"),
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c", "content": "snow"},
        tools=[WEATHER],
    )
    text = render_chat(body, dialect=Dialect.V4_1).text
    assert '"<｜DSML｜ calls>" block like the following' in text
    assert (
        '<｜DSML｜ calls>\n<｜DSML｜ invoke name="get_weather">\n'
        '<｜DSML｜ parameter name="city" string="true">Oslo</｜DSML｜ parameter>\n'
        "</｜DSML｜ invoke>\n</｜DSML｜ calls>"
    ) in text
    assert "tool_calls>" not in text


def test_v41_json_object_renders_the_format_object_as_schema() -> None:
    prompt = render_chat(
        request(user("JSON please"), response_format={"type": "json_object"}), dialect=Dialect.V4_1
    )
    assert (
        '## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{"type": "json_object"}'
        in prompt.text
    )


@pytest.mark.parametrize("dialect", list(Dialect))
def test_image_parts_are_unsupported_in_every_dialect(dialect: Dialect) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    with pytest.raises(UnsupportedError) as err:
        render_chat(request({"role": "user", "content": [image]}), dialect=dialect)
    assert err.value.status_code == 400


# --- V3.2 ---------------------------------------------------------------------------------


def v32_tool_conversation(**fields: Any) -> dict[str, Any]:
    calls = [
        {
            "id": "a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "A"}'},
        },
        {
            "id": "b",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "B"}'},
        },
    ]
    return request(
        {"role": "system", "content": "S"},
        user("two cities"),
        {"role": "assistant", "content": "", "reasoning_content": "R", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "a", "content": "sun"},
        {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "rain"}]},
        tools=[WEATHER],
        **fields,
    )


def test_v32_function_calls_and_results() -> None:
    text = render_chat(v32_tool_conversation(), dialect=Dialect.V3_2).text
    assert text.startswith(
        f"{mk.BOS}S\n\n## Tools\n\nYou have access to a set of tools you can use"
    )
    assert text.endswith(
        f"{mk.USER}two cities{mk.ASSISTANT}{mk.THINK_OPEN}R{mk.THINK_CLOSE}\n\n"
        '<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">A</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        '<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">B</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        f"</｜DSML｜function_calls>{mk.EOS}\n\n<function_results>\n<result>sun</result>\n"
        f"<result>rain</result>\n</function_results>\n\n{mk.THINK_OPEN}"
    )


def test_v32_has_no_effort_prompt() -> None:
    for effort in ("low", "max", None):
        fields = {} if effort is None else {"reasoning_effort": effort}
        text = render_chat(request(user("hi"), **fields), dialect=Dialect.V3_2).text
        assert text == f"{mk.BOS}{mk.USER}hi{mk.ASSISTANT}{mk.THINK_OPEN}"


def test_v32_drops_earlier_reasoning_even_with_tools() -> None:
    body = v32_tool_conversation()
    body["messages"] += [
        {"role": "assistant", "content": "done", "reasoning_content": "R2"},
        user("again"),
    ]
    text = render_chat(body, dialect=Dialect.V3_2).text
    assert "R2" not in text and ">R<" not in text.replace(mk.THINK_OPEN, "<").replace(
        mk.THINK_CLOSE, "<"
    )
    assert text.endswith(f"{mk.USER}again{mk.ASSISTANT}{mk.THINK_OPEN}")


def test_v32_rejects_reminders_and_results_without_calls() -> None:
    with pytest.raises(RenderError):
        render_chat(
            request({"role": "latest_reminder", "content": "x"}, user("hi")), dialect=Dialect.V3_2
        )
    with pytest.raises(RenderError):
        render_messages(
            [user("hi"), {"role": "tool", "tool_call_id": "a", "content": "x"}],
            "thinking",
            Dialect.V3_2,
        )


def test_v32_developer_message_in_deepseek_format() -> None:
    prompt = render_messages([{"role": "developer", "content": "Do it."}], "chat", Dialect.V3_2)
    assert (
        prompt.text
        == f"{mk.BOS}{mk.USER}\n\n# The user's message is: Do it.{mk.ASSISTANT}{mk.THINK_CLOSE}"
    )
