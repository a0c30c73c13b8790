"""GET /v1/models and GET /v1/models/{model_id}."""

from __future__ import annotations

from aiohttp import web

from proxy import state


async def list_models(request: web.Request) -> web.Response:
    models = request.app[state.MODELS]
    if not models.engine_names:  # none listed yet (the engine was loading at start)
        await models.refresh()
    return web.json_response({"object": "list", "data": [models.card(n) for n in models.names]})


async def get_model(request: web.Request) -> web.Response:
    models = request.app[state.MODELS]
    name = request.match_info["model_id"]
    await models.resolve(name)  # 404 for an unknown name
    return web.json_response(models.card(name))
