"""The floor for scale: a bare aiohttp relay that decodes and re-encodes each chunk's JSON.

What issue 3 quotes as ~31,000 chunks/s (17 us CPU per chunk): no rendering, no parsing, no
metrics, no validation; just `json.loads` of each upstream event and `json.dumps` of a chat
chunk carrying its text as `content`. Measured in the same run as the proxy, it shows what
this machine gives any Python relay right now (it is shared and noisy).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
from multiprocessing.connection import Connection
from typing import Any


def make_app(upstream: str) -> Any:
    import aiohttp
    from aiohttp import web

    async def startup(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        upstream_body = {"prompt": [0], "stream": True, "seed": body.get("seed", 0)}
        async with request.app["session"].post(upstream + "/v1/completions",
                                               json=upstream_body) as resp:
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                chunk = {"id": "chatcmpl-relay", "object": "chat.completion.chunk",
                         "created": 0, "model": "relay",
                         "choices": [{"index": 0, "delta": {"content": choice["text"]},
                                      "finish_reason": choice["finish_reason"]}]}
                await out.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await out.write(b"data: [DONE]\n\n")
            await out.write_eof()
            return out

    app = web.Application()
    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def _serve(upstream: str, conn: Connection) -> None:
    from _fake_engine import watch_parent
    from aiohttp import web

    runner = web.AppRunner(make_app(upstream), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    conn.send({"url": f"http://127.0.0.1:{runner.addresses[0][1]}", "pid": os.getpid()})
    await watch_parent()
    await runner.cleanup()


def _main(upstream: str, conn: Connection) -> None:
    asyncio.run(_serve(upstream, conn))


def start(upstream: str) -> tuple[mp.Process, dict[str, Any]]:
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=_main, args=(upstream, child_end), daemon=True,
                       name="bench-relay")
    proc.start()
    if not parent_end.poll(60):
        proc.terminate()
        raise RuntimeError("the reference relay did not start within 60 s")
    return proc, parent_end.recv()
