"""Operations: GET /health (the process is alive), /ready (the backend answers), /metrics."""

from __future__ import annotations

from aiohttp import web

from proxy import state
from proxy.errors import ApiError
from proxy.metrics import CONTENT_TYPE


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    backend = request.app[state.BACKEND]
    if not await backend.ready():
        raise ApiError(503, f"backend {backend.name} is not ready", code="not_ready")
    return web.json_response({"status": "ready", "backend": backend.name})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[state.METRICS].scrape()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
