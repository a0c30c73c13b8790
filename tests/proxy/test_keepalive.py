"""Keep-alives while a turn is silent (`stream_turn(keepalive_s=...)`), on chat completions:
SSE comments (`: keep-alive`) that the openai SDK skips, between whole events, with the
silence they fill counted as a backend wait rather than this process's overhead.
(/v1/messages pings and /v1/responses comments: test_anthropic_protocol, test_responses_protocol.)
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
from openai.lib.streaming.chat import ChatCompletionStreamState

from tests.fakes.upstream import FakeUpstream, Reply
from tests.proxy.conftest import ProxyServer, StartProxy
from tests.proxy.test_turn_policy import ARGS, BLOCK, INVOKE, MESSAGES, WEATHER, metric, scrape

# Thinking, then a tool call: reasoning, tool-call and finish chunks all go through the SDK.
CALL = "The user wants the weather.</think>" + BLOCK + INVOKE + ARGS
REQUEST: dict[str, Any] = {"model": "deepseek-reasoner", "messages": MESSAGES, "tools": WEATHER}
KEEPALIVE = ": keep-alive"


async def raw_stream(proxy: ProxyServer) -> tuple[int, list[str]]:
    """The status and the SSE blocks (text between blank lines) of one streamed request."""
    async with aiohttp.ClientSession() as s, s.post(
            proxy.url + "/v1/chat/completions", json={**REQUEST, "stream": True}) as r:
        raw = (await r.read()).decode()
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""  # every block complete: a keep-alive never splits an event
    return r.status, blocks[:-1]


def message_of(completion: Any) -> tuple[Any, ...]:
    choice = completion.choices[0]
    m = choice.message
    return (m.content, m.reasoning_content,
            [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls or ()],
            choice.finish_reason)


async def test_chat_keepalives_between_events_and_the_sdk_accumulates(
        start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy(keepalive_interval_s=0.01)
    fake.push(Reply(CALL, token_delay_s=0.03))  # ~3 intervals of silence before every token
    status, blocks = await raw_stream(proxy)
    assert status == 200
    assert {b for b in blocks if not b.startswith("data: ")} == {KEEPALIVE}
    data_at = [i for i, b in enumerate(blocks) if b.startswith("data: ")]
    between = [i for i, b in enumerate(blocks) if b == KEEPALIVE and data_at[1] < i < data_at[-2]]
    assert len(between) >= 10, blocks  # interleaved with the chunks, not just before them
    assert blocks[data_at[-1]] == "data: [DONE]"

    client = proxy.client()
    fake.push(CALL)  # at full speed: the reference, without keep-alives
    plain = await client.chat.completions.create(**REQUEST)
    assert message_of(plain)[2] == [("get_weather", {"city": "Paris"})]
    # The SDK's accumulator, its stream helper and the sync client, keep-alives interleaved.
    fake.push(Reply(CALL, token_delay_s=0.03))
    state = ChatCompletionStreamState()
    async for chunk in await client.chat.completions.create(**REQUEST, stream=True):
        state.handle_chunk(chunk)
    assert message_of(state.get_final_completion()) == message_of(plain)
    fake.push(Reply(CALL, token_delay_s=0.03))
    async with client.chat.completions.stream(**REQUEST) as stream:
        assert message_of(await stream.get_final_completion()) == message_of(plain)

    def sync_stream() -> Any:
        with proxy.sync_client() as sync, sync.chat.completions.stream(**REQUEST) as s:
            return s.get_final_completion()

    fake.push(Reply(CALL, token_delay_s=0.03))
    assert message_of(await asyncio.to_thread(sync_stream)) == message_of(plain)

    s = await scrape(proxy)
    # Four slow streams, each over a second of silence filled with keep-alives: none of it
    # is this process's overhead.
    assert metric(s, "dsml_proxy_overhead_seconds_sum", endpoint="chat_completions") < 0.5


async def test_silence_before_the_first_token_opens_the_stream(
        start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy(keepalive_interval_s=0.02)
    fake.push(Reply(CALL, delay_before_s=0.3))  # a long prefill: no token for a while
    status, blocks = await raw_stream(proxy)
    assert status == 200
    assert '"role":"assistant"' in blocks[0] and blocks[1] == KEEPALIVE
    assert blocks[2:].count(KEEPALIVE) >= 5
    fake.push(Reply(CALL, delay_before_s=0.3))
    async with proxy.client().chat.completions.stream(**REQUEST) as stream:
        final = await stream.get_final_completion()
    assert message_of(final)[2:] == ([("get_weather", {"city": "Paris"})], "tool_calls")


async def test_failure_after_the_stream_opened_is_an_sse_error(
        start_proxy: StartProxy, fake: FakeUpstream) -> None:
    # The keep-alives sent the status line already: the engine's failure becomes the SSE
    # error event, which the SDK raises.
    proxy = await start_proxy(keepalive_interval_s=0.02)
    fake.push(Reply(status=500, text="engine exploded", delay_before_s=0.2))
    status, blocks = await raw_stream(proxy)
    assert status == 200 and KEEPALIVE in blocks
    # The engine's body is logged, not echoed (issue 14): its status is.
    assert "HTTP 500" in json.loads(blocks[-1][len("data: "):])["error"]["message"]
    fake.push(Reply(status=500, text="engine exploded", delay_before_s=0.2))
    stream = await proxy.client().chat.completions.create(**REQUEST, stream=True)
    try:
        async for _ in stream:
            pass
    except openai.APIError as exc:
        assert "HTTP 500" in exc.message
    else:
        raise AssertionError("the SDK did not raise the SSE error event")


async def test_no_keepalive_while_tokens_flow(proxy: ProxyServer, fake: FakeUpstream) -> None:
    # Default interval (seconds), tokens at full speed: nothing but events on the wire.
    fake.push(CALL)
    status, blocks = await raw_stream(proxy)
    assert status == 200 and all(b.startswith("data: ") for b in blocks)
