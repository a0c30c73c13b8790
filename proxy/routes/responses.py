"""POST /v1/responses (OpenAI Responses, as Codex uses it).

Same turn runner, renderer, parser, backends, recovery and metrics as chat completions; only
the request translation (`proxy.translate.responses`) and the encoder differ. Errors keep
the OpenAI error shape (the app's error middleware).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from dsml.request import render_chat
from proxy import state
from proxy.backends.base import SamplingParams
from proxy.encoders.responses import ResponsesStreamEncoder, envelope, new_id, response_body
from proxy.errors import ApiError
from proxy.response_store import ResponseStore
from proxy.routes.common import drain, off_loop, prepare_turn, read_json, stream_turn
from proxy.signature import app_signer
from proxy.translate.responses import input_messages, output_message, to_chat
from schemas.responses import ResponsesRequest

ENDPOINT = "responses"
STORE = web.AppKey("response_store", ResponseStore)


def add_routes(app: web.Application) -> None:
    settings = app[state.SETTINGS]
    app_signer(app)
    app[STORE] = ResponseStore(settings.response_store_size, settings.response_store_ttl_s)
    app.router.add_post("/v1/responses", responses)


def history(app: web.Application, req: ResponsesRequest) -> list[dict[str, Any]]:
    if req.previous_response_id is None:
        return []
    stored = app[STORE].get(req.previous_response_id)
    if stored is None:
        raise ApiError(400, f"Previous response with id {req.previous_response_id!r} not found "
                       "(responses are kept in memory for a bounded time; see the README)",
                       param="previous_response_id", code="previous_response_not_found")
    return stored


async def responses(request: web.Request) -> web.StreamResponse:
    app = request.app
    signer = app_signer(app)

    def prepare(body: dict[str, Any]) -> tuple[Any, ...]:
        req = ResponsesRequest.model_validate(body)
        model = app[state.MODELS].get(req.model)  # 404 for an unknown model
        messages = history(app, req) + input_messages(req, signer)
        chat, parallel = to_chat(req, messages)
        app[state.REASONING_CACHE].backfill(chat["messages"])
        prompt = render_chat(chat, dialect=model.dialect, default_thinking=model.thinking)
        return req, model, messages, chat, parallel, prompt

    req, model, messages, chat, parallel, prompt = await off_loop(
        request, prepare, await read_json(request))
    request[state.LOG_FIELDS]["model"] = req.model
    sampling = SamplingParams(max_tokens=req.max_output_tokens, temperature=req.temperature,
                              top_p=req.top_p)
    response = envelope(req, new_id("resp_"), chat.get("tools", []))
    clock = request[state.CLOCK]
    streamed: web.StreamResponse | None = None
    async with app[state.LIMITER].slot(clock):  # queueing is a wait, not overhead
        turn = app[state.RUNNER].start(prompt, sampling, endpoint=ENDPOINT, clock=clock,
                                       parallel_tool_calls=parallel, dialect=model.dialect)
        await prepare_turn(request, turn)
        if req.stream:
            streamed = await stream_turn(request, turn, ResponsesStreamEncoder(response, signer),
                                         keepalive_s=app[state.SETTINGS].keepalive_interval_s)
        else:
            await drain(request, turn)
    if turn.result is not None and req.store is not False:
        app[STORE].put(response["id"], [*messages, output_message(turn.result)])
    if streamed is not None:
        return streamed
    return web.json_response(response_body(turn, response, signer))
