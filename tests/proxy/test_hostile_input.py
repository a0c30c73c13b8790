"""Hostile input never becomes a 500 (issue 14, items 1, 4, 5): every bad request gets a
400/408/413/415 in the endpoint's error shape, every bad upstream a 502 counted in
`dsml_proxy_upstream_errors_total`, and client errors never show the upstream's address or
echo its body."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy import state
from proxy.app import create_app, make_runner
from proxy.backends.base import GenerateDelta, GenerateRequest
from proxy.settings import Settings
from tests.fakes.upstream import FakeUpstream, refused_url, serve_completions
from tests.proxy.conftest import ProxyServer, StartProxy

EOS = "<｜end▁of▁sentence｜>"
USER = [{"role": "user", "content": "hi"}]
CHAT = {"model": "deepseek-chat", "messages": USER}


def tool(params: dict[str, Any], name: str = "lookup") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": params}}


async def post(url: str, path: str, body: Any = None, *, data: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    if data is None:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as session, session.post(
            url + path, data=data, headers=headers) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


def openai_error(body: Any) -> dict[str, Any]:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def anthropic_error(body: Any) -> dict[str, Any]:
    assert body["type"] == "error" and {"type", "message"} <= set(body["error"])
    return body["error"]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- read_json -------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [
    '{"model": "deepseek-chat", "messages": ' + nested(2500) + "}",  # RecursionError
    '{"model": "deepseek-chat", "messages": [], "n": ' + "9" * 5000 + "}",  # digit limit
    '{"model": "deepseek-chat", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
    '{"model": "deepseek-chat", "messages": [{"role": "user", "content": "\\udc00"}]}',
])
async def test_bad_bodies_are_400_on_chat(proxy: ProxyServer, payload: str) -> None:
    status, body = await post(proxy.url, "/v1/chat/completions", data=payload.encode(),
                              headers={"Content-Type": "application/json"})
    assert status == 400, body
    assert openai_error(body)["code"] == "invalid_json"


LONE = "a\ud800b"
ENDPOINTS = [
    ("/v1/chat/completions", {"model": "deepseek-chat", "messages": [
        {"role": "user", "content": LONE}]}, openai_error),
    ("/v1/completions", {"model": "deepseek-chat", "prompt": LONE}, openai_error),
    ("/v1/responses", {"model": "deepseek-chat", "input": LONE}, openai_error),
    ("/v1/messages", {"model": "deepseek-chat", "max_tokens": 5, "messages": [
        {"role": "user", "content": LONE}]}, anthropic_error),
    ("/v1/messages/count_tokens", {"model": "deepseek-chat", "messages": [
        {"role": "user", "content": LONE}]}, anthropic_error),
    ("/v1/chat/completions", {"model": "deepseek-chat", "messages": USER,
                              "tools": [tool({"type": "object", "description": LONE})]},
     openai_error),
]


@pytest.mark.parametrize(("path", "payload", "shape"), ENDPOINTS)
async def test_lone_surrogate_is_400_on_every_endpoint(proxy: ProxyServer, path: str,
                                                       payload: dict, shape: Any) -> None:
    # json.dumps writes the lone surrogate as the escape "\ud800", as a hostile client would.
    status, body = await post(proxy.url, path, payload)
    assert status == 400, body
    assert "surrogate" in shape(body)["message"]


async def test_escaped_surrogate_pairs_are_text(proxy: ProxyServer, fake: FakeUpstream) -> None:
    fake.push("ok" + EOS)
    data = json.dumps({**CHAT, "messages": [{"role": "user", "content": "snow \U0001f328"}]},
                      ensure_ascii=True).encode()  # "\ud83c\udf28": a valid pair
    assert b"\\ud83c\\udf28" in data
    status, body = await post(proxy.url, "/v1/chat/completions", data=data,
                              headers={"Content-Type": "application/json"})
    assert status == 200, body
    assert "snow \U0001f328" in fake.prompt_text()


async def test_non_json_content_type_is_415(proxy: ProxyServer) -> None:
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        status, body = await post(proxy.url, "/v1/chat/completions",
                                  data=json.dumps(CHAT).encode(),
                                  headers={"Content-Type": content_type})
        assert status == 415, body
        assert openai_error(body)["code"] == "unsupported_media_type"
    status, body = await post(proxy.url, "/v1/messages", data=b"{}",
                              headers={"Content-Type": "text/plain"})
    assert status == 415 and anthropic_error(body)


async def test_too_many_tools_or_messages_is_400(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(max_tools=3, max_messages=4)
    tools = [tool({}, f"t{k}") for k in range(4)]
    status, body = await post(proxy.url, "/v1/chat/completions", {**CHAT, "tools": tools})
    assert status == 400 and openai_error(body)["param"] == "tools"
    status, body = await post(proxy.url, "/v1/chat/completions", {**CHAT, "messages": USER * 5})
    assert status == 400 and openai_error(body)["param"] == "messages"
    status, body = await post(proxy.url, "/v1/responses",
                              {"model": "deepseek-chat", "input": USER * 5})
    assert status == 400 and openai_error(body)["param"] == "input"


async def test_prompt_over_max_prompt_tokens_is_400(start_proxy: StartProxy,
                                                    fake: FakeUpstream) -> None:
    proxy = await start_proxy(max_prompt_tokens=50)
    long = [{"role": "user", "content": "word " * 200}]
    for path, payload in (("/v1/chat/completions", {**CHAT, "messages": long}),
                          ("/v1/completions", {"model": "deepseek-chat", "prompt": "word " * 200})):
        status, body = await post(proxy.url, path, payload)
        assert status == 400, body
        assert openai_error(body)["code"] == "context_length_exceeded"
    # A big one (on a worker thread) stops being tokenized once it is surely over.
    big = {**CHAT, "messages": [{"role": "user", "content": "lorem ipsum dolor " * 100_000}]}
    status, body = await post(proxy.url, "/v1/chat/completions", big)
    assert status == 400 and "more than 50 tokens" in openai_error(body)["message"]
    assert not fake.requests  # refused before the engine


# -- tool schemas ----------------------------------------------------------------------------


async def test_catastrophic_pattern_answers_in_milliseconds(proxy: ProxyServer,
                                                            fake: FakeUpstream) -> None:
    import time

    params = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}}}
    fake.push('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="lookup">\n<｜DSML｜parameter name="s" '
              'string="true">' + "a" * 28 + "!</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
              "</｜DSML｜tool_calls>" + EOS)
    start = time.perf_counter()
    status, body = await post(proxy.url, "/v1/chat/completions",
                              {**CHAT, "tools": [tool(params)]})
    assert status == 200, body
    assert time.perf_counter() - start < 2.0  # Python's re: ~8 s of a frozen event loop
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"


@pytest.mark.parametrize(("params", "keyword"), [
    ({"type": "object", "properties": {"s": {"type": "string", "pattern": "(a)\\1"}}}, "pattern"),
    ({"type": "object", "patternProperties": {"(?=x)": {}}}, "patternProperties"),
    ({"type": "object", "propertyNames": {"pattern": "(?<=a)b"}}, "pattern"),
])
async def test_pattern_re2_cannot_take_is_400_naming_tool_and_keyword(
        proxy: ProxyServer, params: dict, keyword: str) -> None:
    status, body = await post(proxy.url, "/v1/chat/completions", {**CHAT, "tools": [tool(params)]})
    assert status == 400, body
    message = openai_error(body)["message"]
    assert "'lookup'" in message and keyword in message


async def test_deep_tool_parameters_are_400(proxy: ProxyServer) -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(450):
        node["properties"] = {"x": {}}
        node = node["properties"]["x"]
    for path, shape, payload in (
            ("/v1/chat/completions", openai_error, {**CHAT, "tools": [tool(deep)]}),
            ("/v1/messages", anthropic_error, {"model": "deepseek-chat", "max_tokens": 5,
                                               "messages": USER, "tools": [
                                                   {"name": "lookup", "input_schema": deep}]})):
        status, body = await post(proxy.url, path, payload)
        assert status == 400, body
        assert "nest" in shape(body)["message"]


async def test_ref_cycle_called_by_the_model_is_not_a_500(proxy: ProxyServer,
                                                          fake: FakeUpstream) -> None:
    params = {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}},
              "$defs": {"a": {"$ref": "#/$defs/a"}}}
    fake.push('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="lookup">\n<｜DSML｜parameter name="x" '
              'string="false">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>' + EOS)
    status, body = await post(proxy.url, "/v1/chat/completions", {**CHAT, "tools": [tool(params)]})
    assert status == 200, body


@pytest.mark.parametrize("entries", [
    [{"type": "function", "function": "lookup"}],
    [{"type": "function", "name": ["lookup"]}],
    ["lookup"],
    [None],
])
async def test_malformed_allowed_tools_are_400(proxy: ProxyServer, entries: list) -> None:
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": entries}}
    status, body = await post(proxy.url, "/v1/chat/completions",
                              {**CHAT, "tools": [tool({})], "tool_choice": choice})
    assert status == 400, body
    assert openai_error(body)["param"].startswith("tool_choice")  # pydantic's or ours
    responses_tool = {"type": "function", "name": "lookup", "parameters": {}}
    status, body = await post(proxy.url, "/v1/responses", {
        "model": "deepseek-chat", "input": "hi", "tools": [responses_tool],
        "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": entries}})
    assert status == 400, body
    assert openai_error(body)["param"].startswith("tool_choice")


# -- bad upstreams ---------------------------------------------------------------------------


def upstream_errors(proxy: ProxyServer, reason: str) -> float:
    return proxy.app[state.METRICS].upstream_errors.labels(reason)._value.get()


@pytest.mark.parametrize("event", [
    b'data: {"choices": [{"text": "hi", "finish_reason": null}], '
    b'"usage": {"completion_tokens": Infinity}}\n\n',
    b'data: {"choices": [{"text": "hi", "x": ' + nested(3000).encode() + b"}]}\n\n",
])
async def test_bad_upstream_events_are_502_and_counted(start_proxy: StartProxy,
                                                       event: bytes) -> None:
    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(event)
        await response.write(b"data: [DONE]\n\n")
        return response

    runner, url = await serve_completions(completions)
    try:
        proxy = await start_proxy(upstream=url)
        for path, payload in (("/v1/chat/completions", CHAT),
                              ("/v1/completions", {"model": "deepseek-chat", "prompt": "x"})):
            before = upstream_errors(proxy, "stream")
            status, body = await post(proxy.url, path, payload)
            assert status == 502, body
            assert openai_error(body)["code"] == "upstream_error"
            assert upstream_errors(proxy, "stream") == before + 1
    finally:
        await runner.cleanup()


async def test_errors_do_not_reveal_the_upstream(start_proxy: StartProxy) -> None:
    url = refused_url()
    proxy = await start_proxy(upstream=url)
    status, body = await post(proxy.url, "/v1/chat/completions", CHAT)
    assert status == 502
    port = url.rsplit(":", 1)[1]
    assert port not in json.dumps(body) and "127.0.0.1" not in json.dumps(body)


class _FailingBackend:
    """One delta, then an exception that is not a BackendError (a bug, or a bad engine)."""

    name = "failing"

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        yield GenerateDelta("hello", 1)
        raise RuntimeError("boom")

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


async def test_completions_stream_error_after_200_is_an_sse_event() -> None:
    settings = Settings(log_requests=False)
    runner = make_runner(create_app(_FailingBackend(), settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        timeout = aiohttp.ClientTimeout(total=10)  # the old code left the client hanging
        async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
                url + "/v1/completions",
                json={"model": "deepseek-chat", "prompt": "x", "stream": True}) as resp:
            assert resp.status == 200
            raw = (await resp.read()).decode()
        assert "HTTP/1.1" not in raw  # no second response inside the body
        events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
        assert events[0]["choices"][0]["text"] == "hello"
        assert events[-1]["error"]["code"] == "internal_error"
    finally:
        await runner.cleanup()


async def test_a_parser_failure_is_a_502_not_a_500(proxy: ProxyServer, fake: FakeUpstream,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from dsml.parser import StreamParser

    def broken(self: Any, text: str) -> Any:
        raise IndexError("parser bug")

    monkeypatch.setattr(StreamParser, "feed", broken)
    fake.push("hello" + EOS)
    status, body = await post(proxy.url, "/v1/chat/completions", CHAT)
    assert status == 502, body
    assert openai_error(body)["code"] == "unparsable_output"
    fake.push("hello" + EOS)
    status, body = await post(proxy.url, "/v1/messages", {
        "model": "deepseek-chat", "max_tokens": 5, "messages": USER})
    assert status == 502 and anthropic_error(body)


async def test_lone_surrogate_from_the_upstream_becomes_a_replacement_char(
        start_proxy: StartProxy) -> None:
    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"text": "a\\ud800b", "finish_reason": null}]}'
                             b'\n\ndata: {"choices": [{"text": " \\ud83d\\ude00", '
                             b'"finish_reason": "stop"}]}\n\ndata: [DONE]\n\n')
        return response

    runner, url = await serve_completions(completions)
    try:
        proxy = await start_proxy(upstream=url)
        for stream in (False, True):
            async with aiohttp.ClientSession() as session, session.post(
                    proxy.url + "/v1/chat/completions", json={**CHAT, "stream": stream}) as resp:
                assert resp.status == 200
                raw = await resp.text()
            if not stream:
                assert json.loads(raw)["choices"][0]["message"]["content"] == "a\ufffdb \U0001f600"
            else:
                assert '"error"' not in raw and "data: [DONE]" in raw
    finally:
        await runner.cleanup()


def _deep_object(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize("where", ["arguments", "response_format", "metadata", "tool_result",
                                   "anthropic_input"])
async def test_deep_values_below_the_json_limit_are_never_a_500(
        proxy: ProxyServer, fake: FakeUpstream, where: str) -> None:
    deep = _deep_object(900)  # json reads it; a recursive step after it may not
    fake.responder = lambda body: "ok" + EOS
    path, payload = "/v1/chat/completions", dict(CHAT)
    if where == "arguments":
        payload["messages"] = [*USER, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": deep}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "x"}]
        payload["tools"] = [tool({})]
    elif where == "response_format":
        payload["response_format"] = {"type": "json_schema",
                                      "json_schema": {"name": "x", "schema": deep}}
    elif where == "metadata":
        payload["metadata"] = deep
    elif where == "tool_result":
        path, payload = "/v1/messages", {"model": "deepseek-chat", "max_tokens": 5, "messages": [
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                          "content": [deep]}]}]}
    else:
        path, payload = "/v1/messages", {"model": "deepseek-chat", "max_tokens": 5, "messages": [
            *USER, {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t", "name": "lookup", "input": deep}]},
            {"role": "user", "content": "go on"}]}
    data = json.dumps(payload).encode()
    status, body = await post(proxy.url, path, data=data,
                              headers={"Content-Type": "application/json"})
    assert status < 500, body
