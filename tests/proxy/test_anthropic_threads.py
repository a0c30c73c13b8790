"""Anthropic message threads on /v1/messages (issue 12, item 4), with the SDK's own agent
loop: `client.beta.messages.tool_runner` sends `thread: {"type": "create"}`, then only the
new tool result with `thread: {"type": "continue", "previous_message_id": …}`."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import anthropic
import pytest
from anthropic.lib.tools import beta_async_tool

from proxy.response_store import app_store
from tests.fakes.upstream import FakeUpstream
from tests.proxy.conftest import ProxyServer, StartProxy
from tests.proxy.test_anthropic import client_for

EOS = "<｜end▁of▁sentence｜>"
CALL = ("Let me look.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
        "<｜DSML｜parameter name=\"city\" string=\"true\">Taipei</｜DSML｜parameter>\n"
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS)
ANSWER = "It is sunny in Taipei." + EOS
SYSTEM = "You are the weather desk."
USER = "Weather in Taipei?"


def weather_tool(seen: list[str]) -> Any:
    @beta_async_tool
    async def get_weather(city: str) -> str:
        """The weather of a city.

        Args:
            city: the city's name.
        """
        seen.append(city)
        return f"sunny in {city}"
    return get_weather


async def run_tool_runner(proxy: ProxyServer, stream: bool) -> tuple[list[str], list[Any]]:
    seen: list[str] = []
    async with client_for(proxy) as client:
        runner = client.beta.messages.tool_runner(
            model="deepseek-chat", max_tokens=1024, system=SYSTEM,
            messages=[{"role": "user", "content": USER}], tools=[weather_tool(seen)],
            stream=stream)
        messages = []
        async for item in runner:
            messages.append(await item.get_final_message() if stream else item)
    return seen, messages


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_runner_two_turns_on_a_thread(
        proxy: ProxyServer, fake: FakeUpstream, stream: bool) -> None:
    fake.push(CALL, ANSWER)
    seen, messages = await run_tool_runner(proxy, stream)
    assert seen == ["Taipei"]
    assert [m.stop_reason for m in messages] == ["tool_use", "end_turn"]
    assert messages[-1].content[0].text == "It is sunny in Taipei."
    assert len(fake.requests) == 2
    # Turn 2 sent only the tool result; the server rendered the whole conversation from the
    # thread: system, tools, the user's question, its own call and the result.
    prompt = fake.prompt_text()
    assert prompt.count(SYSTEM) == 1 and prompt.count(USER) == 1
    assert "get_weather" in prompt.split(USER)[0]  # the tools section, from the thread
    assert "Taipei</｜DSML｜parameter>" in prompt and "sunny in Taipei" in prompt


async def test_tool_runner_replays_when_the_thread_expired(
        proxy: ProxyServer, fake: FakeUpstream) -> None:
    """`thread_not_found` (404) makes the SDK send the whole history under a new thread."""
    fake.push(CALL, ANSWER)
    store = app_store(proxy.app)
    original_get = store.get
    store.get = lambda key: None  # every stored reply has expired
    try:
        seen, messages = await run_tool_runner(proxy, stream=False)
    finally:
        store.get = original_get
    assert seen == ["Taipei"] and messages[-1].stop_reason == "end_turn"
    assert len(fake.requests) == 2  # the refused continue never reached the engine
    assert fake.prompt_text().count(USER) == 1


async def post(proxy: ProxyServer, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/messages", json=body) as r:
        return r.status, await r.json()


async def test_unknown_or_expired_threads_are_refused_clearly(
        start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy(response_store_ttl_s=0.05)
    base = {"model": "deepseek-chat", "max_tokens": 64,
            "messages": [{"role": "user", "content": "hi"}]}
    status, body = await post(proxy, {**base, "thread": {"type": "continue",
                                                         "previous_message_id": "msg_nope"}})
    assert status == 404
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert body["error"]["details"] == {"error_code": "thread_not_found"}
    assert "msg_nope" in body["error"]["message"]
    # The SDK's own exception for it.
    async with client_for(proxy) as client:
        with pytest.raises(anthropic.NotFoundError) as refused:
            await client.beta.messages.create(**base, thread={
                "type": "continue", "previous_message_id": "msg_nope"})
    assert refused.value.error_code == "thread_not_found"

    # A stored reply expires: then its id is refused the same way.
    fake.push("Hello." + EOS)
    status, created = await post(proxy, {**base, "thread": {"type": "create"}})
    assert status == 200
    await asyncio.sleep(0.1)
    status, body = await post(proxy, {**base, "thread": {"type": "continue",
                                                         "previous_message_id": created["id"]}})
    assert status == 404 and body["error"]["details"]["error_code"] == "thread_not_found"
    # A continue that repeats the thread's create-only fields, or lacks its id: 400.
    fake.push("Hello." + EOS)
    status, created = await post(proxy, {**base, "thread": {"type": "create"}})
    for thread, extra in (({"type": "continue", "previous_message_id": created["id"]},
                           {"system": "again"}),
                          ({"type": "continue"}, {})):
        status, body = await post(proxy, {**base, **extra, "thread": thread})
        assert status == 400 and body["error"]["type"] == "invalid_request_error", body
    # No thread, no store entry: nothing to continue from.
    fake.push("Hello." + EOS)
    status, plain = await post(proxy, base)
    status, body = await post(proxy, {**base, "thread": {"type": "continue",
                                                         "previous_message_id": plain["id"]}})
    assert status == 404 and body["error"]["details"]["error_code"] == "thread_not_found"
