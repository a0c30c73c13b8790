"""A client that goes away cancels its upstream request at once (the engine sees the close).

In the style of Starlette's `test_streaming_response_stops_if_receiving_http_disconnect`:
every wait has a timeout guard, so a proxy that keeps generating fails the test instead of
hanging it.
"""

from __future__ import annotations

import asyncio

import aiohttp

from tests.fakes.upstream import FakeUpstream, Reply
from tests.proxy.conftest import ProxyServer
from tests.proxy.test_turn_policy import metric, scrape

LONG = "word " * 400 + "<｜end▁of▁sentence｜>"  # 20 s at 50 ms a token: never finishes here
BODY = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "talk"}]}


async def test_stream_disconnect_cancels_upstream(proxy: ProxyServer, fake: FakeUpstream) -> None:
    fake.push(Reply(LONG, token_delay_s=0.05))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy.url + "/v1/chat/completions",
                                  json={**BODY, "stream": True})
        assert resp.status == 200
        await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)  # role chunk
        await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)  # first word
        resp.close()  # drop the connection mid-stream
    await asyncio.wait_for(fake.disconnected.wait(), 5)
    for _ in range(100):  # the proxy's bookkeeping runs as its handler unwinds
        samples = await scrape(proxy)
        if metric(samples, "dsml_proxy_requests_total", endpoint="chat_completions",
                  status="499") == 1:
            break
        await asyncio.sleep(0.02)
    assert metric(samples, "dsml_proxy_requests_total", endpoint="chat_completions",
                  status="499") == 1
    assert metric(samples, "dsml_proxy_inflight_requests", endpoint="chat_completions") == 0


async def test_non_stream_disconnect_cancels_upstream(proxy: ProxyServer,
                                                      fake: FakeUpstream) -> None:
    fake.push(Reply(LONG, token_delay_s=0.05))
    async with aiohttp.ClientSession() as session:
        try:
            await session.post(proxy.url + "/v1/chat/completions", json=BODY,
                               timeout=aiohttp.ClientTimeout(total=0.5))
        except TimeoutError:
            pass
        else:
            raise AssertionError("the request should still be running")
    await asyncio.wait_for(fake.disconnected.wait(), 5)
