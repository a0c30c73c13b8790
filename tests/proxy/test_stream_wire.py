"""The SSE wire itself, read raw (no SDK smoothing over mistakes): api.md's streaming rules."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from tests.fakes.upstream import FakeUpstream, Reply
from tests.proxy.conftest import ProxyServer, load_cases

PARSE = load_cases("parse.jsonl")
THREE_CALLS = next(c for c in PARSE.values()
                   if len(c["expected"]["tool_calls"]) == 3 and c["thinking"])


async def read_sse(url: str, body: dict[str, Any]) -> tuple[list[str], Any]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
        headers = resp.headers
    events = raw.split("\n\n")
    assert events[-1] == ""
    datas = []
    for event in events[:-1]:
        assert event.startswith("data: "), event
        datas.append(event[6:])
    return datas, headers


async def test_stream_rules(proxy: ProxyServer, fake: FakeUpstream) -> None:
    case = THREE_CALLS
    fake.push(case["completion"])
    body = {"model": "deepseek-reasoner", "messages": [{"role": "user", "content": "Go."}],
            "tools": case["tools"], "stream": True, "stream_options": {"include_usage": True}}
    datas, headers = await read_sse(proxy.url + "/v1/chat/completions", body)
    assert "X-Request-Id" in headers
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(d) for d in datas[:-1]]

    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])

    *body_chunks, final, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert usage_chunk["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])
    assert final["choices"][0]["delta"] == {}
    assert final["choices"][0]["finish_reason"] == "tool_calls"
    assert all(c["choices"][0]["finish_reason"] is None for c in body_chunks)

    seen_ids: dict[int, str] = {}
    order: list[int] = []
    args: dict[int, str] = {}
    for chunk in body_chunks:
        delta = chunk["choices"][0]["delta"]
        if "reasoning_content" in delta:
            assert delta["reasoning"] == delta["reasoning_content"]
        calls = delta.get("tool_calls")
        if not calls:
            continue
        assert len(calls) == 1  # one tool-call entry per chunk
        call = calls[0]
        index = call["index"]
        if "id" in call:
            assert index not in seen_ids and index == len(seen_ids)  # 0..n-1, no gaps
            assert call["type"] == "function" and call["function"]["arguments"] == ""
            assert call["id"].startswith("call_")
            seen_ids[index] = call["id"]
        else:
            assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
            assert index in seen_ids
        if not order or order[-1] != index:
            assert index not in order  # sequential, not interleaved
            order.append(index)
        args[index] = args.get(index, "") + call["function"].get("arguments", "")
    assert order == [0, 1, 2]
    expected = [c["arguments"] for c in case["expected"]["tool_calls"]]
    assert [json.loads(args[i]) for i in range(3)] == expected


async def test_stream_without_usage_has_no_usage_chunk(proxy: ProxyServer,
                                                       fake: FakeUpstream) -> None:
    fake.push("Hi!<｜end▁of▁sentence｜>")
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}],
            "stream": True}
    datas, _ = await read_sse(proxy.url + "/v1/chat/completions", body)
    chunks = [json.loads(d) for d in datas[:-1]]
    assert all(c["choices"] for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hi!"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_sdk_stream_helper_matches_create(proxy: ProxyServer, fake: FakeUpstream) -> None:
    """`client.chat.completions.stream(...)` (strict tools only) rebuilds the same message."""
    tools = [{"type": "function", "function": {
        "name": "get_weather", "strict": True,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": False}}}]
    completion = ("Need weather.</think>Checking.\n\n<｜DSML｜tool_calls>\n"
                  "<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" "
                  "string=\"true\">Oslo</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
                  "</｜DSML｜tool_calls><｜end▁of▁sentence｜>")
    fake.push(completion, completion)
    client = proxy.client()
    kwargs: dict[str, Any] = {"model": "deepseek-reasoner", "tools": tools,
                              "messages": [{"role": "user", "content": "Weather in Oslo?"}]}
    plain = await client.chat.completions.create(**kwargs)
    async with client.chat.completions.stream(**kwargs) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    a, b = plain.choices[0].message, final.choices[0].message
    assert a.content == b.content == "Checking."
    assert a.reasoning_content == b.reasoning_content == "Need weather."  # type: ignore[attr-defined]
    assert [c.function.name for c in b.tool_calls] == ["get_weather"]
    assert b.tool_calls[0].function.parsed_arguments == {"city": "Oslo"}
    assert a.tool_calls[0].function.arguments == b.tool_calls[0].function.arguments
    assert plain.choices[0].finish_reason == final.choices[0].finish_reason == "tool_calls"


async def test_sync_client(proxy: ProxyServer, fake: FakeUpstream) -> None:
    import asyncio

    fake.push("Sure.</think>Answer.<｜end▁of▁sentence｜>", "Sure.</think>Answer.<｜end▁of▁sentence｜>")
    client = proxy.sync_client()
    messages = [{"role": "user", "content": "q"}]

    def call() -> tuple[Any, str]:
        plain = client.chat.completions.create(model="deepseek-reasoner", messages=messages)
        parts = []
        for chunk in client.chat.completions.create(model="deepseek-reasoner",
                                                    messages=messages, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        client.close()
        return plain, "".join(parts)

    plain, streamed = await asyncio.to_thread(call)
    assert plain.choices[0].message.content == streamed == "Answer."


async def test_stream_opens_at_the_first_token_of_a_turn_that_starts_with_a_call(
        proxy: ProxyServer, fake: FakeUpstream) -> None:
    """A turn that opens with a tool call has no event for ~15 tokens (the call's name):
    the role chunk goes out when the engine's first token arrives, not after them."""
    case = next(c for c in PARSE.values() if not c["thinking"] and c["expected"]["tool_calls"]
                and c["completion"].startswith("\n\n<｜DSML｜tool_calls>"))
    fake.push(Reply(case["completion"], token_delay_s=0.05))
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Go."}],
            "tools": case["tools"], "stream": True}
    arrivals: list[tuple[float, dict[str, Any]]] = []
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.post(proxy.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            buf = b""
            async for data in resp.content.iter_any():
                buf += data
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    if event != b"data: [DONE]":
                        arrivals.append((time.perf_counter() - started, json.loads(event[6:])))
    first_at, first = arrivals[0]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} or \
        first["choices"][0]["delta"] == {"role": "assistant"}
    call_at = next(t for t, c in arrivals if c["choices"] and c["choices"][0]["delta"].get("tool_calls"))
    # ~15 tokens at 50 ms each separate the call's first chunk from the engine's first token.
    assert call_at - first_at > 0.4, (first_at, call_at)
    names = [tc["function"]["name"] for _, c in arrivals if c["choices"]
             for tc in c["choices"][0]["delta"].get("tool_calls") or [] if "name" in tc["function"]]
    assert names == [c["name"] for c in case["expected"]["tool_calls"]]
