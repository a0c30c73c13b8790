"""Reasoning this server produced for a tool call comes back when a client drops it."""

from __future__ import annotations

from typing import Any

from proxy.reasoning_cache import ReasoningCache
from tests.fakes.upstream import FakeUpstream
from tests.proxy.conftest import StartProxy
from tests.proxy.test_turn_policy import ARGS, BLOCK, INVOKE, WEATHER

REASONING = "The user asks about Paris; reasoning-marker-7f3 says call get_weather."


def history(call_id: str, reasoning: str | None = None) -> list[dict[str, Any]]:
    assistant: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    if reasoning is not None:
        assistant["reasoning_content"] = reasoning
    return [{"role": "user", "content": "Weather in Paris?"}, assistant,
            {"role": "tool", "tool_call_id": call_id, "content": "sunny"}]


async def test_backfill_after_client_drops_reasoning(start_proxy: StartProxy,
                                                     fake: FakeUpstream) -> None:
    proxy = await start_proxy()
    client = proxy.client()
    fake.push(REASONING + "</think>" + BLOCK + INVOKE + ARGS,
              "Done.</think>It is sunny.<｜end▁of▁sentence｜>")
    first = await client.chat.completions.create(
        model="deepseek-reasoner", messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=WEATHER)
    call_id = first.choices[0].message.tool_calls[0].id
    await client.chat.completions.create(model="deepseek-reasoner", messages=history(call_id),
                                         tools=WEATHER)
    assert REASONING + "</think>" in fake.prompt_text(1)

    # A server that never produced this call has nothing to put back.
    other = await start_proxy()
    fake.push("Done.</think>It is sunny.<｜end▁of▁sentence｜>")
    await other.client().chat.completions.create(model="deepseek-reasoner",
                                                 messages=history(call_id), tools=WEATHER)
    assert REASONING not in fake.prompt_text(2)

    # Reasoning the client did send is kept as sent.
    fake.push("Done.</think>It is sunny.<｜end▁of▁sentence｜>")
    await client.chat.completions.create(
        model="deepseek-reasoner", messages=history(call_id, "client's own reasoning"),
        tools=WEATHER)
    assert "client's own reasoning</think>" in fake.prompt_text(3)
    assert REASONING not in fake.prompt_text(3)


def test_cache_is_a_bounded_lru() -> None:
    cache = ReasoningCache(max_entries=2)
    cache.put("a", "ra")
    cache.put("b", "rb")
    assert cache.get("a") == "ra"  # a is now the most recent
    cache.put("c", "rc")
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == ("ra", None, "rc")
    assert len(cache) == 2
    disabled = ReasoningCache(max_entries=0)
    disabled.put("a", "ra")
    assert disabled.get("a") is None
