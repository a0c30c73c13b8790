"""POST /v1/responses (OpenAI Responses, as Codex uses it), and over the response store
`GET` and `DELETE /v1/responses/{id}` and `GET /v1/responses/{id}/input_items`.

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
from proxy.response_store import StoredResponse, app_store
from proxy.routes.common import drain, off_loop, prepare_turn, read_json, stream_turn
from proxy.signature import app_signer
from proxy.translate.responses import input_messages, listed_input_items, output_message, to_chat
from schemas.responses import ResponsesRequest

ENDPOINT = "responses"
MAX_LIST_LIMIT = 100  # OpenAI's bounds of `limit` on /input_items (default 20)


def add_routes(app: web.Application) -> None:
    app_signer(app)
    app_store(app)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/responses/{response_id}", retrieve)
    app.router.add_delete("/v1/responses/{response_id}", delete)
    app.router.add_get("/v1/responses/{response_id}/input_items", list_input_items)


def stored(app: web.Application, response_id: str) -> StoredResponse | None:
    value = app_store(app).get(response_id)
    return value if isinstance(value, StoredResponse) else None


def history(app: web.Application, req: ResponsesRequest) -> list[dict[str, Any]]:
    if req.previous_response_id is None:
        return []
    entry = stored(app, req.previous_response_id)
    if entry is None:
        raise ApiError(400, f"Previous response with id {req.previous_response_id!r} not found "
                       "(responses are kept in memory for a bounded time; see the README)",
                       param="previous_response_id", code="previous_response_not_found")
    return entry.messages


async def responses(request: web.Request) -> web.StreamResponse:
    app = request.app
    body = await read_json(request)
    req = await off_loop(request, ResponsesRequest.model_validate, body)
    request[state.LOG_FIELDS]["model"] = req.model
    model = await app[state.MODELS].resolve(req.model)  # 404 for an unknown model
    signer = app_signer(app)

    def prepare() -> tuple[Any, ...]:
        messages = history(app, req) + input_messages(req, signer)
        chat, parallel = to_chat(req, messages)
        app[state.REASONING_CACHE].backfill(chat["messages"])
        prompt = render_chat(chat, dialect=model.dialect, default_thinking=model.thinking)
        return messages, chat, parallel, prompt

    messages, chat, parallel, prompt = await off_loop(request, prepare)
    sampling = SamplingParams(max_tokens=req.max_output_tokens, temperature=req.temperature,
                              top_p=req.top_p, logprobs=req.logprobs_count())
    response = envelope(req, new_id("resp_"), chat.get("tools", []))
    clock = request[state.CLOCK]
    streamed: web.StreamResponse | None = None
    final: dict[str, Any] | None = None
    async with app[state.LIMITER].slot(clock):  # queueing is a wait, not overhead
        turn = app[state.RUNNER].start(prompt, sampling, endpoint=ENDPOINT, clock=clock,
                                       parallel_tool_calls=parallel, dialect=model.dialect)
        await prepare_turn(request, turn)
        if req.stream:
            encoder = ResponsesStreamEncoder(response, signer)
            streamed = await stream_turn(request, turn, encoder,
                                         keepalive_s=app[state.SETTINGS].keepalive_interval_s)
            final = encoder.final  # None if the stream failed
        else:
            await drain(request, turn)
            final = response_body(turn, response, signer)
    if turn.result is not None and final is not None and req.store is not False:
        app_store(app).put(response["id"], StoredResponse(
            [*messages, output_message(turn.result)], final,
            listed_input_items(body["input"])))
    if streamed is not None:
        return streamed
    assert final is not None
    return web.json_response(final)


def _not_found(response_id: str) -> ApiError:
    return ApiError(404, f"Response with id {response_id!r} not found (responses are kept in "
                    "memory for a bounded time, and only when stored; see the README)",
                    param="response_id", code="response_not_found")


async def retrieve(request: web.Request) -> web.Response:
    """GET /v1/responses/{id}: the stored response as it was returned (no replay stream)."""
    response_id = request.match_info["response_id"]
    if request.query.get("stream", "false").lower() == "true":
        raise ApiError(400, "stream=true is not supported on GET /v1/responses/{id}; the "
                       "stored response is returned whole", param="stream")
    entry = stored(request.app, response_id)
    if entry is None:
        raise _not_found(response_id)
    return web.json_response(entry.response)


async def delete(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    if stored(request.app, response_id) is None:
        raise _not_found(response_id)
    app_store(request.app).delete(response_id)
    return web.json_response({"id": response_id, "object": "response.deleted", "deleted": True})


async def list_input_items(request: web.Request) -> web.Response:
    """GET /v1/responses/{id}/input_items: this response's input items, a cursor page
    (`limit` 1-100, default 20; `order` desc by default, as OpenAI; `after` an item id)."""
    response_id = request.match_info["response_id"]
    query = request.query
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ApiError(400, f"limit must be an integer from 1 to {MAX_LIST_LIMIT}", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "order must be 'asc' or 'desc'", param="order")
    entry = stored(request.app, response_id)
    if entry is None:
        raise _not_found(response_id)
    items = entry.input_items if order == "asc" else entry.input_items[::-1]
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ApiError(400, f"no input item with id {after!r} in this response",
                           param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return web.json_response({
        "object": "list", "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    })
