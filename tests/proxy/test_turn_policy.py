"""Forced tool choice, parallel_tool_calls=false and empty-turn recovery, end to end."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.upstream import FakeUpstream, Reply
from tests.proxy.conftest import ProxyServer, StartProxy, load_cases

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string"}}}}}]
BLOCK = "\n\n<｜DSML｜tool_calls>\n"
INVOKE = '<｜DSML｜invoke name="get_weather">\n'
ARGS = ('<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>")
EOS = "<｜end▁of▁sentence｜>"
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


async def scrape(proxy: ProxyServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    client = proxy.client()
    resp = await client._client.get(proxy.url + "/metrics")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def collect_stream(client: Any, **kwargs: Any) -> Any:
    state = ChatCompletionStreamState()
    async for chunk in await client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}):
        state.handle_chunk(chunk)
    return state.get_final_completion()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", "named"])
async def test_forced_tool_choice_chat_mode(proxy: ProxyServer, fake: FakeUpstream,
                                            choice: str, stream: bool) -> None:
    if choice == "required":
        tool_choice: Any = "required"
        fake.push(INVOKE + ARGS)
        opener = BLOCK
    else:
        tool_choice = {"type": "function", "function": {"name": "get_weather"}}
        fake.push(ARGS)
        opener = BLOCK + INVOKE
    client = proxy.client()
    kwargs = {"model": "deepseek-chat", "messages": MESSAGES, "tools": WEATHER,
              "tool_choice": tool_choice}
    if stream:
        resp = await collect_stream(client, **kwargs)
    else:
        resp = await client.chat.completions.create(**kwargs)
    assert len(fake.requests) == 1
    assert fake.prompt_text(0).endswith("<｜Assistant｜></think>" + opener)
    message = resp.choices[0].message
    assert [c.function.name for c in message.tool_calls] == ["get_weather"]
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert message.content is None
    assert resp.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", "named"])
async def test_forced_tool_choice_thinking_mode(proxy: ProxyServer, fake: FakeUpstream,
                                                choice: str, stream: bool) -> None:
    named = choice == "named"
    tool_choice: Any = ({"type": "function", "function": {"name": "get_weather"}} if named
                        else "required")
    # Phase 1 is cut at the `</think>` stop string; what follows must never be seen.
    fake.push("Paris, so get_weather.</think>An answer that must not appear." + EOS,
              (ARGS if named else INVOKE + ARGS))
    client = proxy.client()
    kwargs = {"model": "deepseek-reasoner", "messages": MESSAGES, "tools": WEATHER,
              "tool_choice": tool_choice}
    if stream:
        resp = await collect_stream(client, **kwargs)
    else:
        resp = await client.chat.completions.create(**kwargs)
    assert len(fake.requests) == 2
    assert fake.requests[0]["stop"] == ["</think>"]
    assert fake.prompt_text(0).endswith("<｜Assistant｜><think>")
    opener = BLOCK + (INVOKE if named else "")
    assert fake.prompt_text(1).endswith("<think>Paris, so get_weather.</think>" + opener)
    assert "stop" not in fake.requests[1]
    message = resp.choices[0].message
    assert message.reasoning_content == "Paris, so get_weather."  # type: ignore[attr-defined]
    assert message.content is None
    assert [c.function.name for c in message.tool_calls] == ["get_weather"]
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert resp.usage.completion_tokens_details.reasoning_tokens > 0


@pytest.mark.parametrize("stream", [False, True])
async def test_parallel_tool_calls_false_stops_after_first(proxy: ProxyServer,
                                                           fake: FakeUpstream,
                                                           stream: bool) -> None:
    case = next(c for c in load_cases("parse.jsonl").values()
                if len(c["expected"]["tool_calls"]) == 3 and not c["thinking"])
    fake.push(Reply(case["completion"], token_delay_s=0.005))
    client = proxy.client()
    kwargs = {"model": "deepseek-chat", "messages": MESSAGES, "tools": case["tools"],
              "parallel_tool_calls": False}
    if stream:
        resp = await collect_stream(client, **kwargs)
    else:
        resp = await client.chat.completions.create(**kwargs)
    message = resp.choices[0].message
    first = case["expected"]["tool_calls"][0]
    assert len(message.tool_calls) == 1
    assert message.tool_calls[0].function.name == first["name"]
    assert json.loads(message.tool_calls[0].function.arguments) == first["arguments"]
    assert resp.choices[0].finish_reason == "tool_calls"
    assert (message.content or "") == case["expected"]["content"]
    # The proxy hung up on the engine instead of letting it write the other two calls.
    await asyncio.wait_for(fake.disconnected.wait(), 5)
    samples = await scrape(proxy)
    assert metric(samples, "dsml_proxy_tool_turns_total",
                  endpoint="chat_completions", outcome="tool_calls") == 1
    assert metric(samples, "dsml_proxy_tool_turns_total",
                  endpoint="chat_completions", outcome="truncated") == 0


def _recovering_responder(body: dict[str, Any], fake: FakeUpstream) -> Reply:
    prompt = fake.tokenizer.decode(body["prompt"])
    if prompt.endswith("</think>"):
        return Reply(BLOCK.lstrip("\n") + INVOKE + ARGS)
    return Reply("The user wants the weather. I should call get_weather for Paris." + EOS)


@pytest.mark.parametrize("stream", [False, True])
async def test_empty_turn_is_recovered(proxy: ProxyServer, fake: FakeUpstream,
                                       stream: bool) -> None:
    fake.responder = lambda body: _recovering_responder(body, fake)
    client = proxy.client()
    kwargs = {"model": "deepseek-reasoner", "messages": MESSAGES, "tools": WEATHER}
    resp = (await collect_stream(client, **kwargs) if stream
            else await client.chat.completions.create(**kwargs))
    assert len(fake.requests) == 2
    assert fake.prompt_text(1).endswith("I should call get_weather for Paris.</think>")
    message = resp.choices[0].message
    assert message.reasoning_content.endswith("for Paris.")  # type: ignore[attr-defined]
    assert [c.function.name for c in message.tool_calls] == ["get_weather"]
    samples = await scrape(proxy)
    assert metric(samples, "dsml_proxy_tool_turns_total",
                  endpoint="chat_completions", outcome="recovered_empty") == 1
    assert metric(samples, "dsml_proxy_tool_turns_total",
                  endpoint="chat_completions", outcome="empty") == 0


async def test_empty_turn_recovery_can_be_turned_off(start_proxy: StartProxy,
                                                     fake: FakeUpstream) -> None:
    proxy = await start_proxy(recover_empty_turns=False)
    fake.responder = lambda body: _recovering_responder(body, fake)
    client = proxy.client()
    resp = await client.chat.completions.create(model="deepseek-reasoner", messages=MESSAGES,
                                                tools=WEATHER)
    assert len(fake.requests) == 1
    assert resp.choices[0].message.tool_calls is None
    assert resp.choices[0].message.content is None
    samples = await scrape(proxy)
    assert metric(samples, "dsml_proxy_tool_turns_total",
                  endpoint="chat_completions", outcome="empty") == 1


async def test_call_inside_reasoning_is_not_recovered_twice(proxy: ProxyServer,
                                                            fake: FakeUpstream) -> None:
    """A block written before `</think>` becomes the call; no continuation is asked for."""
    case = load_cases("wild.jsonl")["w-think-terminal"]
    fake.push(case["completion"])
    resp = await proxy.client().chat.completions.create(
        model="deepseek-reasoner", messages=MESSAGES, tools=case["tools"])
    assert len(fake.requests) == 1
    assert [c.function.name for c in resp.choices[0].message.tool_calls] == ["get_weather"]
    samples = await scrape(proxy)
    assert metric(samples, "dsml_proxy_tool_turns_total",
                  endpoint="chat_completions", outcome="recovered_from_thinking") == 1


async def test_allowed_tools_narrow_the_offer(proxy: ProxyServer, fake: FakeUpstream) -> None:
    fake.push('<｜DSML｜invoke name="get_time">\n<｜DSML｜parameter name="zone" string="true">'
              "CET</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS)
    resp = await proxy.client().chat.completions.create(
        model="deepseek-chat", messages=MESSAGES, tools=WEATHER,
        tool_choice={"type": "allowed_tools", "allowed_tools": {
            "mode": "required", "tools": [{"type": "function", "function": {"name": "get_time"}}]}})
    prompt = fake.prompt_text(0)
    assert '"name": "get_time"' in prompt and '"name": "get_weather"' not in prompt
    assert prompt.endswith(BLOCK)
    assert [c.function.name for c in resp.choices[0].message.tool_calls] == ["get_time"]
