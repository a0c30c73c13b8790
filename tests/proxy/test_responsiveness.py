"""One big request must not stop the others (issue 14, item 2): while a request of 1,000 tools
and 1.2 MB of text (0.7M tokens in all) is decoded, rendered and tokenized, `/health` and a small chat request
answer in milliseconds. (Before, all of that ran on the event loop: seconds of silence.)"""

from __future__ import annotations

import asyncio
import gc
import http.client
import json
import os
import threading
import time

import aiohttp
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.proxy.conftest import ProxyServer, StartProxy

EOS = "<｜end▁of▁sentence｜>"


def huge_request() -> bytes:
    schema = {"type": "object", "properties": {
        f"field_{k}": {"type": "string", "description": "a parameter " * 8} for k in range(12)}}
    tools = [{"type": "function", "function": {"name": f"tool_{n}", "description": "x " * 40,
                                                 "parameters": schema}} for n in range(1000)]
    text = " ".join(f"word{k % 977}" for k in range(150_000))  # ~1.2 MB, ~0.4M tokens
    return json.dumps({"model": "deepseek-chat", "tools": tools,
                       "messages": [{"role": "user", "content": text}]}).encode()


def probe(url: str, stop: threading.Event, latencies: list[float], small: list[float]) -> None:
    """From another thread (its own client, not the server's event loop): GET /health every
    10 ms, and a small chat request every tenth time, each timed."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chat = json.dumps({"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]})
    while not stop.is_set():
        start = time.perf_counter()
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        latencies.append(time.perf_counter() - start)
        if len(latencies) % 10 == 0:
            start = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", chat,
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            small.append(time.perf_counter() - start)
        time.sleep(0.01)
    conn.close()


async def test_health_and_small_requests_answer_while_a_huge_one_runs(
        start_proxy: StartProxy, fake: FakeUpstream) -> None:
    proxy = await start_proxy(upstream_read_timeout_s=120)
    fake.responder = lambda body: "ok" + EOS
    data = huge_request()
    latencies: list[float] = []
    small: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(proxy.url, stop, latencies, small))
    async with aiohttp.ClientSession() as session:
        prober.start()
        try:
            await asyncio.sleep(0.1)
            start = time.perf_counter()
            async with session.post(proxy.url + "/v1/chat/completions", data=data,
                                    headers={"Content-Type": "application/json"}) as resp:
                body = await resp.read()
                assert resp.status == 200, body[:300]
            big_s = time.perf_counter() - start
        finally:
            stop.set()
            await asyncio.to_thread(prober.join, 30)
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    print(f"huge request {big_s:.2f} s; /health p50 {latencies[len(latencies) // 2] * 1000:.1f} "
          f"ms p99 {p99 * 1000:.1f} ms max {latencies[-1] * 1000:.1f} ms over {len(latencies)}; "
          f"small chat max {max(small or [0]) * 1000:.1f} ms")
    # The huge request really ran beside the probes (else this proves nothing).
    assert big_s > 0.3 and len(latencies) >= 10, (big_s, len(latencies))
    # Generous for a loaded CI box; before the fix /health waited out the whole request.
    assert p99 < 0.2, (p99, latencies[-5:], big_s)
    assert small and max(small) < 0.5, small


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="Linux's /proc only")
async def test_memory_goes_back_after_a_huge_request(proxy: ProxyServer,
                                                     fake: FakeUpstream) -> None:
    fake.responder = lambda body: "ok" + EOS
    data = huge_request()
    gc.collect()
    before = rss_mb()
    async with aiohttp.ClientSession() as session, session.post(
            proxy.url + "/v1/chat/completions", data=data,
            headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        await resp.read()
    gc.collect()
    grown = after = 0.0
    for _ in range(50):  # the trim runs on a worker thread after the response
        await asyncio.sleep(0.05)
        after = rss_mb()
        grown = after - before
        if grown < 150:
            break
    print(f"RSS before {before:.0f} MB, after {after:.0f} MB")
    # Measured on the dev box: +70 MB after (the bounded caches keep their share), +290 MB
    # when the freed pages are not given back (the process stays near its peak).
    assert grown < 150, (before, after)
