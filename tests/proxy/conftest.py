"""Fixtures: a fake engine and the real proxy, both real servers on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from proxy.app import create_app, make_runner
from proxy.backends.upstream import UpstreamBackend
from proxy.settings import Settings
from tests.fakes.upstream import FakeUpstream

DATA = Path(__file__).resolve().parents[1] / "data" / "dsml"


def load_cases(name: str) -> dict[str, dict[str, Any]]:
    with open(DATA / name, encoding="utf-8") as f:
        return {case["id"]: case for case in map(json.loads, f)}


@dataclass
class ProxyServer:
    app: web.Application
    runner: web.AppRunner
    url: str
    settings: Settings
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    def client(self, **kw: Any) -> openai.AsyncOpenAI:
        kw.setdefault("api_key", "unused")
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 30)
        client = openai.AsyncOpenAI(base_url=self.url + "/v1", **kw)
        self.clients.append(client)
        return client

    def sync_client(self, **kw: Any) -> openai.OpenAI:
        kw.setdefault("api_key", "unused")
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 30)
        return openai.OpenAI(base_url=self.url + "/v1", **kw)


StartProxy = Callable[..., Awaitable[ProxyServer]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
async def start_proxy(fake: FakeUpstream) -> AsyncIterator[StartProxy]:
    """`await start_proxy(**settings)`: a proxy in front of `fake` (or settings' upstream)."""
    servers: list[ProxyServer] = []

    async def start(**overrides: Any) -> ProxyServer:
        overrides.setdefault("upstream", fake.url)
        overrides.setdefault("upstream_read_timeout_s", 10)
        overrides.setdefault("log_requests", False)
        settings = Settings(**overrides)
        app = create_app(UpstreamBackend.from_settings(settings), settings)
        runner = make_runner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        server = ProxyServer(app, runner, f"http://127.0.0.1:{port}", settings)
        servers.append(server)
        return server

    yield start
    for server in servers:
        for client in server.clients:
            await client.close()
        await server.runner.cleanup()


@pytest.fixture
async def proxy(start_proxy: StartProxy) -> ProxyServer:
    return await start_proxy()
