"""Whatever a client sends, rendering answers with a prompt or one typed 400 error."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsml import Dialect, DsmlError, render_chat, render_messages

# Field names and values the renderer looks at, so random bodies reach deep code paths.
KEYS = [
    "role", "content", "tool_calls", "tool_call_id", "function", "name", "arguments", "id",
    "type", "text", "reasoning_content", "reasoning", "prefix", "task", "tools", "parameters",
    "properties", "required", "strict", "schema", "json_schema", "thinking", "model",
    "tool_choice", "response_format", "reasoning_effort", "chat_template_kwargs",
    "description", "additionalProperties", "items", "wo_eos",
]  # fmt: skip
MESSAGE_KEYS = [
    "content",
    "tool_calls",
    "tool_call_id",
    "reasoning_content",
    "reasoning",
    "prefix",
    "task",
    "tools",
]
REQUEST_KEYS = [
    "thinking",
    "tool_choice",
    "tools",
    "response_format",
    "reasoning_effort",
    "chat_template_kwargs",
]
WORDS = [
    "user", "assistant", "tool", "system", "developer", "latest_reminder", "function", "text",
    "image_url", "json_object", "json_schema", "enabled", "none", "auto", "required", "max",
    "c1", "object", "{}", '{"a": 1}', "[1]", "json",
]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.sampled_from(WORDS)
    | st.text(max_size=5)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)
    ),
    max_leaves=6,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "tool", "system", "developer", "x"])},
        optional={key: values for key in MESSAGE_KEYS},
    ),
    max_size=4,
)
bodies = st.fixed_dictionaries(
    {"model": st.just("m"), "messages": messages},
    optional={key: values for key in REQUEST_KEYS},
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies, st.sampled_from(list(Dialect)))
def test_random_requests_render_or_raise_a_typed_error(
    body: dict[str, Any], dialect: Dialect
) -> None:
    for render in (
        lambda: render_chat(body, dialect=dialect),
        lambda: render_messages(body["messages"], "thinking", dialect),
    ):
        try:
            prompt = render()
        except DsmlError as err:
            assert err.status_code == 400
        else:
            assert prompt.text.startswith("<｜begin▁of▁sentence｜>")
