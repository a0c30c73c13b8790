"""Client connections are bounded (issue 14, item 5): a connection that never delivers a
request is closed after `client_timeout_s`, a slow body gets a 408, and past
`max_connections` a new connection gets a 503 and is closed; a long turn is not cut."""

from __future__ import annotations

import asyncio
import json
import time

from tests.fakes.upstream import FakeUpstream, Reply
from tests.proxy.conftest import StartProxy

EOS = "<｜end▁of▁sentence｜>"


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection (fails past `seconds`)."""
    return await asyncio.wait_for(reader.read(), seconds)


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP response: its head and its (Content-Length) body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


async def test_silent_and_slow_header_connections_are_closed(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(client_timeout_s=0.3)
    silent = await connect(proxy.url)
    slow = await connect(proxy.url)
    slow[1].write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
    start = time.perf_counter()
    assert await closed_within(silent[0], 5) == b""
    assert await closed_within(slow[0], 5) == b""
    assert 0.25 < time.perf_counter() - start < 3
    for _, writer in (silent, slow):
        writer.close()


async def test_slow_body_is_408(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(client_timeout_s=0.3)
    reader, writer = await connect(proxy.url)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 408") and b"Connection: close" in head, head
    assert json.loads(body)["error"]["code"] == "request_timeout"
    writer.close()


async def test_a_long_turn_is_not_cut_by_the_timeout(start_proxy: StartProxy,
                                                     fake: FakeUpstream) -> None:
    proxy = await start_proxy(client_timeout_s=0.3)
    fake.push(Reply("one two three four five six seven eight" + EOS, token_delay_s=0.1))
    client = proxy.client()
    chunks = [c async for c in await client.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "hi"}], stream=True)]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four five six seven eight"
    # ... and the kept-alive connection serves the next request too.
    fake.push("again" + EOS)
    again = await client.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "hi"}])
    assert again.choices[0].message.content == "again"


async def test_connections_past_the_limit_get_503(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(max_connections=2, client_timeout_s=10)
    first, second = await connect(proxy.url), await connect(proxy.url)
    await asyncio.sleep(0.05)
    third = await connect(proxy.url)
    answer = await closed_within(third[0], 5)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:100]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_connections"
    first[1].close()
    await asyncio.sleep(0.1)  # the server sees it go
    fourth = await connect(proxy.url)
    fourth[1].write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await closed_within(fourth[0], 5)).startswith(b"HTTP/1.1 200")
    for _, writer in (second, third, fourth):
        writer.close()


def test_connection_flags_reach_the_settings() -> None:
    from proxy.cli import settings_from_args

    s = settings_from_args(["serve", "--upstream", "http://127.0.0.1:1",
                            "--client-timeout", "7.5", "--max-connections", "9"])
    assert (s.client_timeout_s, s.max_connections) == (7.5, 9)
