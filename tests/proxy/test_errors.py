"""Errors and limits: the OpenAI error shape, and the status each failure maps to."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from tests.fakes.upstream import FakeUpstream, Reply, refused_url
from tests.proxy.conftest import ProxyServer, StartProxy

MESSAGES = [{"role": "user", "content": "hi"}]


async def post(url: str, body: object, **kw: object) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.post(
        url, data=data, headers={"Content-Type": "application/json"}, **kw
    ) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


def assert_error_shape(body: dict) -> dict:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


async def test_render_error_is_400(proxy: ProxyServer, fake: FakeUpstream) -> None:
    bad_tool = [{"type": "function", "function": {"name": "has spaces", "parameters": {}}}]
    with pytest.raises(openai.BadRequestError) as info:
        await proxy.client().chat.completions.create(model="deepseek-chat", messages=MESSAGES,
                                                     tools=bad_tool)
    assert info.value.status_code == 400
    error = assert_error_shape(info.value.response.json())
    assert error["type"] == "invalid_request_error"
    assert error["param"] and "tools" in error["param"]
    assert fake.requests == []


async def test_validation_errors_are_400(proxy: ProxyServer) -> None:
    url = proxy.url + "/v1/chat/completions"
    status, body, _ = await post(url, {"model": "deepseek-chat"})  # no messages
    assert status == 400 and assert_error_shape(body)["param"] == "messages"
    status, body, _ = await post(url, {"model": "deepseek-chat", "messages": MESSAGES, "n": 2})
    assert status == 400
    assert "n=1" in assert_error_shape(body)["message"]
    status, body, _ = await post(url, b"{not json")
    assert status == 400 and assert_error_shape(body)["code"] == "invalid_json"
    status, body, _ = await post(url, [1, 2])
    assert status == 400


async def test_unknown_fields_are_ignored(proxy: ProxyServer, fake: FakeUpstream) -> None:
    fake.push("ok<｜end▁of▁sentence｜>")
    status, body, _ = await post(proxy.url + "/v1/chat/completions", {
        "model": "deepseek-chat", "messages": MESSAGES, "some_future_field": {"x": 1},
        "store": True, "metadata": {"a": "b"}, "logprobs": False})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "ok"


async def test_unknown_model_and_route_are_404(proxy: ProxyServer) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await proxy.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    error = assert_error_shape(info.value.response.json())
    assert error["code"] == "model_not_found" and error["param"] == "model"
    status, body, _ = await post(proxy.url + "/v1/nothing/here", {})
    assert status == 404 and assert_error_shape(body)["code"] == "unknown_route"


async def test_body_too_large_is_413(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(max_body_bytes=10_000)
    big = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "x" * 20_000}]}
    status, body, _ = await post(proxy.url + "/v1/chat/completions", big)
    assert status == 413
    assert assert_error_shape(body)["code"] == "body_too_large"


async def test_full_queue_is_429_with_retry_after(start_proxy: StartProxy,
                                                  fake: FakeUpstream) -> None:
    proxy = await start_proxy(max_concurrency=1, max_queue=1, retry_after_s=3)
    fake.push(Reply("slow " * 40 + "<｜end▁of▁sentence｜>", token_delay_s=0.02),
              "queued<｜end▁of▁sentence｜>")
    client = proxy.client()
    running = asyncio.create_task(client.chat.completions.create(
        model="deepseek-chat", messages=MESSAGES))
    while not fake.num_active:
        await asyncio.sleep(0.01)
    queued = asyncio.create_task(client.chat.completions.create(
        model="deepseek-chat", messages=MESSAGES))
    await asyncio.sleep(0.1)  # let it take the one queue place
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="deepseek-chat", messages=MESSAGES)
    assert info.value.response.headers["Retry-After"] == "3"
    assert assert_error_shape(info.value.response.json())["type"] == "rate_limit_error"
    assert (await running).choices[0].message.content.startswith("slow")
    assert (await queued).choices[0].message.content == "queued"


async def test_upstream_down_is_502(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(upstream=refused_url())
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as info:
            await proxy.client().chat.completions.create(model="deepseek-chat",
                                                         messages=MESSAGES, stream=stream)
        assert info.value.status_code == 502
        assert assert_error_shape(info.value.response.json())["code"] == "upstream_error"


async def test_upstream_http_error_is_502(proxy: ProxyServer, fake: FakeUpstream,
                                          caplog: pytest.LogCaptureFixture) -> None:
    fake.push(Reply(status=500, text="engine exploded"))
    with pytest.raises(openai.InternalServerError) as info:
        await proxy.client().chat.completions.create(model="deepseek-chat", messages=MESSAGES)
    assert info.value.status_code == 502
    message = info.value.response.json()["error"]["message"]
    # The engine's body is logged, never echoed to the client (issue 14).
    assert "HTTP 500" in message and "engine exploded" not in message
    assert any("engine exploded" in str(getattr(r, "fields", {}).get("detail"))
               for r in caplog.records)


async def test_upstream_timeout_is_504(start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy(upstream_read_timeout_s=0.3)
    fake.push(Reply("late<｜end▁of▁sentence｜>", delay_before_s=2))
    with pytest.raises(openai.APIStatusError) as info:
        await proxy.client().chat.completions.create(model="deepseek-chat", messages=MESSAGES)
    assert info.value.status_code == 504
    assert assert_error_shape(info.value.response.json())["type"] == "timeout_error"


async def test_mid_stream_failure_is_an_sse_error_event(proxy: ProxyServer,
                                                        fake: FakeUpstream) -> None:
    fake.push(Reply("one two three four five six seven<｜end▁of▁sentence｜>",
                    close_after_tokens=3))
    stream = await proxy.client().chat.completions.create(
        model="deepseek-chat", messages=MESSAGES, stream=True)
    received = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert "".join(received) == "one two three"
    assert "upstream" in str(info.value.message)


async def test_engine_refusal_is_400_not_retried(proxy: ProxyServer, fake: FakeUpstream) -> None:
    """An engine's 400 (e.g. prompt over its context) is the client's to fix: no 5xx. (A
    constrained turn is sent once more without its grammar, in case the grammar was what the
    engine refused: the same 400 again is then the client's.)"""
    refusal = Reply(status=400, text="This model's maximum context length is 8192 tokens")
    fake.push(refusal, refusal)
    with pytest.raises(openai.BadRequestError) as info:
        await proxy.client().chat.completions.create(model="deepseek-chat", messages=MESSAGES)
    error = assert_error_shape(info.value.response.json())
    assert error["code"] == "upstream_rejected" and "HTTP 400" in error["message"]
    assert "maximum context length" not in error["message"]  # logged, not echoed (issue 14)
    assert len(fake.requests) == 2 and "structured_outputs" not in fake.requests[1]
